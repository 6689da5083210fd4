// medssl::augment, CUDA kernel: one thread block per view, one launch per batch.
// A block owns a whole view, so the contrast mean (a per-view reduction) and the two blur passes only need
// __syncthreads between phases, not extra launches:
//   phase 1  crop + resize + flip + brightness, per pixel; block-reduce the luma sum for the contrast mean
//   phase 2  contrast, saturation, hue, grayscale in place (only when the view jitters or grays)
//   phase 3  blur: horizontal pass into scratch, vertical pass fused with solarize + normalize
//            (no blur: solarize + normalize in place)
// The per-pixel math is shared with the CPU kernel through augment.h; checks live in augment.cpp.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>

#include "augment.h"

namespace medssl {

Norm check_inputs(const at::Tensor& images, const at::Tensor& params, int64_t size, at::ArrayRef<double> mean,
                  at::ArrayRef<double> std, int64_t blur_kernel, std::optional<at::ScalarType> dtype);

constexpr int THREADS = 256;

// work and scratch are float32 (V*B, C, S, S) buffers; out is the result in T (float or bfloat16).
template <int C, typename T>
__global__ void augment_kernel(const uint8_t* __restrict__ images, const float* __restrict__ params,
                               T* __restrict__ out, float* __restrict__ work, float* __restrict__ scratch, int B,
                               int H, int W, int S, int K, Norm norm) {
  extern __shared__ float taps[];  // K blur weights
  __shared__ float warp_sums[THREADS / 32];
  __shared__ float p[P];
  const int m = blockIdx.x;  // view index: view v of image b is m = v * B + b
  if (threadIdx.x < P) p[threadIdx.x] = params[(int64_t)m * P + threadIdx.x];
  __syncthreads();
  const uint8_t* img = images + (int64_t)(m % B) * C * H * W;
  const int SS = S * S, HW = H * W;
  float* dst = work + (int64_t)m * C * SS;  // this view's float working copy
  float* mid = scratch + (int64_t)m * C * SS;
  T* res = out + (int64_t)m * C * SS;
  const Box box = crop_box(p, H, W);  // clamped: memory-safe for any params
  const int top = box.top, left = box.left, h = box.h, w = box.w;
  const bool flip = p[FLIP] > 0.5f, jitter = p[JITTER] > 0.5f;
  const float bright = jitter ? p[BRIGHT] : 1.f;

  // phase 1: crop + resize + flip + brightness; each thread sums the luma of its pixels
  float lum = 0.f;
  for (int i = threadIdx.x; i < SS; i += blockDim.x) {
    const int y = i / S, x = i - y * S;
    int y0, y1, x0, x1;
    float wy, wx;
    resize_tap(y, top, h, S, y0, y1, wy);
    resize_tap(flip ? S - 1 - x : x, left, w, S, x0, x1, wx);
    float v[3];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const uint8_t* ch = img + c * HW;
      float a = ch[y0 * W + x0] * (1.f - wy) + ch[y1 * W + x0] * wy;
      float b = ch[y0 * W + x1] * (1.f - wy) + ch[y1 * W + x1] * wy;
      v[c] = (a * (1.f - wx) + b * wx) / 255.f;
      if (jitter) v[c] = clamp01(v[c] * bright);
      dst[c * SS + i] = v[c];
    }
    lum += C == 3 ? luma(v[0], v[1], v[2]) : v[0];
  }
  // block reduction: warp shuffles, then the first warp adds the per-warp sums
  for (int o = 16; o > 0; o >>= 1) lum += __shfl_down_sync(0xffffffff, lum, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = lum;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffff, s, o);
    if (threadIdx.x == 0) warp_sums[0] = s;
  }
  __syncthreads();
  const float mean = warp_sums[0] / (float)SS;

  // phase 2: the rest of the colour pipeline, per pixel, in place (same pixel-to-thread map as phase 1)
  if (jitter && C == 1) {
    for (int i = threadIdx.x; i < SS; i += blockDim.x) dst[i] = contrast1(dst[i], p[CONTRAST], mean);
  } else if (C == 3 && (jitter || p[GRAY] > 0.5f)) {
    const bool gray = p[GRAY] > 0.5f;
    for (int i = threadIdx.x; i < SS; i += blockDim.x) {
      float r = dst[i], g = dst[SS + i], b = dst[2 * SS + i];
      Rgb o = jitter ? jitter_rgb(r, g, b, p[CONTRAST], p[SAT], p[HUE], mean) : Rgb{r, g, b};
      if (gray) o.r = o.g = o.b = luma(o.r, o.g, o.b);
      dst[i] = o.r;
      dst[SS + i] = o.g;
      dst[2 * SS + i] = o.b;
    }
  }

  // phase 3: separable blur (reflect padding) or straight to solarize + normalize
  const bool sol = p[SOLARIZE] > 0.5f;
  if (p[BLUR] > 0.5f) {
    const int r = K / 2;
    if (threadIdx.x == 0) {
      float total = 0.f;
      for (int k = 0; k < K; ++k) {
        float t = (float)(k - r) / p[SIGMA];
        taps[k] = expf(-0.5f * t * t);
        total += taps[k];
      }
      for (int k = 0; k < K; ++k) taps[k] /= total;
    }
    __syncthreads();  // taps ready, and phase 2 writes visible to the whole block
    for (int i = threadIdx.x; i < C * SS; i += blockDim.x) {
      const int c = i / SS, y = (i - c * SS) / S, x = i - c * SS - y * S;
      const float* row = dst + c * SS + y * S;
      float acc = 0.f;
      for (int k = 0; k < K; ++k) acc += taps[k] * row[reflect(x + k - r, S)];
      mid[i] = acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < C * SS; i += blockDim.x) {
      const int c = i / SS, y = (i - c * SS) / S, x = i - c * SS - y * S;
      const float* col = mid + c * SS + x;
      float acc = 0.f;
      for (int k = 0; k < K; ++k) acc += taps[k] * col[reflect(y + k - r, S) * S];
      res[i] = (T)finish(acc, sol, norm, c);
    }
  } else {
    __syncthreads();
    for (int i = threadIdx.x; i < C * SS; i += blockDim.x) res[i] = (T)finish(dst[i], sol, norm, i / SS);
  }
}

at::Tensor augment_cuda(const at::Tensor& images, const at::Tensor& params, int64_t size, at::ArrayRef<double> mean,
                        at::ArrayRef<double> std, int64_t blur_kernel, std::optional<at::ScalarType> dtype) {
  const Norm norm = check_inputs(images, params, size, mean, std, blur_kernel, dtype);
  TORCH_CHECK(images.is_cuda(), "medssl::augment (CUDA kernel): images must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(images.device());
  const int64_t V = params.size(0), B = images.size(0), C = images.size(1);
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  at::Tensor out = at::empty({V, B, C, size, size}, images.options().dtype(out_type));
  // float32 working buffers (the caching allocator makes these cheap): colour result, horizontal blur pass
  at::Tensor work = at::empty({V, B, C, size, size}, images.options().dtype(at::kFloat));
  at::Tensor scratch = at::empty_like(work);
  const int64_t views = V * B;
  TORCH_CHECK(views <= 0x7fffffff, "medssl::augment: too many views for one launch: ", views);
  const size_t smem = blur_kernel * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto kernel, auto* dst) {
    kernel<<<(unsigned)views, THREADS, smem, stream>>>(images.data_ptr<uint8_t>(), params.data_ptr<float>(), dst,
                                                        work.data_ptr<float>(), scratch.data_ptr<float>(), (int)B,
                                                        (int)images.size(2), (int)images.size(3), (int)size,
                                                        (int)blur_kernel, norm);
  };
  if (out_type == at::kBFloat16) {
    auto* dst = out.data_ptr<c10::BFloat16>();
    C == 1 ? launch(augment_kernel<1, c10::BFloat16>, dst) : launch(augment_kernel<3, c10::BFloat16>, dst);
  } else {
    auto* dst = out.data_ptr<float>();
    C == 1 ? launch(augment_kernel<1, float>, dst) : launch(augment_kernel<3, float>, dst);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace medssl

TORCH_LIBRARY_IMPL(medssl, CUDA, m) { m.impl("augment", &medssl::augment_cuda); }

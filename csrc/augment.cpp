// medssl::augment: batched multi-view augmentation of uint8 images with per-view parameters.
// This file holds the input checks, the CPU kernel (parallel over views), and the op schema + CPU registration.
// The CUDA kernel and its registration are in augment.cu; the semantics are specified by augment_reference
// in augment.py, and the per-pixel math shared by both kernels is in augment.h.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "augment.h"

namespace medssl {

// Checks shared with the CUDA entry point: say what was expected and what came.
Norm check_inputs(const at::Tensor& images, const at::Tensor& params, int64_t size, at::ArrayRef<double> mean,
                  at::ArrayRef<double> std, int64_t blur_kernel, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(!dtype || *dtype == at::kFloat || *dtype == at::kBFloat16,
              "medssl::augment: dtype must be float32 or bfloat16, got ", *dtype);
  TORCH_CHECK(images.scalar_type() == at::kByte, "medssl::augment: images must be uint8, got ", images.scalar_type());
  TORCH_CHECK(images.dim() == 4, "medssl::augment: images must be N x C x H x W, got ", images.dim(), " dims");
  TORCH_CHECK(images.size(1) == 1 || images.size(1) == 3, "medssl::augment: images must have 1 or 3 channels, got ",
              images.size(1));
  TORCH_CHECK(images.size(0) > 0 && images.size(2) > 0 && images.size(3) > 0,
              "medssl::augment: empty batch or image, shape ", images.sizes());
  TORCH_CHECK(images.is_contiguous(), "medssl::augment: images must be contiguous (call .contiguous())");
  TORCH_CHECK(params.scalar_type() == at::kFloat, "medssl::augment: params must be float32, got ", params.scalar_type());
  TORCH_CHECK(params.dim() == 3 && params.size(1) == images.size(0) && params.size(2) == P,
              "medssl::augment: params must be (V, ", images.size(0), ", ", P, "), got ", params.sizes());
  TORCH_CHECK(params.size(0) > 0, "medssl::augment: params has no views");
  TORCH_CHECK(params.is_contiguous(), "medssl::augment: params must be contiguous");
  TORCH_CHECK(params.device() == images.device(), "medssl::augment: params on ", params.device(), " but images on ",
              images.device());
  TORCH_CHECK(size >= 1, "medssl::augment: size must be >= 1, got ", size);
  TORCH_CHECK(blur_kernel >= 1 && blur_kernel % 2 == 1 && blur_kernel / 2 < size,
              "medssl::augment: blur_kernel must be odd with blur_kernel / 2 < size, got ", blur_kernel);
  const int64_t C = images.size(1);
  TORCH_CHECK((int64_t)mean.size() == C && (int64_t)std.size() == C, "medssl::augment: mean and std need ", C,
              " entries (one per channel), got ", mean.size(), " and ", std.size());
  Norm n{};
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK(std[c] > 0, "medssl::augment: std must be > 0, got ", std[c]);
    n.mean[c] = (float)mean[c];
    n.inv_std[c] = (float)(1.0 / std[c]);
  }
  return n;
}

// The params rules of augment.py (check_params; the layout table there), for params on the CPU: a bad row raises
// with its view, sample and field instead of computing a garbage view. CUDA params are not read back here (that
// would synchronize the stream): the kernel's crop_box keeps them memory-safe, and common.sample_params checks
// them on the CPU before the copy.
void check_params(const at::Tensor& params, int64_t H, int64_t W) {
  static const char* names[P] = {"TOP", "LEFT", "HEIGHT", "WIDTH", "FLIP", "JITTER", "BRIGHT", "CONTRAST", "SAT",
                                 "HUE", "GRAY", "BLUR", "SIGMA", "SOLARIZE"};
  const float* p = params.data_ptr<float>();
  const int64_t B = params.size(1), M = params.size(0) * B;
  for (int64_t m = 0; m < M; ++m) {
    const float* r = p + m * P;
    auto rule = [&](int col, bool ok, const char* expected) {
      TORCH_CHECK(ok, "augment: params[", m / B, ", ", m % B, ", ", names[col], "] = ", r[col], ": expected ",
                  expected);
    };
    for (int col = 0; col < P; ++col) rule(col, finite_bits(r[col]), "a finite number");
    for (int col : {TOP, LEFT, HEIGHT, WIDTH}) rule(col, r[col] == std::floor(r[col]), "an integer");
    rule(HEIGHT, r[HEIGHT] >= 1 && r[HEIGHT] <= H, "1 <= HEIGHT <= image height");
    rule(WIDTH, r[WIDTH] >= 1 && r[WIDTH] <= W, "1 <= WIDTH <= image width");
    rule(TOP, r[TOP] >= 0 && r[TOP] + r[HEIGHT] <= H, "0 <= TOP and TOP + HEIGHT <= image height");
    rule(LEFT, r[LEFT] >= 0 && r[LEFT] + r[WIDTH] <= W, "0 <= LEFT and LEFT + WIDTH <= image width");
    for (int col : {FLIP, JITTER, GRAY, BLUR, SOLARIZE}) rule(col, r[col] == 0.f || r[col] == 1.f, "0 or 1");
    rule(SIGMA, r[BLUR] == 0.f || r[SIGMA] > 0.f, "SIGMA > 0 where BLUR is 1");
    for (int col : {BRIGHT, CONTRAST, SAT}) rule(col, r[col] >= 0.f, ">= 0 (a factor)");
  }
}

// Per-thread scratch, allocated once per parallel chunk rather than once per view.
struct Scratch {
  std::vector<float> buf, mid, wx, taps, pad, row;
  std::vector<int> x0, x1;
  Scratch(int C, int S, int K, int W)
      : buf(C * S * S), mid(C * S * S), wx(S), taps(K), pad(std::max(S + K, W)), row(S), x0(S), x1(S) {}
};

// One view: crop+resize+flip+brightness (and the contrast mean) -> colour -> blur -> solarize+normalize.
// Inner loops run along rows with unit stride so the compiler can vectorize the blur and the final pass.
// T is the output type (float or c10::BFloat16); all arithmetic is float32, T only at the final store.
template <int C, typename T>
void augment_view(const uint8_t* img, int H, int W, const float* p, int S, int K, const Norm& norm, Scratch& s,
                  T* out) {
  const Box box = crop_box(p, H, W);  // clamped: memory-safe for any params
  const int top = box.top, left = box.left, h = box.h, w = box.w;
  const bool flip = p[FLIP] > 0.5f, jitter = p[JITTER] > 0.5f;
  const float bright = jitter ? p[BRIGHT] : 1.f;
  int* x0 = s.x0.data();
  int* x1 = s.x1.data();
  float* wx = s.wx.data();
  float* buf = s.buf.data();
  for (int x = 0; x < S; ++x) resize_tap(flip ? S - 1 - x : x, left, w, S, x0[x], x1[x], wx[x]);
  // crop + resize, rows first as the reference: blend the two source rows of each output row into a float row
  // of the crop window (unit stride, vectorizes), then gather the two taps of each output column from it
  const int HW = H * W, SS = S * S;
  float* win = s.pad.data();  // w <= W floats (pad holds max(S + K, W))
  for (int c = 0; c < C; ++c) {
    for (int y = 0; y < S; ++y) {
      int y0, y1;
      float wy;
      resize_tap(y, top, h, S, y0, y1, wy);
      const uint8_t* r0 = img + c * HW + y0 * W + left;
      const uint8_t* r1 = img + c * HW + y1 * W + left;
#pragma omp simd
      for (int j = 0; j < w; ++j) win[j] = (float)r0[j] * (1.f - wy) + (float)r1[j] * wy;
      float* dst = buf + c * SS + y * S;
#pragma omp simd
      for (int x = 0; x < S; ++x) {
        float v = (win[x0[x] - left] * (1.f - wx[x]) + win[x1[x] - left] * wx[x]) / 255.f;
        dst[x] = jitter ? clamp01(v * bright) : v;
      }
    }
  }
  double lum_sum = 0.0;  // the contrast mean: luma of the view after brightness, as the reference
  for (int y = 0; y < S; ++y) {
    float row = 0.f;
    const float* R = buf + y * S;
    if (C == 3) {
      const float* G = R + SS;
      const float* Bl = R + 2 * SS;
      for (int x = 0; x < S; ++x) row += luma(R[x], G[x], Bl[x]);
    } else {
      for (int x = 0; x < S; ++x) row += R[x];
    }
    lum_sum += row;
  }
  const float mean = (float)(lum_sum / SS);
  if (jitter && C == 1) {  // gray images: only the contrast step is not a no-op
    const float c = p[CONTRAST];
#pragma omp simd
    for (int i = 0; i < SS; ++i) buf[i] = contrast1(buf[i], c, mean);
  } else if (C == 3 && (jitter || p[GRAY] > 0.5f)) {
    const float c = p[CONTRAST], sat = p[SAT], hue = p[HUE];
    const bool gray = p[GRAY] > 0.5f;
    float* R = buf;
    float* G = buf + SS;
    float* Bl = buf + 2 * SS;
#pragma omp simd
    for (int i = 0; i < SS; ++i) {
      Rgb o = jitter ? jitter_rgb(R[i], G[i], Bl[i], c, sat, hue, mean) : Rgb{R[i], G[i], Bl[i]};
      if (gray) o.r = o.g = o.b = luma(o.r, o.g, o.b);
      R[i] = o.r;
      G[i] = o.g;
      Bl[i] = o.b;
    }
  }
  const bool sol = p[SOLARIZE] > 0.5f;
  if (p[BLUR] > 0.5f) {
    const int r = K / 2;
    float* k = s.taps.data();
    float total = 0.f;
    for (int i = 0; i < K; ++i) {
      float t = (float)(i - r) / p[SIGMA];
      k[i] = std::exp(-0.5f * t * t);
      total += k[i];
    }
    for (int i = 0; i < K; ++i) k[i] /= total;
    float* pad = s.pad.data();
    for (int c = 0; c < C; ++c) {
      const float* src = buf + c * SS;
      float* mid = s.mid.data() + c * SS;
      for (int y = 0; y < S; ++y) {  // horizontal pass: reflect-pad the row once, then a plain 1-D convolution
        const float* row = src + y * S;
        for (int x = -r; x < S + r; ++x) pad[x + r] = row[reflect(x, S)];
        float* dst = mid + y * S;
        for (int x = 0; x < S; ++x) dst[x] = 0.f;
        for (int i = 0; i < K; ++i)
          for (int x = 0; x < S; ++x) dst[x] += k[i] * pad[x + i];
      }
      float* acc = s.row.data();
      for (int y = 0; y < S; ++y) {  // vertical pass as weighted sums of whole rows, then solarize + normalize
        for (int x = 0; x < S; ++x) acc[x] = 0.f;
        for (int i = 0; i < K; ++i) {
          const float* row = mid + reflect(y + i - r, S) * S;
          for (int x = 0; x < S; ++x) acc[x] += k[i] * row[x];
        }
        T* dst = out + c * SS + y * S;
        for (int x = 0; x < S; ++x) dst[x] = (T)finish(acc[x], sol, norm, c);
      }
    }
  } else {
    for (int c = 0; c < C; ++c)
      for (int i = 0; i < SS; ++i) out[c * SS + i] = (T)finish(buf[c * SS + i], sol, norm, c);
  }
}

template <typename T>
void augment_cpu_impl(const at::Tensor& images, const at::Tensor& params, int S, int K, const Norm& norm,
                      at::Tensor& out) {
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const uint8_t* img = images.data_ptr<uint8_t>();
  const float* prm = params.data_ptr<float>();
  T* dst = out.data_ptr<T>();
  const int64_t view_elems = C * S * S;
  // one task per view, chunked over threads (needs -fopenmp, see load_op); each chunk owns its scratch
  at::parallel_for(0, params.size(0) * B, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch((int)C, S, K, (int)W);
    for (int64_t m = begin; m < end; ++m) {
      const uint8_t* src = img + (m % B) * C * H * W;  // view v of image b is row m = v * B + b
      if (C == 1)
        augment_view<1, T>(src, (int)H, (int)W, prm + m * P, S, K, norm, scratch, dst + m * view_elems);
      else
        augment_view<3, T>(src, (int)H, (int)W, prm + m * P, S, K, norm, scratch, dst + m * view_elems);
    }
  });
}

at::Tensor augment_cpu(const at::Tensor& images, const at::Tensor& params, int64_t size, at::ArrayRef<double> mean,
                       at::ArrayRef<double> std, int64_t blur_kernel, std::optional<at::ScalarType> dtype) {
  const Norm norm = check_inputs(images, params, size, mean, std, blur_kernel, dtype);
  TORCH_CHECK(images.device().is_cpu(), "medssl::augment (CPU kernel): images must be on the CPU");
  check_params(params, images.size(2), images.size(3));
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  at::Tensor out = at::empty({params.size(0), images.size(0), images.size(1), size, size}, images.options().dtype(out_type));
  if (out_type == at::kBFloat16)
    augment_cpu_impl<c10::BFloat16>(images, params, (int)size, (int)blur_kernel, norm, out);
  else
    augment_cpu_impl<float>(images, params, (int)size, (int)blur_kernel, norm, out);
  return out;
}

}  // namespace medssl

TORCH_LIBRARY(medssl, m) {
  m.def("augment(Tensor images, Tensor params, int size, float[] mean, float[] std, int blur_kernel, "
        "ScalarType? dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(medssl, CPU, m) { m.impl("augment", &medssl::augment_cpu); }

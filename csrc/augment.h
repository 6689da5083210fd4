// Per-pixel math shared by the CPU kernel (augment.cpp) and the CUDA kernel (augment.cu), so the two cannot drift.
// Semantics and the params layout are documented in augment.py; augment_reference there is the specification.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MEDSSL_HD __host__ __device__ __forceinline__
#else
#define MEDSSL_HD inline
#endif

namespace medssl {

constexpr int P = 14;  // columns of one params row
enum Col { TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER, BRIGHT, CONTRAST, SAT, HUE, GRAY, BLUR, SIGMA, SOLARIZE };
constexpr float LUMA_R = 0.2989f, LUMA_G = 0.587f, LUMA_B = 0.114f;  // torchvision's rgb_to_grayscale weights

struct Norm {  // normalize constants, passed by value to the kernels
  float mean[3];
  float inv_std[3];
};

MEDSSL_HD float clamp01(float v) { return v < 0.f ? 0.f : (v > 1.f ? 1.f : v); }

// Bilinear taps for output index d of a window [start, start+len) resized to `out` (align_corners=False, the
// source coordinate clamped at 0 as torch's upsample does). Writes the two absolute indices and the weight of i1.
MEDSSL_HD void resize_tap(int d, int start, int len, int out, int& i0, int& i1, float& w) {
  float src = ((float)d + 0.5f) * ((float)len / (float)out) - 0.5f;
  src = src < 0.f ? 0.f : src;
  int f = (int)floorf(src);
  w = src - (float)f;
  int a = f < len - 1 ? f : len - 1;
  int b = f + 1 < len - 1 ? f + 1 : len - 1;
  i0 = start + a;
  i1 = start + b;
}

// Reflect padding without repeating the edge (torch 'reflect'): -1 -> 1, n -> n - 2. Needs |overhang| < n.
MEDSSL_HD int reflect(int i, int n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

// Hue rotation by `turns` through the hexcone HSV model; r, g, b in [0, 1], modified in place.
MEDSSL_HD void shift_hue(float& r, float& g, float& b, float turns) {
  float v = fmaxf(r, fmaxf(g, b));
  float lo = fminf(r, fminf(g, b));
  float chroma = v - lo;
  bool flat = chroma == 0.f;
  float s = chroma / (flat ? 1.f : v);
  float d = flat ? 1.f : chroma;
  float h = (v == r) ? (g - b) / d : ((v == g) ? 2.f + (b - r) / d : 4.f + (r - g) / d);
  if (flat) h = 0.f;
  h = h / 6.f + 1.f;
  h = h - floorf(h);  // remainder(h, 1) for h >= 0
  h = h + turns;
  h = h - floorf(h);
  float out[3];
  const float n[3] = {5.f, 3.f, 1.f};
  for (int c = 0; c < 3; ++c) {
    float k = n[c] + h * 6.f;
    k = k - 6.f * floorf(k / 6.f);
    float t = fminf(k, 4.f - k);
    t = t < 0.f ? 0.f : (t > 1.f ? 1.f : t);
    out[c] = clamp01(v - v * s * t);
  }
  r = out[0];
  g = out[1];
  b = out[2];
}

// Colour steps after brightness, for one pixel of C channels (x[c]); `mean` is the view's contrast mean.
template <int C>
MEDSSL_HD void colour(float* x, const float* p, float mean) {
  if (p[JITTER] > 0.5f) {
    float c = p[CONTRAST];
    for (int k = 0; k < C; ++k) x[k] = clamp01(c * x[k] + (1.f - c) * mean);
    if (C == 3) {
      float s = p[SAT];
      float gray = LUMA_R * x[0] + LUMA_G * x[1] + LUMA_B * x[2];
      for (int k = 0; k < C; ++k) x[k] = clamp01(s * x[k] + (1.f - s) * gray);
      shift_hue(x[0], x[1], x[2], p[HUE]);
    }
  }
  if (C == 3 && p[GRAY] > 0.5f) {
    float gray = LUMA_R * x[0] + LUMA_G * x[1] + LUMA_B * x[2];
    x[0] = x[1] = x[2] = gray;
  }
}

MEDSSL_HD float finish(float v, bool solarize, const Norm& norm, int c) {
  if (solarize && v >= 0.5f) v = 1.f - v;
  return (v - norm.mean[c]) * norm.inv_std[c];
}

}  // namespace medssl

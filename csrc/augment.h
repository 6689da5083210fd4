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

// Exponent bits not all ones: neither inf nor NaN. Read from the bits because augment.cpp is compiled with
// -ffinite-math-only, under which std::isfinite may be folded to true.
MEDSSL_HD bool finite_bits(float v) {
#ifdef __CUDA_ARCH__
  const unsigned u = __float_as_uint(v);
#else
  unsigned u;
  __builtin_memcpy(&u, &v, sizeof u);
#endif
  return (u & 0x7f800000u) != 0x7f800000u;
}

// A params value as an index in [lo, hi] for ANY float: non-finite -> lo, then clamped in float (a float -> int
// cast of 1e30 is undefined), then in int. Valid params pass unchanged; bad ones can never index out of bounds.
MEDSSL_HD int clamp_index(float v, int lo, int hi) {
  v = finite_bits(v) ? v : (float)lo;
  v = v < (float)lo ? (float)lo : (v > (float)hi ? (float)hi : v);
  const int i = (int)v;
  return i < lo ? lo : (i > hi ? hi : i);
}

// The crop box of one view inside an H x W image: 1 <= h <= H, 1 <= w <= W, 0 <= top <= H - h, 0 <= left <= W - w.
// Both kernels read pixels only through this box, so they are memory-safe whatever params hold (augment.py
// check_params rejects invalid params with a message before they get here; this is the kernels' own guard).
struct Box {
  int top, left, h, w;
};

MEDSSL_HD Box crop_box(const float* p, int H, int W) {
  Box b;
  b.h = clamp_index(p[HEIGHT], 1, H);
  b.w = clamp_index(p[WIDTH], 1, W);
  b.top = clamp_index(p[TOP], 0, H - b.h);
  b.left = clamp_index(p[LEFT], 0, W - b.w);
  return b;
}

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

// One channel of HSV -> RGB: v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1 for R, G, B.
MEDSSL_HD float hsv_channel(float n, float h6, float v, float vs) {
  float k = n + h6;
  k = k - 6.f * floorf(k * (1.f / 6.f));
  float t = fminf(fmaxf(fminf(k, 4.f - k), 0.f), 1.f);
  return clamp01(v - vs * t);
}

// Hue rotation by `turns` through the hexcone HSV model; r, g, b in [0, 1]. Values in, a struct out, no arrays
// and no early exits, so that a loop over pixels vectorizes (the selects become blends).
struct Rgb {
  float r, g, b;
};

MEDSSL_HD Rgb shift_hue(float r, float g, float b, float turns) {
  const float v = fmaxf(r, fmaxf(g, b));
  const float chroma = v - fminf(r, fminf(g, b));
  const bool flat = chroma == 0.f;  // gray pixel: hue undefined, saturation 0
  const float s = chroma / (flat ? 1.f : v);
  const float inv_d = 1.f / (flat ? 1.f : chroma);  // one division, then multiplies (within 1 ulp of dividing)
  float h = (v == r) ? (g - b) * inv_d : ((v == g) ? 2.f + (b - r) * inv_d : 4.f + (r - g) * inv_d);
  h = flat ? 0.f : h;
  h = h * (1.f / 6.f) + 1.f;
  h = h - floorf(h);  // remainder(h, 1) for h >= 0
  h = h + turns;
  h = h - floorf(h);
  const float h6 = h * 6.f, vs = v * s;
  return {hsv_channel(5.f, h6, v, vs), hsv_channel(3.f, h6, v, vs), hsv_channel(1.f, h6, v, vs)};
}

// Colour jitter after brightness, for one RGB pixel: contrast (towards the view's luma mean), saturation (towards
// the pixel's luma), hue. Gray images only take the contrast step (contrast1). Both kernels call these from pixel
// loops whose flags are hoisted, so the loops stay branch-free and vectorize.
MEDSSL_HD float luma(float r, float g, float b) { return LUMA_R * r + LUMA_G * g + LUMA_B * b; }

MEDSSL_HD float contrast1(float x, float c, float mean) { return clamp01(c * x + (1.f - c) * mean); }

MEDSSL_HD Rgb jitter_rgb(float r, float g, float b, float c, float sat, float hue, float mean) {
  r = contrast1(r, c, mean);
  g = contrast1(g, c, mean);
  b = contrast1(b, c, mean);
  const float l = luma(r, g, b);
  return shift_hue(clamp01(sat * r + (1.f - sat) * l), clamp01(sat * g + (1.f - sat) * l),
                   clamp01(sat * b + (1.f - sat) * l), hue);
}

MEDSSL_HD float finish(float v, bool solarize, const Norm& norm, int c) {
  if (solarize && v >= 0.5f) v = 1.f - v;
  return (v - norm.mean[c]) * norm.inv_std[c];
}

}  // namespace medssl

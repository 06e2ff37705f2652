// SwiGLU's activation over rows of the fused gate/up projection [rows, 2F] (gate first, then up), on the calling
// thread: the training kernels (swiglu.cpp, moe_experts.cpp) split rows among threads themselves.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace hanlin {

inline __m256 sigmoid8(__m256 g) {  // 1 / (1 + e^-g), e^-g kept inside exp8's range
  const __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(87.0f)));
  return _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(std::min(-g, 87.0f))); }

// out[n, :F] = silu(gate) * up
inline void swiglu_rows_forward(const float* GU, float* O, int64_t rows, int64_t F) {
  for (int64_t n = 0; n < rows; ++n) {
    const float* g = GU + n * 2 * F;
    const float* u = g + F;
    float* o = O + n * F;
    int64_t f = 0;
    for (; f + 8 <= F; f += 8) {
      const __m256 gv = _mm256_loadu_ps(g + f);
      _mm256_storeu_ps(o + f, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid8(gv)), _mm256_loadu_ps(u + f)));
    }
    for (; f < F; ++f) o[f] = g[f] * sigmoid(g[f]) * u[f];
  }
}

// d gate = dout * up * s * (1 + gate * (1 - s)), d up = dout * gate * s, with s = sigmoid(gate), both halves into
// DGU [rows, 2F]; the forward's output into O [rows, F] too where O is not null (what a weight gradient needs).
inline void swiglu_rows_backward(const float* DO, const float* GU, float* DGU, float* O, int64_t rows, int64_t F) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t n = 0; n < rows; ++n) {
    const float* g = GU + n * 2 * F;
    const float* u = g + F;
    const float* d = DO + n * F;
    float* dg = DGU + n * 2 * F;
    float* du = dg + F;
    float* o = O ? O + n * F : nullptr;
    int64_t f = 0;
    for (; f + 8 <= F; f += 8) {
      const __m256 gv = _mm256_loadu_ps(g + f), uv = _mm256_loadu_ps(u + f), dv = _mm256_loadu_ps(d + f);
      const __m256 s = sigmoid8(gv), ds = _mm256_mul_ps(dv, s);
      if (o) _mm256_storeu_ps(o + f, _mm256_mul_ps(_mm256_mul_ps(gv, s), uv));
      _mm256_storeu_ps(du + f, _mm256_mul_ps(ds, gv));
      const __m256 slope = _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one);
      _mm256_storeu_ps(dg + f, _mm256_mul_ps(_mm256_mul_ps(ds, uv), slope));
    }
    for (; f < F; ++f) {
      const float s = sigmoid(g[f]), ds = d[f] * s;
      if (o) o[f] = g[f] * s * u[f];
      du[f] = ds * g[f];
      dg[f] = ds * u[f] * (1.0f + g[f] * (1.0f - s));
    }
  }
}

}  // namespace hanlin

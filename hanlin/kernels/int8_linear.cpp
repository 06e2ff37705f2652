// y[n, m] = scale[m] * sum_k x[n, k] * w[m, k]  (+ bias[m]); w is int8, row-major [M, K].
// Batch-1 decode reads every weight once per token, so reading 1 byte instead of 4 per weight
// is what sets the speed. AVX2 + FMA; rows are split across PyTorch's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

static inline __m256 load8_i8(const int8_t* p) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be float32 [N, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8 && w.is_contiguous(), "w must be contiguous int8 [M, K]");
  x = x.contiguous();
  const int64_t N = x.size(0), K = x.size(1), M = w.size(0);
  TORCH_CHECK(w.size(1) == K, "shape mismatch");
  auto y = torch::empty({N, M}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t K32 = K - K % 32;
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* row = wp + m * K;
      for (int64_t n = 0; n < N; ++n) {
        const float* xr = xp + n * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t k = 0; k < K32; k += 32) {
          a0 = _mm256_fmadd_ps(load8_i8(row + k), _mm256_loadu_ps(xr + k), a0);
          a1 = _mm256_fmadd_ps(load8_i8(row + k + 8), _mm256_loadu_ps(xr + k + 8), a1);
          a2 = _mm256_fmadd_ps(load8_i8(row + k + 16), _mm256_loadu_ps(xr + k + 16), a2);
          a3 = _mm256_fmadd_ps(load8_i8(row + k + 24), _mm256_loadu_ps(xr + k + 24), a3);
        }
        float acc = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (int64_t k = K32; k < K; ++k) acc += static_cast<float>(row[k]) * xr[k];
        yp[n * M + m] = acc * sp[m] + (bp ? bp[m] : 0.0f);
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "int8-weight linear layer (AVX2)");
}

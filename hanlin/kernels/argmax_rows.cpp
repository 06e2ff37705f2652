// The first index of each row's largest value, NaN counting as the largest (torch.argmax's rule), in two vector
// passes: the row's max (and whether it has a NaN), then the first lane equal to it. ATen's CPU argmax carries an
// index through every comparison: [16, 49152] logits take 0.65 ms on one Zen 4 core, the max alone 0.04 ms.
#include "argmax_rows.h"

#include <ATen/Parallel.h>

#include "simd.h"

namespace hanlin {
namespace {

// First j in [0, n) with s[j] == target, or with s[j] a NaN where nan is set.
int64_t first_match(const float* s, int64_t n, float target, bool nan) {
  const __m256 t8 = _mm256_set1_ps(target);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(s + j);
    const __m256 hit = nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, t8, _CMP_EQ_OQ);
    const int mask = _mm256_movemask_ps(hit);
    if (mask) return j + __builtin_ctz(static_cast<unsigned>(mask));
  }
  for (; j < n; ++j) {
    if (nan ? std::isnan(s[j]) : s[j] == target) return j;
  }
  return 0;
}

int64_t argmax_row(const float* s, int64_t n) {
  __m256 top8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(s + j);
    top8 = _mm256_max_ps(top8, v);
    nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float top = hmax(top8);
  bool nan = _mm256_movemask_ps(nan8) != 0;
  for (; j < n; ++j) {
    nan = nan || std::isnan(s[j]);
    top = std::max(top, s[j]);
  }
  return first_match(s, n, top, nan);
}

}  // namespace

torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32 && x.size(1) > 0,
              "argmax_rows: x must be contiguous float32 [B, V] with V > 0");
  const int64_t B = x.size(0), V = x.size(1);
  torch::Tensor out = torch::empty({B}, x.options().dtype(torch::kLong));
  const float* X = x.data_ptr<float>();
  int64_t* O = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) O[b] = argmax_row(X + b * V, V);
  });
  return out;
}

void register_argmax_rows(pybind11::module& m) {
  m.def("argmax_rows", &argmax_rows, pybind11::arg("x"));
}

}  // namespace hanlin

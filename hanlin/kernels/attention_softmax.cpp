// Softmax over attention scores in place, for attention computed as two batched GEMMs around it (short
// bidirectional sequences, where that beats a flash-attention loop): see hanlin.models.bert.attention.
#include "attention_softmax.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace hanlin {
namespace {

template <typename T>
void softmax_row(T* row, int64_t n, int64_t valid, float scale) {
  float buffer[1024];
  float* x = buffer;
  std::vector<float> large;
  if (n > 1024) {
    large.resize(n);
    x = large.data();
  }
  const __m256 scale8 = _mm256_set1_ps(scale);
  __m256 max8 = _mm256_set1_ps(-INFINITY);
  int64_t k = 0;
  for (; k + 8 <= valid; k += 8) {
    const __m256 v = _mm256_mul_ps(load8(row + k), scale8);
    _mm256_storeu_ps(x + k, v);
    max8 = _mm256_max_ps(max8, v);
  }
  float top = hmax(max8);
  for (; k < valid; ++k) {
    x[k] = to_float(row[k]) * scale;
    top = std::max(top, x[k]);
  }
  const float sum = exp_shifted_(x, valid, top);
  for (k = valid; k < n; ++k) x[k] = 0.0f;
  const __m256 inv8 = _mm256_set1_ps(1.0f / sum);
  k = 0;
  for (; k + 8 <= n; k += 8) store8(row + k, _mm256_mul_ps(_mm256_loadu_ps(x + k), inv8));
  for (; k < n; ++k) row[k] = static_cast<T>(x[k] / sum);
}

}  // namespace

// In place over scores [B, H, Tq, Tk] (contiguous, float32 or bfloat16): softmax(scale * scores) along the last
// dimension, keys at or beyond key_lengths[b] (int64 [B], optional) masked out.
void attention_softmax_(torch::Tensor& scores, double scale, const c10::optional<torch::Tensor>& key_lengths) {
  TORCH_CHECK(scores.dim() == 4 && scores.is_contiguous(), "attention_softmax_: contiguous scores [B, H, Tq, Tk]");
  TORCH_CHECK(scores.scalar_type() == torch::kFloat32 || scores.scalar_type() == torch::kBFloat16,
              "attention_softmax_: scores must be float32 or bfloat16");
  const int64_t B = scores.size(0), Tk = scores.size(3), rows_per_batch = scores.size(1) * scores.size(2);
  const int64_t* lengths = nullptr;
  torch::Tensor lengths_tensor;
  if (key_lengths) {
    lengths_tensor = key_lengths->to(torch::kInt64).contiguous();
    TORCH_CHECK(lengths_tensor.numel() == B, "attention_softmax_: key_lengths must hold one length per batch row");
    lengths = lengths_tensor.data_ptr<int64_t>();
  }
  const bool bf16 = scores.scalar_type() == torch::kBFloat16;
  void* base = scores.data_ptr();
  at::parallel_for(0, B * rows_per_batch, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t valid = lengths ? std::min<int64_t>(std::max<int64_t>(lengths[r / rows_per_batch], 1), Tk) : Tk;
      if (bf16) softmax_row(static_cast<c10::BFloat16*>(base) + r * Tk, Tk, valid, static_cast<float>(scale));
      else softmax_row(static_cast<float*>(base) + r * Tk, Tk, valid, static_cast<float>(scale));
    }
  });
}

void register_attention_softmax(pybind11::module& m) {
  namespace py = pybind11;
  m.def("attention_softmax_", &attention_softmax_, py::arg("scores"), py::arg("scale"), py::arg("key_lengths") = py::none());
}

}  // namespace hanlin

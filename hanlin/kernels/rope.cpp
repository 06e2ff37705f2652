// RoPE for training over the fused q/k/v projection's rows [B, T, (H + 2 Hkv) D], forward and backward in one pass
// each: q and k rotated (x cos + rotate_half(x) sin), v copied out, each into [B, T, heads, D] memory returned as
// [B, heads, T, D] views; backward writes the whole projection's gradient at once. PyTorch's ops take a mul, a roll,
// a mul and an add per tensor each way, and the split's backward a cat. See hanlin.models.rope.rope_qkv.
#include "rope.h"

#include <ATen/Parallel.h>

#include <vector>

#include "simd.h"

namespace hanlin {
namespace {

// One [B, heads, T, D] operand with a contiguous last dimension.
struct Heads {
  float* data;
  int64_t sB, sH, sT;
  explicit Heads(const torch::Tensor& t) : data(t.data_ptr<float>()), sB(t.stride(0)), sH(t.stride(1)), sT(t.stride(2)) {}
  float* at(int64_t b, int64_t h, int64_t t) const { return data + b * sB + h * sH + t * sT; }
};

// out[i] = x[i] c[i] - x[i + half] s[i], out[i + half] = x[i + half] c[i + half] + x[i] s[i + half] (i < half).
// kTranspose: the rotation's transpose, which takes a gradient back: out[i] = x[i] c[i] + x[i + half] s[i + half],
// out[i + half] = x[i + half] c[i + half] - x[i] s[i].
template <bool kTranspose>
inline void rotate(const float* x, float* out, const float* c, const float* s, int64_t D) {
  const int64_t half = D / 2;
  const float* s_lo = kTranspose ? s + half : s;  // times x[i + half], into out[i]
  const float* s_hi = kTranspose ? s : s + half;  // times x[i], into out[i + half]
  const float sign = kTranspose ? 1.0f : -1.0f;   // of out[i]'s sine term; out[i + half]'s has the other
  int64_t i = 0;
  if (half % 8 == 0) {
    const __m256 sign8 = _mm256_set1_ps(sign), minus_sign8 = _mm256_set1_ps(-sign);
    for (; i < half; i += 8) {
      const __m256 lo = _mm256_loadu_ps(x + i), hi = _mm256_loadu_ps(x + half + i);
      _mm256_storeu_ps(out + i, _mm256_fmadd_ps(hi, _mm256_mul_ps(sign8, _mm256_loadu_ps(s_lo + i)),
                                                _mm256_mul_ps(lo, _mm256_loadu_ps(c + i))));
      _mm256_storeu_ps(out + half + i, _mm256_fmadd_ps(lo, _mm256_mul_ps(minus_sign8, _mm256_loadu_ps(s_hi + i)),
                                                       _mm256_mul_ps(hi, _mm256_loadu_ps(c + half + i))));
    }
  }
  for (; i < half; ++i) {
    const float lo = x[i], hi = x[half + i];
    out[i] = lo * c[i] + sign * hi * s_lo[i];
    out[half + i] = hi * c[half + i] - sign * lo * s_hi[i];
  }
}

struct Layout {
  int64_t B, T, H, Hkv, D, W;
};

Layout check(const torch::Tensor& cos, const torch::Tensor& sin, int64_t B, int64_t T, int64_t H, int64_t Hkv) {
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(0) == B && cos.size(1) == T &&
                  cos.stride(2) == 1 && sin.stride(2) == 1 && cos.scalar_type() == torch::kFloat32 &&
                  sin.scalar_type() == torch::kFloat32,
              "rope: cos and sin must be float32 [B, T, D] with a contiguous last dimension");
  const int64_t D = cos.size(2);
  TORCH_CHECK(D % 2 == 0 && H > 0 && Hkv > 0, "rope: an even head dimension and at least one head");
  return {B, T, H, Hkv, D, (H + 2 * Hkv) * D};
}

}  // namespace

std::vector<torch::Tensor> rope_qkv_forward(const torch::Tensor& qkv, const torch::Tensor& cos,
                                            const torch::Tensor& sin, int64_t H, int64_t Hkv) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && qkv.scalar_type() == torch::kFloat32,
              "rope: qkv must be contiguous float32 [B, T, (H + 2 Hkv) D]");
  const Layout L = check(cos, sin, qkv.size(0), qkv.size(1), H, Hkv);
  TORCH_CHECK(qkv.size(2) == L.W, "rope: qkv's last dimension must be (H + 2 Hkv) D");
  torch::Tensor q = torch::empty({L.B, L.T, H, L.D}, qkv.options());
  torch::Tensor k = torch::empty({L.B, L.T, Hkv, L.D}, qkv.options());
  torch::Tensor v = torch::empty({L.B, L.T, Hkv, L.D}, qkv.options());
  const float* X = qkv.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  float *Q = q.data_ptr<float>(), *K = k.data_ptr<float>(), *V = v.data_ptr<float>();
  const int64_t cB = cos.stride(0), cT = cos.stride(1), sB = sin.stride(0), sT = sin.stride(1);
  at::parallel_for(0, L.B * L.T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / L.T, t = row % L.T;
      const float* x = X + row * L.W;
      const float* c = C + b * cB + t * cT;
      const float* s = S + b * sB + t * sT;
      for (int64_t h = 0; h < H; ++h) rotate<false>(x + h * L.D, Q + (row * H + h) * L.D, c, s, L.D);
      for (int64_t h = 0; h < Hkv; ++h) rotate<false>(x + (H + h) * L.D, K + (row * Hkv + h) * L.D, c, s, L.D);
      std::copy_n(x + (H + Hkv) * L.D, Hkv * L.D, V + row * Hkv * L.D);
    }
  });
  return {q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)};
}

// dq [B, H, T, D], dk and dv [B, Hkv, T, D] (any strides, last dimension contiguous) -> d qkv [B, T, W].
torch::Tensor rope_qkv_backward(const torch::Tensor& dq, const torch::Tensor& dk, const torch::Tensor& dv,
                                const torch::Tensor& cos, const torch::Tensor& sin) {
  for (const torch::Tensor* t : {&dq, &dk, &dv}) {
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1 && t->scalar_type() == torch::kFloat32,
                "rope: gradients must be float32 [B, heads, T, D] with a contiguous last dimension");
  }
  const int64_t H = dq.size(1), Hkv = dk.size(1);
  const Layout L = check(cos, sin, dq.size(0), dq.size(2), H, Hkv);
  TORCH_CHECK(dq.size(3) == L.D && dk.sizes() == dv.sizes() && dk.size(0) == L.B && dk.size(2) == L.T &&
                  dk.size(3) == L.D,
              "rope: gradient shapes do not match");
  torch::Tensor grad = torch::empty({L.B, L.T, L.W}, dq.options());
  const Heads gQ(dq), gK(dk), gV(dv);
  float* G = grad.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  const int64_t cB = cos.stride(0), cT = cos.stride(1), sB = sin.stride(0), sT = sin.stride(1);
  at::parallel_for(0, L.B * L.T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / L.T, t = row % L.T;
      float* g = G + row * L.W;
      const float* c = C + b * cB + t * cT;
      const float* s = S + b * sB + t * sT;
      for (int64_t h = 0; h < H; ++h) rotate<true>(gQ.at(b, h, t), g + h * L.D, c, s, L.D);
      for (int64_t h = 0; h < Hkv; ++h) rotate<true>(gK.at(b, h, t), g + (H + h) * L.D, c, s, L.D);
      for (int64_t h = 0; h < Hkv; ++h) std::copy_n(gV.at(b, h, t), L.D, g + (H + Hkv + h) * L.D);
    }
  });
  return grad;
}

void register_rope(pybind11::module& m) {
  namespace py = pybind11;
  m.def("rope_qkv_forward", &rope_qkv_forward, py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("heads"),
        py::arg("kv_heads"));
  m.def("rope_qkv_backward", &rope_qkv_backward, py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("cos"),
        py::arg("sin"));
}

}  // namespace hanlin

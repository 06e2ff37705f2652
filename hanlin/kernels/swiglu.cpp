// SwiGLU's activation for training over the fused gate/up projection's rows [N, 2F] (gate first, then up):
// forward silu(gate) * up; backward writes the gradient of both halves into one [N, 2F] tensor, where PyTorch's
// split, silu and mul each run their own backward and a cat joins the two halves. See hanlin.models.layers.SwiGLU.
#include "swiglu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "simd.h"

namespace hanlin {
namespace {

inline __m256 sigmoid8(__m256 g) {  // 1 / (1 + e^-g), e^-g kept inside exp8's range
  const __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(87.0f)));
  return _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(std::min(-g, 87.0f))); }

void check_gate_up(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.scalar_type() == torch::kFloat32 &&
                  gate_up.size(1) % 2 == 0,
              "swiglu: gate_up must be contiguous float32 rows [N, 2F]");
}

}  // namespace

torch::Tensor swiglu_forward(const torch::Tensor& gate_up) {
  check_gate_up(gate_up);
  const int64_t N = gate_up.size(0), F = gate_up.size(1) / 2;
  torch::Tensor out = torch::empty({N, F}, gate_up.options());
  const float* GU = gate_up.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
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
  });
  return out;
}

// d gate = dout * up * s * (1 + gate * (1 - s)), d up = dout * gate * s, with s = sigmoid(gate).
torch::Tensor swiglu_backward(const torch::Tensor& grad_out, const torch::Tensor& gate_up) {
  check_gate_up(gate_up);
  const int64_t N = gate_up.size(0), F = gate_up.size(1) / 2;
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.size(0) == N && grad_out.size(1) == F,
              "swiglu: grad_out must be contiguous [N, F]");
  torch::Tensor grad = torch::empty_like(gate_up);
  const float* GU = gate_up.data_ptr<float>();
  const float* DO = grad_out.data_ptr<float>();
  float* DGU = grad.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t n = begin; n < end; ++n) {
      const float* g = GU + n * 2 * F;
      const float* u = g + F;
      const float* d = DO + n * F;
      float* dg = DGU + n * 2 * F;
      float* du = dg + F;
      int64_t f = 0;
      for (; f + 8 <= F; f += 8) {
        const __m256 gv = _mm256_loadu_ps(g + f), dv = _mm256_loadu_ps(d + f), s = sigmoid8(gv);
        const __m256 ds = _mm256_mul_ps(dv, s);
        _mm256_storeu_ps(du + f, _mm256_mul_ps(ds, gv));
        const __m256 slope = _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one);
        _mm256_storeu_ps(dg + f, _mm256_mul_ps(_mm256_mul_ps(ds, _mm256_loadu_ps(u + f)), slope));
      }
      for (; f < F; ++f) {
        const float s = sigmoid(g[f]), ds = d[f] * s;
        du[f] = ds * g[f];
        dg[f] = ds * u[f] * (1.0f + g[f] * (1.0f - s));
      }
    }
  });
  return grad;
}

void register_swiglu(pybind11::module& m) {
  namespace py = pybind11;
  m.def("swiglu_forward", &swiglu_forward, py::arg("gate_up"));
  m.def("swiglu_backward", &swiglu_backward, py::arg("grad_out"), py::arg("gate_up"));
}

}  // namespace hanlin

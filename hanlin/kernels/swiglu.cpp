// SwiGLU's activation for training over the fused gate/up projection's rows [N, 2F] (gate first, then up):
// forward silu(gate) * up; backward writes the gradient of both halves into one [N, 2F] tensor, where PyTorch's
// split, silu and mul each run their own backward and a cat joins the two halves. See hanlin.models.layers.SwiGLU.
#include "swiglu.h"

#include <ATen/Parallel.h>

#include "swiglu_rows.h"

namespace hanlin {
namespace {

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
    swiglu_rows_forward(GU + begin * 2 * F, O + begin * F, end - begin, F);
  });
  return out;
}

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
    swiglu_rows_backward(DO + begin * F, GU + begin * 2 * F, DGU + begin * 2 * F, nullptr, end - begin, F);
  });
  return grad;
}

void register_swiglu(pybind11::module& m) {
  namespace py = pybind11;
  m.def("swiglu_forward", &swiglu_forward, py::arg("gate_up"));
  m.def("swiglu_backward", &swiglu_backward, py::arg("grad_out"), py::arg("gate_up"));
}

}  // namespace hanlin

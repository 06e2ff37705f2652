// MoE experts in int8 (the w8a8 scheme): the slots sorted by expert, each active expert's rows through
// gate/up GEMM -> SwiGLU + quantize -> down GEMM (int8_rows.h), written into one output. One call per layer
// instead of a dozen Python-level ops per expert.
#include "int8_experts.h"

#include <vector>

#include "int8_rows.h"

namespace hanlin {
namespace {

// One expert's two int8 weights [N, K] and the terms of their outputs (int8_rows.h).
struct Int8Expert {
  torch::Tensor gate_up, gate_up_scale, gate_up_colsum, gate_up_bias;
  torch::Tensor down, down_scale, down_colsum, down_bias;
};

class Int8Experts {
 public:
  explicit Int8Experts(const std::vector<std::vector<torch::Tensor>>& experts) {
    for (const auto& t : experts) {
      TORCH_CHECK(t.size() == 8, "each expert: gate_up, its w_scale, colsum, bias; down, its w_scale, colsum, bias");
      TORCH_CHECK(t[0].scalar_type() == torch::kInt8 && t[4].scalar_type() == torch::kInt8, "int8 expert weights");
      TORCH_CHECK(t[0].size(0) == 2 * t[4].size(1), "gate_up must have 2 * the down projection's inputs");
      experts_.push_back(Int8Expert{t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]});
    }
  }

  // q [S, D] int8 with scale, zero [S]: the slots sorted by expert; ids[i] runs counts[i] consecutive slots.
  torch::Tensor forward(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& zero,
                        const std::vector<int64_t>& ids, const std::vector<int64_t>& counts) const {
    TORCH_CHECK(ids.size() == counts.size(), "one count per expert id");
    const int64_t D = experts_.empty() ? 0 : experts_[0].down.size(0);
    auto out = torch::empty({q.size(0), D}, q.options().dtype(torch::kFloat32));
    int64_t start = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      TORCH_CHECK(ids[i] >= 0 && ids[i] < static_cast<int64_t>(experts_.size()), "expert id out of range");
      const Int8Expert& e = experts_[ids[i]];
      const int64_t count = counts[i];
      TORCH_CHECK(count > 0 && start + count <= q.size(0), "counts must be positive and cover at most the slots");
      auto acc = at::_int_mm(q.narrow(0, start, count), e.gate_up.t());
      auto [hq, hs, hz] = int8_linear_swiglu_quantize(acc, scale.narrow(0, start, count), zero.narrow(0, start, count),
                                                      e.gate_up_scale, e.gate_up_colsum, e.gate_up_bias);
      auto rows = out.narrow(0, start, count);
      int8_linear_output_into(at::_int_mm(hq, e.down.t()), hs, hz, e.down_scale, e.down_colsum, e.down_bias, rows);
      start += count;
    }
    return out.narrow(0, 0, start);
  }

 private:
  std::vector<Int8Expert> experts_;
};

}  // namespace

void register_int8_experts(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Int8Experts>(m, "Int8Experts")
      .def(py::init<const std::vector<std::vector<torch::Tensor>>&>(), py::arg("experts"))
      .def("forward", &Int8Experts::forward, py::arg("q"), py::arg("scale"), py::arg("zero"), py::arg("ids"),
           py::arg("counts"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace hanlin

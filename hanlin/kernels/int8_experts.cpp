// MoE experts in int8 (the w8a8 scheme): the slots sorted by expert, each active expert's rows through
// gate/up GEMM -> SwiGLU + quantize -> down GEMM (int8_rows.h), written into one output. One call per layer
// instead of a dozen Python-level ops per expert.
#include "int8_experts.h"

#include <algorithm>
#include <atomic>
#include <numeric>
#include <utility>
#include <vector>

#include "int8_rows.h"
#include "vnni_gemm.h"

namespace hanlin {
namespace {

// One expert's two int8 weights [N, K], the terms of their outputs (int8_rows.h) and, where its QuantLinears have
// them, their VNNI-laid copies (vnni_gemm.h: an expert's weights are cold, and its tens of rows multiply faster
// there), shared with those layers, not copied.
struct Int8Expert {
  torch::Tensor gate_up, gate_up_scale, gate_up_colsum, gate_up_bias;
  torch::Tensor down, down_scale, down_colsum, down_bias;
  std::shared_ptr<VnniWeight> gate_up_vnni, down_vnni;
};

class Int8Experts {
 public:
  // vnni: each expert's (gate_up, down) VnniWeights, None where a layer has none.
  Int8Experts(const std::vector<std::vector<torch::Tensor>>& experts,
              const std::vector<std::pair<std::shared_ptr<VnniWeight>, std::shared_ptr<VnniWeight>>>& vnni) {
    TORCH_CHECK(vnni.size() == experts.size(), "one (gate_up, down) VNNI pair per expert");
    for (size_t i = 0; i < experts.size(); ++i) {
      const auto& t = experts[i];
      TORCH_CHECK(t.size() == 8, "each expert: gate_up, its w_scale, colsum, bias; down, its w_scale, colsum, bias");
      TORCH_CHECK(t[0].scalar_type() == torch::kInt8 && t[4].scalar_type() == torch::kInt8, "int8 expert weights");
      TORCH_CHECK(t[0].size(0) == 2 * t[4].size(1), "gate_up must have 2 * the down projection's inputs");
      experts_.push_back(Int8Expert{t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], vnni[i].first, vnni[i].second});
    }
  }

  // q [S, D] int8 with scale, zero [S]: the slots sorted by expert; ids[i] runs counts[i] consecutive slots.
  // The experts, not the rows of one GEMM, are shared out among the threads: each thread claims the next
  // expert (largest first) and runs its GEMMs alone. An expert has tens of rows in a prefill and one in a
  // decode step, too few for oneDNN to split a GEMM across threads without waiting on them (at 512 tokens,
  // 64 experts top-8, 2 threads: 217 -> 161-167 ms a forward). Every result is exact integer sums, so the
  // schedule does not change the output.
  torch::Tensor forward(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& zero,
                        const std::vector<int64_t>& ids, const std::vector<int64_t>& counts) const {
    TORCH_CHECK(ids.size() == counts.size(), "one count per expert id");
    const int64_t D = experts_.empty() ? 0 : experts_[0].down.size(0);
    const int64_t active = static_cast<int64_t>(ids.size());
    std::vector<int64_t> starts(active);
    int64_t total = 0;
    for (int64_t i = 0; i < active; ++i) {
      TORCH_CHECK(ids[i] >= 0 && ids[i] < static_cast<int64_t>(experts_.size()), "expert id out of range");
      TORCH_CHECK(counts[i] > 0, "counts must be positive");
      starts[i] = total;
      total += counts[i];
    }
    TORCH_CHECK(total <= q.size(0), "the counts cover more slots than q has");
    auto out = torch::empty({total, D}, q.options().dtype(torch::kFloat32));
    std::vector<int64_t> largest_first(active);
    std::iota(largest_first.begin(), largest_first.end(), 0);
    std::stable_sort(largest_first.begin(), largest_first.end(),
                     [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
    std::atomic<int64_t> next{0};
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), active);
    at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
      for (int64_t claim = next++; claim < active; claim = next++) {
        const int64_t i = largest_first[claim];
        run_expert(experts_[ids[i]], q.narrow(0, starts[i], counts[i]), scale.narrow(0, starts[i], counts[i]),
                   zero.narrow(0, starts[i], counts[i]), out.narrow(0, starts[i], counts[i]));
      }
    });
    return out;
  }

 private:
  static void run_expert(const Int8Expert& e, const torch::Tensor& q, const torch::Tensor& scale,
                         const torch::Tensor& zero, torch::Tensor rows) {
    auto [hq, hs, hz] = int8_linear_swiglu_quantize(int8_mm(q, e.gate_up, e.gate_up_vnni.get()), scale, zero,
                                                    e.gate_up_scale, e.gate_up_colsum, e.gate_up_bias);
    int8_linear_output_into(int8_mm(hq, e.down, e.down_vnni.get()), hs, hz, e.down_scale, e.down_colsum, e.down_bias,
                            rows);
  }

  std::vector<Int8Expert> experts_;
};

}  // namespace

void register_int8_experts(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Int8Experts>(m, "Int8Experts")
      .def(py::init<const std::vector<std::vector<torch::Tensor>>&,
                    const std::vector<std::pair<std::shared_ptr<VnniWeight>, std::shared_ptr<VnniWeight>>>&>(),
           py::arg("experts"), py::arg("vnni"))
      .def("forward", &Int8Experts::forward, py::arg("q"), py::arg("scale"), py::arg("zero"), py::arg("ids"),
           py::arg("counts"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace hanlin

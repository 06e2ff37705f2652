// The routed experts of an MoE layer for training on CPU, forward and backward, in one pass each. Slots (token,
// choice) arrive sorted by expert (`order`: sorted position -> slot = token * K + choice; `counts` rows per expert;
// positions past their sum are dropped slots). Each expert gathers its tokens, multiplies by its gate/up projection,
// applies SwiGLU and its down projection; every token then sums its K weighted outputs.
//
// Experts run side by side, each on one thread with a single-threaded BLAS call, instead of one after another with
// every thread splitting each (smaller) matmul: on 2 Zen 4 cores the 8 experts x 512 rows of bench/train.py's MoE
// multiply ~20% faster that way. An expert with more than half a thread's fair share of rows runs alone first, with
// all threads, so one hot expert cannot leave the other threads idle. See hanlin.models.expert_group.
#include "moe_experts.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <tuple>
#include <vector>

#include "blas.h"
#include "simd.h"
#include "swiglu_rows.h"

namespace hanlin {
namespace {

struct Group {
  int64_t N, K, S, D, I;
  const int64_t* order;          // sorted position -> slot
  std::vector<int64_t> inverse;  // slot -> sorted position
  std::vector<int64_t> start, count;
  int64_t routed;  // positions routed .. S - 1 are dropped slots
  std::vector<const float*> w1, w2;  // per expert: gate/up [2I, D], down [D, I]
  std::vector<int64_t> wide;                      // experts run with every thread, one after another
  std::vector<std::vector<int64_t>> per_thread;  // then these, each thread its own list, each expert on one thread
};

Group make_group(const torch::Tensor& x, const torch::Tensor& weights, const torch::Tensor& order,
                 const std::vector<int64_t>& counts, const std::vector<torch::Tensor>& w1,
                 const std::vector<torch::Tensor>& w2) {
  TORCH_CHECK(sgemm() != nullptr, "moe_experts: no BLAS sgemm found in this PyTorch build");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32,
              "moe_experts: x must be contiguous float32 [N, D]");
  TORCH_CHECK(weights.dim() == 2 && weights.is_contiguous() && weights.scalar_type() == torch::kFloat32 &&
                  weights.size(0) == x.size(0),
              "moe_experts: weights must be contiguous float32 [N, K]");
  const int64_t E = static_cast<int64_t>(counts.size());
  TORCH_CHECK(E > 0 && static_cast<int64_t>(w1.size()) == E && static_cast<int64_t>(w2.size()) == E,
              "moe_experts: one gate/up and one down weight per expert");
  Group g;
  g.N = x.size(0);
  g.K = weights.size(1);
  g.S = g.N * g.K;
  g.D = x.size(1);
  g.I = w2[0].size(1);
  TORCH_CHECK(order.dim() == 1 && order.numel() == g.S && order.is_contiguous() && order.scalar_type() == torch::kInt64,
              "moe_experts: order must be int64 [N * K]");
  g.order = order.data_ptr<int64_t>();
  g.inverse.assign(g.S, -1);
  for (int64_t p = 0; p < g.S; ++p) {
    const int64_t slot = g.order[p];
    TORCH_CHECK(slot >= 0 && slot < g.S && g.inverse[slot] < 0, "moe_experts: order must be a permutation");
    g.inverse[slot] = p;
  }
  g.start.resize(E);
  g.count = counts;
  g.routed = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(counts[e] >= 0, "moe_experts: negative count");
    g.start[e] = g.routed;
    g.routed += counts[e];
    TORCH_CHECK(w1[e].is_contiguous() && w1[e].scalar_type() == torch::kFloat32 && w1[e].size(0) == 2 * g.I &&
                    w1[e].size(1) == g.D,
                "moe_experts: gate/up weights must be contiguous float32 [2I, D]");
    TORCH_CHECK(w2[e].is_contiguous() && w2[e].scalar_type() == torch::kFloat32 && w2[e].size(0) == g.D &&
                    w2[e].size(1) == g.I,
                "moe_experts: down weights must be contiguous float32 [D, I]");
    g.w1.push_back(w1[e].data_ptr<float>());
    g.w2.push_back(w2[e].data_ptr<float>());
  }
  TORCH_CHECK(g.routed <= g.S, "moe_experts: counts add up to more than N * K");

  // Largest first, each to the least loaded thread; an expert above half a fair share runs wide.
  const int64_t threads = at::get_num_threads();
  g.per_thread.resize(threads);
  std::vector<int64_t> experts;
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e]) experts.push_back(e);
  }
  std::stable_sort(experts.begin(), experts.end(), [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
  std::vector<int64_t> load(threads, 0);
  for (int64_t e : experts) {
    if (threads > 1 && 2 * threads * counts[e] > g.routed) {
      g.wide.push_back(e);
      continue;
    }
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    g.per_thread[t].push_back(e);
    load[t] += counts[e];
  }
  return g;
}

// fn(begin, end) over rows [0, rows): split among threads for a wide expert, whole on this thread otherwise.
template <typename Fn>
void over_rows(bool wide, int64_t rows, const Fn& fn) {
  if (wide) {
    at::parallel_for(0, rows, 16, fn);
  } else {
    fn(0, rows);
  }
}

// Runs run(expert, wide): the wide experts one by one, then each thread its own list.
template <typename Run>
void for_each_expert(const Group& g, const Run& run) {
  for (int64_t e : g.wide) run(e, true);
  const int64_t threads = static_cast<int64_t>(g.per_thread.size());
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t e : g.per_thread[t]) run(e, false);
    }
  });
}

// Scratch rows, left uninitialised: every element is written before it is read.
inline std::unique_ptr<float[]> scratch(int64_t size) { return std::unique_ptr<float[]>(new float[size]); }

}  // namespace

// x [N, D], weights [N, K] -> (out [N, D], x_sorted [S, D], gate_up_sorted [S, 2I], y_sorted [S, D]); the last three
// are what the backward needs.
std::vector<torch::Tensor> moe_experts_forward(const torch::Tensor& x, const torch::Tensor& weights,
                                               const torch::Tensor& order, const std::vector<int64_t>& counts,
                                               const std::vector<torch::Tensor>& w1,
                                               const std::vector<torch::Tensor>& w2) {
  const Group g = make_group(x, weights, order, counts, w1, w2);
  const int64_t D = g.D, I = g.I, K = g.K;
  torch::Tensor x_sorted = torch::empty({g.S, D}, x.options());
  torch::Tensor h_sorted = torch::empty({g.S, 2 * I}, x.options());
  torch::Tensor y_sorted = torch::empty({g.S, D}, x.options());
  torch::Tensor out = torch::zeros({g.N, D}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = weights.data_ptr<float>();
  float* XS = x_sorted.data_ptr<float>();
  float* HS = h_sorted.data_ptr<float>();
  float* YS = y_sorted.data_ptr<float>();
  float* O = out.data_ptr<float>();
  for_each_expert(g, [&](int64_t e, bool wide) {
    const int64_t s = g.start[e], c = g.count[e];
    float* Xe = XS + s * D;
    float* He = HS + s * 2 * I;
    const auto act = scratch(c * I);
    over_rows(wide, c, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) std::copy_n(X + g.order[s + r] / K * D, D, Xe + r * D);
    });
    gemm(false, true, c, 2 * I, D, 1.0f, Xe, D, g.w1[e], D, 0.0f, He, 2 * I);
    over_rows(wide, c, [&](int64_t r0, int64_t r1) {
      swiglu_rows_forward(He + r0 * 2 * I, act.get() + r0 * I, r1 - r0, I);
    });
    gemm(false, true, c, D, I, 1.0f, act.get(), I, g.w2[e], I, 0.0f, YS + s * D, D);
  });
  at::parallel_for(0, g.N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t p = g.inverse[n * K + j];
        if (p < g.routed) axpy(W[n * K + j], YS + p * D, O + n * D, D);
      }
    }
  });
  return {out, x_sorted, h_sorted, y_sorted};
}

// Gradients of moe_experts_forward's out: (x [N, D], weights [N, K], gate/up per expert, down per expert); an expert
// that ran no rows gets an undefined gradient (None in Python).
std::tuple<torch::Tensor, torch::Tensor, std::vector<torch::Tensor>, std::vector<torch::Tensor>> moe_experts_backward(
    const torch::Tensor& grad_out, const torch::Tensor& x, const torch::Tensor& weights, const torch::Tensor& order,
    const std::vector<int64_t>& counts, const std::vector<torch::Tensor>& w1, const std::vector<torch::Tensor>& w2,
    const torch::Tensor& x_sorted, const torch::Tensor& h_sorted, const torch::Tensor& y_sorted) {
  const Group g = make_group(x, weights, order, counts, w1, w2);
  const int64_t D = g.D, I = g.I, K = g.K, E = static_cast<int64_t>(counts.size());
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.sizes() == x.sizes(), "moe_experts: grad_out must be [N, D]");
  std::vector<torch::Tensor> dw1(E), dw2(E);
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e]) {
      dw1[e] = torch::empty_like(w1[e]);
      dw2[e] = torch::empty_like(w2[e]);
    }
  }
  torch::Tensor dx_sorted = torch::empty({g.routed, D}, x.options());
  const float* G = grad_out.data_ptr<float>();
  const float* W = weights.data_ptr<float>();
  const float* XS = x_sorted.data_ptr<float>();
  const float* HS = h_sorted.data_ptr<float>();
  const float* YS = y_sorted.data_ptr<float>();
  float* DXS = dx_sorted.data_ptr<float>();
  for_each_expert(g, [&](int64_t e, bool wide) {
    const int64_t s = g.start[e], c = g.count[e];
    const float* He = HS + s * 2 * I;
    const auto dy = scratch(c * D), act = scratch(c * I), dact = scratch(c * I), dh = scratch(c * 2 * I);
    over_rows(wide, c, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t slot = g.order[s + r];
        const float w = W[slot];
        const float* src = G + slot / K * D;
        float* dst = dy.get() + r * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = w * src[d];
      }
    });
    gemm(false, false, c, I, D, 1.0f, dy.get(), D, g.w2[e], I, 0.0f, dact.get(), I);
    over_rows(wide, c, [&](int64_t r0, int64_t r1) {
      swiglu_rows_backward(dact.get() + r0 * I, He + r0 * 2 * I, dh.get() + r0 * 2 * I, act.get() + r0 * I,
                           r1 - r0, I);
    });
    gemm(true, false, D, I, c, 1.0f, dy.get(), D, act.get(), I, 0.0f, dw2[e].data_ptr<float>(), I);
    gemm(false, false, c, D, 2 * I, 1.0f, dh.get(), 2 * I, g.w1[e], D, 0.0f, DXS + s * D, D);
    gemm(true, false, 2 * I, D, c, 1.0f, dh.get(), 2 * I, XS + s * D, D, 0.0f, dw1[e].data_ptr<float>(), D);
  });
  torch::Tensor dx = torch::zeros_like(x);
  torch::Tensor dweights = torch::zeros_like(weights);
  float* DX = dx.data_ptr<float>();
  float* DW = dweights.data_ptr<float>();
  at::parallel_for(0, g.N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t p = g.inverse[n * K + j];
        if (p >= g.routed) continue;
        DW[n * K + j] = dot(G + n * D, YS + p * D, D);
        axpy(1.0f, DXS + p * D, DX + n * D, D);
      }
    }
  });
  return {dx, dweights, dw1, dw2};
}

void register_moe_experts(pybind11::module& m) {
  namespace py = pybind11;
  m.def("moe_experts_available", [] { return sgemm() != nullptr; });
  m.def("moe_experts_forward", &moe_experts_forward, py::arg("x"), py::arg("weights"), py::arg("order"),
        py::arg("counts"), py::arg("w1"), py::arg("w2"));
  m.def("moe_experts_backward", &moe_experts_backward, py::arg("grad_out"), py::arg("x"), py::arg("weights"),
        py::arg("order"), py::arg("counts"), py::arg("w1"), py::arg("w2"), py::arg("x_sorted"), py::arg("h_sorted"),
        py::arg("y_sorted"));
}

}  // namespace hanlin

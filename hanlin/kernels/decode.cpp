// The engine's CPU hot path: one call per decoder-layer half instead of ~60 PyTorch ops from Python.
//
// Same math as hanlin/models (attention.py, layers.py, rope.py), in fp32, for a step that packs every
// scheduled token of every sequence into rows [N, D]: single-token (decode) rows come first and read
// their context straight from the paged KV pools; each multi-token (prefill) chunk too, by the BLAS sgemm
// (paged_prefill_attention), with the same masks as kv_cache.StepKV's scaled_dot_product_attention.
#include "decode.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "int8_rows.h"
#include "paged_attention.h"
#include "qlinear.h"
#include "simd.h"
#include "vnni_gemm.h"

namespace hanlin {
namespace {

using QuantizedRows = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>;  // int8 q, scale, zero per row

// A packed weight (qlinear.h). With int8 terms (w8a8: an int8 weight per channel, see int8_rows.h) each input row
// is quantized and multiplied in int8: by the VNNI kernel over a second, VNNI-laid copy of the weight for decode-sized
// inputs where the CPU has it (vnni_gemm.h), by at::_int_mm over the transposed weight otherwise.
struct Linear {
  int64_t kind = kF32;
  torch::Tensor qdata, scales, mins;
  int64_t group = 0;
  c10::optional<torch::Tensor> bias;
  bool int8 = false;
  torch::Tensor w_scale, colsum, bias_n;  // float32 [N] each, for int8
  std::shared_ptr<VnniWeight> vnni;       // int8 with AVX512-VNNI: the layer's own (QuantLinear.int8_vnni)

  torch::Tensor operator()(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual = c10::nullopt) const {
    if (int8) return int8_output(quantize_rows(x), residual);
    auto y = qlinear(x, kind, qdata, scales, mins, group, bias);
    if (residual) y.add_(*residual);
    return y;
  }

  at::Tensor int8_product(const QuantizedRows& rows) const { return int8_mm(std::get<0>(rows), qdata, vnni.get()); }

  torch::Tensor int8_output(const QuantizedRows& rows, const c10::optional<torch::Tensor>& residual) const {
    return int8_linear_output(int8_product(rows), std::get<1>(rows), std::get<2>(rows), w_scale, colsum, bias_n,
                              residual, false);
  }
};

Linear make_linear(int64_t kind, torch::Tensor qdata, torch::Tensor scales, torch::Tensor mins, int64_t group,
                   c10::optional<torch::Tensor> bias, c10::optional<std::vector<torch::Tensor>> int8_terms,
                   std::shared_ptr<VnniWeight> vnni) {
  Linear linear{kind, std::move(qdata), std::move(scales), std::move(mins), group, std::move(bias)};
  if (int8_terms) {
    TORCH_CHECK(linear.kind == kQ8 && int8_terms->size() == 3, "int8 terms: (w_scale, colsum, bias) of an int8 weight");
    linear.int8 = true;
    linear.w_scale = (*int8_terms)[0];
    linear.colsum = (*int8_terms)[1];
    linear.bias_n = (*int8_terms)[2];
    linear.vnni = std::move(vnni);
  }
  return linear;
}

// out = weight * x / sqrt(mean(x^2) + eps), like models.layers.RMSNorm.
void rms_norm_row(const float* x, const float* weight, float eps, float* out, int64_t n) {
  const float inv = 1.0f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
}

torch::Tensor rms_norm(const torch::Tensor& x_ND, const torch::Tensor& weight, float eps) {
  auto out = torch::empty_like(x_ND);
  const int64_t N = x_ND.size(0), D = x_ND.size(1);
  const float *xp = x_ND.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) rms_norm_row(xp + n * D, wp, eps, op + n * D, D);
  });
  return out;
}

// Rotate-half RoPE in place on one head vector: x * cos + rotate_half(x) * sin.
void rope_row(float* x, const float* cos, const float* sin, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// One step's attention layout, built once per step by hanlin/engine/fused.py and shared by every layer.
struct StepPlan {
  torch::Tensor cos, sin;          // [N, head_dim]
  torch::Tensor write_slots;       // [N] int64: pool row of each new token's K/V
  int64_t num_decode = 0;          // rows [0, num_decode) are single-token queries
  torch::Tensor block_tables;      // [num_decode, max_blocks] int32
  torch::Tensor context_lens;      // [num_decode] int32, the query's own token included
  int64_t block_size = 16;
  int64_t window = 0;              // sliding window in tokens; 0 = none
  // Prefill chunks: rows [start, start + count) attend to the pool rows `slots` under `mask` or causally.
  std::vector<int64_t> chunk_start, chunk_count;
  std::vector<torch::Tensor> chunk_slots;
  std::vector<c10::optional<torch::Tensor>> chunk_mask;  // [1, Q, S] bool (True = may attend)
  std::vector<bool> chunk_causal;
  std::vector<torch::Tensor> k_pools, v_pools;  // the paged cache: [slots, Hkv, Dh] per kv layer
};

// Attention of one prefill chunk: over the pools in place (paged_prefill_attention); without a BLAS sgemm, its
// context gathered and ATen's fused SDPA.
void chunk_attention(const StepPlan& plan, size_t c, const torch::Tensor& q_NHD, const torch::Tensor& k_pool,
                     const torch::Tensor& v_pool, torch::Tensor& out_NHD) {
  const int64_t start = plan.chunk_start[c], count = plan.chunk_count[c];
  const auto& slots = plan.chunk_slots[c];
  const int64_t row = q_NHD.size(1) * q_NHD.size(2);
  if (slots.scalar_type() == torch::kLong && slots.is_contiguous() &&
      paged_prefill_attention(q_NHD.data_ptr<float>() + start * row, k_pool, v_pool, slots, count, plan.window,
                              q_NHD.size(1), out_NHD.data_ptr<float>() + start * row)) {
    return;
  }
  auto q = q_NHD.narrow(0, start, count).transpose(0, 1).unsqueeze(0);           // [1, H, Q, D]
  auto k = k_pool.index_select(0, slots).to(torch::kFloat).transpose(0, 1).unsqueeze(0);  // [1, Hkv, S, D]
  auto v = v_pool.index_select(0, slots).to(torch::kFloat).transpose(0, 1).unsqueeze(0);
  c10::optional<torch::Tensor> mask;
  if (plan.chunk_mask[c].has_value()) mask = plan.chunk_mask[c]->unsqueeze(1);  // [1, 1, Q, S]
  auto o = at::scaled_dot_product_attention(q, k, v, mask, 0.0, plan.chunk_causal[c], c10::nullopt, true);
  out_NHD.narrow(0, start, count).copy_(o[0].transpose(0, 1));
}

class FusedLayer {
 public:
  FusedLayer(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t kv_layer, bool owns_kv, double eps,
             torch::Tensor input_norm, Linear qkv, Linear o, c10::optional<torch::Tensor> q_norm,
             c10::optional<torch::Tensor> k_norm, bool qk_norm_over_projection, bool qk_norm_after_rope, double clip_qkv,
             torch::Tensor post_attn_norm, c10::optional<Linear> gate_up, c10::optional<Linear> down)
      : H_(num_heads), Hkv_(num_kv_heads), Dh_(head_dim), kv_layer_(kv_layer), owns_kv_(owns_kv),
        eps_(static_cast<float>(eps)), input_norm_(std::move(input_norm)), qkv_(std::move(qkv)), o_(std::move(o)),
        q_norm_(std::move(q_norm)), k_norm_(std::move(k_norm)), proj_norm_(qk_norm_over_projection),
        norm_after_rope_(qk_norm_after_rope),
        clip_(static_cast<float>(clip_qkv)), post_attn_norm_(std::move(post_attn_norm)),
        gate_up_(std::move(gate_up)), down_(std::move(down)) {}

  bool has_mlp() const { return gate_up_.has_value(); }

  // x + attention(input_norm(x)); writes this step's K/V into the pools of its kv layer.
  torch::Tensor attention(const torch::Tensor& x_ND, const StepPlan& plan) const {
    const int64_t N = x_ND.size(0), q_dim = H_ * Dh_, kv_dim = Hkv_ * Dh_;
    auto qkv = qkv_(rms_norm(x_ND, input_norm_, eps_));
    const int64_t width = qkv.size(1);
    auto q_NHD = torch::empty({N, H_, Dh_}, x_ND.options());
    const auto& k_pool = plan.k_pools.at(kv_layer_);
    const auto& v_pool = plan.v_pools.at(kv_layer_);
    prepare_rows(qkv.data_ptr<float>(), width, plan, q_NHD.data_ptr<float>(), k_pool, v_pool, N, q_dim, kv_dim);
    auto out_NHD = torch::empty({N, H_, Dh_}, x_ND.options());
    if (plan.num_decode > 0) {
      paged_decode_attention(q_NHD.data_ptr<float>(), k_pool, v_pool, plan.block_tables, plan.context_lens,
                             plan.block_size, plan.window, H_, out_NHD.data_ptr<float>());
    }
    for (size_t c = 0; c < plan.chunk_start.size(); ++c) chunk_attention(plan, c, q_NHD, k_pool, v_pool, out_NHD);
    return o_(out_NHD.view({N, q_dim}), x_ND);
  }

  // x + down(silu(gate(h)) * up(h)) with h = post_attn_norm(x).
  torch::Tensor mlp(const torch::Tensor& x_ND) const {
    TORCH_CHECK(has_mlp(), "this layer's MLP is not fused (a Mixture-of-Experts layer)");
    if (gate_up_->int8 && down_->int8) {
      const QuantizedRows rows = quantize_rows(rms_norm(x_ND, post_attn_norm_, eps_));
      const QuantizedRows hidden =
          int8_linear_swiglu_quantize(gate_up_->int8_product(rows), std::get<1>(rows), std::get<2>(rows),
                                      gate_up_->w_scale, gate_up_->colsum, gate_up_->bias_n);
      return down_->int8_output(hidden, x_ND);
    }
    auto gu = (*gate_up_)(rms_norm(x_ND, post_attn_norm_, eps_));
    const int64_t N = gu.size(0), F = gu.size(1) / 2;
    auto act = torch::empty({N, F}, gu.options());
    const float* g = gu.data_ptr<float>();
    float* a = act.data_ptr<float>();
    at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t f = 0; f < F; ++f) {
          const float gate = g[n * 2 * F + f], up = g[n * 2 * F + F + f];
          a[n * F + f] = gate / (1.0f + std::exp(-gate)) * up;
        }
      }
    });
    return (*down_)(act, x_ND);
  }

  torch::Tensor forward(const torch::Tensor& x_ND, const StepPlan& plan) const {
    return mlp(attention(x_ND, plan));
  }

 private:
  // Splits each row of the qkv projection into q [N, H, Dh] (clipped, normed, rotated) and, for a layer
  // that owns its K/V, writes k (same treatment) and v straight into their pool rows.
  void prepare_rows(const float* qkv, int64_t width, const StepPlan& plan, float* q_out, const torch::Tensor& k_pool,
                    const torch::Tensor& v_pool, int64_t N, int64_t q_dim, int64_t kv_dim) const {
    const float *cos = plan.cos.data_ptr<float>(), *sin = plan.sin.data_ptr<float>();
    const int64_t* slots = plan.write_slots.data_ptr<int64_t>();
    const bool half = k_pool.scalar_type() == torch::kHalf;  // a float16 KV cache: rows are rounded on the way in
    void *kp = k_pool.data_ptr(), *vp = v_pool.data_ptr();
    const float* qn = q_norm_ ? q_norm_->data_ptr<float>() : nullptr;
    const float* kn = k_norm_ ? k_norm_->data_ptr<float>() : nullptr;
    const float* head_qn = proj_norm_ ? nullptr : qn;
    const float* head_kn = proj_norm_ ? nullptr : kn;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      std::vector<float> normed(proj_norm_ ? q_dim + kv_dim : 0);
      std::vector<float> k_row(kv_dim), v_row(kv_dim);
      for (int64_t n = n0; n < n1; ++n) {
        const float* row = qkv + n * width;
        const float* q = row;
        const float* k = row + q_dim;
        if (proj_norm_) {  // OLMoE: RMSNorm over all of q and all of k, before the split into heads
          rms_norm_row(q, qn, eps_, normed.data(), q_dim);
          if (owns_kv_) rms_norm_row(k, kn, eps_, normed.data() + q_dim, kv_dim);
          q = normed.data();
          k = normed.data() + q_dim;
        }
        const float *c = cos + n * Dh_, *s = sin + n * Dh_;
        for (int64_t h = 0; h < H_; ++h) head(q + h * Dh_, q_out + (n * H_ + h) * Dh_, head_qn, c, s);
        if (!owns_kv_) continue;
        for (int64_t h = 0; h < Hkv_; ++h) head(k + h * Dh_, k_row.data() + h * Dh_, head_kn, c, s);
        for (int64_t i = 0; i < kv_dim; ++i) v_row[i] = clipped(row[q_dim + kv_dim + i]);
        const int64_t at = slots[n] * kv_dim;
        if (half) {
          convert_row(k_row.data(), static_cast<c10::Half*>(kp) + at, kv_dim);
          convert_row(v_row.data(), static_cast<c10::Half*>(vp) + at, kv_dim);
        } else {
          convert_row(k_row.data(), static_cast<float*>(kp) + at, kv_dim);
          convert_row(v_row.data(), static_cast<float*>(vp) + at, kv_dim);
        }
      }
    });
  }

  float clipped(float v) const { return clip_ > 0 ? std::min(std::max(v, -clip_), clip_) : v; }

  void head(const float* in, float* out, const float* norm, const float* cos, const float* sin) const {
    for (int64_t i = 0; i < Dh_; ++i) out[i] = clipped(in[i]);
    if (norm != nullptr && !norm_after_rope_) rms_norm_row(out, norm, eps_, out, Dh_);
    rope_row(out, cos, sin, Dh_);
    if (norm != nullptr && norm_after_rope_) rms_norm_row(out, norm, eps_, out, Dh_);
  }

  int64_t H_, Hkv_, Dh_, kv_layer_;
  bool owns_kv_;
  float eps_;
  torch::Tensor input_norm_;
  Linear qkv_, o_;
  c10::optional<torch::Tensor> q_norm_, k_norm_;
  bool proj_norm_;  // q/k norms over the whole projection (OLMoE) instead of per head
  bool norm_after_rope_;
  float clip_;
  torch::Tensor post_attn_norm_;
  c10::optional<Linear> gate_up_, down_;
};

}  // namespace

void register_decode(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Linear>(m, "Linear")
      .def(py::init(&make_linear), py::arg("kind"), py::arg("qdata"), py::arg("scales"), py::arg("mins"),
           py::arg("group"), py::arg("bias") = py::none(), py::arg("int8_terms") = py::none(),
           py::arg("vnni") = py::none())
      .def("__call__", [](const Linear& linear, const torch::Tensor& x) { return linear(x); });
  py::class_<StepPlan>(m, "StepPlan")
      .def(py::init<>())
      .def_readwrite("cos", &StepPlan::cos)
      .def_readwrite("sin", &StepPlan::sin)
      .def_readwrite("write_slots", &StepPlan::write_slots)
      .def_readwrite("num_decode", &StepPlan::num_decode)
      .def_readwrite("block_tables", &StepPlan::block_tables)
      .def_readwrite("context_lens", &StepPlan::context_lens)
      .def_readwrite("block_size", &StepPlan::block_size)
      .def_readwrite("window", &StepPlan::window)
      .def_readwrite("k_pools", &StepPlan::k_pools)
      .def_readwrite("v_pools", &StepPlan::v_pools)
      .def("add_chunk", [](StepPlan& p, int64_t start, int64_t count, torch::Tensor slots,
                           c10::optional<torch::Tensor> mask, bool causal) {
        p.chunk_start.push_back(start);
        p.chunk_count.push_back(count);
        p.chunk_slots.push_back(std::move(slots));
        p.chunk_mask.push_back(std::move(mask));
        p.chunk_causal.push_back(causal);
      });
  py::class_<FusedLayer>(m, "FusedLayer")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, bool, double, torch::Tensor, Linear, Linear,
                    c10::optional<torch::Tensor>, c10::optional<torch::Tensor>, bool, bool, double, torch::Tensor,
                    c10::optional<Linear>, c10::optional<Linear>>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("kv_layer"), py::arg("owns_kv"),
           py::arg("eps"), py::arg("input_norm"), py::arg("qkv"), py::arg("o"), py::arg("q_norm"), py::arg("k_norm"),
           py::arg("qk_norm_over_projection"), py::arg("qk_norm_after_rope"), py::arg("clip_qkv"), py::arg("post_attn_norm"), py::arg("gate_up"),
           py::arg("down"))
      .def_property_readonly("has_mlp", &FusedLayer::has_mlp)
      .def("attention", &FusedLayer::attention, py::call_guard<py::gil_scoped_release>())
      .def("mlp", &FusedLayer::mlp, py::call_guard<py::gil_scoped_release>())
      .def("forward", &FusedLayer::forward, py::call_guard<py::gil_scoped_release>());
  // Every layer in one call: the engine thread gives up the GIL once per step rather than once per layer, and each
  // taking it back can wait out the server's event loop (up to the 0.2 ms switch interval, ~30 times a step).
  m.def(
      "forward_layers",
      [](const std::vector<const FusedLayer*>& layers, torch::Tensor x_ND, const StepPlan& plan) {
        for (const FusedLayer* layer : layers) x_ND = layer->forward(x_ND, plan);
        return x_ND;
      },
      py::arg("layers"), py::arg("x"), py::arg("plan"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace hanlin

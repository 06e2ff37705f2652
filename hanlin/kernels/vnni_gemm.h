// int8 GEMM for decode-sized batches with AVX512-VNNI, over a weight packed once (see vnni_gemm.cpp).
#pragma once
#include <torch/extension.h>

#include <memory>

namespace hanlin {

// Rows up to which VnniWeight::mm is used. Over cold weights (1 thread, 64 MoE experts 1024 -> 1024 -> 512 ->
// 1024): 16 rows 11.3 ms against _int_mm's 20.9, 64 rows 36.2 against 43.4, 96 rows 52.6 against 57.6; oneDNN's
// blocking wins on longer (prefill) inputs.
constexpr int64_t kVnniMaxRows = 96;

// AVX512-VNNI present, and HANLIN_NO_VNNI unset in the environment (which leaves every product to _int_mm).
bool cpu_has_vnni();

// An int8 weight W [N, K] laid out for vpdpbusd, with what turns the unsigned product back into q @ W^T.
class VnniWeight {
 public:
  explicit VnniWeight(const torch::Tensor& w_NK);
  // int32 [M, N] = q @ W^T for int8 q [M, K]: exactly torch._int_mm(q, W.t()).
  torch::Tensor mm(const torch::Tensor& q_MK) const;
  int64_t out_features() const { return N_; }
  int64_t in_features() const { return K_; }

 private:
  int64_t N_, K_, blocks_, quads_;  // blocks_: 16-channel blocks, whole tiles of 4 (ceil(N / 64) * 4); quads_: ceil(K / 4)
  torch::Tensor packed_;            // int8 [blocks_, quads_, 16, 4]
  torch::Tensor correction_;        // int32 [blocks_ * 16]: -128 * sum_k W[n, k], where the accumulators start
};

// q @ W^T in int32: VNNI on at most kVnniMaxRows rows where `vnni` is given and the CPU has it, else _int_mm.
torch::Tensor int8_mm(const torch::Tensor& q_MK, const torch::Tensor& w_NK, const VnniWeight* vnni);

void register_vnni_gemm(pybind11::module& m);
}  // namespace hanlin

// Activations quantized per row for int8 GEMMs (torch._int_mm), and the fused outputs of such a GEMM.
//
// A row x (a token's activations) is held as int8 q with a float scale s and an integer zero point z,
// x ~= s * (q - z): the row's range [min(x, 0), max(x, 0)] is mapped onto -128..127 (asymmetric, so rows that
// are mostly positive, like GELU outputs, keep all 256 levels). A weight W [N, K] is int8 per output channel,
// w ~= ws[n] * qw[n, k], with colsum[n] = sum_k qw[n, k]. Then
//   (x W^T)[m, n] = s[m] * ws[n] * (acc[m, n] - z[m] * colsum[n]),  acc = q @ qw^T in int32.
#pragma once
#include <torch/extension.h>

#include <tuple>

namespace hanlin {
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_rows(const torch::Tensor& x);
torch::Tensor int8_linear_output(const torch::Tensor& acc, const torch::Tensor& scale, const torch::Tensor& zero,
                                 const torch::Tensor& w_scale, const torch::Tensor& colsum, const torch::Tensor& bias,
                                 const c10::optional<torch::Tensor>& residual, bool out_bf16);
// The same, fp32 without residual, written into `out` (contiguous, acc's shape).
void int8_linear_output_into(const torch::Tensor& acc, const torch::Tensor& scale, const torch::Tensor& zero,
                             const torch::Tensor& w_scale, const torch::Tensor& colsum, const torch::Tensor& bias,
                             torch::Tensor& out);
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> int8_linear_swiglu_quantize(
    const torch::Tensor& acc, const torch::Tensor& scale, const torch::Tensor& zero, const torch::Tensor& w_scale,
    const torch::Tensor& colsum, const torch::Tensor& bias);
void register_int8_rows(pybind11::module& m);
}  // namespace hanlin

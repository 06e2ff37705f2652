// Weight-only quantized linear layers for the CPU: the packed formats and the one entry point.
//
// A weight W [M, K] (M outputs, K inputs) is held as (kind, qdata, scales, mins, group):
//   kF32: qdata is the fp32 weight itself (any strides); scales, mins unused.
//   kF32Panels: qdata float32 [ceil(M / 16), K, 16]: panel p holds rows 16p .. 16p + 15 interleaved,
//         qdata[p, k, i] = W[16p + i, k]; M is padded up to a multiple of 16 with zero rows. group = M (the
//         true number of outputs, which the panels alone do not tell); scales, mins unused (empty).
//   kQ8 : qdata int8 [M, K]; scales float16 [M, K / group]; w = q * scale.
//         group == K (per output channel, any K) or group % 32 == 0 and K % group == 0 (GGUF Q8_0: 32).
//   kQ4 : qdata uint8 [M, K / 2]; scales, mins float16 [M, K / group]; w = q * scale + min, q in 0..15.
//         group % 32 == 0 and K % group == 0. Inside each run of 32 weights (16 bytes) byte j holds
//         weight j in its low nibble and weight j + 16 in its high nibble: GGUF's Q4_0/Q4_1 layout, so
//         those blocks are copied in as they are (Q4_0: min = -8 * scale).
// Arithmetic is fp32; y = x @ W^T (+ bias).
#pragma once
#include <torch/extension.h>

namespace hanlin {

constexpr int64_t kF32 = 0, kQ8 = 1, kQ4 = 2, kF32Panels = 3;

// x: float32 [N, K] (made contiguous); bias: float32 [M] or none. Returns float32 [N, M].
// Splits work across ATen's intra-op threads (at::parallel_for); safe to call from C++ code that is
// not itself inside a parallel region.
torch::Tensor qlinear(const torch::Tensor& x, int64_t kind, const torch::Tensor& qdata, const torch::Tensor& scales,
                      const torch::Tensor& mins, int64_t group, const c10::optional<torch::Tensor>& bias);

void register_qlinear(pybind11::module& m);

}  // namespace hanlin

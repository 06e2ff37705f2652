// Attention of single-token (decode) queries over their context in a paged KV pool, read in place (see
// paged_attention.cpp).
#pragma once
#include <torch/extension.h>

namespace hanlin {

// out[g, h] = softmax(q[g, h] . K_g / sqrt(Dh)) V_g for each of G queries q [G, H, Dh] (fp32), with K_g / V_g the
// rows of positions [max(0, ctx_g - window), ctx_g) of one kv layer's pools [slots, Hkv, Dh] (float32 or float16):
// position p of query g sits in slot block_tables[g, p / block_size] * block_size + p % block_size. Query head h
// reads kv head h / (H / Hkv). window 0: the whole context.
void paged_decode_attention(const float* q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                            const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t block_size,
                            int64_t window, int64_t H, float* out);

// One prefill chunk of `count` query rows q [count, H, Dh] (fp32, contiguous), the last `count` of its context's S
// positions, whose pool rows are slots [S] (int64): row r sits at position S - count + r and sees positions up to its
// own (and no further back than window - 1 before it; window 0: all). out [count, H, Dh]. False, with nothing
// written, where no BLAS sgemm was found (the caller then gathers and runs SDPA).
bool paged_prefill_attention(const float* q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                             const torch::Tensor& slots, int64_t count, int64_t window, int64_t H, float* out);

void register_paged_attention(pybind11::module& m);
}  // namespace hanlin

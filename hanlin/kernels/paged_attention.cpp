// Decode attention over a paged KV pool, read in place.
//
// A pool's blocks lie anywhere in its memory and one block of one layer is small (16 slots of SmolLM2's 3 kv heads
// of 64 float16 values: 6 KB), so the reads are bound by memory latency, not bandwidth: on the 2-core EPYC, blocks
// of 4-8 KB at random places stream at ~7.5 GB/s against 29 GB/s for one long run, and software prefetching did not
// change that. What helps is reading each block whole and front to back: a work item takes all of a sequence's kv
// heads (each slot's row once, in order) rather than one head (a third of every row, three passes). 16 sequences x
// 150 positions x 30 layers: 14.8 -> 13.0 ms cold (3.6 -> 3.2 ms with the K/V in cache).
#include "paged_attention.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "blas.h"
#include "simd.h"

namespace hanlin {
namespace {

// One sequence's rows in one pool [slots, Hkv, Dh]; the rows of one block are consecutive.
template <typename T>
struct PagedRows {
  const T* pool;
  const int32_t* table;
  int64_t block_size, slot_stride;  // slot_stride = Hkv * Dh

  const T* row(int64_t p) const {
    return pool + (static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size) * slot_stride;
  }

  // Calls visit(p0, p1, rows of p0) for each block's positions within [first, ctx), in order.
  template <typename Visit>
  void for_each_block(int64_t first, int64_t ctx, Visit visit) const {
    for (int64_t p0 = first; p0 < ctx;) {
      const int64_t p1 = std::min(ctx, p0 - p0 % block_size + block_size);
      visit(p0, p1, row(p0));
      p0 = p1;
    }
  }
};

// scores[(kvh - h0) * rep + r][p - first] = scale * q_{kvh * rep + r} . k_kvh(p) for kv heads [h0, h1) (q: the
// sequence's [H, Dh]; Dh = 8 * Lanes): each key row is read and converted once for the rep query heads sharing it.
template <typename T, int Lanes>
void key_scores(const float* q, const PagedRows<T>& k, int64_t first, int64_t ctx, int64_t h0, int64_t h1, int64_t rep,
                float scale, float* scores) {
  static_assert(Lanes % 2 == 0, "two accumulators");
  constexpr int64_t Dh = 8 * Lanes;
  const int64_t len = ctx - first;
  k.for_each_block(first, ctx, [&](int64_t p0, int64_t p1, const T* rows) {
    for (int64_t kvh = h0; kvh < h1; ++kvh) {
      const float* qh = q + kvh * rep * Dh;
      float* sh = scores + (kvh - h0) * rep * len - first;
      for (int64_t p = p0; p < p1; ++p) {
        const T* kr = rows + (p - p0) * k.slot_stride + kvh * Dh;
        __m256 kv[Lanes];
        for (int j = 0; j < Lanes; ++j) kv[j] = load8(kr + 8 * j);
        for (int64_t r = 0; r < rep; ++r) {
          const float* qr = qh + r * Dh;
          __m256 acc0 = _mm256_mul_ps(kv[0], _mm256_loadu_ps(qr)), acc1 = _mm256_mul_ps(kv[1], _mm256_loadu_ps(qr + 8));
          for (int j = 2; j < Lanes; j += 2) {
            acc0 = _mm256_fmadd_ps(kv[j], _mm256_loadu_ps(qr + 8 * j), acc0);
            acc1 = _mm256_fmadd_ps(kv[j + 1], _mm256_loadu_ps(qr + 8 * j + 8), acc1);
          }
          sh[r * len + p] = hsum(_mm256_add_ps(acc0, acc1)) * scale;
        }
      }
    }
  });
}

// The same for any head size.
template <typename T>
void key_scores_any(const float* q, const PagedRows<T>& k, int64_t first, int64_t ctx, int64_t h0, int64_t h1,
                    int64_t rep, int64_t Dh, float scale, float* scores) {
  const int64_t len = ctx - first;
  k.for_each_block(first, ctx, [&](int64_t p0, int64_t p1, const T* rows) {
    for (int64_t kvh = h0; kvh < h1; ++kvh) {
      for (int64_t p = p0; p < p1; ++p) {
        const T* kr = rows + (p - p0) * k.slot_stride + kvh * Dh;
        for (int64_t r = 0; r < rep; ++r) {
          scores[((kvh - h0) * rep + r) * len + p - first] = dot(q + (kvh * rep + r) * Dh, kr, Dh) * scale;
        }
      }
    }
  });
}

// o_h += sum_{p in [p0, p1)} w_h[p] v(p) for Heads query heads sharing one value head (w_h at w + h * len, indexed by
// position; o_h at o + h * Dh; v(p) at rows + (p - p0) * stride), 32 columns at a time in 4 * Heads accumulators.
template <typename T, int Heads>
void accumulate_values(const float* w, int64_t len, const T* rows, int64_t stride, int64_t p0, int64_t p1, int64_t Dh,
                       float* o) {
  for (int64_t c = 0; c < Dh; c += 32) {
    __m256 acc[Heads][4];
    for (int h = 0; h < Heads; ++h)
      for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_loadu_ps(o + h * Dh + c + 8 * j);
    for (int64_t p = p0; p < p1; ++p) {
      const T* vr = rows + (p - p0) * stride + c;
      __m256 wp[Heads];
      for (int h = 0; h < Heads; ++h) wp[h] = _mm256_set1_ps(w[h * len + p]);
      for (int j = 0; j < 4; ++j) {
        const __m256 vj = load8(vr + 8 * j);
        for (int h = 0; h < Heads; ++h) acc[h][j] = _mm256_fmadd_ps(wp[h], vj, acc[h][j]);
      }
    }
    for (int h = 0; h < Heads; ++h)
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + h * Dh + c + 8 * j, acc[h][j]);
  }
}

// o[(kvh - h0) * rep + r] = sum_p w[(kvh - h0) * rep + r][p - first] v_kvh(p) for kv heads [h0, h1), block by block.
template <typename T>
void value_sums(const float* w, const PagedRows<T>& v, int64_t first, int64_t ctx, int64_t h0, int64_t h1, int64_t rep,
                int64_t Dh, float* o) {
  const int64_t len = ctx - first;
  std::fill(o, o + (h1 - h0) * rep * Dh, 0.0f);
  v.for_each_block(first, ctx, [&](int64_t p0, int64_t p1, const T* rows) {
    for (int64_t kvh = h0; kvh < h1; ++kvh) {
      const T* vh = rows + kvh * Dh;
      for (int64_t r = 0; r < rep; r += 3) {  // three query heads at a time: 12 accumulators
        const int64_t head = (kvh - h0) * rep + r;
        const float* wr = w + head * len - first;
        float* oh = o + head * Dh;
        if (Dh % 32 != 0) {
          for (int64_t h = r; h < std::min(rep, r + 3); ++h) {
            for (int64_t p = p0; p < p1; ++p) {
              axpy(wr[(h - r) * len + p], vh + (p - p0) * v.slot_stride, oh + (h - r) * Dh, Dh);
            }
          }
          continue;
        }
        switch (std::min<int64_t>(3, rep - r)) {
          case 3: accumulate_values<T, 3>(wr, len, vh, v.slot_stride, p0, p1, Dh, oh); break;
          case 2: accumulate_values<T, 2>(wr, len, vh, v.slot_stride, p0, p1, Dh, oh); break;
          default: accumulate_values<T, 1>(wr, len, vh, v.slot_stride, p0, p1, Dh, oh);
        }
      }
    }
  });
}

template <typename T>
void decode_attention(const float* q, const T* kp, const T* vp, const int32_t* tables, int64_t max_blocks,
                      const int32_t* lens, int64_t G, int64_t H, int64_t Hkv, int64_t Dh, int64_t bs, int64_t window,
                      float* out) {
  const int64_t rep = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  // All of a sequence's kv heads in one work item, so that its blocks are read whole; one item per kv head only
  // when there are too few sequences to keep the threads busy.
  const int64_t heads_per_item = G >= 2 * at::get_num_threads() ? Hkv : 1;
  const int64_t items_per_seq = Hkv / heads_per_item;
  at::parallel_for(0, G * items_per_seq, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores, inv_total;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = i / items_per_seq, h0 = (i % items_per_seq) * heads_per_item, h1 = h0 + heads_per_item;
      const int64_t ctx = lens[g], first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0, len = ctx - first;
      const int64_t heads = (h1 - h0) * rep;
      const PagedRows<T> k{kp, tables + g * max_blocks, bs, Hkv * Dh}, v{vp, tables + g * max_blocks, bs, Hkv * Dh};
      const float* qg = q + g * H * Dh;
      float* o = out + (g * H + h0 * rep) * Dh;
      scores.resize(static_cast<size_t>(heads * len));
      switch (Dh) {
        case 64: key_scores<T, 8>(qg, k, first, ctx, h0, h1, rep, scale, scores.data()); break;
        case 96: key_scores<T, 12>(qg, k, first, ctx, h0, h1, rep, scale, scores.data()); break;
        case 128: key_scores<T, 16>(qg, k, first, ctx, h0, h1, rep, scale, scores.data()); break;
        default: key_scores_any<T>(qg, k, first, ctx, h0, h1, rep, Dh, scale, scores.data());
      }
      inv_total.resize(static_cast<size_t>(heads));
      for (int64_t h = 0; h < heads; ++h) inv_total[h] = 1.0f / softmax_in_place(scores.data() + h * len, len);
      value_sums(scores.data(), v, first, ctx, h0, h1, rep, Dh, o);
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t d = 0; d < Dh; ++d) o[h * Dh + d] *= inv_total[h];
      }
    }
  });
}

constexpr int64_t kPrefillRows = 64;

// One prefill chunk: work items are (kv head, block of kPrefillRows query rows). Each gathers the keys and values its
// rows can see into fp32 rows once, then for each query head sharing them multiplies scores, softmax and values with
// the BLAS sgemm (see prefill_attention in paged_attention.h).
template <typename T>
void prefill_attention(const float* q, const T* kp, const T* vp, const int64_t* slots, int64_t S, int64_t count,
                       int64_t window, int64_t H, int64_t Hkv, int64_t Dh, float* out) {
  const int64_t p0 = S - count, group = H / Hkv, blocks = (count + kPrefillRows - 1) / kPrefillRows;
  const int64_t row_stride = H * Dh;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh)));
  auto first_key = [&](int64_t r) { return window > 0 ? std::max<int64_t>(0, p0 + r + 1 - window) : int64_t{0}; };
  at::parallel_for(0, Hkv * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> keys, values, scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / blocks, r0 = item % blocks * kPrefillRows, r1 = std::min(count, r0 + kPrefillRows);
      const int64_t rows = r1 - r0, c0 = first_key(r0), cols = p0 + r1 - c0;
      keys.resize(cols * Dh);
      values.resize(cols * Dh);
      scores.resize(rows * cols);
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t at = (slots[c0 + j] * Hkv + g) * Dh;
        convert_row(kp + at, keys.data() + j * Dh, Dh);
        convert_row(vp + at, values.data() + j * Dh, Dh);
      }
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        gemm(false, true, rows, cols, Dh, scale, q + r0 * row_stride + h * Dh, row_stride, keys.data(), Dh, 0.0f,
             scores.data(), cols);
        for (int64_t r = 0; r < rows; ++r) {  // visible keys [first_key - c0, own position - c0]
          softmax_span_(scores.data() + r * cols, cols, first_key(r0 + r) - c0, p0 + r0 + r + 1 - c0);
        }
        gemm(false, false, rows, Dh, cols, 1.0f, scores.data(), cols, values.data(), Dh, 0.0f,
             out + r0 * row_stride + h * Dh, row_stride);
      }
    }
  });
}

}  // namespace

bool paged_prefill_attention(const float* q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                             const torch::Tensor& slots, int64_t count, int64_t window, int64_t H, float* out) {
  if (sgemm() == nullptr) return false;
  const int64_t S = slots.size(0), Hkv = k_pool.size(1), Dh = k_pool.size(2);
  const int64_t* slot_rows = slots.data_ptr<int64_t>();
  if (k_pool.scalar_type() == torch::kHalf) {
    prefill_attention<c10::Half>(q, k_pool.data_ptr<c10::Half>(), v_pool.data_ptr<c10::Half>(), slot_rows, S, count,
                                 window, H, Hkv, Dh, out);
  } else {
    prefill_attention<float>(q, k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), slot_rows, S, count, window, H,
                             Hkv, Dh, out);
  }
  return true;
}

void paged_decode_attention(const float* q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                            const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t block_size,
                            int64_t window, int64_t H, float* out) {
  const int64_t G = context_lens.size(0), Hkv = k_pool.size(1), Dh = k_pool.size(2);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1);
  if (k_pool.scalar_type() == torch::kHalf) {
    decode_attention<c10::Half>(q, k_pool.data_ptr<c10::Half>(), v_pool.data_ptr<c10::Half>(), tables, max_blocks, lens,
                                G, H, Hkv, Dh, block_size, window, out);
  } else {
    decode_attention<float>(q, k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), tables, max_blocks, lens, G, H, Hkv,
                            Dh, block_size, window, out);
  }
}

void register_paged_attention(pybind11::module& m) {
  m.def(
      "paged_prefill_attention",
      [](const torch::Tensor& q_QHD, const torch::Tensor& k_pool, const torch::Tensor& v_pool, const torch::Tensor& slots,
         int64_t window) {
        TORCH_CHECK(q_QHD.dim() == 3 && q_QHD.scalar_type() == torch::kFloat && q_QHD.is_contiguous(),
                    "q: contiguous float32 [Q, H, Dh]");
        TORCH_CHECK(k_pool.dim() == 3 && k_pool.sizes() == v_pool.sizes() && k_pool.is_contiguous() &&
                        v_pool.is_contiguous() && k_pool.scalar_type() == v_pool.scalar_type() &&
                        (k_pool.scalar_type() == torch::kFloat || k_pool.scalar_type() == torch::kHalf),
                    "k_pool, v_pool: contiguous float32 or float16 [slots, Hkv, Dh] of one shape");
        TORCH_CHECK(q_QHD.size(2) == k_pool.size(2) && q_QHD.size(1) % k_pool.size(1) == 0,
                    "q's head size must be the pools', and its heads a multiple of their kv heads");
        TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == torch::kLong && slots.is_contiguous() &&
                        slots.size(0) >= q_QHD.size(0),
                    "slots: contiguous int64 [S], S >= the query rows");
        TORCH_CHECK(slots.numel() == 0 || (slots.min().item<int64_t>() >= 0 && slots.max().item<int64_t>() < k_pool.size(0)),
                    "slots outside the pools");
        TORCH_CHECK(window >= 0, "window >= 0");
        auto out = torch::empty_like(q_QHD);
        TORCH_CHECK(paged_prefill_attention(q_QHD.data_ptr<float>(), k_pool, v_pool, slots, q_QHD.size(0), window,
                                            q_QHD.size(1), out.data_ptr<float>()),
                    "no BLAS sgemm in this PyTorch build");
        return out;
      },
      pybind11::arg("q"), pybind11::arg("k_pool"), pybind11::arg("v_pool"), pybind11::arg("slots"),
      pybind11::arg("window") = 0);
  m.def(
      "paged_decode_attention",
      [](const torch::Tensor& q_GHD, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
         const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t block_size, int64_t window) {
        TORCH_CHECK(q_GHD.dim() == 3 && q_GHD.scalar_type() == torch::kFloat && q_GHD.is_contiguous(),
                    "q: contiguous float32 [G, H, Dh]");
        TORCH_CHECK(k_pool.dim() == 3 && k_pool.sizes() == v_pool.sizes() && k_pool.is_contiguous() &&
                        v_pool.is_contiguous(), "k_pool, v_pool: contiguous [slots, Hkv, Dh] of one shape");
        TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type() &&
                        (k_pool.scalar_type() == torch::kFloat || k_pool.scalar_type() == torch::kHalf),
                    "k_pool, v_pool: both float32 or both float16");
        TORCH_CHECK(q_GHD.size(2) == k_pool.size(2) && q_GHD.size(1) % k_pool.size(1) == 0,
                    "q's head size must be the pools', and its heads a multiple of their kv heads");
        TORCH_CHECK(block_tables.scalar_type() == torch::kInt && block_tables.dim() == 2 && block_tables.is_contiguous() &&
                        block_tables.size(0) == q_GHD.size(0), "block_tables: contiguous int32 [G, max_blocks]");
        TORCH_CHECK(context_lens.scalar_type() == torch::kInt && context_lens.dim() == 1 &&
                        context_lens.size(0) == q_GHD.size(0), "context_lens: int32 [G]");
        TORCH_CHECK(block_size >= 1 && window >= 0, "block_size >= 1, window >= 0");
        const int64_t slots = k_pool.size(0), max_blocks = block_tables.size(1);
        const int32_t* lens = context_lens.data_ptr<int32_t>();
        const int32_t* tables = block_tables.data_ptr<int32_t>();
        for (int64_t g = 0; g < q_GHD.size(0); ++g) {
          TORCH_CHECK(lens[g] >= 1 && lens[g] <= max_blocks * block_size, "context_lens[", g, "] out of range");
          for (int64_t b = 0; b * block_size < lens[g]; ++b) {
            TORCH_CHECK(tables[g * max_blocks + b] >= 0 && (tables[g * max_blocks + b] + 1) * block_size <= slots,
                        "block_tables[", g, ", ", b, "] is outside the pools");
          }
        }
        auto out = torch::empty_like(q_GHD);
        {
          pybind11::gil_scoped_release release;
          paged_decode_attention(q_GHD.data_ptr<float>(), k_pool, v_pool, block_tables, context_lens, block_size, window,
                                 q_GHD.size(1), out.data_ptr<float>());
        }
        return out;
      },
      pybind11::arg("q"), pybind11::arg("k_pool"), pybind11::arg("v_pool"), pybind11::arg("block_tables"),
      pybind11::arg("context_lens"), pybind11::arg("block_size"), pybind11::arg("window") = 0,
      "Decode attention of q [G, H, Dh] over paged K/V pools [slots, Hkv, Dh] (float32 or float16), read in place.");
}

}  // namespace hanlin

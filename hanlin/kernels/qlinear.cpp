// Fused dequantize + matmul CPU kernels (AVX2, FMA, F16C) for the packed weights described in qlinear.h.
//
// Quantized weights (kQ8, kQ4) take three paths, picked by the number N of input rows:
//   N <= kFusedMaxRows   fused: inputs quantized per 32 to int8, each block of weights multiplied into every
//                        input with integer dot products, scaled in fp32 (decode; see below).
//   N < kMklMinRows      small_batch: 3 weight rows at a time are dequantized into an L1 buffer and applied
//                        to 4 inputs at once (register blocking, 12 accumulators).
//   N >= kMklMinRows     large_batch: tiles of W are dequantized into a per-thread buffer and multiplied by
//                        MKL (at::mm), so prefill runs near fp32 GEMM speed without expanding all of W.
// fp32 weights (kF32 column-major, kF32Panels) have their own register-tiled kernels at the end of the file.
// Output rows are handed out to ATen's intra-op threads in chunks claimed dynamically, so that a core
// slowed by another process does not hold the other one up.
#include "qlinear.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "simd.h"

namespace hanlin {
namespace {

using Half = uint16_t;  // raw IEEE fp16 bits

constexpr int64_t kMklMinRows = 192;  // N from which MKL on dequantized tiles beats the register-blocked kernel

struct QWeight {
  int64_t kind, M, K, group, groups;  // groups: scales per row (K / group)
  const uint8_t* q;
  int64_t row_bytes;
  const Half* scales;
  const Half* mins;  // kQ4 only

  const int8_t* q8_row(int64_t m) const { return reinterpret_cast<const int8_t*>(q + m * row_bytes); }
  const uint8_t* q4_row(int64_t m) const { return q + m * row_bytes; }
  const Half* scale_row(int64_t m) const { return scales + m * groups; }
  const Half* min_row(int64_t m) const { return mins + m * groups; }
};

// ---------------------------------------------------------------------------------------------------------
// Small helpers

float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[3];
  auto& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

void half_to_float(const Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

float dot_half(const Half* h, const float* v, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))),
                          _mm256_loadu_ps(v + i), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  float sum = _mm_cvtss_f32(s);
  for (; i < n; ++i) sum += _cvtsh_ss(h[i]) * v[i];
  return sum;
}

inline __m256i load_8_bytes_u32(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

inline __m256 load_8_int8_ps(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Runs fn(begin, end) over [0, n) in chunks of `chunk`, each claimed by whichever thread is free.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& fn) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < chunks; ++c) fn(c * chunk, std::min(n, (c + 1) * chunk));
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;)
      fn(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// Rows per chunk: about `per_thread` chunks per thread, a multiple of `multiple`, at least `min_rows`.
int64_t chunk_rows(int64_t M, int64_t per_thread, int64_t multiple, int64_t min_rows) {
  const int64_t want = M / (per_thread * std::max(1, at::get_num_threads()));
  const int64_t rows = std::max(min_rows, want);
  return (rows + multiple - 1) / multiple * multiple;
}

// ---------------------------------------------------------------------------------------------------------
// Dequantization of whole rows into fp32 (small and large batches)

void dequantize_row_q8(const QWeight& w, int64_t m, float* out) {
  const int8_t* q = w.q8_row(m);
  const Half* s = w.scale_row(m);
  for (int64_t g = 0, k = 0; g < w.groups; ++g) {
    const float scale = _cvtsh_ss(s[g]);
    const __m256 vs = _mm256_set1_ps(scale);
    const int64_t end = k + w.group;
    for (; k + 8 <= end; k += 8) _mm256_storeu_ps(out + k, _mm256_mul_ps(load_8_int8_ps(q + k), vs));
    for (; k < end; ++k) out[k] = q[k] * scale;
  }
}

void dequantize_row_q4(const QWeight& w, int64_t m, float* out) {
  const uint8_t* q = w.q4_row(m);
  const Half* s = w.scale_row(m);
  const Half* mn = w.min_row(m);
  const __m256i low_nibble = _mm256_set1_epi32(15);
  for (int64_t g = 0, k = 0; g < w.groups; ++g) {
    const __m256 vs = _mm256_set1_ps(_cvtsh_ss(s[g]));
    const __m256 vm = _mm256_set1_ps(_cvtsh_ss(mn[g]));
    for (const int64_t end = k + w.group; k < end; k += 32) {
      const __m256i b0 = load_8_bytes_u32(q + k / 2), b1 = load_8_bytes_u32(q + k / 2 + 8);
      auto put = [&](int64_t at, __m256i nibbles) {
        _mm256_storeu_ps(out + at, _mm256_fmadd_ps(_mm256_cvtepi32_ps(nibbles), vs, vm));
      };
      put(k, _mm256_and_si256(b0, low_nibble));
      put(k + 8, _mm256_and_si256(b1, low_nibble));
      put(k + 16, _mm256_srli_epi32(b0, 4));
      put(k + 24, _mm256_srli_epi32(b1, 4));
    }
  }
}

// rows x ld floats: W[m0 + i, k] at out[i * ld + k], zeros for K <= k < ld.
void dequantize_rows(const QWeight& w, int64_t m0, int64_t rows, float* out, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = out + i * ld;
    if (w.kind == kQ8)
      dequantize_row_q8(w, m0 + i, row);
    else
      dequantize_row_q4(w, m0 + i, row);
    std::fill(row + w.K, row + ld, 0.f);
  }
}

// ---------------------------------------------------------------------------------------------------------
// 1 <= N <= kFusedMaxRows (decode): integer dot products, as llama.cpp does. Each input row is quantized
// per block of 32 to int8 with its own fp32 scale d (|error| <= d / 2 per element); a block of weights is
// then multiplied into it exactly in integers (maddubs + madd: 32 products in 2 instructions instead of
// converting every weight to fp32), and each block's integer sum is scaled in fp32. A 4-bit group's min
// multiplies the exact fp32 sum of x over the group. Per-channel int8 with K not a multiple of 32 stays
// in fp32 (q8_channel_dot).
constexpr int64_t kFusedMaxRows = 4;

struct QuantizedInputs {
  std::vector<int8_t> q;         // [N, K]
  std::vector<float> d;          // [N, K / 32]: x ≈ q * d
  std::vector<float> group_sums; // [N, K / group]: exact sums of x (4-bit weights only)
};

QuantizedInputs quantize_inputs(const float* x, int64_t N, int64_t K, int64_t group, bool sums) {
  const int64_t blocks = K / 32, groups = K / group;
  QuantizedInputs in{std::vector<int8_t>(N * K), std::vector<float>(N * blocks), std::vector<float>(sums ? N * groups : 0)};
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256i lane_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + n * K + b * 32;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[i]));
      }
      __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m = _mm_max_ps(m, _mm_movehl_ps(m, m));
      m = _mm_max_ss(m, _mm_movehdup_ps(m));
      const float d = _mm_cvtss_f32(m) / 127.f;
      in.d[n * blocks + b] = d;
      const __m256 inv = _mm256_set1_ps(d > 0 ? 1.f / d : 0.f);
      __m256i i32[4];
      for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // round to nearest
      const __m256i i16 = _mm256_packs_epi32(i32[0], i32[1]), j16 = _mm256_packs_epi32(i32[2], i32[3]);
      const __m256i i8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i16, j16), lane_order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(in.q.data() + n * K + b * 32), i8);
    }
    if (sums)
      for (int64_t g = 0; g < groups; ++g) {
        float s = 0.f;
        for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[n * K + k];
        in.group_sums[n * groups + g] = s;
      }
  }
  return in;
}

// The 32 unsigned 4-bit weights of a block in order (low nibbles are weights 0-15, high nibbles 16-31).
inline __m256i q4_block_u8(const uint8_t* q) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(15));
}

// Sum of the 32 products w_j * x_j as 8 int32 lanes; w unsigned (4-bit) or signed (int8, via the sign trick).
template <bool kSigned>
inline __m256i block_products(__m256i w, __m256i x) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (kSigned) return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), ones);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
}

// out[r][n] = row m + r of W times input n, for R weight rows and NX inputs (kQ4 or kQ8 with group % 32 == 0).
template <int R, int NX, bool kQ4Weights>
void integer_dots(const QWeight& w, int64_t m, const QuantizedInputs& in, float (&out)[R][NX]) {
  const int64_t K = w.K, blocks = K / 32, blocks_per_group = w.group / 32;
  float* scale_buffer = scratch(0, R * w.groups);
  const uint8_t* q[R];
  for (int r = 0; r < R; ++r) {
    half_to_float(w.scale_row(m + r), scale_buffer + r * w.groups, w.groups);
    q[r] = w.q + (m + r) * w.row_bytes;
  }
  __m256 total[R][NX];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NX; ++n) total[r][n] = _mm256_setzero_ps();
  for (int64_t g = 0, b = 0; g < w.groups; ++g) {
    __m256 acc[R][NX];
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < NX; ++n) acc[r][n] = _mm256_setzero_ps();
    for (int64_t end = b + blocks_per_group; b < end; ++b) {
      __m256i xq[NX];
      __m256 xd[NX];
      for (int n = 0; n < NX; ++n) {
        xq[n] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in.q.data() + n * K + b * 32));
        xd[n] = _mm256_broadcast_ss(in.d.data() + n * blocks + b);
      }
      for (int r = 0; r < R; ++r) {
        const __m256i wq = kQ4Weights ? q4_block_u8(q[r] + b * 16)
                                      : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + b * 32));
        for (int n = 0; n < NX; ++n)
          acc[r][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_products<!kQ4Weights>(wq, xq[n])), xd[n], acc[r][n]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 scale = _mm256_broadcast_ss(scale_buffer + r * w.groups + g);
      for (int n = 0; n < NX; ++n) total[r][n] = _mm256_fmadd_ps(scale, acc[r][n], total[r][n]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NX; ++n) {
      out[r][n] = hsum(total[r][n]);
      if (kQ4Weights) out[r][n] += dot_half(w.min_row(m + r), in.group_sums.data() + n * w.groups, w.groups);
    }
}

// Per-channel int8 with K not a multiple of 32: vector part, then a scalar tail (fp32 throughout).
float q8_channel_dot(const QWeight& w, int64_t m, const float* x) {
  const int8_t* q = w.q8_row(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= w.K; k += 8) acc = _mm256_fmadd_ps(load_8_int8_ps(q + k), _mm256_loadu_ps(x + k), acc);
  float sum = hsum(acc);
  for (; k < w.K; ++k) sum += q[k] * x[k];
  return sum * _cvtsh_ss(w.scale_row(m)[0]);
}

// y[n, m .. m + R) for NX inputs.
template <int R, int NX>
void fused_rows(const QWeight& w, int64_t m, const float* x, const QuantizedInputs& in, const float* bias, float* y) {
  float out[R][NX];
  if (w.kind == kQ8 && w.group % 32 != 0) {
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < NX; ++n) out[r][n] = q8_channel_dot(w, m + r, x + n * w.K);
  } else if (w.kind == kQ4) {
    integer_dots<R, NX, true>(w, m, in, out);
  } else {
    integer_dots<R, NX, false>(w, m, in, out);
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NX; ++n) y[n * w.M + m + r] = out[r][n] + (bias ? bias[m + r] : 0.f);
}

// Weight rows [begin, end), R at a time (their blocks share each input block's loads).
template <int R, int NX>
void fused_row_range(const QWeight& w, int64_t begin, int64_t end, const float* x, const QuantizedInputs& in,
                     const float* bias, float* y) {
  int64_t m = begin;
  for (; m + R <= end; m += R) fused_rows<R, NX>(w, m, x, in, bias, y);
  for (; m < end; ++m) fused_rows<1, NX>(w, m, x, in, bias, y);
}

template <int NX>
void fused_batch(const QWeight& w, const float* x, const float* bias, float* y) {
  QuantizedInputs in;
  if (w.group % 32 == 0) in = quantize_inputs(x, NX, w.K, w.group, w.kind == kQ4);
  // Measured (2 threads, SmolLM2 shapes): int8 rows one at a time stream from memory at ~40 GB/s, four
  // interleaved rows at ~14 GB/s; 4-bit rows, which cost more arithmetic per byte, do best in pairs.
  parallel_chunks(w.M, chunk_rows(w.M, 8, 8, 16), [&](int64_t begin, int64_t end) {
    if (w.kind == kQ4 && NX <= 2)
      fused_row_range<2, NX>(w, begin, end, x, in, bias, y);
    else
      fused_row_range<1, NX>(w, begin, end, x, in, bias, y);
  });
}

void fused(const QWeight& w, const float* x, int64_t N, const float* bias, float* y) {
  switch (N) {
    case 1: return fused_batch<1>(w, x, bias, y);
    case 2: return fused_batch<2>(w, x, bias, y);
    case 3: return fused_batch<3>(w, x, bias, y);
    case 4: return fused_batch<4>(w, x, bias, y);
  }
  TORCH_CHECK(false, "qlinear: fused kernel called with ", N, " rows");
}

// ---------------------------------------------------------------------------------------------------------
// kFusedMaxRows < N < kMklMinRows: register-blocked dot products on a few dequantized rows

constexpr int kTileRows = 3, kTileInputs = 4;

// y[j * ldy + i] = w[i] . x[j] (+ bias[i]) for MR weight rows and NR input rows, K a multiple of 8.
template <int MR, int NR>
void dot_tile(const float* w, const float* x, int64_t ld, int64_t K, const float* bias, float* y, int64_t ldy) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[MR];
    for (int i = 0; i < MR; ++i) wv[i] = _mm256_loadu_ps(w + i * ld + k);
    for (int j = 0; j < NR; ++j) {
      const __m256 xv = _mm256_loadu_ps(x + j * ld + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[j * ldy + i] = hsum(acc[i][j]) + (bias ? bias[i] : 0.f);
}

template <int MR>
void dot_rows_all_inputs(const float* w, const float* x, int64_t N, int64_t ld, const float* bias, float* y,
                         int64_t ldy) {
  int64_t n = 0;
  for (; n + kTileInputs <= N; n += kTileInputs) dot_tile<MR, kTileInputs>(w, x + n * ld, ld, ld, bias, y + n * ldy, ldy);
  const float* xs = x + n * ld;
  float* ys = y + n * ldy;
  switch (N - n) {
    case 3: dot_tile<MR, 3>(w, xs, ld, ld, bias, ys, ldy); break;
    case 2: dot_tile<MR, 2>(w, xs, ld, ld, bias, ys, ldy); break;
    case 1: dot_tile<MR, 1>(w, xs, ld, ld, bias, ys, ldy); break;
  }
}

// x: [N, ld] with ld = K rounded up to 8 (zero padded). Each kTileRows weight rows are dequantized into an
// L1 buffer and run against all inputs.
void small_batch(const QWeight& w, const float* x, int64_t N, int64_t ld, const float* bias, float* y) {
  const int64_t M = w.M;
  auto rows = [&](int64_t begin, int64_t end) {
    float* buffer = scratch(1, kTileRows * ld);
    for (int64_t m = begin; m < end; m += kTileRows) {
      const int64_t count = std::min<int64_t>(kTileRows, end - m);
      dequantize_rows(w, m, count, buffer, ld);
      const float* b = bias ? bias + m : nullptr;
      switch (count) {
        case 3: dot_rows_all_inputs<3>(buffer, x, N, ld, b, y + m, M); break;
        case 2: dot_rows_all_inputs<2>(buffer, x, N, ld, b, y + m, M); break;
        case 1: dot_rows_all_inputs<1>(buffer, x, N, ld, b, y + m, M); break;
      }
    }
  };
  parallel_chunks(M, chunk_rows(M, 8, kTileRows, kTileRows), rows);
}

// ---------------------------------------------------------------------------------------------------------
// N >= kMklMinRows: MKL sgemm on dequantized tiles of W

void large_batch(const QWeight& w, const torch::Tensor& x, const float* bias, torch::Tensor& y) {
  const int64_t M = w.M, K = w.K, N = x.size(0);
  float* yp = y.data_ptr<float>();
  auto tile = [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's inference mode; without it mm_out refuses to write into an
    // inference tensor (and with grad mode into a tensor that requires grad). This kernel has no backward.
    c10::InferenceMode inference;
    const int64_t rows = end - begin;
    float* buffer = scratch(2, rows * K);
    dequantize_rows(w, begin, rows, buffer, K);
    const auto w_tile = torch::from_blob(buffer, {rows, K}, torch::kFloat32);
    auto y_tile = y.narrow(1, begin, rows);  // strided: ATen's CPU mm writes it in place (leading dimension M)
    at::mm_out(y_tile, x, w_tile.t());
    if (bias)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t m = begin; m < end; ++m) yp[n * M + m] += bias[m];
  };
  const int64_t tile_rows = std::min<int64_t>(256, chunk_rows(M, 4, 8, 32));
  parallel_chunks(M, tile_rows, tile);
}

// ---------------------------------------------------------------------------------------------------------
// Validation

QWeight check_weight(int64_t kind, const torch::Tensor& qdata, const torch::Tensor& scales, const torch::Tensor& mins,
                     int64_t group) {
  TORCH_CHECK(kind == kQ8 || kind == kQ4, "qlinear: unknown weight kind ", kind,
              " (0 = fp32, 1 = q8, 2 = q4, 3 = fp32 panels)");
  TORCH_CHECK(qdata.device().is_cpu() && scales.device().is_cpu(), "qlinear: tensors must be on the CPU");
  TORCH_CHECK(qdata.dim() == 2, "qlinear: qdata must be 2-D [M, K] (q4: [M, K / 2]), got ", qdata.sizes());
  TORCH_CHECK(group > 0, "qlinear: group must be positive, got ", group);
  QWeight w{};
  w.kind = kind;
  w.M = qdata.size(0);
  w.group = group;
  if (kind == kQ8) {
    TORCH_CHECK(qdata.scalar_type() == torch::kInt8, "qlinear: q8 qdata must be int8, got ", qdata.scalar_type());
    w.K = qdata.size(1);
    TORCH_CHECK(group == w.K || (group % 32 == 0 && w.K % group == 0), "qlinear: q8 group must equal K (", w.K,
                ") or be a multiple of 32 dividing K, got ", group);
  } else {
    TORCH_CHECK(qdata.scalar_type() == torch::kUInt8, "qlinear: q4 qdata must be uint8, got ", qdata.scalar_type());
    w.K = qdata.size(1) * 2;
    TORCH_CHECK(group % 32 == 0 && w.K % group == 0, "qlinear: q4 group must be a multiple of 32 dividing K (",
                w.K, "), got ", group);
  }
  TORCH_CHECK(w.K > 0, "qlinear: K must be positive");
  w.groups = w.K / group;
  auto check_scale_tensor = [&](const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), "qlinear: ", name, " must be on the CPU");
    TORCH_CHECK(t.scalar_type() == torch::kFloat16, "qlinear: ", name, " must be float16, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == w.M && t.size(1) == w.groups, "qlinear: ", name, " must be [M, K / group] = [",
                w.M, ", ", w.groups, "], got ", t.sizes());
  };
  check_scale_tensor(scales, "scales");
  w.q = static_cast<const uint8_t*>(qdata.data_ptr());
  w.row_bytes = qdata.size(1);
  w.scales = reinterpret_cast<const Half*>(scales.data_ptr<at::Half>());
  if (kind == kQ4) {
    check_scale_tensor(mins, "mins");
    w.mins = reinterpret_cast<const Half*>(mins.data_ptr<at::Half>());
  }
  return w;
}

// ---------------------------------------------------------------------------------------------------------
// fp32 weights stored column-major (Hanlin's CPU layout, models/weight_layout.py), 2 <= N < kMklMinRows:
// the classic GEMM micro-kernel — 16 output columns x NR inputs in registers, each step broadcasting one
// input value against two vectors of a weight row. Measured (2 threads, SmolLM2's layer shapes): 1.2-2.5x
// MKL's sgemm at N = 2-16, slower from N = 64, and no better on the 49152-wide vocabulary projection
// (one page per k at that stride), so N = 1, N > kColumnMaxRows and very wide weights stay with at::linear.
constexpr int64_t kColumns = 16, kColumnMaxRows = 32, kColumnMaxWidth = 8192;

template <int NR>
void column_tile(const float* wt, int64_t M, int64_t K, const float* x, int64_t m, const float* bias, float* y) {
  __m256 acc[NR][2];
  for (int n = 0; n < NR; ++n) acc[n][0] = acc[n][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(wt + k * M + m), w1 = _mm256_loadu_ps(wt + k * M + m + 8);
    for (int n = 0; n < NR; ++n) {
      const __m256 xv = _mm256_broadcast_ss(x + n * K + k);
      acc[n][0] = _mm256_fmadd_ps(xv, w0, acc[n][0]);
      acc[n][1] = _mm256_fmadd_ps(xv, w1, acc[n][1]);
    }
  }
  for (int n = 0; n < NR; ++n) {
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    if (bias) b0 = _mm256_loadu_ps(bias + m), b1 = _mm256_loadu_ps(bias + m + 8);
    _mm256_storeu_ps(y + n * M + m, _mm256_add_ps(acc[n][0], b0));
    _mm256_storeu_ps(y + n * M + m + 8, _mm256_add_ps(acc[n][1], b1));
  }
}

// y [N, M] = x [N, K] @ wt [K, M] (+ bias); M a multiple of kColumns.
void column_major_gemm(const float* wt, int64_t M, int64_t K, const float* x, int64_t N, const float* bias, float* y) {
  parallel_chunks(M / kColumns, std::max<int64_t>(1, chunk_rows(M / kColumns, 4, 1, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t m = block * kColumns;
      int64_t n = 0;
      for (; n + 4 <= N; n += 4) column_tile<4>(wt, M, K, x + n * K, m, bias, y + n * M);
      switch (N - n) {
        case 3: column_tile<3>(wt, M, K, x + n * K, m, bias, y + n * M); break;
        case 2: column_tile<2>(wt, M, K, x + n * K, m, bias, y + n * M); break;
        case 1: column_tile<1>(wt, M, K, x + n * K, m, bias, y + n * M); break;
      }
    }
  });
}

torch::Tensor f32_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  const int64_t M = weight.size(0), K = weight.size(1);
  const bool column_major = weight.dim() == 2 && weight.stride(0) == 1 && weight.stride(1) == M;
  const int64_t N = x.numel() / std::max<int64_t>(1, x.size(-1));
  const bool plain_bias = !bias || !bias->defined() || (bias->is_contiguous() && bias->scalar_type() == torch::kFloat32);
  if (!column_major || M % kColumns != 0 || M > kColumnMaxWidth || N < 2 || N > kColumnMaxRows || x.scalar_type() != torch::kFloat32 ||
      weight.scalar_type() != torch::kFloat32 || !x.device().is_cpu() || x.requires_grad() || !plain_bias ||
      (weight.requires_grad() && at::GradMode::is_enabled()) ||
      x.size(-1) != K)
    return at::linear(x, weight, bias);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = M;
  const auto x2 = x.reshape({-1, K}).contiguous();
  auto y = torch::empty({N, M}, x.options());
  const float* bp = bias && bias->defined() ? bias->data_ptr<float>() : nullptr;
  column_major_gemm(weight.data_ptr<float>(), M, K, x2.data_ptr<float>(), N, bp, y.data_ptr<float>());
  return y.view(out_sizes);
}

// ---------------------------------------------------------------------------------------------------------
// fp32 weights packed in panels (kF32Panels, models/quant_packing.py pack_panels): 16 output rows per panel,
// stored k by k ([K][16]), so each kernel below reads its panels front to back, one 64-byte line per k.
//   N == 1   GEMV over kGemvPanels panels at once: 8 independent FMA chains (4 cycles of latency, 2 FMAs a
//            cycle) and 4 sequential streams for the prefetcher.
//   N >= 2   the 6 x 16 register tile (12 accumulators): each k broadcasts 6 inputs against the panel's two
//            vectors, 8 loads per 12 FMAs, near the core's FMA peak once the panel sits in L2.
// Measured on the 2-core Zen 4 against the column-major kF32 path (at::linear, i.e. MKL, at N = 1 and N > 32;
// column_major_gemm between), SmolLM2-135M's 30 layers of linears, 1 / 2 threads:
//   N = 1 27.1 / 27.1 -> 15.2 / 13.0 ms, N = 4 58 / 32 -> 19 / 12, N = 16 66 / 40 -> 41 / 23,
//   N = 64 191 / 116 -> 134 / 71, N = 256 624 / 375 -> 511 / 277 (106 / 196 GFLOP/s: MKL is slower at every N);
// the 49152-wide lm_head, where a column-major weight touches a new page per k: N = 1 4.8 / 4.9 -> 4.0 / 3.4 ms,
// N = 16 29 / 23 -> 11 / 5.8.
constexpr int64_t kPanel = 16, kGemvPanels = 4;
// The tiles prefetch their panel 32 steps (2 KB) ahead: the hardware prefetcher alone left them waiting on
// memory (1 thread, the 30 layers: N = 4 33 -> 24 ms, N = 16 59 -> 46, N = 64 152 -> 137; 8 steps ahead gains
// half of that, 64 the same as 32). The GEMV's 4 streams gain nothing from it, and lost 20% with 4 prefetches
// a step.
constexpr int64_t kPrefetchAhead = 32;

struct Panels {
  const float* data;  // [P, K, 16]
  int64_t P, K, M;    // M <= 16 P: rows past M are padding (zeros) and never stored
  const float* panel(int64_t p) const { return data + p * K * kPanel; }
};

// y[m .. m + 16) = out (+ bias), or only the first M - m when the panel ends in padding.
inline void store_panel(const Panels& w, int64_t m, const float* out, const float* bias, float* y) {
  if (m + kPanel <= w.M) {
    __m256 a0 = _mm256_load_ps(out), a1 = _mm256_load_ps(out + 8);
    if (bias) a0 = _mm256_add_ps(a0, _mm256_loadu_ps(bias + m)), a1 = _mm256_add_ps(a1, _mm256_loadu_ps(bias + m + 8));
    _mm256_storeu_ps(y + m, a0);
    _mm256_storeu_ps(y + m + 8, a1);
    return;
  }
  for (int64_t i = 0; m + i < w.M; ++i) y[m + i] = out[i] + (bias ? bias[m + i] : 0.f);
}

// y[p * 16 ...] for G panels from p, one input row.
template <int G>
void panel_gemv(const Panels& w, int64_t p, const float* x, const float* bias, float* y) {
  const float* base = w.panel(p);
  const int64_t K = w.K, stride = K * kPanel;
  __m256 acc[G][2];
  for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 xv = _mm256_broadcast_ss(x + k);
    for (int g = 0; g < G; ++g) {
      const float* at = base + g * stride + k * kPanel;
      acc[g][0] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(at), acc[g][0]);
      acc[g][1] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(at + 8), acc[g][1]);
    }
  }
  // Through a buffer, in a loop GCC unrolls: storing the accumulators in the loop that handles a bias and a
  // ragged panel made it keep all of them in memory, written back on every k step (2x slower at N >= 8).
  alignas(32) float out[G][kPanel];
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) _mm256_store_ps(out[g], acc[g][0]), _mm256_store_ps(out[g] + 8, acc[g][1]);
  for (int g = 0; g < G; ++g) store_panel(w, (p + g) * kPanel, out[g], bias, y);
}

// y[n, panel p] for NR input rows from x (rows K apart); y rows M apart.
template <int NR>
void panel_tile(const Panels& w, int64_t p, const float* x, const float* bias, float* y) {
  const float* panel = w.panel(p);
  const int64_t K = w.K;
  __m256 acc[NR][2];
  for (int n = 0; n < NR; ++n) acc[n][0] = acc[n][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + (k + kPrefetchAhead) * kPanel), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel), w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
    for (int n = 0; n < NR; ++n) {
      const __m256 xv = _mm256_broadcast_ss(x + n * K + k);
      acc[n][0] = _mm256_fmadd_ps(xv, w0, acc[n][0]);
      acc[n][1] = _mm256_fmadd_ps(xv, w1, acc[n][1]);
    }
  }
  alignas(32) float out[NR][kPanel];
#pragma GCC unroll 8
  for (int n = 0; n < NR; ++n) _mm256_store_ps(out[n], acc[n][0]), _mm256_store_ps(out[n] + 8, acc[n][1]);
  for (int n = 0; n < NR; ++n) store_panel(w, p * kPanel, out[n], bias, y + n * w.M);
}

// NR inputs give 2 NR independent FMA chains; 8 keep both FMA units busy (4 cycles of latency), so a tile of
// 1 or 2 rows runs at a quarter or half speed: 6 + 1 and 6 + 2 rows go as 4 + 3 and 4 + 4.
void panel_rows(const Panels& w, int64_t p, const float* x, int64_t N, const float* bias, float* y) {
  auto tile = [&](int64_t n, int64_t rows) {
    const float* xs = x + n * w.K;
    float* ys = y + n * w.M;
    switch (rows) {
      case 6: panel_tile<6>(w, p, xs, bias, ys); break;
      case 5: panel_tile<5>(w, p, xs, bias, ys); break;
      case 4: panel_tile<4>(w, p, xs, bias, ys); break;
      case 3: panel_tile<3>(w, p, xs, bias, ys); break;
      case 2: panel_tile<2>(w, p, xs, bias, ys); break;
      case 1: panel_tile<1>(w, p, xs, bias, ys); break;
    }
  };
  int64_t n = 0;
  for (; N - n > 8 || N - n == 6; n += 6) tile(n, 6);
  if (N - n > 6) {  // 7 or 8 left
    tile(n, 4);
    n += 4;
  }
  if (n < N) tile(n, N - n);
}

void panel_linear(const Panels& w, const float* x, int64_t N, const float* bias, float* y) {
  if (N == 1) {
    const int64_t groups = (w.P + kGemvPanels - 1) / kGemvPanels;
    parallel_chunks(groups, chunk_rows(groups, 4, 1, 1), [&](int64_t begin, int64_t end) {
      int64_t p = begin * kGemvPanels;
      const int64_t last = std::min(w.P, end * kGemvPanels);
      for (; p + kGemvPanels <= last; p += kGemvPanels) panel_gemv<4>(w, p, x, bias, y);
      switch (last - p) {
        case 3: panel_gemv<3>(w, p, x, bias, y); break;
        case 2: panel_gemv<2>(w, p, x, bias, y); break;
        case 1: panel_gemv<1>(w, p, x, bias, y); break;
      }
    });
    return;
  }
  parallel_chunks(w.P, chunk_rows(w.P, 4, 1, 1), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) panel_rows(w, p, x, N, bias, y);
  });
}

void check_input(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "qlinear: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "qlinear: x must be on the CPU");
  TORCH_CHECK(x.dim() >= 1, "qlinear: x must have at least one dimension");
}

// The bias made contiguous (undefined when there is none), checked to be float32 [M].
torch::Tensor checked_bias(const c10::optional<torch::Tensor>& bias, int64_t M) {
  torch::Tensor b;
  if (bias && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == torch::kFloat32, "qlinear: bias must be float32, got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == M, "qlinear: bias must be [M] = [", M, "], got ", b.sizes());
  }
  return b;
}

// x already checked by check_input.
torch::Tensor f32_panels_linear(const torch::Tensor& x, const torch::Tensor& qdata, int64_t M,
                                const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(qdata.device().is_cpu(), "qlinear: tensors must be on the CPU");
  TORCH_CHECK(qdata.scalar_type() == torch::kFloat32, "qlinear: fp32 panels must be float32, got ", qdata.scalar_type());
  TORCH_CHECK(qdata.dim() == 3 && qdata.size(2) == kPanel, "qlinear: fp32 panels must be [ceil(M / 16), K, 16], got ",
              qdata.sizes());
  const int64_t P = qdata.size(0), K = qdata.size(1);
  TORCH_CHECK(M > (P - 1) * kPanel && M <= P * kPanel, "qlinear: fp32 panels: group must be M (",
              (P - 1) * kPanel + 1, " to ", P * kPanel, " for ", P, " panels), got ", M);
  TORCH_CHECK(x.size(-1) == K, "qlinear: x has ", x.size(-1), " features, the weight expects K = ", K);
  const torch::Tensor b = checked_bias(bias, M);
  const auto q = qdata.contiguous();
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = M;
  const auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t N = x2.size(0);
  auto y = torch::empty({N, M}, x.options());
  if (N > 0) panel_linear(Panels{q.data_ptr<float>(), P, K, M}, x2.data_ptr<float>(), N,
                          b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y.view(out_sizes);
}

}  // namespace

torch::Tensor qlinear(const torch::Tensor& x, int64_t kind, const torch::Tensor& qdata, const torch::Tensor& scales,
                      const torch::Tensor& mins, int64_t group, const c10::optional<torch::Tensor>& bias) {
  if (kind == kF32) return f32_linear(x, qdata, bias);
  check_input(x);
  if (kind == kF32Panels) return f32_panels_linear(x, qdata, group, bias);
  // Keep the tensors alive while raw pointers into them are used.
  const auto q = qdata.contiguous(), s = scales.contiguous();
  const auto mn = kind == kQ4 ? mins.contiguous() : mins;
  const QWeight w = check_weight(kind, q, s, mn, group);
  TORCH_CHECK(x.size(-1) == w.K, "qlinear: x has ", x.size(-1), " features, the weight expects K = ", w.K);
  const torch::Tensor b = checked_bias(bias, w.M);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = w.M;
  const auto x2 = x.reshape({-1, w.K}).contiguous();
  const int64_t N = x2.size(0);
  auto y = torch::empty({N, w.M}, x.options());
  if (N == 0 || w.M == 0) return y.view(out_sizes);
  const float* xp = x2.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (N <= kFusedMaxRows) {
    fused(w, xp, N, bp, yp);
  } else if (N < kMklMinRows) {
    const int64_t ld = (w.K + 7) / 8 * 8;
    if (ld == w.K) {
      small_batch(w, xp, N, ld, bp, yp);
    } else {
      auto padded = torch::zeros({N, ld}, x.options());
      padded.narrow(1, 0, w.K).copy_(x2);
      small_batch(w, padded.data_ptr<float>(), N, ld, bp, yp);
    }
  } else {
    large_batch(w, x2, bp, y);
  }
  return y.view(out_sizes);
}

void register_qlinear(pybind11::module& m) {
  m.def("qlinear", &qlinear, "y = x @ W^T (+ bias) for an fp32, fp32 panels, int8 or 4-bit packed weight (see qlinear.h)",
        pybind11::arg("x"), pybind11::arg("kind"), pybind11::arg("qdata"), pybind11::arg("scales"),
        pybind11::arg("mins"), pybind11::arg("group"), pybind11::arg("bias") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace hanlin

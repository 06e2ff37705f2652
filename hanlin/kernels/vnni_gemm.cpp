// int8 GEMM for decode-sized batches (1 to kVnniMaxRows rows) with AVX512-VNNI's vpdpbusd.
//
// torch._int_mm (oneDNN) reorders the whole weight into its VNNI layout on every call; at a few rows that pass
// costs about as much as the product (30 SmolLM MLPs at 16 rows, 1 thread: 16.5 ms, 10.5 ms with oneDNN's
// prepacked weights). Here the weight is laid out once, at load: 16 output channels x 4 consecutive inputs per
// 64-byte vector, [ceil(N / 16), ceil(K / 4), 16, 4], zero-padded. A register tile of up to 6 rows x 64 channels
// streams its weight strip once per 6 rows, each row's 4 inputs broadcast against the 4 vectors of a step.
//
// vpdpbusd multiplies unsigned by signed bytes, so each int8 row q is shifted to q + 128 (0..255) and the result
// loses 128 * sum_k W[n, k] again: the int32 output is exactly q @ W^T, as _int_mm gives it. Compiled for
// AVX512-VNNI by function attribute and used only where the CPU reports it; _int_mm everywhere else.
#include "vnni_gemm.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace hanlin {
namespace {

constexpr int64_t kLanes = 16;  // int32 channels per vector
constexpr int kTileRows = 6;
constexpr int kTileBlocks = 4;  // 6 x 4 accumulators + 4 weight vectors + a broadcast: 29 of 32 registers
constexpr int64_t kTileChannels = kTileBlocks * kLanes;

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

// out[r, 16 b + l] = sum_k u[r, k] * W[n0 + 16 b + l, k] + offset[16 b + l] for `Rows` rows and the 4 blocks of
// 16 channels (one tile) starting at the packed block `w`. The accumulators are named variables and start at the
// offset: with an array of them, or anything but plain stores after the loop, GCC spills them on every step.
#define VNNI_ROW(r)                                                  \
  if constexpr (Rows > r) {                                          \
    int32_t four;                                                    \
    std::memcpy(&four, u + r * u_stride + 4 * k, 4);                 \
    const __m512i x = _mm512_set1_epi32(four);                       \
    a##r##0 = _mm512_dpbusd_epi32(a##r##0, x, w0);                   \
    a##r##1 = _mm512_dpbusd_epi32(a##r##1, x, w1);                   \
    a##r##2 = _mm512_dpbusd_epi32(a##r##2, x, w2);                   \
    a##r##3 = _mm512_dpbusd_epi32(a##r##3, x, w3);                   \
  }
#define VNNI_STORE(r)                                                \
  if constexpr (Rows > r) {                                          \
    int32_t* o = out + r * out_stride;                               \
    _mm512_storeu_si512(o, a##r##0);                                 \
    _mm512_storeu_si512(o + 16, a##r##1);                            \
    _mm512_storeu_si512(o + 32, a##r##2);                            \
    _mm512_storeu_si512(o + 48, a##r##3);                            \
  }

template <int Rows>
VNNI_TARGET void vnni_tile(const uint8_t* u, int64_t u_stride, const int8_t* w, int64_t block_stride, int64_t quads,
                           const int32_t* offset, int32_t* out, int64_t out_stride) {
  const __m512i c0 = _mm512_loadu_si512(offset), c1 = _mm512_loadu_si512(offset + 16);
  const __m512i c2 = _mm512_loadu_si512(offset + 32), c3 = _mm512_loadu_si512(offset + 48);
  __m512i a00 = c0, a01 = c1, a02 = c2, a03 = c3, a10 = c0, a11 = c1, a12 = c2, a13 = c3;
  __m512i a20 = c0, a21 = c1, a22 = c2, a23 = c3, a30 = c0, a31 = c1, a32 = c2, a33 = c3;
  __m512i a40 = c0, a41 = c1, a42 = c2, a43 = c3, a50 = c0, a51 = c1, a52 = c2, a53 = c3;
  for (int64_t k = 0; k < quads; ++k) {
    const __m512i w0 = _mm512_loadu_si512(w + k * 64), w1 = _mm512_loadu_si512(w + block_stride + k * 64);
    const __m512i w2 = _mm512_loadu_si512(w + 2 * block_stride + k * 64);
    const __m512i w3 = _mm512_loadu_si512(w + 3 * block_stride + k * 64);
    VNNI_ROW(0) VNNI_ROW(1) VNNI_ROW(2) VNNI_ROW(3) VNNI_ROW(4) VNNI_ROW(5)
  }
  VNNI_STORE(0) VNNI_STORE(1) VNNI_STORE(2) VNNI_STORE(3) VNNI_STORE(4) VNNI_STORE(5)
}
#undef VNNI_ROW
#undef VNNI_STORE

using TileFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, const int32_t*, int32_t*, int64_t);

TileFn tile_for(int rows) {
  switch (rows) {
    case 1: return vnni_tile<1>;
    case 2: return vnni_tile<2>;
    case 3: return vnni_tile<3>;
    case 4: return vnni_tile<4>;
    case 5: return vnni_tile<5>;
    default: return vnni_tile<6>;
  }
}

}  // namespace

bool cpu_has_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni") && std::getenv("HANLIN_NO_VNNI") == nullptr;
  return has;
}

VnniWeight::VnniWeight(const torch::Tensor& w_NK) {
  TORCH_CHECK(w_NK.scalar_type() == torch::kInt8 && w_NK.dim() == 2 && w_NK.device().is_cpu(),
              "VnniWeight: an int8 CPU weight [N, K], got ", w_NK.scalar_type(), " ", w_NK.sizes());
  auto w = w_NK.contiguous();
  N_ = w.size(0);
  K_ = w.size(1);
  blocks_ = (N_ + kTileBlocks * kLanes - 1) / (kTileBlocks * kLanes) * kTileBlocks;  // whole tiles
  quads_ = (K_ + 3) / 4;
  packed_ = torch::zeros({blocks_, quads_, kLanes, 4}, w.options());
  correction_ = torch::zeros({blocks_ * kLanes}, w.options().dtype(torch::kInt32));
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = packed_.data_ptr<int8_t>();
  int32_t* corr = correction_.data_ptr<int32_t>();
  for (int64_t n = 0; n < N_; ++n) {
    int32_t sum = 0;
    for (int64_t k = 0; k < K_; ++k) {
      const int8_t v = src[n * K_ + k];
      sum += v;
      dst[((n / kLanes) * quads_ + k / 4) * 64 + (n % kLanes) * 4 + k % 4] = v;
    }
    corr[n] = -128 * sum;
  }
}

torch::Tensor VnniWeight::mm(const torch::Tensor& q_MK) const {
  TORCH_CHECK(cpu_has_vnni(), "VnniWeight.mm: this CPU has no AVX512-VNNI");
  TORCH_CHECK(q_MK.scalar_type() == torch::kInt8 && q_MK.dim() == 2 && q_MK.size(1) == K_,
              "VnniWeight.mm: int8 rows [M, ", K_, "] expected, got ", q_MK.scalar_type(), " ", q_MK.sizes());
  const int64_t M = q_MK.size(0), row_bytes = quads_ * 4;
  auto q = q_MK.contiguous();
  auto out = torch::empty({M, N_}, q.options().dtype(torch::kInt32));
  if (M == 0 || N_ == 0) return out;
  // q + 128; the padding meets zero weights. K is a local: through a byte store GCC would reload the member on
  // every iteration and not vectorize the loop.
  std::vector<uint8_t> shifted(M * row_bytes);
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr<int8_t>());
  const int64_t K = K_;
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* row = shifted.data() + m * row_bytes;
    const uint8_t* src = qp + m * K;
    for (int64_t k = 0; k < K; ++k) row[k] = src[k] ^ 0x80;
    for (int64_t k = K; k < row_bytes; ++k) row[k] = 0;
  }
  const int8_t* w = packed_.data_ptr<int8_t>();
  const int32_t* corr = correction_.data_ptr<int32_t>();
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t block_stride = quads_ * 64, tiles = blocks_ / kTileBlocks;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * kTileBlocks, n0 = b0 * kLanes;
      const int64_t valid = std::min<int64_t>(kTileChannels, N_ - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, M - m0));
        const TileFn tile = tile_for(rows);
        const uint8_t* u = shifted.data() + m0 * row_bytes;
        if (valid == kTileChannels) {
          tile(u, row_bytes, w + b0 * block_stride, block_stride, quads_, corr + n0, op + m0 * N_ + n0, N_);
          continue;
        }
        int32_t partial[kTileRows * kTileChannels];  // the last tile of an N that is not a multiple of 64
        tile(u, row_bytes, w + b0 * block_stride, block_stride, quads_, corr + n0, partial, kTileChannels);
        for (int r = 0; r < rows; ++r)
          std::memcpy(op + (m0 + r) * N_ + n0, partial + r * kTileChannels, valid * sizeof(int32_t));
      }
    }
  });
  return out;
}

torch::Tensor int8_mm(const torch::Tensor& q_MK, const torch::Tensor& w_NK, const VnniWeight* vnni) {
  if (vnni != nullptr && q_MK.size(0) <= kVnniMaxRows && cpu_has_vnni()) return vnni->mm(q_MK);
  return at::_int_mm(q_MK, w_NK.t());
}

void register_vnni_gemm(pybind11::module& m) {
  namespace py = pybind11;
  m.def("cpu_has_vnni", &cpu_has_vnni);
  m.attr("VNNI_MAX_ROWS") = kVnniMaxRows;
  m.def(
      "int8_mm",
      [](const torch::Tensor& q_MK, const torch::Tensor& w_NK, const std::shared_ptr<VnniWeight>& vnni) {
        return int8_mm(q_MK, w_NK, vnni.get());
      },
      py::arg("q_MK"), py::arg("w_NK"), py::arg("vnni") = py::none(), py::call_guard<py::gil_scoped_release>());
  py::class_<VnniWeight, std::shared_ptr<VnniWeight>>(m, "VnniWeight")
      .def(py::init<const torch::Tensor&>(), py::arg("w_NK"))
      .def("mm", &VnniWeight::mm, py::arg("q_MK"), py::call_guard<py::gil_scoped_release>())
      // immutable: a copied module shares it
      .def("__copy__", [](const std::shared_ptr<VnniWeight>& self) { return self; })
      .def("__deepcopy__", [](const std::shared_ptr<VnniWeight>& self, py::dict) { return self; }, py::arg("memo"))
      .def_property_readonly("out_features", &VnniWeight::out_features)
      .def_property_readonly("in_features", &VnniWeight::in_features);
}

}  // namespace hanlin

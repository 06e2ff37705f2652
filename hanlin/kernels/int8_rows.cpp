// Row quantization and int8-GEMM outputs (see int8_rows.h), vectorized with AVX2 and split over rows.
#include "int8_rows.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "simd.h"

namespace hanlin {
namespace {

constexpr int64_t kRowsPerTask = 8;

// erf(x) as x P(x^2) / Q(x^2) on [-4, 4] (the rational fit Eigen and XLA use; error ~1e-7), no exp.
inline __m256 erf8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-4.0f)), _mm256_set1_ps(4.0f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-2.72614225801306e-10f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.77068142495902e-08f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.10102402082508e-06f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-5.69250639462346e-05f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-7.34990630326855e-04f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.95459980854025e-03f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.60960333262415e-02f));
  __m256 q = _mm256_set1_ps(-1.45660718464996e-05f);
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-2.13374055278905e-04f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.68282697438203e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-7.37332916720468e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.42647390514189e-02f));
  __m256 inverse = _mm256_rcp_ps(q);  // 12 bits, then one Newton step: r (2 - q r)
  inverse = _mm256_mul_ps(inverse, _mm256_fnmadd_ps(q, inverse, _mm256_set1_ps(2.0f)));
  return _mm256_mul_ps(_mm256_mul_ps(x, p), inverse);
}

// GELU, exact (erf) or with the tanh approximation: tanh(u) = 1 - 2 / (1 + exp(2u)).
inline __m256 gelu8(__m256 x, bool tanh_approximation) {
  const __m256 half_x = _mm256_mul_ps(_mm256_set1_ps(0.5f), x);
  __m256 inner;
  if (tanh_approximation) {
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608f),
                                   _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x));
    const __m256 e = exp8(_mm256_min_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f), u), _mm256_set1_ps(80.0f)));
    inner = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  } else {
    inner = erf8(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678f)));
  }
  return _mm256_fmadd_ps(half_x, inner, half_x);
}

inline float gelu1(float x, bool tanh_approximation) {
  if (tanh_approximation) return 0.5f * x * (1.0f + std::tanh(0.7978845608f * (x + 0.044715f * x * x * x)));
  return 0.5f * x * (1.0f + std::erf(x * 0.70710678f));
}

// One row of K values to int8 given its range (lo <= 0 <= hi): writes q[0..K), returns (scale, zero).
template <typename T>
std::pair<float, float> quantize_row_in_range(const T* x, int64_t K, float lo, float hi, int8_t* q) {
  const float scale = hi > lo ? (hi - lo) / 255.0f : 1.0f;
  const float zero = std::nearbyint(-128.0f - lo / scale);
  const float inv = 1.0f / scale;
  const __m256 inv8 = _mm256_set1_ps(inv);
  const __m256i zero8 = _mm256_set1_epi32(static_cast<int32_t>(zero));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  auto quantize8 = [&](int64_t at) {
    return _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(load8(x + at), inv8)), zero8);
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {  // saturating packs 32 -> 16 -> 8 bits clamp to -128..127
    const __m256i ab = _mm256_packs_epi32(quantize8(k), quantize8(k + 8));
    const __m256i cd = _mm256_packs_epi32(quantize8(k + 16), quantize8(k + 24));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), bytes);
  }
  for (; k < K; ++k) {
    const float v = std::nearbyint(to_float(x[k]) * inv) + zero;
    q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, v)));
  }
  return {scale, zero};
}

template <typename T>
std::pair<float, float> quantize_row(const T* x, int64_t K, int8_t* q) {
  __m256 lo8 = _mm256_setzero_ps(), hi8 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = load8(x + k);
    lo8 = _mm256_min_ps(lo8, v);
    hi8 = _mm256_max_ps(hi8, v);
  }
  float lo = hmin(lo8), hi = hmax(hi8);
  for (; k < K; ++k) {
    lo = std::min(lo, to_float(x[k]));
    hi = std::max(hi, to_float(x[k]));
  }
  return quantize_row_in_range(x, K, lo, hi, q);
}

struct Dequant {
  const float *scale, *zero, *w_scale, *colsum, *bias;
};

// y[n] = scale[m] * ws[n] * (acc[m, n] - zero[m] * colsum[n]) + bias[n] for n .. n + 7; s8, z8: scale[m], zero[m]
inline __m256 dequantize8(const int32_t* acc_row, const Dequant& d, __m256 s8, __m256 z8, int64_t n) {
  const __m256 a = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc_row + n)));
  const __m256 centred = _mm256_fnmadd_ps(z8, _mm256_loadu_ps(d.colsum + n), a);
  const __m256 ws = _mm256_mul_ps(s8, _mm256_loadu_ps(d.w_scale + n));
  return _mm256_fmadd_ps(centred, ws, _mm256_loadu_ps(d.bias + n));
}

inline float dequantize1(const int32_t* acc_row, const Dequant& d, int64_t m, int64_t n) {
  return d.scale[m] * d.w_scale[n] * (acc_row[n] - d.zero[m] * d.colsum[n]) + d.bias[n];
}

// The terms of an int8 GEMM's result acc [M, N], checked: row scale and zero [M]; w_scale, colsum, bias [N].
Dequant checked_terms(const torch::Tensor& acc, const torch::Tensor& scale, const torch::Tensor& zero,
                      const torch::Tensor& w_scale, const torch::Tensor& colsum, const torch::Tensor& bias) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == torch::kInt32 && acc.is_contiguous(), "acc: contiguous int32 [M, N]");
  const int64_t M = acc.size(0), N = acc.size(1);
  for (const auto* t : {&scale, &zero}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == M, "row scales: float32 [M]");
  }
  for (const auto* t : {&w_scale, &colsum, &bias}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == N, "column terms: float32 [N]");
  }
  return Dequant{scale.data_ptr<float>(), zero.data_ptr<float>(), w_scale.data_ptr<float>(), colsum.data_ptr<float>(),
                 bias.data_ptr<float>()};
}

}  // namespace

// x: float32 or bfloat16 [M, K] -> (q int8 [M, K], scale float32 [M], zero float32 [M]).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_rows(const torch::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "quantize_rows: x must be 2-D");
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat32 || x_in.scalar_type() == torch::kBFloat16,
              "quantize_rows: x must be float32 or bfloat16");
  const torch::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto scale = torch::empty({M}, x.options().dtype(torch::kFloat32));
  auto zero = torch::empty({M}, x.options().dtype(torch::kFloat32));
  float *s = scale.data_ptr<float>(), *z = zero.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const void* base = x.data_ptr();
  at::parallel_for(0, M, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      auto [row_scale, row_zero] =
          bf16 ? quantize_row(static_cast<const c10::BFloat16*>(base) + m * K, K, qp + m * K)
               : quantize_row(static_cast<const float*>(base) + m * K, K, qp + m * K);
      s[m] = row_scale;
      z[m] = row_zero;
    }
  });
  return {q, scale, zero};
}

namespace {

// out[m, :] = the float result of row m of acc, plus residual row m when given (T: float or c10::BFloat16).
template <typename T>
void write_output(const int32_t* a, const Dequant& d, int64_t M, int64_t N, const T* residual, T* out) {
  at::parallel_for(0, M, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* acc_row = a + m * N;
      const T* res_row = residual ? residual + m * N : nullptr;
      T* out_row = out + m * N;
      const __m256 s8 = _mm256_set1_ps(d.scale[m]), z8 = _mm256_set1_ps(d.zero[m]);
      int64_t n = 0;
      for (; n + 8 <= N; n += 8) {
        __m256 v = dequantize8(acc_row, d, s8, z8, n);
        if (res_row) v = _mm256_add_ps(v, load8(res_row + n));
        store8(out_row + n, v);
      }
      for (; n < N; ++n) out_row[n] = static_cast<T>(dequantize1(acc_row, d, m, n) + (res_row ? to_float(res_row[n]) : 0.0f));
    }
  });
}

}  // namespace

// The float result of an int8 GEMM, plus `residual` when given; float32 or bfloat16 (out_bf16).
torch::Tensor int8_linear_output(const torch::Tensor& acc, const torch::Tensor& scale, const torch::Tensor& zero,
                                 const torch::Tensor& w_scale, const torch::Tensor& colsum, const torch::Tensor& bias,
                                 const c10::optional<torch::Tensor>& residual_in, bool out_bf16) {
  const Dequant d = checked_terms(acc, scale, zero, w_scale, colsum, bias);
  const int64_t M = acc.size(0), N = acc.size(1);
  const auto out_type = out_bf16 ? torch::kBFloat16 : torch::kFloat32;
  torch::Tensor residual;
  if (residual_in) {
    residual = residual_in->contiguous();
    TORCH_CHECK(residual.scalar_type() == out_type && residual.numel() == M * N, "residual: [M, N] in the output dtype");
  }
  auto out = torch::empty({M, N}, acc.options().dtype(out_type));
  const int32_t* a = acc.data_ptr<int32_t>();
  if (out_bf16) {
    write_output(a, d, M, N, residual.defined() ? residual.data_ptr<c10::BFloat16>() : nullptr, out.data_ptr<c10::BFloat16>());
  } else {
    write_output(a, d, M, N, residual.defined() ? residual.data_ptr<float>() : nullptr, out.data_ptr<float>());
  }
  return out;
}

void int8_linear_output_into(const torch::Tensor& acc, const torch::Tensor& scale, const torch::Tensor& zero,
                             const torch::Tensor& w_scale, const torch::Tensor& colsum, const torch::Tensor& bias,
                             torch::Tensor& out) {
  const Dequant d = checked_terms(acc, scale, zero, w_scale, colsum, bias);
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.numel() == acc.numel(),
              "out: contiguous float32 [M, N]");
  write_output<float>(acc.data_ptr<int32_t>(), d, acc.size(0), acc.size(1), nullptr, out.data_ptr<float>());
}

// A fused query-key-value projection's result laid out for attention: acc [B * T, 3 * H * K] -> [3, B, H, T, K].
torch::Tensor int8_linear_qkv(const torch::Tensor& acc, const torch::Tensor& scale, const torch::Tensor& zero,
                              const torch::Tensor& w_scale, const torch::Tensor& colsum, const torch::Tensor& bias,
                              int64_t batch, int64_t heads, bool out_bf16) {
  const Dequant d = checked_terms(acc, scale, zero, w_scale, colsum, bias);
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(batch > 0 && M % batch == 0, "int8_linear_qkv: rows must be batch * tokens");
  TORCH_CHECK(heads > 0 && N % (3 * heads) == 0, "int8_linear_qkv: columns must be 3 * heads * head_dim");
  const int64_t T = M / batch, K = N / (3 * heads);
  auto out = torch::empty({3, batch, heads, T, K}, acc.options().dtype(out_bf16 ? torch::kBFloat16 : torch::kFloat32));
  const int32_t* a = acc.data_ptr<int32_t>();
  void* out_base = out.data_ptr();
  at::parallel_for(0, M, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* acc_row = a + m * N;
      const __m256 s8 = _mm256_set1_ps(d.scale[m]), z8 = _mm256_set1_ps(d.zero[m]);
      const int64_t b = m / T, t = m % T;
      for (int64_t part_head = 0; part_head < 3 * heads; ++part_head) {  // (part, head) = divmod(part_head, heads)
        const int64_t dest = ((part_head / heads * batch + b) * heads + part_head % heads) * T * K + t * K;
        const int64_t first = part_head * K;
        auto copy = [&](auto* out_row) {
          int64_t k = 0;
          for (; k + 8 <= K; k += 8) store8(out_row + k, dequantize8(acc_row, d, s8, z8, first + k));
          for (; k < K; ++k) {
            out_row[k] = static_cast<std::remove_pointer_t<decltype(out_row)>>(dequantize1(acc_row, d, m, first + k));
          }
        };
        if (out_bf16) copy(static_cast<c10::BFloat16*>(out_base) + dest);
        else copy(static_cast<float*>(out_base) + dest);
      }
    }
  });
  return out;
}

namespace {

// An activation of each row of an int8 GEMM's float result, quantized per row for the next int8 GEMM:
// (q [M, width], scale, zero). act8(acc_row, s8, z8, n) gives the activated values of columns n .. n + 7 of the
// output row, act1(acc_row, m, n) that of column n.
template <typename Act8, typename Act1>
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> activate_and_quantize(const torch::Tensor& acc, const Dequant& d,
                                                                             int64_t width, Act8 act8, Act1 act1) {
  const int64_t M = acc.size(0), N = acc.size(1);
  auto q = torch::empty({M, width}, acc.options().dtype(torch::kInt8));
  auto out_scale = torch::empty({M}, acc.options().dtype(torch::kFloat32));
  auto out_zero = torch::empty({M}, acc.options().dtype(torch::kFloat32));
  const int32_t* a = acc.data_ptr<int32_t>();
  int8_t* qp = q.data_ptr<int8_t>();
  float *s = out_scale.data_ptr<float>(), *z = out_zero.data_ptr<float>();
  at::parallel_for(0, M, kRowsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<float> row(width);
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* acc_row = a + m * N;
      const __m256 s8 = _mm256_set1_ps(d.scale[m]), z8 = _mm256_set1_ps(d.zero[m]);
      __m256 lo8 = _mm256_setzero_ps(), hi8 = _mm256_setzero_ps();
      int64_t n = 0;
      for (; n + 8 <= width; n += 8) {
        const __m256 y = act8(acc_row, s8, z8, n);
        _mm256_storeu_ps(row.data() + n, y);
        lo8 = _mm256_min_ps(lo8, y);
        hi8 = _mm256_max_ps(hi8, y);
      }
      float lo = hmin(lo8), hi = hmax(hi8);
      for (; n < width; ++n) {
        row[n] = act1(acc_row, m, n);
        lo = std::min(lo, row[n]);
        hi = std::max(hi, row[n]);
      }
      std::tie(s[m], z[m]) = quantize_row_in_range(row.data(), width, lo, hi, qp + m * width);
    }
  });
  return {q, out_scale, out_zero};
}

}  // namespace

// GELU of an int8 GEMM's float result, quantized per row for the next int8 GEMM: (q, scale, zero).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> int8_linear_gelu_quantize(
    const torch::Tensor& acc, const torch::Tensor& scale, const torch::Tensor& zero, const torch::Tensor& w_scale,
    const torch::Tensor& colsum, const torch::Tensor& bias, bool tanh_approximation) {
  const Dequant d = checked_terms(acc, scale, zero, w_scale, colsum, bias);
  return activate_and_quantize(
      acc, d, acc.size(1),
      [&](const int32_t* acc_row, __m256 s8, __m256 z8, int64_t n) {
        return gelu8(dequantize8(acc_row, d, s8, z8, n), tanh_approximation);
      },
      [&](const int32_t* acc_row, int64_t m, int64_t n) {
        return gelu1(dequantize1(acc_row, d, m, n), tanh_approximation);
      });
}

// SwiGLU of an int8 GEMM's result acc [M, 2F] (gate columns 0..F, up columns F..2F): silu(gate) * up per row,
// quantized for the next int8 GEMM: (q [M, F], scale, zero).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> int8_linear_swiglu_quantize(
    const torch::Tensor& acc, const torch::Tensor& scale, const torch::Tensor& zero, const torch::Tensor& w_scale,
    const torch::Tensor& colsum, const torch::Tensor& bias) {
  const Dequant d = checked_terms(acc, scale, zero, w_scale, colsum, bias);
  TORCH_CHECK(acc.size(1) % 2 == 0, "int8_linear_swiglu_quantize: acc must have 2 * F columns (gate, then up)");
  const int64_t F = acc.size(1) / 2;
  return activate_and_quantize(
      acc, d, F,
      [&](const int32_t* acc_row, __m256 s8, __m256 z8, int64_t f) {
        const __m256 g = dequantize8(acc_row, d, s8, z8, f);
        const __m256 u = dequantize8(acc_row, d, s8, z8, F + f);
        const __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(80.0f)));
        return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
      },
      [&](const int32_t* acc_row, int64_t m, int64_t f) {
        const float g = dequantize1(acc_row, d, m, f), u = dequantize1(acc_row, d, m, F + f);
        return g / (1.0f + std::exp(std::min(-g, 80.0f))) * u;
      });
}

void register_int8_rows(pybind11::module& m) {
  namespace py = pybind11;
  using release = py::call_guard<py::gil_scoped_release>;  // the server's event loop runs meanwhile
  m.def("quantize_rows", &quantize_rows, py::arg("x"), release());
  m.def("int8_linear_output", &int8_linear_output, py::arg("acc"), py::arg("scale"), py::arg("zero"),
        py::arg("w_scale"), py::arg("colsum"), py::arg("bias"), py::arg("residual") = py::none(), py::arg("out_bf16") = false, release());
  m.def("int8_linear_gelu_quantize", &int8_linear_gelu_quantize, py::arg("acc"), py::arg("scale"), py::arg("zero"),
        py::arg("w_scale"), py::arg("colsum"), py::arg("bias"), py::arg("tanh_approximation") = false, release());
  m.def("int8_linear_swiglu_quantize", &int8_linear_swiglu_quantize, py::arg("acc"), py::arg("scale"), py::arg("zero"),
        py::arg("w_scale"), py::arg("colsum"), py::arg("bias"), release());
  m.def("int8_linear_qkv", &int8_linear_qkv, py::arg("acc"), py::arg("scale"), py::arg("zero"), py::arg("w_scale"),
        py::arg("colsum"), py::arg("bias"), py::arg("batch"), py::arg("heads"), py::arg("out_bf16") = false, release());
}

}  // namespace hanlin

"""Linear layers computed in int8: weights per output channel, activations quantized per row at run time.

A row x is held as int8 q with a scale s and an integer zero point z (x ~= s * (q - z)); its range
[min(x, 0), max(x, 0)] maps onto -128..127, so a row that is mostly positive (GELU outputs) keeps all 256
levels. torch._int_mm multiplies q by the int8 weight in int32 (AVX512-VNNI / AMX through oneDNN; where it is
not exact, fp32 products stand in: int8_gemm_is_exact), or for decode-sized batches the kernels' VNNI GEMM over
a VNNI-laid copy of the weight (vnni_weight); the compiled
kernels (hanlin/kernels/int8_rows.cpp) quantize the rows and turn the int32 result into floats with the bias, a
residual or GELU + quantization for the next layer fused in, one pass each. Without them the same math runs in
PyTorch ops.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hanlin.kernels import cpu_kernels


@functools.cache
def int8_gemm_is_exact() -> bool:
    """Whether torch._int_mm computes exact int32 products here. It does through oneDNN on AVX512-VNNI / AMX;
    oneDNN's AVX2 path (no VNNI) was measured off by up to ~1e5 on random int8 inputs (16-bit intermediate
    sums saturate), so there Int8Linear multiplies in fp32 instead: exact for |sums| < 2**24, and slower."""
    gen = torch.Generator().manual_seed(0)
    a_MK = torch.randint(-128, 128, (32, 256), dtype=torch.int8, generator=gen)
    b_KN = torch.randint(-127, 128, (256, 48), dtype=torch.int8, generator=gen)
    a_MK[0], b_KN[:, 0] = -128, 127
    try:
        got_MN = torch._int_mm(a_MK, b_KN)
    except RuntimeError:
        return False
    return torch.equal(got_MN, (a_MK.long() @ b_KN.long()).int())


def int8_matmul(q_MK: torch.Tensor, w_KN: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = q @ w for int8 q [M, K] and w [K, N]."""
    if q_MK.device.type == "cpu" and not int8_gemm_is_exact():
        return torch.matmul(q_MK.float(), w_KN.float()).round_().int()
    return torch._int_mm(q_MK, w_KN)


class QuantizedRows(NamedTuple):
    q: torch.Tensor  # int8 [M, K]
    scale: torch.Tensor  # float32 [M]
    zero: torch.Tensor  # float32 [M], integer-valued in -128..127


def quantize_rows(x_MK: torch.Tensor) -> QuantizedRows:
    kernels = cpu_kernels()
    if kernels is not None and x_MK.device.type == "cpu" and x_MK.dtype in (torch.float32, torch.bfloat16):
        return QuantizedRows(*kernels.quantize_rows(x_MK))
    return _quantize_rows_torch(x_MK)


def _quantize_rows_torch(x_MK: torch.Tensor) -> QuantizedRows:
    x_MK = x_MK.float()
    lo_M1 = x_MK.amin(dim=1, keepdim=True).clamp(max=0.0)
    hi_M1 = x_MK.amax(dim=1, keepdim=True).clamp(min=0.0)
    scale_M1 = torch.where(hi_M1 > lo_M1, (hi_M1 - lo_M1) / 255.0, torch.ones_like(hi_M1))
    zero_M1 = torch.round(-128.0 - lo_M1 / scale_M1)
    q_MK = (torch.round(x_MK * (1.0 / scale_M1)) + zero_M1).clamp_(-128, 127).to(torch.int8)
    return QuantizedRows(q_MK, scale_M1.squeeze(1), zero_M1.squeeze(1))


class Int8Terms(NamedTuple):
    """Per output channel of an int8 weight qw [N, K] (w ~= w_scale * qw): what turns an int32 GEMM result into
    floats. All float32 [N]."""

    w_scale: torch.Tensor
    colsum: torch.Tensor  # sum_k qw[n, k]
    bias: torch.Tensor  # zeros for a linear without bias


def int8_terms(q_NK: torch.Tensor, w_scale_N: torch.Tensor, bias_N: torch.Tensor | None) -> Int8Terms:
    w_scale_N = w_scale_N.reshape(-1).float().contiguous()
    bias_N = torch.zeros_like(w_scale_N) if bias_N is None else bias_N.detach().float().contiguous()
    return Int8Terms(w_scale_N, q_NK.sum(dim=1, dtype=torch.int32).float(), bias_N)


def _dequantize(acc_MN: torch.Tensor, rows: QuantizedRows, terms: Int8Terms) -> torch.Tensor:
    centred_MN = acc_MN.float() - rows.zero[:, None] * terms.colsum
    return torch.addcmul(terms.bias, centred_MN, rows.scale[:, None] * terms.w_scale)


def vnni_weight(q_NK: torch.Tensor):
    """The compiled kernels' VNNI-laid copy of an int8 weight [N, K] (hanlin/kernels/vnni_gemm.h), for
    int8_linear_rows; None where the CPU has no AVX512-VNNI, the kernels are not built or _int_mm is inexact."""
    kernels = cpu_kernels()
    if kernels is None or q_NK.device.type != "cpu" or not kernels.cpu_has_vnni() or not int8_gemm_is_exact():
        return None
    return kernels.VnniWeight(q_NK)


def int8_linear_rows(rows: QuantizedRows, weight_NK: torch.Tensor, terms: Int8Terms, vnni=None) -> torch.Tensor:
    """float32 [M, N] = x W^T + b for quantized rows of x and an int8 weight [N, K]; with its vnni_weight, a
    decode-sized batch is multiplied by the VNNI kernel."""
    if vnni is not None:
        acc_MN = cpu_kernels().int8_mm(rows.q, weight_NK, vnni)
    else:
        acc_MN = int8_matmul(rows.q, weight_NK.t())
    kernels = cpu_kernels() if acc_MN.device.type == "cpu" else None
    if kernels is not None:
        return kernels.int8_linear_output(acc_MN, rows.scale, rows.zero, *terms, None, False)
    return _dequantize(acc_MN, rows, terms)


class Int8Linear(nn.Module):
    """y = x W^T + b with an int8 GEMM. forward(x, residual=None) adds `residual` to the result; with `gelu`
    ("none" = exact, or "tanh") it returns GELU(x W^T + b) as QuantizedRows, ready for the next Int8Linear;
    with `qkv_heads` H (a fused query-key-value projection, x [B, T, D]) it returns y as [3, B, H, T, D / H]."""

    def __init__(self, linear: nn.Linear, *, gelu: str | None = None, qkv_heads: int | None = None) -> None:
        super().__init__()
        self.qkv_heads = qkv_heads
        weight_NK = linear.weight.detach().float()
        scale_N = weight_NK.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q_NK = torch.round(weight_NK / scale_N[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("weight_KN", q_NK.t().contiguous())
        terms = int8_terms(q_NK, scale_N, linear.bias)
        self.register_buffer("w_scale_N", terms.w_scale)
        self.register_buffer("colsum_N", terms.colsum)
        self.register_buffer("bias_N", terms.bias)
        self.gelu = gelu
        self.in_features, self.out_features = weight_NK.shape[1], weight_NK.shape[0]

    def forward(self, x: torch.Tensor | QuantizedRows,
                residual: torch.Tensor | None = None) -> torch.Tensor | QuantizedRows:
        if isinstance(x, QuantizedRows):
            rows, lead, dtype = x, (x.q.shape[0],), torch.float32
        else:
            rows, lead, dtype = quantize_rows(x.reshape(-1, self.in_features)), x.shape[:-1], x.dtype
        if residual is not None:
            lead, dtype = residual.shape[:-1], residual.dtype
        acc_MN = int8_matmul(rows.q, self.weight_KN)
        on_kernels = acc_MN.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        kernels = cpu_kernels() if on_kernels else None
        terms = (rows.scale, rows.zero, self.w_scale_N, self.colsum_N, self.bias_N)
        if self.gelu is not None:
            if kernels is not None:
                return QuantizedRows(*kernels.int8_linear_gelu_quantize(acc_MN, *terms, self.gelu == "tanh"))
            return _quantize_rows_torch(F.gelu(self._dequantize(acc_MN, rows), approximate=self.gelu))
        if self.qkv_heads is not None:
            return self._split_heads(acc_MN, rows, terms, x.shape[0], dtype, kernels)
        if kernels is not None:
            res = residual.reshape(-1, self.out_features) if residual is not None else None
            y_MN = kernels.int8_linear_output(acc_MN, *terms, res, dtype == torch.bfloat16)
        else:
            y_MN = self._dequantize(acc_MN, rows)
            if residual is not None:
                y_MN = y_MN + residual.reshape(-1, self.out_features).float()
            y_MN = y_MN.to(dtype)
        return y_MN.view(*lead, self.out_features)

    def _dequantize(self, acc_MN: torch.Tensor, rows: QuantizedRows) -> torch.Tensor:
        return _dequantize(acc_MN, rows, Int8Terms(self.w_scale_N, self.colsum_N, self.bias_N))

    def _split_heads(self, acc_MN: torch.Tensor, rows: QuantizedRows, terms: tuple, batch: int, dtype: torch.dtype,
                     kernels) -> torch.Tensor:
        heads = self.qkv_heads
        if kernels is not None:
            return kernels.int8_linear_qkv(acc_MN, *terms, batch, heads, dtype == torch.bfloat16)
        y_MN = self._dequantize(acc_MN, rows).to(dtype)
        head_dim = self.out_features // (3 * heads)
        return y_MN.view(batch, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4).contiguous()

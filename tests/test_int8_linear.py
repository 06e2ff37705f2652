"""Int8 linears with activations quantized per row (the encoder's int8 path) and the kernels' attention softmax:
compiled kernels against the pure-PyTorch fallback and both against float math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hanlin.kernels import cpu_kernels
from hanlin.models.bert import BertConfig, BertModel, attention, quantize_int8
from hanlin.models.int8_linear import (Int8Linear, QuantizedRows, _quantize_rows_torch, int8_gemm_is_exact, int8_matmul,
                                       quantize_rows)

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="the compiled CPU kernels could not be built here")


def dequantized(rows: QuantizedRows) -> torch.Tensor:
    return rows.scale[:, None] * (rows.q.float() - rows.zero[:, None])


def special_rows(K: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(K)
    x = torch.randn(6, K, generator=gen) * 3
    x[1] = 0.0  # all zeros
    x[2] = x[2].abs() + 0.5  # all positive
    x[3] = -x[3].abs() - 0.5  # all negative
    x[4, 0] = 40.0  # one outlier
    return x


@pytest.mark.parametrize("K", [1, 7, 33, 384, 1537])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_round_trip_and_fallback(K: int, dtype: torch.dtype) -> None:
    x = special_rows(K).to(dtype)
    rows = quantize_rows(x)
    assert rows.q.dtype == torch.int8 and rows.q.shape == (6, K) and rows.scale.shape == rows.zero.shape == (6,)
    assert torch.equal(rows.zero, rows.zero.round()) and rows.zero.abs().max() <= 128
    error = (dequantized(rows) - x.float()).abs()
    assert (error <= rows.scale[:, None] * 0.5001 + 1e-7).all()  # at most half a step everywhere
    assert torch.equal(dequantized(rows)[1], torch.zeros(K))  # zero stays exact
    reference = _quantize_rows_torch(x)
    torch.testing.assert_close(rows.scale, reference.scale, rtol=1e-6, atol=0)
    assert torch.equal(rows.zero, reference.zero)
    assert (rows.q.int() - reference.q.int()).abs().max() <= 1  # x / s vs x * (1 / s) may round a tie apart


@pytest.mark.parametrize("exact_int_mm", [True, False])
def test_int8_matmul_is_exact(monkeypatch: pytest.MonkeyPatch, exact_int_mm: bool) -> None:
    """Through torch._int_mm where it is exact here, else through fp32 products (oneDNN's AVX2 path is not)."""
    if exact_int_mm and not int8_gemm_is_exact():
        pytest.skip("torch._int_mm is not exact on this CPU (no AVX512-VNNI / AMX)")
    monkeypatch.setattr("hanlin.models.int8_linear.int8_gemm_is_exact", lambda: exact_int_mm)
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-128, 128, (37, 300), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (300, 50), dtype=torch.int8, generator=gen)
    got = int8_matmul(q, w)
    assert got.dtype == torch.int32 and torch.equal(got, (q.long() @ w.long()).int())


def int8_linear(N: int, K: int, **kwargs) -> tuple[nn.Linear, Int8Linear]:
    torch.manual_seed(N * 1000 + K)
    linear = nn.Linear(K, N)
    return linear, Int8Linear(linear, **kwargs)


@pytest.fixture(params=["kernels", "fallback"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "kernels" and cpu_kernels() is None:
        pytest.skip("the compiled CPU kernels could not be built here")
    if request.param == "fallback":
        monkeypatch.setattr("hanlin.models.int8_linear.cpu_kernels", lambda: None)
    return request.param


@pytest.mark.parametrize(("M", "K", "N"), [(1, 8, 8), (5, 33, 17), (64, 384, 1536), (37, 1536, 384)])
def test_int8_linear_close_to_float(path: str, M: int, K: int, N: int) -> None:
    linear, q8 = int8_linear(N, K)
    x = torch.randn(M, K)
    want = linear(x).detach()
    got = q8(x)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    assert ((got - want).norm() / want.norm()).item() < 0.02
    residual = torch.randn(M, N)
    torch.testing.assert_close(q8(x, residual), got + residual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_output_is_quantized_for_the_next_layer(path: str, approximate: str) -> None:
    linear, up = int8_linear(200, 48, gelu=approximate)
    x = torch.randn(2, 9, 48)
    rows = up(x)
    assert isinstance(rows, QuantizedRows) and rows.q.shape == (18, 200)
    want = F.gelu(linear(x.reshape(18, 48)), approximate=approximate).detach()
    assert ((dequantized(rows) - want).norm() / want.norm()).item() < 0.03
    down_linear, down = int8_linear(48, 200)
    residual = torch.randn(2, 9, 48)
    out = down(rows, residual)
    assert out.shape == (2, 9, 48) and out.dtype == torch.float32
    want_out = down_linear(want).reshape(2, 9, 48).detach() + residual
    assert ((out - want_out).norm() / want_out.norm()).item() < 0.03


def test_bf16_activations_and_residual(path: str) -> None:
    linear, q8 = int8_linear(40, 24)
    x = torch.randn(3, 5, 24).bfloat16()
    residual = torch.randn(3, 5, 40).bfloat16()
    got = q8(x, residual)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 5, 40)
    want = linear(x.float()).detach() + residual.float()
    assert ((got.float() - want).norm() / want.norm()).item() < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_heads_layout(path: str, dtype: torch.dtype) -> None:
    B, T, H, K = 3, 7, 4, 8
    linear, qkv = int8_linear(3 * H * K, H * K, qkv_heads=H)
    plain = Int8Linear(linear)
    x = torch.randn(B, T, H * K).to(dtype)
    got = qkv(x)
    assert got.shape == (3, B, H, T, K) and got.dtype == dtype and got.is_contiguous()
    want = plain(x).view(B, T, 3, H, K).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_kernels
def test_kernels_match_the_fallback_exactly_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    linear, q8 = int8_linear(96, 64)
    _, up = int8_linear(96, 64, gelu="none")
    x = torch.randn(50, 64)
    got, got_rows = q8(x), up(x)
    monkeypatch.setattr("hanlin.models.int8_linear.cpu_kernels", lambda: None)
    want, want_rows = q8(x), up(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # GELU through the kernels' erf (error <= 1.5e-7) may move a value across a rounding boundary: one step at most
    assert (dequantized(got_rows) - dequantized(want_rows)).abs().max() <= got_rows.scale.max() * 1.01


@needs_kernels
@pytest.mark.parametrize("T", [1, 13, 128, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_sdpa_with_right_padding(T: int, dtype: torch.dtype) -> None:
    torch.manual_seed(T)
    B, H, K = 3, 2, 16
    q, k, v = (torch.randn(B, H, T, K).to(dtype) for _ in range(3))
    lengths = torch.tensor([T, max(1, T // 2), max(1, T - 3)])
    keep = (torch.arange(T)[None, :] < lengths[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep)
    got = attention(q, k, v, keep, lengths)
    assert got.dtype == dtype
    tolerance = 2e-6 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)
    full = attention(q, k, v, None, None)
    torch.testing.assert_close(full.float(), F.scaled_dot_product_attention(q.float(), k.float(), v.float()),
                               rtol=tolerance, atol=tolerance)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_kernel_on_long_rows(dtype: torch.dtype) -> None:
    scores = torch.randn(2, 1, 3, 1100) * 4
    lengths = torch.tensor([1100, 517])
    keep = torch.arange(1100)[None, :] < lengths[:, None]
    want = torch.softmax((scores * 0.3).masked_fill(~keep[:, None, None, :], float("-inf")), dim=-1)
    got = scores.to(dtype)
    cpu_kernels().attention_softmax_(got, 0.3, lengths)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance if dtype == torch.float32 else 1e-3)
    assert torch.equal(got[1, :, :, 517:].float(), torch.zeros(1, 3, 583))


def test_attention_with_a_mask_that_is_not_right_padding_uses_sdpa() -> None:
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    keep = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    torch.testing.assert_close(attention(q, k, v, keep, None), F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


@needs_kernels
def test_softmax_kernel_refuses_bad_input() -> None:
    kernels = cpu_kernels()
    with pytest.raises(RuntimeError, match="contiguous scores"):
        kernels.attention_softmax_(torch.randn(2, 3, 4), 1.0, None)
    with pytest.raises(RuntimeError, match="one length per batch row"):
        kernels.attention_softmax_(torch.randn(2, 1, 3, 3), 1.0, torch.tensor([3]))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.quantize_rows(torch.ones(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("float_dtype", [torch.float32, torch.bfloat16])
def test_int8_bert_stays_close_to_fp32(path: str, float_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=160, max_position_embeddings=40)
    model = BertModel(config).eval()
    for p in model.parameters():  # BERT-like scales: unit-variance activations through the linears
        p.data.normal_(0, 0.08)
    ids = torch.randint(1, 120, (3, 30))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    with torch.inference_mode():
        want = model(ids, mask)
        quantized = quantize_int8(model, float_dtype=float_dtype)
        got = quantized(ids, mask).float()
    kept = mask.bool()
    cosine = F.cosine_similarity(got[kept], want[kept], dim=-1)
    assert cosine.min().item() > 0.99

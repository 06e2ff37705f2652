"""Weight-only quantized layers: packing error bounds, the compiled kernel against the PyTorch fallback,
quantized tiny models against fp32."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hanlin
from hanlin.config import ModelConfig, MoEConfig
from hanlin.errors import HanlinError
from hanlin.kernels import cpu_kernels
from hanlin.models import Transformer
from hanlin.models.quant_packing import F32_PANELS, concat_rows, pack_int4, pack_int8, pack_panels
from hanlin.models.quantized import Q4, Q8, QuantEmbedding, QuantLinear, pack_fp32_panels, quantize_model

# (rows, in_features, out_features, group); group 0 means int8 per channel, which takes any width
SHAPES = [
    (1, 64, 32, 32), (1, 576, 1536, 32), (3, 100, 37, 0), (8, 33, 7, 0), (5, 1536, 576, 64), (64, 96, 80, 32), (2, 31, 1, 0)
]


def _layer(in_features: int, out_features: int, group: int, seed: int) -> QuantLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=out_features % 2 == 1)
    return QuantLinear.int4(linear, group) if group else QuantLinear.int8(linear)


@pytest.mark.parametrize("rows,in_features,out_features,group", SHAPES)
def test_kernel_and_fallback_paths_agree_inside_the_module(
    monkeypatch: pytest.MonkeyPatch, rows: int, in_features: int, out_features: int, group: int
) -> None:
    if cpu_kernels() is None:
        pytest.skip("the compiled kernels could not be built here (no AVX2 or no compiler)")
    layer = _layer(in_features, out_features, group, seed=rows * 1000 + in_features)
    assert layer.kind == (Q4 if group else Q8)
    x = torch.randn(rows, 2, in_features)
    with torch.inference_mode():
        fast = layer(x)
        monkeypatch.setattr("hanlin.models.quantized.cpu_kernels", lambda: None)
        slow = layer(x)
    assert fast.shape == (rows, 2, out_features)
    tolerance = 1e-5 * (1 + slow.abs()) + 1e-5 * in_features**0.5
    if 2 * rows <= 4 and in_features % 32 == 0:
        # Decode-sized inputs are quantized per 32 to int8 inside the kernel (tests/test_qlinear_kernels.py):
        # each is off by at most half its block's step.
        x_NK = x.reshape(-1, in_features)
        step = x_NK.abs().view(x_NK.shape[0], -1, 32).amax(-1) / 127
        bound = (step.repeat_interleave(32, dim=1) / 2) @ layer.dequantized_weight().abs().T
        tolerance = tolerance + bound.view_as(slow)
    assert ((fast - slow).abs() <= tolerance).all()


def test_the_fallback_serves_gradients_and_other_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hanlin.models.quantized.FALLBACK_CHUNK_BYTES", 4 * 64 * 10)  # 10 rows at a time
    layer = _layer(64, 47, 32, seed=3)  # with a bias
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.shape == (4, 64)
    reference = x.detach() @ layer.dequantized_weight().T + layer.bias
    got = layer(x.detach().to(torch.float64))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), reference, rtol=1e-5, atol=1e-5)


def test_int8_error_is_at_most_half_a_step() -> None:
    torch.manual_seed(1)
    weight = torch.randn(64, 256) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different ranges
    packed = pack_int8(weight)
    assert packed.qdata.dtype == torch.int8 and packed.scales.dtype == torch.float16 and packed.group == 256
    step = packed.scales.float()
    # The stored fp16 scale is the fp32 one rounded up (< 1 fp16 ulp), and every error is within half of it.
    torch.testing.assert_close(step, weight.abs().amax(dim=1, keepdim=True) / 127, rtol=1e-3, atol=0)
    error = (QuantLinear(packed).dequantized_weight() - weight).abs()
    assert (error <= step / 2 * (1 + 1e-6)).all()


def test_int4_error_is_at_most_half_a_group_step() -> None:
    torch.manual_seed(2)
    weight = torch.randn(48, 128) + torch.linspace(-3, 3, 48)[:, None]  # offsets: asymmetric ranges matter
    packed = pack_int4(weight, group=32)
    assert packed.qdata.shape == (48, 64) and packed.scales.shape == packed.mins.shape == (48, 4)
    groups = weight.view(48, 4, 32)
    torch.testing.assert_close(packed.scales.float(), (groups.amax(-1) - groups.amin(-1)) / 15, rtol=2e-3, atol=0)
    step = packed.scales.float().repeat_interleave(32, dim=1)
    error = (QuantLinear(packed).dequantized_weight() - weight).abs()
    assert (error <= step / 2 * (1 + 1e-6)).all()


def test_int4_layout_is_gguf_nibble_order_and_odd_widths_fall_back_to_int8() -> None:
    packed = pack_int4(torch.tensor([[float(j % 16) for j in range(32)]]), group=32)  # scale 1, min 0: q = w
    assert packed.qdata[0, :16].tolist() == [j | (j << 4) for j in range(16)]  # byte j: weights j and j + 16
    assert QuantLinear.int4(nn.Linear(48, 16), group=32).kind == Q8  # 48 % 32 != 0
    assert QuantLinear.int4(nn.Linear(64, 16), group=16).kind == Q8  # groups must be whole nibble runs
    assert QuantLinear.int4(nn.Linear(64, 16), group=64).group == 64


def test_fused_rows_keep_each_part_and_regroup_int8_scales() -> None:
    torch.manual_seed(4)
    a, b = torch.randn(8, 64), torch.randn(4, 64)
    per_group = pack_int8(a).regrouped(32)
    fused = concat_rows([per_group, pack_int8(b)])
    assert fused.group == 32 and fused.scales.shape == (12, 2)
    values = QuantLinear(fused).dequantized_weight()
    torch.testing.assert_close(values[:8], QuantLinear(pack_int8(a)).dequantized_weight(), rtol=0, atol=0)
    torch.testing.assert_close(values[8:], QuantLinear(pack_int8(b)).dequantized_weight(), rtol=0, atol=0)


def test_quantized_embedding_dequantizes_only_the_selected_rows() -> None:
    torch.manual_seed(5)
    table = torch.randn(100, 64)
    for packed in (pack_int8(table), pack_int4(table)):
        embedding = QuantEmbedding(packed)
        ids = torch.tensor([[3, 99, 3], [0, 50, 7]])
        full = QuantLinear(packed).dequantized_weight()
        torch.testing.assert_close(embedding(ids), full[ids], rtol=0, atol=0)


def _tiny_model(moe: MoEConfig | None = None, seed: int = 0) -> Transformer:
    config = ModelConfig(
        vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
        tie_embeddings=True, moe=moe,
    )
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    return model


def _float_tensors_of_quantized_modules(model: nn.Module) -> list[str]:
    return [
        f"{name}.{tensor_name}"
        for name, module in model.named_modules()
        if isinstance(module, (QuantLinear, QuantEmbedding))
        for tensor_name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if tensor.dtype == torch.float32 and tensor_name != "bias"
    ]


# Weights ~ N(0, 0.1). int8 per channel: step = |w|max / 127 ≈ 0.02σ; int4 per 32: step = range / 15 ≈ 0.27σ,
# about 14x coarser. Measured max |Δ log-prob| on these models: ~0.003 (int8), ~0.05 (int4); the bounds
# leave ~3x room. Top-1 can only change where the fp32 margin is below twice the bound.
BOUNDS = {"int8": 0.01, "int4": 0.15}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("moe", [None, MoEConfig(num_experts=4, top_k=2, expert_dim=64)], ids=["dense", "moe"])
def test_quantized_tiny_model_stays_close_to_fp32(scheme: str, moe: MoEConfig | None) -> None:
    model = _tiny_model(moe)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model(ids).log_softmax(-1)
        quantized = copy.deepcopy(model)
        replaced = quantize_model(quantized, scheme)
        approx = quantized(ids).log_softmax(-1)
    per_layer = 4 if moe is None else 2 + 2 * moe.num_experts  # qkv, o + gate_up, down (per expert)
    assert replaced == 2 * per_layer + 1  # plus the lm_head
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in quantized.modules())
    if moe is not None:  # routers stay fp32 parameters
        assert all(block.mlp.router.weight.dtype == torch.float32 for block in quantized.layers)
    assert _float_tensors_of_quantized_modules(quantized) == []
    assert quantized.embed_tokens.qdata.data_ptr() == quantized.lm_head.qdata.data_ptr()
    assert quantized.embed_tokens.scales.data_ptr() == quantized.lm_head.scales.data_ptr()
    bound = BOUNDS[scheme]
    assert (approx - reference).abs().max().item() < bound
    top2 = reference.topk(2, dim=-1).values
    confident = (top2[..., 0] - top2[..., 1]) > 2 * bound
    assert (approx.argmax(-1) == reference.argmax(-1))[confident].all()


# --- fp32 panels (qlinear.h kF32Panels): the same values, re-laid for the CPU kernels ----------------------


@pytest.mark.parametrize("out_features,in_features", [(1, 5), (16, 64), (37, 33), (200, 576)])
def test_panels_hold_the_weight_exactly(out_features: int, in_features: int) -> None:
    torch.manual_seed(out_features)
    linear = nn.Linear(in_features, out_features)
    packed = pack_panels(linear.weight.t().contiguous().t())  # column-major, as hanlin.load stores fp32 weights
    assert packed.kind == F32_PANELS and packed.qdata.shape == (-(-out_features // 16), in_features, 16)
    assert (packed.out_features, packed.in_features, packed.group) == (out_features, in_features, out_features)
    assert (packed.qdata[-1, :, (out_features - 1) % 16 + 1 :] == 0).all()  # the last panel's padding rows
    layer = QuantLinear(packed, linear.bias)
    assert layer.out_features == out_features and "fp32 panels" in repr(layer)
    assert torch.equal(layer.weight, linear.weight.detach()) and not hasattr(QuantLinear.int8(linear), "weight")
    torch.testing.assert_close(layer.dequantized_weight(), linear.weight.detach(), rtol=0, atol=0)
    index = torch.tensor([out_features - 1, 0, out_features // 2])
    weight = linear.weight.detach()
    torch.testing.assert_close(QuantLinear(packed.rows(index)).dequantized_weight(), weight[index], rtol=0, atol=0)
    both = concat_rows([packed, packed])
    torch.testing.assert_close(QuantLinear(both).dequantized_weight(), weight.repeat(2, 1), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 40])
def test_panel_kernel_and_fallback_paths_agree(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    if cpu_kernels() is None:
        pytest.skip("the compiled kernels could not be built here (no AVX2 or no compiler)")
    torch.manual_seed(rows)
    linear = nn.Linear(72, 100)  # 100 outputs: 7 panels, the last one 4 rows
    layer = QuantLinear(pack_panels(linear.weight), linear.bias)
    x = torch.randn(rows, 72)
    with torch.inference_mode():
        expected = linear(x)
        fast = layer(x)
        monkeypatch.setattr("hanlin.models.quantized.cpu_kernels", lambda: None)
        monkeypatch.setattr("hanlin.models.quantized.FALLBACK_CHUNK_BYTES", 4 * 72 * 20)  # 32 rows (2 panels) at a time
        slow = layer(x)
    assert fast.shape == slow.shape == (rows, 100)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slow, expected, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    layer(x).sum().backward()  # the fallback serves gradients to the inputs (the panels take none)
    torch.testing.assert_close(x.grad, linear.weight.detach().sum(0).expand(rows, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("moe", [None, MoEConfig(num_experts=4, top_k=2, expert_dim=64)], ids=["dense", "moe"])
def test_pack_fp32_panels_keeps_the_model(moe: MoEConfig | None) -> None:
    model = _tiny_model(moe)
    reference_model = copy.deepcopy(model)
    embedding = model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = reference_model(ids)
        replaced = pack_fp32_panels(model)
        packed = model(ids)
    per_layer = 4 if moe is None else 2 + 2 * moe.num_experts  # qkv, o + gate_up, down (per expert)
    assert replaced == 2 * per_layer + 1  # plus the lm_head
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())
    assert all(m.kind == F32_PANELS for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding)))
    if moe is not None:
        assert all(block.mlp.router.weight.dtype == torch.float32 for block in model.layers)
    # The tied embedding reads the lm_head's panels (no copy), and its rows are the fp32 rows exactly.
    assert model.embed_tokens.qdata.data_ptr() == model.lm_head.qdata.data_ptr()
    torch.testing.assert_close(model.embed_tokens(ids), embedding[ids], rtol=0, atol=0)
    torch.testing.assert_close(packed, reference, rtol=1e-4, atol=1e-4)
    assert pack_fp32_panels(model) == 0  # nothing left to pack
    # The state dict is the plain model's (a model the engine packed still saves as a checkpoint), both ways.
    state, plain = model.state_dict(), reference_model.state_dict()
    assert state.keys() == plain.keys() and all(torch.equal(state[name], plain[name]) for name in plain)
    other = _tiny_model(moe, seed=1)
    pack_fp32_panels(other)
    other.load_state_dict(plain)
    with torch.inference_mode():
        torch.testing.assert_close(other(ids), packed, rtol=0, atol=0)


def test_unknown_quantization_names_the_choices() -> None:
    with pytest.raises(HanlinError, match="int8 .*int4"):
        hanlin.load("smollm2", quantize="int3")
    with pytest.raises(ValueError, match="int8 or int4"):
        quantize_model(_tiny_model(), "int3")

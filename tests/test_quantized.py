"""Int8 weight-only linear layers: the compiled kernel against the PyTorch fallback and fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hanlin.config import ModelConfig
from hanlin.kernels import int8_kernel
from hanlin.models import Transformer
from hanlin.models.quantized import Int8Linear, quantize_int8

SHAPES = [(1, 64, 32), (1, 576, 1536), (3, 100, 37), (8, 33, 7), (5, 1536, 576), (64, 48, 80), (2, 31, 1)]


@pytest.mark.parametrize("rows,in_features,out_features", SHAPES)
def test_kernel_matches_the_pytorch_fallback_on_odd_shapes(rows: int, in_features: int, out_features: int) -> None:
    kernel = int8_kernel()
    if kernel is None:
        pytest.skip("the int8 kernel could not be built here (no AVX2 or no compiler)")
    torch.manual_seed(rows * 1000 + in_features)
    linear = nn.Linear(in_features, out_features, bias=out_features % 2 == 1)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(rows, in_features)
    reference = x @ layer.dequantized_weight().T + (0 if layer.bias is None else layer.bias)
    got = kernel.int8_linear(x, layer.weight_q, layer.scale, layer.bias)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * in_features**0.5)


def test_fallback_and_kernel_paths_agree_inside_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(96, 40))
    x = torch.randn(2, 3, 96)
    with torch.inference_mode():
        fast = layer(x)
        monkeypatch.setattr("hanlin.models.quantized.int8_kernel", lambda: None)
        slow = layer(x)
    assert fast.shape == (2, 3, 40)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_int8_error_is_bounded_by_half_a_quantization_step() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(256, 64, bias=False)
    layer = Int8Linear.from_linear(linear)
    step = linear.weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((layer.dequantized_weight() - linear.weight).abs() <= step / 2 + 1e-7).all()


def test_quantized_tiny_model_keeps_its_greedy_choices() -> None:
    config = ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    torch.manual_seed(2)
    model = Transformer(config).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 96, (2, 16))
    with torch.inference_mode():
        reference = model(ids)
        replaced = quantize_int8(model)
        approx = model(ids)
    assert replaced == 2 * 4 + 1  # per layer qkv, o, gate_up, down; plus the lm_head
    assert all(not isinstance(m, nn.Linear) for m in model.modules())
    # Each weight moves by at most half a step (|w|max / 254 per row): logits move by a few percent of their spread.
    assert (approx - reference).abs().max() < 0.05 * reference.std()
    assert (approx.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9

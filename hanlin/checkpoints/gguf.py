"""GGUF files (llama.cpp): metadata → ModelConfig, tensors dequantized (or kept packed) into a Transformer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hanlin.checkpoints.gguf_metadata import read_gguf_metadata
from hanlin.config import ModelConfig, MoEConfig, RopeConfig
from hanlin.errors import CheckpointError, UnsupportedModelError
from hanlin.checkpoints.gguf_blocks import GGUFWeights, Piece
from hanlin.checkpoints.materialize import materialize_lazily
from hanlin.models import Transformer
from hanlin.models.quant_packing import PackedWeight

# llama.cpp architecture name → (Hanlin model_type, Q/K rows permuted by llama.cpp's converter)
SUPPORTED_ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("mistral", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "qwen2moe": ("qwen2_moe", False),
    "qwen3moe": ("qwen3_moe", False),
    "olmoe": ("olmoe", False),
}

ProgressCallback = Callable[[int, int], None]


def open_gguf(path: Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(path)
    except Exception as error:  # the reader raises assorted errors on truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt?): {error}") from None


def _rope_config(meta: dict[str, Any], arch: str, head_dim: int) -> RopeConfig:
    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    rope = RopeConfig(theta=float(get("rope.freq_base", 10000.0)))
    scaling = get("rope.scaling.type", "none")
    factor = float(get("rope.scaling.factor", 1.0) or 1.0)
    original = get("rope.scaling.original_context_length")
    if scaling in ("none", None) or factor == 1.0:
        return rope
    if scaling not in ("linear", "yarn"):
        raise UnsupportedModelError(f"GGUF RoPE scaling {scaling!r} is not supported (supported: none, linear, yarn)")
    rope.type = scaling
    rope.factor = factor
    rope.original_max_position_embeddings = int(original) if original else None
    return rope


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {supported})")
    model_type, _ = SUPPORTED_ARCHITECTURES[arch]

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise CheckpointError(f"{path}: GGUF metadata lacks {full!r}")
        return meta[full]

    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError(f"{path}: GGUF files with per-frequency RoPE factors (rope_freqs) are not supported yet")
    num_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // num_heads))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    moe = None
    expert_count = int(meta.get(f"{arch}.expert_count", 0) or 0)
    if expert_count:
        shared_dim = int(meta.get(f"{arch}.expert_shared_feed_forward_length", 0) or 0)
        moe = MoEConfig(
            num_experts=expert_count,
            top_k=int(need("expert_used_count")),
            expert_dim=int(meta.get(f"{arch}.expert_feed_forward_length") or need("feed_forward_length")),
            norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", arch == "qwen3moe")),
            shared_expert_dim=shared_dim,
            shared_expert_gate="blk.0.ffn_gate_inp_shexp.weight" in tensor_names,
        )
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(need("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        intermediate_size=int(meta.get(f"{arch}.feed_forward_length", 0) or 0),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        tie_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm=("proj" if arch == "olmoe" else "head") if "blk.0.attn_q_norm.weight" in tensor_names else "none",
        sliding_window=meta.get(f"{arch}.attention.sliding_window"),
        rope=_rope_config(meta, arch, head_dim),
        moe=moe,
        model_type=model_type,
    )


def _weight_plan(config: ModelConfig, permuted: bool) -> dict[str, tuple[Piece, ...]]:
    """Hanlin parameter name → the llama.cpp tensors it is stacked from (q/k/v and gate/up are fused)."""
    plan: dict[str, tuple[Piece, ...]] = {
        "embed_tokens.weight": (Piece("token_embd.weight"),),
        "norm.weight": (Piece("output_norm.weight"),),
    }
    if not config.tie_embeddings:
        plan["lm_head.weight"] = (Piece("output.weight"),)
    q_heads, kv_heads = (config.num_heads, config.num_kv_heads) if permuted else (None, None)
    for i in range(config.num_layers):
        src, dst = f"blk.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if config.attention_bias else ("weight",):
            plan[dst + f"attn.qkv_proj.{kind}"] = (
                Piece(src + f"attn_q.{kind}", q_heads),
                Piece(src + f"attn_k.{kind}", kv_heads),
                Piece(src + f"attn_v.{kind}"),
            )
        plan[dst + "attn.o_proj.weight"] = (Piece(src + "attn_output.weight"),)
        if config.qk_norm != "none":
            plan[dst + "attn.q_norm.weight"] = (Piece(src + "attn_q_norm.weight"),)
            plan[dst + "attn.k_norm.weight"] = (Piece(src + "attn_k_norm.weight"),)
        plan[dst + "input_norm.weight"] = (Piece(src + "attn_norm.weight"),)
        plan[dst + "post_attn_norm.weight"] = (Piece(src + "ffn_norm.weight"),)
        if config.is_moe_layer(i):
            assert config.moe is not None
            plan[dst + "mlp.router.weight"] = (Piece(src + "ffn_gate_inp.weight"),)
            for e in range(config.moe.num_experts):
                gate, up = Piece(src + "ffn_gate_exps.weight", expert=e), Piece(src + "ffn_up_exps.weight", expert=e)
                plan[dst + f"mlp.experts.{e}.gate_up_proj.weight"] = (gate, up)
                plan[dst + f"mlp.experts.{e}.down_proj.weight"] = (Piece(src + "ffn_down_exps.weight", expert=e),)
            if config.moe.shared_expert_dim:
                shared_gate, shared_up = Piece(src + "ffn_gate_shexp.weight"), Piece(src + "ffn_up_shexp.weight")
                plan[dst + "mlp.shared_expert.gate_up_proj.weight"] = (shared_gate, shared_up)
                plan[dst + "mlp.shared_expert.down_proj.weight"] = (Piece(src + "ffn_down_shexp.weight"),)
                if config.moe.shared_expert_gate:
                    gate_vector = Piece(src + "ffn_gate_inp_shexp.weight", as_row=True)
                    plan[dst + "mlp.shared_expert_gate.weight"] = (gate_vector,)
        else:
            plan[dst + "mlp.gate_up_proj.weight"] = (Piece(src + "ffn_gate.weight"), Piece(src + "ffn_up.weight"))
            plan[dst + "mlp.down_proj.weight"] = (Piece(src + "ffn_down.weight"),)
    return plan


def read_gguf_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any], Any]:
    """(config, metadata, reader) of a GGUF file, without dequantizing any tensor."""
    path = Path(path)
    reader = open_gguf(path)
    meta = read_gguf_metadata(reader)
    return config_from_gguf(meta, {t.name for t in reader.tensors}, path), meta, reader


def load_gguf(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: ProgressCallback | None = None,
    quantize: str | None = None,
) -> tuple[ModelConfig, Transformer, dict[str, Any]]:
    """Returns (config, model, metadata); every tensor type the gguf package can dequantize is accepted.

    quantize="int4" takes Q4_0/Q4_1/Q8_0 tensors and quantize="int8" takes Q8_0 tensors as they are stored;
    other tensors are dequantized and quantized at load (see hanlin.models.quantized).
    """
    path = Path(path)
    config, meta, reader = read_gguf_config(path)
    reader.fields.clear()  # the parsed key/value fields (~150 MB for a 49k-token vocabulary); meta has them
    weights = GGUFWeights(reader, str(path))
    _, permuted = SUPPORTED_ARCHITECTURES[meta["general.architecture"]]
    plan = _weight_plan(config, permuted)
    for pieces in plan.values():
        for piece in pieces:
            if piece.tensor not in weights.tensors:
                raise CheckpointError(f"{path}: tensor {piece.tensor} is missing")
    sources = {name: GGUFWeight(weights, pieces) for name, pieces in plan.items()}
    model = materialize_lazily(config, sources, str(path), device, dtype, quantize=quantize, progress=progress)
    return config, model, meta


class GGUFWeight:
    """One Hanlin weight of a GGUF file, read only when the model is built (a WeightSource)."""

    def __init__(self, weights: GGUFWeights, pieces: tuple[Piece, ...]) -> None:
        self.weights, self.pieces = weights, pieces
        self.shape = weights.shape(pieces)

    def fp32(self) -> torch.Tensor:
        values = self.weights.fp32(self.pieces)
        self.weights.release_pages()
        return values

    def packed(self, scheme: str, group: int) -> PackedWeight | None:
        packed = self.weights.packed(self.pieces, scheme, group)
        self.weights.release_pages()
        return packed

"""GGUF files (llama.cpp): metadata → ModelConfig, tensors dequantized into a Transformer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hanlin.checkpoints.gguf_metadata import read_gguf_metadata
from hanlin.config import ModelConfig, MoEConfig, RopeConfig
from hanlin.errors import CheckpointError, UnsupportedModelError
from hanlin.checkpoints.materialize import materialize
from hanlin.models import Transformer

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


def _unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of Q/K (interleaved rotary pairs → rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hanlin_tensors(config: ModelConfig, arrays: dict[str, np.ndarray], permuted: bool) -> dict[str, np.ndarray]:
    """Map llama.cpp tensor names to Hanlin parameter names, fusing q/k/v and gate/up."""
    out: dict[str, np.ndarray] = {"embed_tokens.weight": arrays["token_embd.weight"], "norm.weight": arrays["output_norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = arrays["output.weight"]
    for i in range(config.num_layers):
        src, dst = f"blk.{i}.", f"layers.{i}."
        q, k, v = arrays[src + "attn_q.weight"], arrays[src + "attn_k.weight"], arrays[src + "attn_v.weight"]
        if permuted:
            q, k = _unpermute_qk(q, config.num_heads), _unpermute_qk(k, config.num_kv_heads)
        out[dst + "attn.qkv_proj.weight"] = np.concatenate([q, k, v])
        if config.attention_bias:
            qb, kb, vb = (arrays[src + f"attn_{n}.bias"] for n in "qkv")
            if permuted:
                qb, kb = _unpermute_qk(qb, config.num_heads), _unpermute_qk(kb, config.num_kv_heads)
            out[dst + "attn.qkv_proj.bias"] = np.concatenate([qb, kb, vb])
        out[dst + "attn.o_proj.weight"] = arrays[src + "attn_output.weight"]
        if config.qk_norm != "none":
            out[dst + "attn.q_norm.weight"] = arrays[src + "attn_q_norm.weight"]
            out[dst + "attn.k_norm.weight"] = arrays[src + "attn_k_norm.weight"]
        out[dst + "input_norm.weight"] = arrays[src + "attn_norm.weight"]
        out[dst + "post_attn_norm.weight"] = arrays[src + "ffn_norm.weight"]
        if config.is_moe_layer(i):
            out[dst + "mlp.router.weight"] = arrays[src + "ffn_gate_inp.weight"]
            gates, ups, downs = (arrays[src + f"ffn_{n}_exps.weight"] for n in ("gate", "up", "down"))
            for e in range(gates.shape[0]):
                out[dst + f"mlp.experts.{e}.gate_up_proj.weight"] = np.concatenate([gates[e], ups[e]])
                out[dst + f"mlp.experts.{e}.down_proj.weight"] = downs[e]
            if config.moe is not None and config.moe.shared_expert_dim:
                g, u = arrays[src + "ffn_gate_shexp.weight"], arrays[src + "ffn_up_shexp.weight"]
                out[dst + "mlp.shared_expert.gate_up_proj.weight"] = np.concatenate([g, u])
                out[dst + "mlp.shared_expert.down_proj.weight"] = arrays[src + "ffn_down_shexp.weight"]
                if config.moe.shared_expert_gate:
                    out[dst + "mlp.shared_expert_gate.weight"] = arrays[src + "ffn_gate_inp_shexp.weight"].reshape(1, -1)
        else:
            g, u = arrays[src + "ffn_gate.weight"], arrays[src + "ffn_up.weight"]
            out[dst + "mlp.gate_up_proj.weight"] = np.concatenate([g, u])
            out[dst + "mlp.down_proj.weight"] = arrays[src + "ffn_down.weight"]
    return out


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
) -> tuple[ModelConfig, Transformer, dict[str, Any]]:
    """Returns (config, model, metadata); every tensor type the gguf package can dequantize is accepted."""
    from gguf.quants import dequantize

    path = Path(path)
    config, meta, reader = read_gguf_config(path)
    tensors = {t.name: t for t in reader.tensors}
    _, permuted = SUPPORTED_ARCHITECTURES[meta["general.architecture"]]
    arrays: dict[str, np.ndarray] = {}
    for done, (name, tensor) in enumerate(tensors.items(), 1):
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UnsupportedModelError(f"{path}: tensor {name} has type {tensor.tensor_type.name}, which gguf cannot dequantize") from None
        arrays[name] = values.reshape(tuple(reversed([int(d) for d in tensor.shape])))
        if progress is not None:
            progress(done, len(tensors))
    try:
        state = _hanlin_tensors(config, arrays, permuted)
    except KeyError as missing:
        raise CheckpointError(f"{path}: tensor {missing.args[0]} is missing") from None
    del arrays
    tensors = {name: torch.from_numpy(np.require(a, requirements=["C", "W"])) for name, a in state.items()}
    model = materialize(config, tensors, str(path), device, dtype)
    return config, model, meta

"""What `hanlin info` reports about a model configuration: sizes, parameters, KV cache and memory."""

from __future__ import annotations

from typing import Any

from hanlin.config import ModelConfig


def describe(config: ModelConfig, source: str) -> dict[str, Any]:
    """Everything `hanlin info` shows, as plain JSON-ready data."""
    total, active = config.parameter_counts()
    context = config.max_position_embeddings
    moe = config.moe
    return {
        "model_type": config.model_type,
        "source": source,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "context_length": context,
        "rope": {"type": config.rope.type, "theta": config.rope.theta, "factor": config.rope.factor},
        "moe": None if moe is None else {
            "experts": moe.num_experts, "top_k": moe.top_k, "expert_dim": moe.expert_dim,
            "shared_expert_dim": moe.shared_expert_dim, "first_k_dense": moe.first_k_dense,
            "moe_layers": sum(config.is_moe_layer(i) for i in range(config.num_layers)),
        },
        "cla_share_factor": config.cla_share_factor,
        "kv_layers": config.num_kv_layers,
        "parameters": {"total": total, "active": active},
        "kv_bytes_per_token": {"fp32": config.kv_bytes_per_token(4), "bf16": config.kv_bytes_per_token(2)},
        "memory_bytes": {
            "weights_fp32": total * 4,
            "weights_bf16": total * 2,
            "kv_cache_full_context_fp32": config.kv_bytes_per_token(4) * context,
            "kv_cache_full_context_bf16": config.kv_bytes_per_token(2) * context,
        },
    }


def info_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    rope = data["rope"]
    rope_text = f"{rope['type']}, theta {rope['theta']:g}" + (f", factor {rope['factor']:g}" if rope["factor"] != 1 else "")
    params = data["parameters"]
    kv, memory, layers, kv_layers = data["kv_bytes_per_token"], data["memory_bytes"], data["layers"], data["kv_layers"]
    kv_text = f"{kv_layers} of {layers} layers store K/V"
    if data["cla_share_factor"] > 1:
        kv_text += f" (CLA ×{data['cla_share_factor']})"
    kv_text += f": {_bytes(kv['fp32'])}/token fp32, {_bytes(kv['bf16'])}/token bf16"
    if kv_layers < layers:
        kv_text += f", saves {100 * (1 - kv_layers / layers):.0f}%"
    rows = [
        ("Architecture", data["model_type"]),
        ("Source", data["source"]),
        ("Layers", str(layers)),
        ("Hidden size", f"{data['hidden_size']} (MLP {data['intermediate_size']})"),
        ("Attention", f"{data['num_heads']} heads, {data['num_kv_heads']} KV heads, head dim {data['head_dim']}"),
        ("Vocabulary", f"{data['vocab_size']:,}"),
        ("Context", f"{data['context_length']:,} tokens"),
        ("RoPE", rope_text),
    ]
    if data["moe"] is not None:
        moe = data["moe"]
        experts = f"{moe['experts']} routed (expert dim {moe['expert_dim']}), top-{moe['top_k']}"
        if moe["shared_expert_dim"]:
            experts += f", shared expert dim {moe['shared_expert_dim']}"
        experts += f"; MoE in {moe['moe_layers']} of {layers} layers"
        if moe["first_k_dense"]:
            experts += f" (first {moe['first_k_dense']} dense)"
        rows.append(("Experts", experts))
    rows += [
        ("Parameters", _count(params["total"]) if params["active"] == params["total"]
         else f"{_count(params['total'])} total, {_count(params['active'])} active per token"),
        ("KV cache", kv_text),
        ("Memory", f"weights {_bytes(memory['weights_fp32'])} fp32 ({_bytes(memory['weights_bf16'])} bf16); "
                   f"full-context KV cache {_bytes(memory['kv_cache_full_context_fp32'])} fp32 "
                   f"({_bytes(memory['kv_cache_full_context_bf16'])} bf16)"),
    ]
    return rows


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError

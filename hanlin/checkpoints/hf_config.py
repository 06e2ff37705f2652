"""Hugging Face config.json ⇄ ModelConfig for the checkpoint families Hanlin runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hanlin.config import ModelConfig, MoEConfig, RopeConfig
from hanlin.errors import CheckpointError, UnsupportedModelError

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "hunyuan_v1_dense")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "hunyuan_v1_moe")
SUPPORTED_MODEL_TYPES = DENSE_FAMILIES + MOE_FAMILIES
HUNYUAN_FAMILIES = ("hunyuan_v1_dense", "hunyuan_v1_moe")
# config_to_hf embeds the whole ModelConfig under this key so that Hanlin reads back exactly what it wrote,
# including features (sigmoid routing, group routing, CLA...) that the family's own keys cannot express.
HANLIN_CONFIG_KEY = "hanlin_config"

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "hunyuan_v1_dense": "HunYuanDenseV1ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "hunyuan_v1_moe": "HunYuanMoEV1ForCausalLM",
}
_QWEN_FAMILIES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class _FamilyDefaults:
    """What transformers assumes when config.json leaves a key out."""

    rms_norm_eps: float
    max_position_embeddings: int
    num_kv_heads: int | None  # None: one KV head per attention head
    rope_theta: float = 10000.0
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    sliding_window: int | None = None


_DEFAULTS = {
    "llama": _FamilyDefaults(1e-6, 2048, None),
    "mistral": _FamilyDefaults(1e-6, 131072, 8, sliding_window=4096),
    "qwen2": _FamilyDefaults(1e-6, 32768, 32),
    "qwen3": _FamilyDefaults(1e-6, 32768, 32, head_dim=128),
    "hunyuan_v1_dense": _FamilyDefaults(1e-5, 2048, None),
    "mixtral": _FamilyDefaults(1e-5, 131072, 8, rope_theta=1e6),
    "qwen2_moe": _FamilyDefaults(1e-6, 32768, 16),
    "qwen3_moe": _FamilyDefaults(1e-6, 32768, 4),
    "olmoe": _FamilyDefaults(1e-5, 4096, None),
    "hunyuan_v1_moe": _FamilyDefaults(1e-5, 2048, None),
}


class _Keys:
    """Reads config.json keys, naming the file and the key in every error."""

    def __init__(self, hf: dict[str, Any], source: str) -> None:
        self.hf, self.source = hf, source
        self.model_type: str = hf["model_type"]

    def required(self, *names: str) -> Any:
        for name in names:
            if self.hf.get(name) is not None:
                return self.hf[name]
        raise CheckpointError(
            f"{self.source}: missing required key {names[0]!r} for model_type {self.model_type!r}"
        )

    def get(self, name: str, default: Any) -> Any:
        return self.hf[name] if name in self.hf else default

    def uniform(self, value: Any, name: str) -> Any:
        """A per-layer list that holds one value is that value; lists that vary are refused."""
        if not isinstance(value, list):
            return value
        if not value:
            raise CheckpointError(f"{self.source}: {name!r} is an empty list")
        if any(v != value[0] for v in value):
            raise UnsupportedModelError(
                f"{self.source}: {name!r} varies from layer to layer ({value}); Hanlin needs one value for every layer"
            )
        return value[0]


def attention_biases(model_type: str, hf: dict[str, Any]) -> tuple[bool, bool]:
    """(bias on q/k/v, bias on o_proj) as the family's transformers code builds them."""
    if model_type == "qwen2":
        return True, False
    if model_type == "qwen2_moe":
        return bool(hf.get("qkv_bias", True)), False
    if model_type in ("mistral", "mixtral"):
        return False, False
    bias = bool(hf.get("attention_bias", False))
    return bias, bias


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """ModelConfig for a Hugging Face config.json dict (`source` names the file in errors)."""
    model_type = hf.get("model_type")
    if model_type is None:
        raise CheckpointError(f"{source}: missing required key 'model_type'")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    keys = _Keys(hf, source)
    embedded = _embedded_config(keys)
    if embedded is not None:
        return embedded
    if keys.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if keys.get("mlp_bias", False):
        raise UnsupportedModelError(f"{source}: mlp_bias is not supported")
    defaults = _DEFAULTS[model_type]
    hidden = keys.required("hidden_size")
    heads = keys.required("num_attention_heads")
    num_layers = keys.required("num_hidden_layers")
    head_dim = keys.get("head_dim", defaults.head_dim) or keys.get("attention_head_dim", None) or hidden // heads
    max_positions = keys.get("max_position_embeddings", defaults.max_position_embeddings)
    qkv_bias, out_bias = attention_biases(model_type, hf)
    qk_norm = "none"
    if model_type in ("qwen3", "qwen3_moe") or (model_type in HUNYUAN_FAMILIES and keys.get("use_qk_norm", True)):
        qk_norm = "head"
    elif model_type == "olmoe":
        qk_norm = "proj"
    cla = keys.get("cla_share_factor", 1) if model_type in HUNYUAN_FAMILIES and keys.get("use_cla", False) else 1
    try:
        return ModelConfig(
            vocab_size=keys.required("vocab_size"),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=keys.get("num_key_value_heads", defaults.num_kv_heads) or heads,
            intermediate_size=keys.required("intermediate_size"),
            head_dim=head_dim,
            max_position_embeddings=max_positions,
            rms_norm_eps=float(keys.get("rms_norm_eps", defaults.rms_norm_eps)),
            tie_embeddings=bool(keys.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            qk_norm=qk_norm,
            qk_norm_after_rope=qk_norm == "head" and model_type in HUNYUAN_FAMILIES,
            clip_qkv=keys.get("clip_qkv", None) if model_type == "olmoe" else None,
            sliding_window=_sliding_window(keys, num_layers),
            rope=_rope_from_hf(keys, max_positions),
            cla_share_factor=int(cla),
            moe=_moe_from_hf(keys),
            model_type=model_type,
        )
    except ValueError as error:
        raise CheckpointError(f"{source}: inconsistent config: {error}") from error


def _embedded_config(keys: _Keys) -> ModelConfig | None:
    data = keys.hf.get(HANLIN_CONFIG_KEY)
    if not isinstance(data, dict):
        return None
    try:
        config = ModelConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{keys.source}: unreadable {HANLIN_CONFIG_KEY!r}: {error}") from error
    # If someone edited the family keys after Hanlin wrote them, the family keys win.
    hf = keys.hf
    sizes = (hf.get("vocab_size"), hf.get("hidden_size"), hf.get("num_hidden_layers"), hf.get("num_attention_heads"))
    if sizes != (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads):
        return None
    return config


def _moe_from_hf(keys: _Keys) -> MoEConfig | None:
    model_type = keys.model_type
    if model_type == "mixtral":
        return MoEConfig(
            num_experts=keys.required("num_local_experts", "num_experts"),
            top_k=keys.required("num_experts_per_tok"),
            expert_dim=keys.required("intermediate_size"),
            norm_topk_prob=True,
        )
    if model_type == "olmoe":
        return MoEConfig(
            num_experts=keys.required("num_experts", "num_local_experts"),
            top_k=keys.required("num_experts_per_tok"),
            expert_dim=keys.required("intermediate_size"),
            norm_topk_prob=bool(keys.get("norm_topk_prob", False)),
        )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        num_experts = keys.required("num_experts", "num_local_experts")
        if num_experts == 0:
            return None
        shared = keys.required("shared_expert_intermediate_size") if model_type == "qwen2_moe" else 0
        return MoEConfig(
            num_experts=num_experts,
            top_k=keys.required("num_experts_per_tok"),
            expert_dim=keys.required("moe_intermediate_size"),
            norm_topk_prob=bool(keys.get("norm_topk_prob", False)),
            shared_expert_dim=shared,
            shared_expert_gate=model_type == "qwen2_moe",
            moe_every=keys.get("decoder_sparse_step", 1) or 1,
            dense_layers=tuple(sorted(keys.get("mlp_only_layers", None) or ())),
        )
    if model_type == "hunyuan_v1_moe":
        intermediate = keys.required("intermediate_size")
        expert_dim = keys.uniform(keys.get("moe_intermediate_size", None), "moe_intermediate_size") or intermediate
        shared_count = keys.uniform(keys.get("num_shared_expert", 1), "num_shared_expert")
        if keys.get("use_mixed_mlp_moe", True) is False:
            shared_count = 0
        return MoEConfig(
            num_experts=keys.uniform(keys.required("num_experts", "num_local_experts"), "num_experts"),
            top_k=keys.uniform(keys.required("moe_topk", "num_experts_per_tok"), "moe_topk"),
            expert_dim=expert_dim,
            norm_topk_prob=True,
            shared_expert_dim=intermediate * shared_count,
        )
    return None


def _sliding_window(keys: _Keys, num_layers: int) -> int | None:
    model_type = keys.model_type
    if model_type in ("mistral", "mixtral"):
        return keys.get("sliding_window", _DEFAULTS[model_type].sliding_window) or None
    if model_type not in _QWEN_FAMILIES or not keys.get("use_sliding_window", False):
        return None
    window = keys.get("sliding_window", 4096) or None
    if model_type == "qwen3_moe" or window is None:
        return window
    layer_types = keys.get("layer_types", None)
    if layer_types is None:
        first_full = keys.get("max_window_layers", 28)
        if model_type == "qwen2_moe":
            sliding = [(i + 1) % 2 == 1 and i < first_full for i in range(num_layers)]
        else:
            sliding = [i >= first_full for i in range(num_layers)]
    else:
        sliding = [kind == "sliding_attention" for kind in layer_types]
    if not any(sliding):
        return None
    if all(sliding):
        return window
    raise UnsupportedModelError(
        f"{keys.source}: a sliding window on some layers only is not supported (sliding layers: "
        f"{[i for i, s in enumerate(sliding) if s]})"
    )


def _rope_from_hf(keys: _Keys, max_positions: int) -> RopeConfig:
    params = keys.get("rope_parameters", None) or keys.get("rope_scaling", None) or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{keys.source}: rope_parameters must be an object, got {params!r}")
    if any(isinstance(value, dict) for value in params.values()):
        raise UnsupportedModelError(f"{keys.source}: per-layer-type RoPE parameters are not supported")
    if (params.get("partial_rotary_factor") or keys.get("partial_rotary_factor", None) or 1.0) != 1.0:
        raise UnsupportedModelError(f"{keys.source}: partial rotary embeddings are not supported")
    theta = float(params.get("rope_theta") or keys.get("rope_theta", None) or _DEFAULTS[keys.model_type].rope_theta)
    kind = params.get("rope_type") or params.get("type") or "default"

    def need(name: str) -> float:
        if params.get(name) is None:
            raise CheckpointError(f"{keys.source}: RoPE type {kind!r} needs {name!r} in rope_parameters")
        return float(params[name])

    # transformers' Hunyuan code reads "dynamic" with an alpha as fixed NTK-alpha scaling.
    if keys.model_type in HUNYUAN_FAMILIES and kind == "dynamic" and params.get("alpha"):
        alpha, factor = float(params["alpha"]), float(params.get("factor") or 1.0)
        return RopeConfig(type="ntk_alpha", theta=theta, alpha=alpha, factor=factor)
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind in ("linear", "dynamic"):
        return RopeConfig(type=kind, theta=theta, factor=need("factor"))
    if kind in ("yarn", "llama3"):
        original = int(
            keys.get("original_max_position_embeddings", None)
            or params.get("original_max_position_embeddings")
            or max_positions
        )
        if kind == "llama3":
            return RopeConfig(
                type="llama3",
                theta=theta,
                factor=need("factor"),
                original_max_position_embeddings=original,
                low_freq_factor=need("low_freq_factor"),
                high_freq_factor=need("high_freq_factor"),
            )
        optional = {name: params.get(name) for name in ("mscale", "mscale_all_dim", "attention_factor")}
        return RopeConfig(
            type="yarn",
            theta=theta,
            factor=float(params.get("factor") or max_positions / original),
            original_max_position_embeddings=original,
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            truncate=bool(params.get("truncate", True)),
            **{name: None if value is None else float(value) for name, value in optional.items()},
        )
    raise UnsupportedModelError(f"{keys.source}: RoPE type {kind!r} is not supported")


# ---- ModelConfig → config.json ---------------------------------------------------------------------


def hf_family(config: ModelConfig) -> str:
    """The transformers family a ModelConfig is saved as: its own model_type when that fits, else the closest."""
    is_moe = config.moe is not None
    if config.model_type in (MOE_FAMILIES if is_moe else DENSE_FAMILIES):
        return config.model_type
    if config.model_type in HUNYUAN_FAMILIES:
        return "hunyuan_v1_moe" if is_moe else "hunyuan_v1_dense"
    if is_moe:
        moe = config.moe
        assert moe is not None
        if moe.shared_expert_gate:
            return "qwen2_moe"
        if moe.shared_expert_dim:
            return "hunyuan_v1_moe"
        if config.qk_norm == "proj":
            return "olmoe"
        if config.qk_norm == "none" and moe.norm_topk_prob and moe.moe_every == 1 and not moe.dense_layers:
            return "mixtral"
        return "qwen3_moe"
    if config.qk_norm == "head":
        return "hunyuan_v1_dense" if config.qk_norm_after_rope else "qwen3"
    if config.attention_bias and not config.attention_out_bias:
        return "qwen2"
    return "mistral" if config.sliding_window else "llama"


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A config.json dict transformers can load (for the family of `hf_family`), plus the full Hanlin config."""
    family = hf_family(config)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "rope_parameters": _rope_to_hf(config.rope),
    }
    if family == "qwen2_moe":
        hf["qkv_bias"] = config.attention_bias
    elif family not in ("qwen2", "mistral", "mixtral"):
        hf["attention_bias"] = config.attention_bias or config.attention_out_bias
    if family in ("mistral", "mixtral"):
        hf["sliding_window"] = config.sliding_window
    elif family in _QWEN_FAMILIES:
        window = config.sliding_window
        hf.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)
        hf["layer_types"] = ["sliding_attention" if window else "full_attention"] * config.num_layers
    if family == "olmoe":
        hf["clip_qkv"] = config.clip_qkv
    if family in HUNYUAN_FAMILIES:
        hf.update(
            use_qk_norm=config.qk_norm != "none",
            use_cla=config.cla_share_factor > 1,
            cla_share_factor=config.cla_share_factor,
        )
    if config.moe is not None:
        hf.update(_moe_to_hf(config, family))
    hf[HANLIN_CONFIG_KEY] = config.to_dict()
    return hf


def _moe_to_hf(config: ModelConfig, family: str) -> dict[str, Any]:
    moe = config.moe
    assert moe is not None
    if family == "mixtral":
        return {
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "intermediate_size": moe.expert_dim,
        }
    if family == "hunyuan_v1_moe":
        return {
            "num_experts": moe.num_experts,
            "moe_topk": moe.top_k,
            "moe_intermediate_size": moe.expert_dim,
            "num_shared_expert": 1 if moe.shared_expert_dim else 0,
            "use_mixed_mlp_moe": bool(moe.shared_expert_dim),
        }
    hf: dict[str, Any] = {
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
    }
    if family == "olmoe":
        hf["intermediate_size"] = moe.expert_dim
        return hf
    dense = sorted(set(moe.dense_layers) | set(range(moe.first_k_dense)))
    hf.update(moe_intermediate_size=moe.expert_dim, decoder_sparse_step=moe.moe_every, mlp_only_layers=dense)
    if family == "qwen2_moe":
        hf["shared_expert_intermediate_size"] = moe.shared_expert_dim
    return hf


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": rope.type, "rope_theta": rope.theta}
    if rope.type in ("linear", "dynamic"):
        out["factor"] = rope.factor
    elif rope.type == "ntk_alpha":
        out.update(rope_type="dynamic", factor=rope.factor, alpha=rope.alpha)
    elif rope.type == "llama3":
        out.update(
            factor=rope.factor,
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    elif rope.type == "yarn":
        out.update(
            factor=rope.factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
            beta_fast=rope.beta_fast,
            beta_slow=rope.beta_slow,
            truncate=rope.truncate,
        )
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(rope, name) is not None:
                out[name] = getattr(rope, name)
    return out

"""Model configuration: plain dataclasses built once at the edge (a checkpoint's config) and passed inward."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

RopeType = Literal["default", "linear", "dynamic", "ntk_alpha", "yarn", "llama3"]


@dataclass
class RopeConfig:
    type: RopeType = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # Hunyuan NTK-alpha: base * alpha ** (d / (d - 2))
    alpha: float | None = None
    # YaRN and Llama-3
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass
class MoEConfig:
    num_experts: int
    top_k: int
    expert_dim: int
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # Shared experts: one SwiGLU MLP of width shared_expert_dim run on every token.
    shared_expert_dim: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(D, 1)) scales the shared output
    # Which layers are MoE: the first `first_k_dense` are dense, then every `moe_every`-th layer,
    # minus any listed in `dense_layers`.
    first_k_dense: int = 0
    moe_every: int = 1
    dense_layers: tuple[int, ...] = ()
    # Aux-loss-free balancing: a per-expert bias added to scores for selection only.
    router_bias: bool = False
    # Group-limited routing (DeepSeek-V3): pick topk_group of n_group groups, then top_k inside them.
    n_group: int = 1
    topk_group: int = 1
    # Training only (module.training): each expert takes at most ceil(capacity_factor * N * top_k / num_experts)
    # of a forward's N tokens; slots beyond that are re-routed at random to experts with room (Hunyuan's
    # recycle routing) or dropped if none has room. None: unlimited. Serving never applies it.
    capacity_factor: float | None = None

    def __post_init__(self) -> None:
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            from hanlin.errors import HanlinError

            raise HanlinError(
                f"moe.capacity_factor must be a positive number (or null for unlimited), got {self.capacity_factor}"
            )

    def is_moe_layer(self, layer: int) -> bool:
        if layer < self.first_k_dense or layer in self.dense_layers:
            return False
        return (layer + 1) % self.moe_every == 0


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v
    attention_out_bias: bool = False
    qk_norm: Literal["none", "head", "proj"] = "none"  # RMSNorm per head (Qwen3, Hunyuan) or over q/k proj (OLMoE)
    qk_norm_after_rope: bool = False  # Hunyuan normalises after RoPE
    clip_qkv: float | None = None
    sliding_window: int | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    # Cross-layer attention: layer i reuses the K/V of layer i - i % cla_share_factor.
    cla_share_factor: int = 1
    moe: MoEConfig | None = None
    model_type: str = "llama"  # the checkpoint family it came from; decides how it is saved

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.cla_share_factor < 1:
            raise ValueError("cla_share_factor must be >= 1")

    # ---- derived sizes -------------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(layer)

    def owns_kv(self, layer: int) -> bool:
        """True when the layer computes its own K/V; False when it reuses an earlier layer's (CLA)."""
        return layer % self.cla_share_factor == 0

    def kv_layer(self, layer: int) -> int:
        """Index into the KV cache that a layer reads and (if it owns its KV) writes."""
        return layer // self.cla_share_factor

    @property
    def num_kv_layers(self) -> int:
        return -(-self.num_layers // self.cla_share_factor)

    def kv_bytes_per_token(self, bytes_per_element: int = 4) -> int:
        return 2 * self.num_kv_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active-per-token) parameter counts."""
        d, hd = self.hidden_size, self.head_dim
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        total = active = embed + head + d  # final norm
        for layer in range(self.num_layers):
            attn = d * self.num_heads * hd * 2  # q, o
            if self.owns_kv(layer):
                attn += 2 * d * self.num_kv_heads * hd
            if self.attention_bias:
                attn += self.num_heads * hd + (2 * self.num_kv_heads * hd if self.owns_kv(layer) else 0)
            if self.attention_out_bias:
                attn += d
            owns = self.owns_kv(layer)
            if self.qk_norm == "head":
                attn += hd * (2 if owns else 1)
            elif self.qk_norm == "proj":
                attn += self.num_heads * hd + (self.num_kv_heads * hd if owns else 0)
            norms = 2 * d
            total += attn + norms
            active += attn + norms
            if self.is_moe_layer(layer):
                moe = self.moe
                assert moe is not None
                expert = 3 * d * moe.expert_dim
                shared = 3 * d * moe.shared_expert_dim + (d if moe.shared_expert_gate else 0)
                router = d * moe.num_experts + (moe.num_experts if moe.router_bias else 0)
                total += moe.num_experts * expert + shared + router
                active += moe.top_k * expert + shared + router
            else:
                mlp = 3 * d * self.intermediate_size
                total += mlp
                active += mlp
        return total, active

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        rope = RopeConfig(**data.pop("rope", {}))
        moe_data = data.pop("moe", None)
        moe = None
        if moe_data is not None:
            moe_data = dict(moe_data)
            moe_data["dense_layers"] = tuple(moe_data.get("dense_layers", ()))
            moe = MoEConfig(**moe_data)
        return cls(rope=rope, moe=moe, **data)

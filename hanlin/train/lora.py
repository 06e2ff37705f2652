"""LoRA (Hu et al. 2021): trainable low-rank updates W + (alpha / r) · B @ A on a model's linear layers.

Hanlin fuses q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`; a target named after a part
(q_proj, v_proj, gate_proj ...) adapts only that part's output rows of the fused layer. MoE experts are
SwiGLU modules too, so their projections are adapted like the dense ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hanlin.errors import HanlinError
from hanlin.models.attention import Attention
from hanlin.models.layers import SwiGLU

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_NAMES = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`/`bias` names, so state dicts line up) plus a low-rank update.

    lora_A [r, in] starts random and lora_B [out, r] at zero, so the layer starts as the plain one. `rows_O`
    (1 = adapted) restricts the update to some output rows of a fused projection.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, rows_O: torch.Tensor | None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.scale = rank, alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT and nn.Linear do
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("rows_O", rows_O.to(device=device, dtype=dtype) if rows_O is not None else None,
                             persistent=False)

    def _update_B(self) -> torch.Tensor:
        return self.lora_B if self.rows_O is None else self.lora_B * self.rows_O[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = F.linear(F.linear(self.dropout(x), self.lora_A), self._update_B())
        return F.linear(x, self.weight, self.bias) + self.scale * low_rank

    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight has the update folded in."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self._update_B().float() @ self.lora_A.float()) * self.scale
            linear.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(True)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def _fused_parts(parent: nn.Module, child_name: str) -> dict[str, tuple[int, int]] | None:
    """Output-row ranges of each part of a fused projection, or None for an unfused one."""
    if isinstance(parent, Attention) and child_name == "qkv_proj":
        q, kv = parent.q_dim, parent.kv_dim
        parts = {"q_proj": (0, q)}
        if parent.owns_kv:
            parts.update(k_proj=(q, q + kv), v_proj=(q + kv, q + 2 * kv))
        return parts
    if isinstance(parent, SwiGLU) and child_name == "gate_up_proj":
        return {"gate_proj": (0, parent.hidden), "up_proj": (parent.hidden, 2 * parent.hidden)}
    return None


def apply_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets: Sequence[str] = DEFAULT_TARGETS
) -> list[str]:
    """Wraps the targeted linear layers in LoRALinear and freezes every other parameter.

    Returns the names of the wrapped modules.
    """
    if rank <= 0:
        raise HanlinError(f"LoRA rank must be a positive integer, got {rank}")
    wanted = set(targets)
    wrapped: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or isinstance(child, LoRALinear):
                continue
            parts = _fused_parts(parent, child_name)
            rows_O = None
            if parts is None or child_name in wanted:
                if child_name not in wanted:
                    continue
            else:
                chosen = [span for part, span in parts.items() if part in wanted]
                if not chosen:
                    continue
                if len(chosen) < len(parts):
                    rows_O = torch.zeros(child.out_features)
                    for start, end in chosen:
                        rows_O[start:end] = 1
            setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout, rows_O))
            wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not wrapped:
        raise HanlinError(f"no linear layer matches the LoRA targets {sorted(wanted)}; "
                          f"the model's projections are qkv_proj (q/k/v), o_proj, gate_up_proj (gate/up), down_proj")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(lora_parameters(name, parameter))
    return wrapped


def lora_parameters(name: str, parameter: nn.Parameter) -> bool:
    """The Trainer's `trainable` predicate: True for adapter matrices only."""
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


def merge_lora(model: nn.Module) -> int:
    """Folds every adapter into its weight and puts plain nn.Linear modules back; returns how many were merged.

    All parameters are trainable again afterwards (the model is a plain Transformer).
    """
    merged = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, child.merged())
                merged += 1
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return merged

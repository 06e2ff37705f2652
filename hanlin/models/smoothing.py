"""SmoothQuant (Xiao et al., 2023) for int8 activations: move activation outliers into the weights.

A linear's input channel j that runs large in the activations gets divided by s_j on the way in and its weight
column multiplied by s_j, so x W^T is unchanged but both x and W quantize with smaller error. The division is
folded into what produces the input, so it costs nothing at run time:
- an RMSNorm feeding linears: its weight / s, every consumer's columns * s (a MoE's router too, which stays
  fp32, and all its experts: one s for the norm);
- a SwiGLU's down projection: its input is silu(gate) * up, so the up rows / s.
With s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) and alpha 0.5, as the paper. The activation ranges come from
a forward pass over random token ids: on the embedded model the W8A8 perplexity increase fell from +2.03% to
+0.62% with that calibration (+0.73% calibrated on real text), so no calibration data needs to ship.
"""

from __future__ import annotations

import torch
from torch import nn

from hanlin.models.layers import RMSNorm, SwiGLU
from hanlin.models.moe import MoE
from hanlin.models.transformer import Transformer

ALPHA = 0.5
CALIBRATION_SEQUENCES = 2
CALIBRATION_TOKENS = 512


@torch.no_grad()
def smooth_activations(model: Transformer, alpha: float = ALPHA, seed: int = 0) -> None:
    """Rescales the fp32 model in place (same function, up to rounding) so its linear inputs quantize well."""
    ranges = _activation_ranges(model, seed)
    lm_head = model.lm_head
    for block in model.layers:
        mlp = block.mlp
        swiglus = [mlp] if isinstance(mlp, SwiGLU) else list(mlp.experts) + [mlp.shared_expert]
        for swiglu in swiglus:
            if swiglu is not None and swiglu.down_proj in ranges:
                _smooth_down(swiglu, ranges[swiglu.down_proj], alpha)
        _smooth_norm(block.input_norm, ranges[block.input_norm], [block.attn.qkv_proj.weight], [], alpha)
        if isinstance(mlp, MoE):
            quantized = [e.gate_up_proj.weight for e in mlp.experts]
            if mlp.shared_expert is not None:
                quantized.append(mlp.shared_expert.gate_up_proj.weight)
            plain = [mlp.router.weight] + ([mlp.shared_expert_gate.weight] if mlp.shared_expert_gate is not None else [])
        else:
            quantized, plain = [mlp.gate_up_proj.weight], []
        _smooth_norm(block.post_attn_norm, ranges[block.post_attn_norm], quantized, plain, alpha)
    if isinstance(lm_head, nn.Linear) and lm_head.weight is not model.embed_tokens.weight:
        _smooth_norm(model.norm, ranges[model.norm], [lm_head.weight], [], alpha)


def _activation_ranges(model: Transformer, seed: int) -> dict[nn.Module, torch.Tensor]:
    """max |x_j| per channel: of every RMSNorm's output and every SwiGLU down projection's input."""
    ranges: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, x: torch.Tensor) -> None:
        x_max = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        ranges[module] = torch.maximum(ranges[module], x_max) if module in ranges else x_max

    hooks = []
    for module in model.modules():
        if isinstance(module, RMSNorm) and module.weight.numel() == model.config.hidden_size:
            hooks.append(module.register_forward_hook(lambda m, args, out: record(m, out)))
        elif isinstance(module, SwiGLU):
            hooks.append(module.down_proj.register_forward_hook(lambda m, args, out: record(m, args[0])))
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (CALIBRATION_SEQUENCES, CALIBRATION_TOKENS), generator=generator)
    try:
        for row in ids:
            model(row[None].to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def _scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s per input channel; 1 where a channel never fired in calibration or has an all-zero weight column."""
    w_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    usable = (x_max > 0) & (w_max > 0)
    s = x_max.clamp(min=1e-8).pow(alpha) / w_max.clamp(min=1e-8).pow(1 - alpha)
    return torch.where(usable, s.clamp(min=1e-5, max=1e5), torch.ones_like(s))


def _smooth_norm(norm: RMSNorm, x_max: torch.Tensor, quantized: list[torch.Tensor], plain: list[torch.Tensor],
                 alpha: float) -> None:
    s = _scales(x_max, quantized, alpha)
    norm.weight.div_(s.to(norm.weight.dtype))
    for weight in quantized + plain:
        weight.mul_(s.to(weight.dtype))


def _smooth_down(swiglu: SwiGLU, x_max: torch.Tensor, alpha: float) -> None:
    s = _scales(x_max, [swiglu.down_proj.weight], alpha)
    swiglu.gate_up_proj.weight[swiglu.hidden :].div_(s[:, None])
    swiglu.down_proj.weight.mul_(s)

"""Rotary position embeddings with the scaling schemes of the supported checkpoint families."""

from __future__ import annotations

import math

import torch

from hanlin.config import RopeConfig
from hanlin.kernels import cpu_kernels


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    original = rope.original_max_position_embeddings or max_positions
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_get_mscale(factor, rope.mscale) / _yarn_get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = _yarn_get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _llama3(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope.theta, dim)
    original = rope.original_max_position_embeddings or 8192
    low_wavelen = original / rope.low_freq_factor
    high_wavelen = original / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Produces (cos, sin) of shape [B, T, head_dim] for integer positions [B, T]."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.rope = rope
        self.dim = head_dim
        self.max_positions = max_positions
        self.attention_scaling = 1.0
        if rope.type in ("default", "dynamic"):
            inv_freq = _base_inv_freq(rope.theta, head_dim)
        elif rope.type == "linear":
            inv_freq = _base_inv_freq(rope.theta, head_dim) / rope.factor
        elif rope.type == "ntk_alpha":
            assert rope.alpha is not None, "ntk_alpha RoPE needs alpha"
            inv_freq = _base_inv_freq(rope.theta * rope.alpha ** (head_dim / (head_dim - 2)), head_dim)
        elif rope.type == "yarn":
            inv_freq, self.attention_scaling = _yarn(rope, head_dim, max_positions)
        elif rope.type == "llama3":
            inv_freq = _llama3(rope, head_dim)
        else:
            raise ValueError(f"unknown RoPE type {rope.type!r}")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        if seq_len <= self.max_positions:
            return self.inv_freq
        factor = self.rope.factor
        base = self.rope.theta * ((factor * seq_len / self.max_positions) - (factor - 1)) ** (self.dim / (self.dim - 2))
        return _base_inv_freq(base, self.dim).to(self.inv_freq.device)

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.rope.type == "dynamic":
            inv_freq = self._dynamic_inv_freq(int(positions_BT.max()) + 1)
        freqs_BTF = positions_BT.float()[..., None] * inv_freq.float()
        emb_BTD = torch.cat((freqs_BTF, freqs_BTF), dim=-1)
        cos = emb_BTD.cos() * self.attention_scaling
        sin = emb_BTD.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, the same values, written as a roll of x times a sin whose first half is
    negated: the backward of rotate_half's slices fills two zero tensors of x's size and adds them, a roll's
    backward is one roll (q of bench/train.py's model, forward + backward, 2 threads: 3.7 -> 2.6 ms)."""
    half = x_BHTD.shape[-1] // 2
    signed_sin = torch.cat((-sin_BTD[..., :half], sin_BTD[..., half:]), dim=-1)
    return x_BHTD * cos_BTD[:, None] + x_BHTD.roll(half, dims=-1) * signed_sin[:, None]


def rope_qkv(qkv_BTW: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor, heads: int,
             kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training on CPU: the fused q/k/v projection [B, T, (H + 2 Hkv) D] -> (rotated q [B, H, T, D], rotated k and
    v [B, Hkv, T, D]) by the compiled kernels (rope.cpp), one pass each way with the projection's gradient written
    whole (apply_rope and a split take a mul, roll, mul and add per tensor each way, and a cat)."""
    return _RopeQKV.apply(qkv_BTW.contiguous(), cos_BTD, sin_BTD, heads, kv_heads)


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv_BTW, cos_BTD, sin_BTD, heads, kv_heads):
        q_BHTD, k_BHTD, v_BHTD = cpu_kernels().rope_qkv_forward(qkv_BTW, cos_BTD, sin_BTD, heads, kv_heads)
        ctx.save_for_backward(cos_BTD, sin_BTD)
        return q_BHTD, k_BHTD, v_BHTD

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos_BTD, sin_BTD = ctx.saved_tensors
        return cpu_kernels().rope_qkv_backward(grad_q, grad_k, grad_v, cos_BTD, sin_BTD), None, None, None, None

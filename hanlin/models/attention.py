"""Grouped-query attention with optional q/k/v bias, QK-norm, sliding window and cross-layer K/V sharing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from typing import Protocol

from hanlin.config import ModelConfig
from hanlin.models.causal_attention import causal_attention, kernel_applies
from hanlin.models.layers import RMSNorm, training_on_cpu
from hanlin.models.rope import apply_rope, rope_qkv

KV = tuple[torch.Tensor, torch.Tensor]


class KVStore(Protocol):
    """Where a step's keys and values go and how attention reads them back (the engine's paged cache)."""

    def write(self, kv_layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> None: ...

    def attend(self, kv_layer: int, q_BHTD: torch.Tensor) -> torch.Tensor: ...


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.owns_kv = config.owns_kv(layer)
        self.kv_layer = config.kv_layer(layer)
        self.clip_qkv = config.clip_qkv
        self.qk_norm_after_rope = config.qk_norm_after_rope
        q_dim = config.num_heads * config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        self.q_dim, self.kv_dim = q_dim, kv_dim
        # Layers that own their K/V project q, k and v in one matmul; CLA layers only project q.
        out_dim = q_dim + 2 * kv_dim if self.owns_kv else q_dim
        self.qkv_proj = nn.Linear(config.hidden_size, out_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=config.attention_out_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "head":
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if self.owns_kv else None
        elif config.qk_norm == "proj":
            self.q_norm = RMSNorm(q_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(kv_dim, config.rms_norm_eps) if self.owns_kv else None

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTD: torch.Tensor,
        sin_BTD: torch.Tensor,
        mask_BQS: torch.Tensor | None,
        cache: KVStore | None,
        shared_kv: KV | None,
        key_start_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KV | None]:
        """key_start_BT: where mask_BQS is causal from a first key per query (documents, a window), that key."""
        B, T, _ = x_BTD.shape
        qkv = self.qkv_proj(x_BTD)
        plain_kv = self.owns_kv and self.qk_norm == "none" and self.clip_qkv is None
        if plain_kv and cache is None and training_on_cpu(qkv, cos_BTD, sin_BTD):
            q_BHTD, k_BHTD, v_BHTD = rope_qkv(qkv, cos_BTD, sin_BTD, self.num_heads, self.num_kv_heads)
            kv = (k_BHTD, v_BHTD)
        else:
            q_BHTD, kv = self._heads(qkv, cos_BTD, sin_BTD, cache, shared_kv)

        if cache is not None:  # cross-layer-attention layers read the K/V their owner wrote this step
            out_BTD = cache.attend(self.kv_layer, q_BHTD).transpose(1, 2).reshape(B, T, self.q_dim)
            return self.o_proj(out_BTD), None
        assert kv is not None, "a cross-layer-attention layer needs the previous layer's K/V"

        k_BHSD, v_BHSD = kv
        causal_rows = mask_BQS is None or key_start_BT is not None
        if causal_rows and T > 1 and q_BHTD.requires_grad and kernel_applies(q_BHTD):  # training on CPU
            out = causal_attention(q_BHTD, k_BHSD, v_BHSD, key_start_BT)
        elif mask_BQS is None:
            out = F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, is_causal=T > 1, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(
                q_BHTD, k_BHSD, v_BHSD, attn_mask=mask_BQS[:, None], enable_gqa=True
            )
        out_BTD = out.transpose(1, 2).reshape(B, T, self.q_dim)
        return self.o_proj(out_BTD), kv

    def _heads(self, qkv: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor, cache: KVStore | None,
               shared_kv: KV | None) -> tuple[torch.Tensor, KV | None]:
        """Queries [B, H, T, D] and this layer's K/V (its own, written to the cache, or the shared ones)."""
        B, T, _ = qkv.shape
        # split, not slices: its backward is one cat, where each slice's fills a zero tensor of qkv's size
        q, k, v = qkv.split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1) if self.owns_kv else (qkv, None, None)
        if self.qk_norm == "proj":
            q = self.q_norm(q)
        if self.clip_qkv is not None:  # OLMoE clips after the projection norm
            q = q.clamp(-self.clip_qkv, self.clip_qkv)
        q_BHTD = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head" and not self.qk_norm_after_rope:
            q_BHTD = self.q_norm(q_BHTD)
        q_BHTD = apply_rope(q_BHTD, cos_BTD, sin_BTD)
        if self.qk_norm == "head" and self.qk_norm_after_rope:
            q_BHTD = self.q_norm(q_BHTD)

        if self.owns_kv:
            if self.qk_norm == "proj":
                k = self.k_norm(k)
            if self.clip_qkv is not None:
                k, v = k.clamp(-self.clip_qkv, self.clip_qkv), v.clamp(-self.clip_qkv, self.clip_qkv)
            k_BHTD = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v_BHTD = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            if self.qk_norm == "head" and not self.qk_norm_after_rope:
                k_BHTD = self.k_norm(k_BHTD)
            k_BHTD = apply_rope(k_BHTD, cos_BTD, sin_BTD)
            if self.qk_norm == "head" and self.qk_norm_after_rope:
                k_BHTD = self.k_norm(k_BHTD)
            if cache is not None:
                cache.write(self.kv_layer, k_BHTD, v_BHTD)
            kv = (k_BHTD, v_BHTD)
        else:
            kv = shared_kv
        return q_BHTD, kv

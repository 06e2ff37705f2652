"""One config-driven decoder-only transformer for dense and Mixture-of-Experts checkpoints."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from hanlin.config import ModelConfig
from hanlin.models.attention import KV, Attention
from hanlin.models.kv_cache import KVCache
from hanlin.models.layers import RMSNorm, SwiGLU
from hanlin.models.moe import MoE
from hanlin.models.rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer):
            assert config.moe is not None
            self.mlp: nn.Module = MoE(config.hidden_size, config.moe)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask_BQS: torch.Tensor | None,
        cache: KVCache | None,
        shared_kv: KV | None,
    ) -> tuple[torch.Tensor, KV]:
        attn_out, kv = self.attn(self.input_norm(x_BTD), cos, sin, mask_BQS, cache, shared_kv)
        h = x_BTD + attn_out
        return h + self.mlp(self.post_attn_norm(h)), kv


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)

    def init_buffers(self, device: torch.device | str) -> None:
        """Creates the non-checkpoint buffers (RoPE frequencies, routing biases absent from a checkpoint)
        after a model built on the meta device received its parameters."""
        self.rotary = RotaryEmbedding(self.config.rope, self.config.head_dim, self.config.max_position_embeddings).to(device)
        for module in self.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer.is_meta:
                    module.register_buffer(name, torch.zeros(buffer.shape, device=device))

    def moe_layers(self) -> Iterator[MoE]:
        return (block.mlp for block in self.layers if isinstance(block.mlp, MoE))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        last_logits_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V]) for input_ids [B, T].

        attention_mask [B, past + T] marks real tokens with 1 and padding with 0 (Hugging Face semantics);
        positions default to the count of real tokens before each one.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                positions = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x_BTD = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x_BTD.dtype)
        mask_BQS = self._attention_mask(attention_mask, B, T, past, x_BTD.device)
        kv: KV | None = None
        for block in self.layers:
            x_BTD, kv = block(x_BTD, cos, sin, mask_BQS, cache, kv)
        if cache is not None:
            cache.advance(T)
        if last_logits_only:
            x_BTD = x_BTD[:, -1:]
        return self.lm_head(self.norm(x_BTD))

    def _attention_mask(
        self, attention_mask: torch.Tensor | None, B: int, T: int, past: int, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean [B, T, past + T] mask (True = may attend), or None when plain causal attention is exact."""
        window = self.config.sliding_window
        S = past + T
        if attention_mask is None and (past == 0 or T == 1) and (window is None or S <= window):
            return None
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        allowed_QS = k_pos <= q_pos
        if window is not None:
            allowed_QS = allowed_QS & (k_pos > q_pos - window)
        mask_BQS = allowed_QS.expand(B, T, S)
        if attention_mask is not None:
            mask_BQS = mask_BQS & attention_mask[:, None, :S].bool()
            # A padding query sees nothing; let it see itself so attention stays finite.
            mask_BQS = mask_BQS | (k_pos == q_pos)
        return mask_BQS

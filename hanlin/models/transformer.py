"""One config-driven decoder-only transformer for dense and Mixture-of-Experts checkpoints."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hanlin.config import ModelConfig
from hanlin.models.attention import KV, Attention, KVStore
from hanlin.models.causal_attention import document_starts, key_starts
from hanlin.models.layers import RMSNorm, SwiGLU
from hanlin.models.linear_cross_entropy import linear_cross_entropy
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
        cache: KVStore | None,
        shared_kv: KV | None,
        key_start_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KV | None]:
        attn_out, kv = self.attn(self.input_norm(x_BTD), cos, sin, mask_BQS, cache, shared_kv, key_start_BT)
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
        cache: KVStore | None = None,
        positions: torch.Tensor | None = None,
        logit_rows: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for input_ids [B, T] (or [B, R, V] for the R token indices in logit_rows).

        Without a cache: attention_mask [B, T] marks real tokens with 1 and padding with 0 (Hugging Face
        semantics) and positions default to the count of real tokens before each one. With the engine's
        paged cache (a KVStore), input_ids are one packed row of every sequence's new tokens and positions
        must be given. Training on packed rows: document_ids [B, T] (equal ids = one document, each document
        contiguous) keep attention inside each document and restart positions at every document's start.
        With labels [B, T] (the token that should follow each position, -100 for none), the summed
        cross-entropy comes back instead of logits, the lm_head and the loss fused (linear_cross_entropy).
        """
        B, T = input_ids.shape
        if document_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("document_ids are for packed training rows: no cache, no attention_mask")
            if positions is None:
                positions = _positions_in_documents(document_ids)
        if positions is None:
            if cache is not None:
                raise ValueError("a forward pass over the paged KV cache needs explicit positions")
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x_BTD = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x_BTD.dtype)
        mask_BQS = None if cache is not None else self._attention_mask(attention_mask, B, T, x_BTD.device)
        if document_ids is not None:
            same_BQS = document_ids[:, :, None] == document_ids[:, None, :]
            causal_QS = torch.ones(T, T, dtype=torch.bool, device=x_BTD.device).tril()
            mask_BQS = same_BQS & (causal_QS if mask_BQS is None else mask_BQS)
        key_start_BT = None
        if cache is None and attention_mask is None:
            key_start_BT = key_starts(document_ids, B, T, self.config.sliding_window, x_BTD.device)
        kv: KV | None = None
        for block in self.layers:
            x_BTD, kv = block(x_BTD, cos, sin, mask_BQS, cache, kv, key_start_BT)
        if logit_rows is not None:
            x_BTD = x_BTD[:, logit_rows]
        h_BTD = self.norm(x_BTD)
        if labels is None:
            return self.lm_head(h_BTD)
        h_ND, labels_N = h_BTD.reshape(-1, h_BTD.shape[-1]), labels.reshape(-1)
        if isinstance(self.lm_head, nn.Linear) and self.lm_head.bias is None:
            return linear_cross_entropy(h_ND, self.lm_head.weight, labels_N)
        return F.cross_entropy(self.lm_head(h_ND).float(), labels_N, reduction="sum")

    def _attention_mask(
        self, attention_mask: torch.Tensor | None, B: int, T: int, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean [B, T, T] mask (True = may attend), or None when plain causal attention is exact."""
        window = self.config.sliding_window
        if attention_mask is None and (window is None or T <= window):
            return None
        q_pos = torch.arange(T, device=device)[:, None]
        k_pos = torch.arange(T, device=device)[None, :]
        allowed_QS = k_pos <= q_pos
        if window is not None:
            allowed_QS = allowed_QS & (k_pos > q_pos - window)
        mask_BQS = allowed_QS.expand(B, T, T)
        if attention_mask is not None:
            mask_BQS = mask_BQS & attention_mask[:, None, :].bool()
            # A padding query sees nothing; let it see itself so attention stays finite.
            mask_BQS = mask_BQS | (k_pos == q_pos)
        return mask_BQS


def _positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Index of each token within its (contiguous) document: [B, T] -> [B, T]."""
    B, T = document_ids.shape
    return torch.arange(T, device=document_ids.device).expand(B, T) - document_starts(document_ids)

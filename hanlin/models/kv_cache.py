"""A contiguous KV cache for a fixed batch of sequences, preallocated to a maximum length."""

from __future__ import annotations

import torch

from hanlin.config import ModelConfig


class KVCache:
    """K/V for every layer that owns its K/V (cross-layer attention shares one entry between layers)."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_kv_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_kv_layers)]
        self.max_length = max_length
        self.length = 0  # tokens already stored (the same for every row of the batch)

    def write(self, kv_layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> None:
        end = self.length + k_BHTD.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache is full: {end} tokens > max_length {self.max_length}")
        self.k[kv_layer][:, :, self.length : end] = k_BHTD
        self.v[kv_layer][:, :, self.length : end] = v_BHTD

    def read(self, kv_layer: int, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + new_tokens
        return self.k[kv_layer][:, :, :end], self.v[kv_layer][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

"""The paged KV cache: one pool of fixed-size blocks per K/V layer, and the per-step view the model uses.

A step packs every scheduled token of every sequence into one row [1, N]. The linear layers see all N at
once; attention runs per group: all single-token queries (decodes) together, padded to the longest
context, and each multi-token chunk (prefill) on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hanlin.config import ModelConfig


class PagedKVCache:
    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        slots = num_blocks * block_size
        shape = (slots, config.num_kv_heads, config.head_dim)
        self.k = [_lazy_zeros(shape, dtype, device) for _ in range(config.num_kv_layers)]
        self.v = [_lazy_zeros(shape, dtype, device) for _ in range(config.num_kv_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sliding_window = config.sliding_window
        self.device = device

    @staticmethod
    def num_blocks_for(config: ModelConfig, megabytes: int, block_size: int, dtype: torch.dtype) -> int:
        bytes_per_token = config.kv_bytes_per_token(torch.finfo(dtype).bits // 8)
        return max(1, megabytes * 2**20 // (bytes_per_token * block_size))


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed, not empty: padded attention reads unwritten slots, and a masked key still multiplies its value
    by 0, which garbage NaNs would poison. On the CPU, numpy's zeros come from calloc, so the OS commits
    pages only as blocks get written (torch.zeros would touch the whole pool up front)."""
    if torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float16, torch.float64):
        return torch.from_numpy(np.zeros(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype))
    return torch.zeros(shape, dtype=dtype, device=device)


@dataclass
class AttentionGroup:
    rows: slice  # this group's query tokens in the packed step
    slots_GS: torch.Tensor  # cache slots of each sequence's context (padded)
    mask_GQS: torch.Tensor | None  # True where a query may attend; None means plain causal / all visible
    causal: bool = False


class StepKV:
    """What the model's attention layers write to and read from during one engine step."""

    def __init__(self, cache: PagedKVCache, slot_mapping_N: torch.Tensor, groups: list[AttentionGroup]) -> None:
        self.cache = cache
        self.slot_mapping_N = slot_mapping_N
        self.groups = groups

    def write(self, kv_layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> None:
        self.cache.k[kv_layer].index_copy_(0, self.slot_mapping_N, k_BHTD[0].transpose(0, 1))
        self.cache.v[kv_layer].index_copy_(0, self.slot_mapping_N, v_BHTD[0].transpose(0, 1))

    def attend(self, kv_layer: int, q_BHTD: torch.Tensor) -> torch.Tensor:
        """Attention output [1, H, N, D] for the packed queries."""
        k_pool, v_pool = self.cache.k[kv_layer], self.cache.v[kv_layer]
        q_HND = q_BHTD[0]
        outputs = []
        for group in self.groups:
            G, S = group.slots_GS.shape
            q_GHQD = q_HND[:, group.rows].unflatten(1, (G, -1)).transpose(0, 1)
            slots = group.slots_GS.flatten()
            k_GHSD = k_pool.index_select(0, slots).view(G, S, *k_pool.shape[1:]).transpose(1, 2)
            v_GHSD = v_pool.index_select(0, slots).view(G, S, *v_pool.shape[1:]).transpose(1, 2)
            mask = group.mask_GQS[:, None] if group.mask_GQS is not None else None
            out_GHQD = F.scaled_dot_product_attention(
                q_GHQD, k_GHSD, v_GHSD, attn_mask=mask, is_causal=group.causal, enable_gqa=True
            )
            outputs.append(out_GHQD.transpose(0, 1).flatten(1, 2))
        return torch.cat(outputs, dim=1)[None] if len(outputs) > 1 else outputs[0][None]


def build_step_kv(
    cache: PagedKVCache,
    chunks: list[tuple[list[int], int, int]],
) -> tuple[StepKV, torch.Tensor]:
    """StepKV and positions [1, N] for chunks of (block_table, first position, token count).

    Single-token chunks must come first (they form one group); every longer chunk is its own group.
    """
    device, bs, window = cache.device, cache.block_size, cache.sliding_window
    singles = [c for c in chunks if c[2] == 1]
    groups: list[AttentionGroup] = []
    slot_parts: list[torch.Tensor] = []
    position_parts: list[torch.Tensor] = []
    row = 0
    if singles:
        G = len(singles)
        context_G = torch.tensor([start + 1 for _, start, _ in singles], device=device)
        S = int(context_G.max())
        slots_GS = _slots(cache, [table for table, _, _ in singles], S)
        k_pos_S = torch.arange(S, device=device)
        mask_GS = k_pos_S[None, :] < context_G[:, None]
        if window is not None:
            mask_GS &= k_pos_S[None, :] > (context_G[:, None] - 1 - window)
        uniform = bool(mask_GS.all())
        groups.append(AttentionGroup(slice(0, G), slots_GS, None if uniform else mask_GS[:, None, :]))
        last_G = context_G - 1
        slot_parts.append(slots_GS.gather(1, last_G[:, None]).squeeze(1))
        position_parts.append(last_G)
        row = G
    for table, start, count in chunks[len(singles) :]:
        if count == 1:
            raise ValueError("single-token chunks must come before longer ones")
        S = start + count
        slots_1S = _slots(cache, [table], S)
        q_pos_Q = torch.arange(start, S, device=device)
        k_pos_S = torch.arange(S, device=device)
        plain_causal = start == 0 and (window is None or S <= window)
        mask = None
        if not plain_causal:
            mask_QS = k_pos_S[None, :] <= q_pos_Q[:, None]
            if window is not None:
                mask_QS &= k_pos_S[None, :] > q_pos_Q[:, None] - window
            mask = mask_QS[None]
        groups.append(AttentionGroup(slice(row, row + count), slots_1S, mask, causal=plain_causal))
        slot_parts.append(slots_1S[0, start:])
        position_parts.append(q_pos_Q)
        row += count
    return StepKV(cache, torch.cat(slot_parts), groups), torch.cat(position_parts)[None]


def _slots(cache: PagedKVCache, tables: list[list[int]], length: int) -> torch.Tensor:
    """Cache slot of each of the first `length` positions of each block table [G, length] (padding → slot 0)."""
    bs = cache.block_size
    blocks = -(-length // bs)
    padded = [table[:blocks] + [0] * (blocks - len(table[:blocks])) for table in tables]
    table_GB = torch.tensor(padded, dtype=torch.long, device=cache.device)
    offsets = torch.arange(bs, device=cache.device)
    return (table_GB[:, :, None] * bs + offsets).flatten(1)[:, :length]

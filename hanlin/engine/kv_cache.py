"""The paged KV cache: one pool of fixed-size blocks per K/V layer, and the per-step view the model uses.

A step packs every scheduled token of every sequence into one row [1, N]. The linear layers see all N at
once; attention runs per group: all single-token queries (decodes) together, and each multi-token chunk
(prefill) on its own. The fused CPU path reads decode contexts in place through their block tables; the
PyTorch path gathers them, padded to the longest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
class DecodeGroup:
    """The step's single-token queries (rows 0 .. G-1): what a paged kernel needs to read contexts in place."""

    block_tables_GB: torch.Tensor  # int32, padded with block 0
    context_G: torch.Tensor  # int32: context length of each query, its own token included
    block_size: int
    window: int | None
    _gathered: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, init=False, repr=False)

    @property
    def size(self) -> int:
        return self.block_tables_GB.shape[0]

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cache slots [G, S] of every context padded to the longest, mask [G, 1, S] or None if all visible)."""
        if self._gathered is None:
            context_G = self.context_G.long()
            S = int(context_G.max())
            slots_GS = _slots_of(self.block_tables_GB.long(), self.block_size, S)
            k_pos_S = torch.arange(S, device=context_G.device)
            mask_GS = k_pos_S[None, :] < context_G[:, None]
            if self.window is not None:
                mask_GS &= k_pos_S[None, :] > (context_G[:, None] - 1 - self.window)
            self._gathered = (slots_GS, None if bool(mask_GS.all()) else mask_GS[:, None, :])
        return self._gathered


@dataclass
class ChunkGroup:
    """One multi-token chunk (a prefill): its rows, the slots of its whole context, its mask."""

    rows: slice
    slots_S: torch.Tensor
    mask_QS: torch.Tensor | None  # True where a query may attend; None with causal=True means plain causal
    causal: bool


class StepKV:
    """What the model's attention layers write to and read from during one engine step."""

    def __init__(
        self, cache: PagedKVCache, slot_mapping_N: torch.Tensor, decode: DecodeGroup | None, chunks: list[ChunkGroup]
    ) -> None:
        self.cache = cache
        self.slot_mapping_N = slot_mapping_N
        self.decode = decode
        self.chunks = chunks

    def write(self, kv_layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> None:
        k_pool, v_pool = self.cache.k[kv_layer], self.cache.v[kv_layer]
        k_pool.index_copy_(0, self.slot_mapping_N, k_BHTD[0].transpose(0, 1).to(k_pool.dtype))
        v_pool.index_copy_(0, self.slot_mapping_N, v_BHTD[0].transpose(0, 1).to(v_pool.dtype))

    def attend(self, kv_layer: int, q_BHTD: torch.Tensor) -> torch.Tensor:
        """Attention output [1, H, N, D] for the packed queries."""
        k_pool, v_pool = self.cache.k[kv_layer], self.cache.v[kv_layer]
        q_HND = q_BHTD[0]
        outputs = []
        if self.decode is not None:
            slots_GS, mask_G1S = self.decode.gathered()
            q_GH1D = q_HND[:, : self.decode.size].transpose(0, 1)[:, :, None]
            out = _attention(q_GH1D, k_pool, v_pool, slots_GS, mask_G1S, causal=False)
            outputs.append(out.transpose(0, 1).flatten(1, 2))
        for chunk in self.chunks:
            q_1HQD = q_HND[None, :, chunk.rows]
            mask = None if chunk.mask_QS is None else chunk.mask_QS[None]
            out = _attention(q_1HQD, k_pool, v_pool, chunk.slots_S[None], mask, causal=chunk.causal)
            outputs.append(out[0])
        return torch.cat(outputs, dim=1)[None] if len(outputs) > 1 else outputs[0][None]


def _attention(
    q_GHQD: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots_GS: torch.Tensor,
    mask_GQS: torch.Tensor | None, causal: bool,
) -> torch.Tensor:
    G, S = slots_GS.shape
    k_GHSD = k_pool.index_select(0, slots_GS.flatten()).view(G, S, *k_pool.shape[1:]).transpose(1, 2).to(q_GHQD.dtype)
    v_GHSD = v_pool.index_select(0, slots_GS.flatten()).view(G, S, *v_pool.shape[1:]).transpose(1, 2).to(q_GHQD.dtype)
    mask = None if mask_GQS is None else mask_GQS[:, None]
    return F.scaled_dot_product_attention(q_GHQD, k_GHSD, v_GHSD, attn_mask=mask, is_causal=causal, enable_gqa=True)


def build_step_kv(
    cache: PagedKVCache,
    chunks: list[tuple[list[int], int, int]],
) -> tuple[StepKV, torch.Tensor]:
    """StepKV and positions [1, N] for chunks of (block_table, first position, token count).

    Single-token chunks must come first (they form the decode group); every longer chunk is its own group.
    """
    device, bs, window = cache.device, cache.block_size, cache.sliding_window
    singles = [c for c in chunks if c[2] == 1]
    decode = None
    slots: list[int] = []
    positions: list[int] = []
    if singles:
        blocks = max(-(-(start + 1) // bs) for _, start, _ in singles)
        tables = [table[:blocks] + [0] * (blocks - len(table[:blocks])) for table, _, _ in singles]
        decode = DecodeGroup(
            torch.tensor(tables, dtype=torch.int32, device=device),
            torch.tensor([start + 1 for _, start, _ in singles], dtype=torch.int32, device=device),
            bs, window,
        )
        for table, start, _ in singles:
            slots.append(table[start // bs] * bs + start % bs)
            positions.append(start)
    groups: list[ChunkGroup] = []
    slot_parts = [torch.tensor(slots, dtype=torch.long, device=device)]
    row = len(singles)
    for table, start, count in chunks[len(singles) :]:
        if count == 1:
            raise ValueError("single-token chunks must come before longer ones")
        S = start + count
        blocks = -(-S // bs)
        slots_S = _slots_of(torch.tensor([table[:blocks]], device=device), bs, S)[0]
        plain_causal = start == 0 and (window is None or S <= window)
        mask = None
        if not plain_causal:
            q_pos_Q = torch.arange(start, S, device=device)
            k_pos_S = torch.arange(S, device=device)
            mask = k_pos_S[None, :] <= q_pos_Q[:, None]
            if window is not None:
                mask &= k_pos_S[None, :] > q_pos_Q[:, None] - window
        groups.append(ChunkGroup(slice(row, row + count), slots_S, mask, plain_causal))
        slot_parts.append(slots_S[start:])
        positions.extend(range(start, S))
        row += count
    slot_mapping = torch.cat(slot_parts) if groups else slot_parts[0]
    return StepKV(cache, slot_mapping, decode, groups), torch.tensor([positions], device=device)


def _slots_of(table_GB: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Cache slot of each of the first `length` positions of each block table [G, length]."""
    offsets = torch.arange(block_size, device=table_GB.device)
    return (table_GB[:, :, None] * block_size + offsets).flatten(1)[:, :length]

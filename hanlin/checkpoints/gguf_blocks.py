"""Reading one Hanlin weight out of GGUF tensors: as fp32 values, or packed straight from Q4_0/Q4_1/Q8_0 blocks."""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hanlin.errors import UnsupportedModelError
from hanlin.models.quant_packing import Q4, Q8, PackedWeight, concat_rows, dequantize, pack_weight


@dataclass(frozen=True)
class Piece:
    """One llama.cpp tensor (or a slice of it) that goes into a Hanlin weight; pieces are stacked by rows."""

    tensor: str
    heads: int | None = None  # undo llama.cpp's Q/K row permutation for this many heads
    expert: int | None = None  # this expert's slice of a stacked [E, rows, cols] tensor
    as_row: bool = False  # a vector that becomes a [1, n] weight


def _block_layouts() -> dict[Any, tuple[int, bool]]:
    """GGML type → (bytes per block of 32 weights, block holds a min)."""
    from gguf import GGMLQuantizationType as T

    return {T.Q4_0: (18, False), T.Q4_1: (20, True), T.Q8_0: (34, False)}


def direct_types(scheme: str) -> set[Any]:
    """GGML types taken as stored under `scheme`. int4 keeps Q8_0 tensors too: a file that stores a tensor in
    8 bits (llama.cpp's Q4 files do so for the tied embedding/output) loses far more from a second rounding
    to 4 bits than the few MB it would save (on SmolLM2: KL 0.03-0.08 nats and 1 top-1 change in 3, vs 0)."""
    from gguf import GGMLQuantizationType as T

    return {"int4": {T.Q4_0, T.Q4_1, T.Q8_0}, "int8": {T.Q8_0}}.get(scheme, set())


def packed_from_blocks(raw_MB: np.ndarray, qtype: Any) -> PackedWeight:
    """Splits Q4_0/Q4_1/Q8_0 rows [M, bytes] into fp16 d (and m) and the quant bytes; nothing goes through fp32
    except Q4_0's min (-8 * d, exact in fp16)."""
    block_bytes, has_min = _block_layouts()[qtype]
    rows = raw_MB.shape[0]
    blocks = raw_MB.reshape(rows, -1, block_bytes)
    n_blocks = blocks.shape[1]

    def halves(start: int) -> torch.Tensor:
        fp16 = np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)
        return torch.from_numpy(fp16.reshape(rows, n_blocks))

    scales = halves(0)
    quants = np.ascontiguousarray(blocks[..., 4 if has_min else 2 :]).reshape(rows, -1)
    if block_bytes == 34:
        return PackedWeight(Q8, torch.from_numpy(quants.view(np.int8)), scales, torch.empty(0, dtype=torch.float16), 32)
    mins = halves(2) if has_min else (scales.float() * -8.0).to(torch.float16)
    return PackedWeight(Q4, torch.from_numpy(quants), scales, mins, 32)


def unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (interleaved rotary pairs → rotate-half halves)."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)


def _requantized(packed: PackedWeight, scheme: str, group: int) -> PackedWeight:
    values = dequantize(packed.kind, packed.qdata, packed.scales, packed.mins, packed.group)
    return pack_weight(values, scheme, group)


class GGUFWeights:
    """The tensors of an open GGUF reader (memory-mapped), read piece by piece."""

    def __init__(self, reader: Any, source: str) -> None:
        self.tensors = {t.name: t for t in reader.tensors}
        self.source = source
        self._mapping = reader.data.base if isinstance(reader.data.base, mmap.mmap) else None

    def release_pages(self) -> None:
        """Unmaps the file pages read so far from this process (they stay in the page cache, and any later
        read faults them back in): otherwise the whole file ends up counted in the process's RSS."""
        if self._mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mapping.madvise(mmap.MADV_DONTNEED)

    def logical_shape(self, piece: Piece) -> tuple[int, ...]:
        shape = tuple(reversed([int(d) for d in self.tensors[piece.tensor].shape]))
        shape = shape[1:] if piece.expert is not None else shape
        return (1, *shape) if piece.as_row else shape

    def shape(self, pieces: tuple[Piece, ...]) -> tuple[int, ...]:
        shapes = [self.logical_shape(p) for p in pieces]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def _raw(self, piece: Piece) -> tuple[np.ndarray, Any]:
        tensor = self.tensors[piece.tensor]
        data = tensor.data if piece.expert is None else tensor.data[piece.expert]
        return data, tensor.tensor_type

    def fp32(self, pieces: tuple[Piece, ...]) -> torch.Tensor:
        """Dequantized values (a fresh, writable array; the memory map is never handed out)."""
        from gguf.quants import dequantize

        arrays = []
        for piece in pieces:
            data, qtype = self._raw(piece)
            try:
                values = dequantize(data, qtype).reshape(self.logical_shape(piece))
            except NotImplementedError:
                raise UnsupportedModelError(
                    f"{self.source}: tensor {piece.tensor} has type {qtype.name}, which gguf cannot dequantize"
                ) from None
            if piece.heads is not None:
                values = values[unpermute_rows(values.shape[0], piece.heads)]
            arrays.append(values)
        values = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        return torch.from_numpy(np.require(values, dtype=np.float32, requirements=["C", "W"]))

    def packed(self, pieces: tuple[Piece, ...], scheme: str, group: int) -> PackedWeight | None:
        """The weight packed for `scheme` with the stored blocks taken as they are, or None when no piece is
        stored in a type `scheme` can take directly (the caller then quantizes the fp32 values)."""
        direct = direct_types(scheme)
        if not any(self.tensors[p.tensor].tensor_type in direct for p in pieces):
            return None
        parts = []
        for piece in pieces:
            data, qtype = self._raw(piece)
            if qtype in direct:
                part = packed_from_blocks(data, qtype)
                if piece.heads is not None:
                    part = part.rows(torch.from_numpy(unpermute_rows(part.out_features, piece.heads)))
            else:
                part = pack_weight(self.fp32((piece,)), scheme, group)
            parts.append(part)
        if len({p.kind for p in parts}) > 1:  # int4 with Q8_0 and 4-bit pieces fused: all become 4-bit
            parts = [p if p.kind == Q4 else _requantized(p, scheme, group) for p in parts]
        return concat_rows(parts)

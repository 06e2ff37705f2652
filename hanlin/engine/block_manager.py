"""KV block allocation with reference counts and automatic prefix caching.

A full block is keyed by a hash of its tokens and of every token before it (a chain of block hashes), so
two sequences that start with the same tokens share those blocks. Blocks whose last user left stay cached
(and findable) until an allocation needs them, oldest first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from hanlin.errors import HanlinError

BlockHash = bytes
ROOT_HASH: BlockHash = b""


class OutOfBlocksError(HanlinError):
    """No free KV block is left (the scheduler preempts before this can happen)."""


def block_hash(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """Collision-resistant, so one user's tokens can never map onto another user's cached K/V."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def prefix_hashes(tokens: Sequence[int], block_size: int, parent: BlockHash = ROOT_HASH) -> list[BlockHash]:
    """Chained hashes of every full block of tokens."""
    hashes = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start : start + block_size])
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[BlockHash | None] = [None] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # never-cached blocks; pop() takes block 0 first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # unused but findable, oldest first
        self._by_hash: dict[BlockHash, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached_free(self) -> int:
        return len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks holding the longest run of leading full blocks (not yet acquired)."""
        if not self.enable_prefix_caching:
            return []
        found = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def free_after_acquiring(self, blocks: Sequence[int]) -> int:
        """Free blocks left once `blocks` (cached hits) are acquired: unused hits stop being free."""
        return self.num_free - sum(1 for b in blocks if self.ref_count[b] == 0)

    def acquire(self, block: int) -> None:
        if self.ref_count[block] == 0:
            self._cached_free.pop(block, None)
        self.ref_count[block] += 1

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._cached_free:
            block, _ = self._cached_free.popitem(last=False)
            old = self.hash_of[block]
            if old is not None and self._by_hash.get(old) == block:
                del self._by_hash[old]
            self.hash_of[block] = None
        else:
            raise OutOfBlocksError("no free KV block")
        self.ref_count[block] = 1
        return block

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] > 0:
            return
        if self.hash_of[block] is not None:
            self._cached_free[block] = None
        else:
            self._free.append(block)

    def register(self, block: int, h: BlockHash) -> None:
        """Mark a block as holding the full block with hash h (first writer wins; duplicates stay private)."""
        if not self.enable_prefix_caching or self.hash_of[block] is not None or h in self._by_hash:
            return
        self.hash_of[block] = h
        self._by_hash[h] = block

    def reset_prefix_cache(self) -> None:
        for block in list(self._cached_free):
            self.hash_of[block] = None
            self._free.append(block)
        self._cached_free.clear()
        self._by_hash = {h: b for h, b in self._by_hash.items() if self.ref_count[b] > 0}

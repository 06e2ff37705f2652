"""Block allocation, reference counts and the prefix cache's LRU eviction."""

from __future__ import annotations

import pytest

from hanlin.engine.block_manager import BlockManager, OutOfBlocksError, prefix_hashes


def test_hashes_chain_so_equal_blocks_after_different_prefixes_differ() -> None:
    a = prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = prefix_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and len(b) == 2
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different history
    assert prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == a


def test_shared_blocks_are_counted_and_freed_blocks_stay_findable_until_evicted_oldest_first() -> None:
    m = BlockManager(num_blocks=3, block_size=2)
    h = prefix_hashes([1, 2, 3, 4, 5, 6], 2)
    blocks = [m.allocate() for _ in range(3)]
    for block, block_h in zip(blocks, h):
        m.register(block, block_h)
    assert m.num_free == 0
    with pytest.raises(OutOfBlocksError):
        m.allocate()
    assert m.find_prefix(h) == blocks
    m.acquire(blocks[0])  # a second sequence shares the first block
    for block in reversed(blocks):
        m.release(block)
    assert m.num_free == 2 and m.ref_count[blocks[0]] == 1
    assert m.find_prefix(h) == blocks  # released blocks are still cached
    assert m.free_after_acquiring(blocks) == 0
    fresh = m.allocate()  # evicts the least recently released: the tail block
    assert fresh == blocks[2] and m.find_prefix(h) == blocks[:2]
    m.release(blocks[0])
    m.reset_prefix_cache()
    assert m.find_prefix(h) == [] and m.num_free == 2


def test_duplicate_content_keeps_the_first_block_and_caching_can_be_off() -> None:
    m = BlockManager(num_blocks=4, block_size=2)
    (h,) = prefix_hashes([7, 7], 2)
    first, second = m.allocate(), m.allocate()
    m.register(first, h)
    m.register(second, h)
    assert m.find_prefix([h]) == [first]
    m.release(second)
    assert m.num_cached_free == 0  # an unregistered duplicate goes straight back to the free list
    off = BlockManager(num_blocks=2, block_size=2, enable_prefix_caching=False)
    off.register(off.allocate(), h)
    assert off.find_prefix([h]) == []

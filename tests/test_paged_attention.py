"""Decode attention over paged K/V pools (hanlin/kernels/paged_attention.cpp) against a float64 reference that
gathers each query's context and takes softmax(q k / sqrt(d)) v."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import torch_threads
from hanlin.kernels import cpu_kernels

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="needs the compiled CPU kernels (AVX2 and a C++ compiler)")


def reference(q_GHD, k_pool, v_pool, tables, lens, block_size: int, window: int) -> torch.Tensor:
    G, H, Dh = q_GHD.shape
    rep = H // k_pool.shape[1]
    out = torch.empty_like(q_GHD)
    for g in range(G):
        ctx = int(lens[g])
        first = max(0, ctx - window) if window else 0
        positions = torch.arange(first, ctx)
        slots = tables[g, positions // block_size].long() * block_size + positions % block_size
        kv_head = torch.arange(H) // rep
        k, v = k_pool[slots][:, kv_head].double(), v_pool[slots][:, kv_head].double()  # [S, H, Dh]
        scores_HS = torch.einsum("shd,hd->hs", k, q_GHD[g].double()) / math.sqrt(Dh)
        out[g] = torch.einsum("hs,shd->hd", torch.softmax(scores_HS, -1), v).float()
    return out


def random_case(G, H, Hkv, Dh, block_size, dtype, seed, max_ctx=120):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 4 * G * (max_ctx // block_size + 1)
    k_pool = torch.randn(num_blocks * block_size, Hkv, Dh, generator=gen).to(dtype)
    v_pool = torch.randn(num_blocks * block_size, Hkv, Dh, generator=gen).to(dtype)
    per_seq = -(-max_ctx // block_size)
    # Every sequence's blocks scattered over the pool, as after a while of serving.
    tables = torch.randperm(num_blocks, generator=gen)[: G * per_seq].view(G, per_seq).int().contiguous()
    lens = torch.randint(1, max_ctx + 1, (G,), generator=gen, dtype=torch.int32)
    lens[0] = max_ctx
    q = torch.randn(G, H, Dh, generator=gen)
    return q, k_pool, v_pool, tables, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "G, H, Hkv, Dh",
    [
        (16, 9, 3, 64),  # SmolLM2: groups of 3
        (1, 9, 3, 64),  # one sequence: split by kv head
        (5, 8, 2, 128),  # groups of 4: three heads then one
        (3, 4, 4, 96),  # no grouping
        (4, 10, 2, 80),  # groups of 5, a head size off the fast paths
        (7, 6, 3, 48),
        (2, 5, 1, 16),
    ],
)
@pytest.mark.parametrize("block_size, window", [(16, 0), (16, 37), (5, 0), (1, 9)])
def test_matches_reference(dtype, G, H, Hkv, Dh, block_size, window) -> None:
    q, k_pool, v_pool, tables, lens = random_case(G, H, Hkv, Dh, block_size, dtype, seed=G * 100 + Dh + block_size)
    got = kernels.paged_decode_attention(q, k_pool, v_pool, tables, lens, block_size, window)
    want = reference(q, k_pool.float(), v_pool.float(), tables, lens, block_size, window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("G", [1, 3, 16])
def test_same_result_on_one_and_two_threads(G: int) -> None:
    q, k_pool, v_pool, tables, lens = random_case(G, 9, 3, 64, 16, torch.float16, seed=7)
    with torch_threads(1):
        one = kernels.paged_decode_attention(q, k_pool, v_pool, tables, lens, 16, 0)
    with torch_threads(2):
        two = kernels.paged_decode_attention(q, k_pool, v_pool, tables, lens, 16, 0)
    assert torch.equal(one, two)


def test_bad_inputs_are_refused_with_a_reason() -> None:
    q, k_pool, v_pool, tables, lens = random_case(2, 9, 3, 64, 16, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="both float32 or both float16"):
        kernels.paged_decode_attention(q, k_pool, v_pool.half(), tables, lens, 16, 0)
    with pytest.raises(RuntimeError, match="head size"):
        kernels.paged_decode_attention(q[..., :32].contiguous(), k_pool, v_pool, tables, lens, 16, 0)
    with pytest.raises(RuntimeError, match="int32"):
        kernels.paged_decode_attention(q, k_pool, v_pool, tables.long(), lens, 16, 0)
    too_long = lens.clone()
    too_long[1] = tables.shape[1] * 16 + 1
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.paged_decode_attention(q, k_pool, v_pool, tables, too_long, 16, 0)
    outside = tables.clone()
    outside[0, 0] = k_pool.shape[0] // 16
    with pytest.raises(RuntimeError, match="outside the pools"):
        kernels.paged_decode_attention(q, k_pool, v_pool, outside, lens, 16, 0)


def prefill_reference(q_QHD, k_pool, v_pool, slots_S, window: int) -> torch.Tensor:
    """Query row r (position S - Q + r) over positions [max(0, pos + 1 - window), pos] (all up to pos: window 0)."""
    Q, H, Dh = q_QHD.shape
    S = slots_S.shape[0]
    rep = H // k_pool.shape[1]
    kv_head = torch.arange(H) // rep
    out = torch.empty_like(q_QHD)
    for r in range(Q):
        pos = S - Q + r
        first = max(0, pos + 1 - window) if window else 0
        rows = slots_S[first : pos + 1]
        k, v = k_pool[rows][:, kv_head].double(), v_pool[rows][:, kv_head].double()
        scores_HS = torch.einsum("shd,hd->hs", k, q_QHD[r].double()) / math.sqrt(Dh)
        out[r] = torch.einsum("hs,shd->hd", torch.softmax(scores_HS, -1), v).float()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H, Hkv, Dh", [(9, 3, 64), (4, 4, 20), (6, 1, 32)])
@pytest.mark.parametrize("S, Q, window", [(110, 70, 0), (40, 40, 0), (150, 130, 0), (150, 90, 50), (30, 1, 0)])
def test_prefill_attention_over_the_pools_matches_the_reference(dtype, H, Hkv, Dh, S, Q, window) -> None:
    """A prefill chunk (the last Q of S positions: a cached prefix before it, or none) with its positions' slots
    scattered over the pools; more than one block of 64 query rows; windows; row sizes past the vector loop."""
    gen = torch.Generator().manual_seed(S + Q + H)
    k_pool = torch.randn(4 * S, Hkv, Dh, generator=gen).to(dtype)
    v_pool = torch.randn(4 * S, Hkv, Dh, generator=gen).to(dtype)
    slots_S = torch.randperm(4 * S, generator=gen)[:S].contiguous()
    q_QHD = torch.randn(Q, H, Dh, generator=gen)
    expected = prefill_reference(q_QHD, k_pool, v_pool, slots_S, window)
    for threads in (1, 2):
        with torch_threads(threads):
            got = kernels.paged_prefill_attention(q_QHD, k_pool, v_pool, slots_S, window)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_prefill_attention_refuses_slots_outside_the_pools() -> None:
    pool = torch.zeros(32, 2, 16)
    with pytest.raises(RuntimeError, match="slots outside the pools"):
        kernels.paged_prefill_attention(torch.zeros(3, 2, 16), pool, pool, torch.tensor([0, 5, 32]))

"""The compiled qlinear kernels (hanlin/kernels/qlinear.cpp) against a pure-PyTorch reference.

The reference builds W from unpacked quantized values written here (the nibble packing is done by the test,
not read back through the kernel's own layout code), computes x @ W^T in float64, and compares with a
tolerance derived from fp32 summation: the kernels add the same K products in another order (blocked,
8 lanes, per group), so the error is a small multiple of eps * sum_k |x_k| (|q_k scale| + |min|).

Up to 4 input rows (decode), blocked weights are multiplied with integer dot products on inputs quantized
per 32 to int8 (scale d = max |x| / 127 over the block, as llama.cpp does): each input is then off by at
most d / 2, which adds sum_k |w_k| d_k / 2 to the bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import torch_threads
import hanlin.kernels

F32, Q8, Q4, F32_PANELS = 0, 1, 2, 3


@pytest.fixture(scope="module")
def qlinear():
    kernels = hanlin.kernels.cpu_kernels()
    if kernels is None:
        pytest.skip("compiled CPU kernels unavailable")
    return kernels.qlinear


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[M, K] values 0..15 -> [M, K / 2] bytes: in each run of 32, byte j = q[j] | q[j + 16] << 4."""
    M, K = q.shape
    runs = q.to(torch.uint8).view(M, K // 32, 2, 16)
    return (runs[:, :, 0, :] | (runs[:, :, 1, :] << 4)).reshape(M, K // 2).contiguous()


def per_column(t: torch.Tensor, group: int, K: int) -> torch.Tensor:
    """[M, K / group] per-group values -> [M, K] per weight, in float64."""
    return t.double().repeat_interleave(group, dim=1)[:, :K]


def random_q8(M: int, K: int, group: int, gen: torch.Generator):
    q = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
    scales = (torch.rand(M, K // group, generator=gen) * 0.02 + 0.001).half()
    weight = q.double() * per_column(scales, group, K)
    magnitude = weight.abs()
    return (q, scales, torch.empty(0, dtype=torch.float16)), weight, magnitude


def random_q4(M: int, K: int, group: int, gen: torch.Generator):
    q = torch.randint(0, 16, (M, K), generator=gen)
    scales = (torch.rand(M, K // group, generator=gen) * 0.02 + 0.001).half()
    mins = ((torch.rand(M, K // group, generator=gen) - 0.5) * 0.3).half()
    s, m = per_column(scales, group, K), per_column(mins, group, K)
    weight = q.double() * s + m
    magnitude = q.double() * s + m.abs()
    return (pack_nibbles(q), scales, mins), weight, magnitude


def random_panels(M: int, K: int, gen: torch.Generator):
    """An fp32 weight and its panels [ceil(M / 16), K, 16] (rows interleaved by 16, zero rows padding M), packed
    here by indexing, not by hanlin's pack_panels; group = M."""
    weight = torch.randn(M, K, generator=gen)
    P = -(-M // 16)
    padded = torch.zeros(P * 16, K)
    padded[:M] = weight
    panels = torch.stack([padded[16 * p : 16 * p + 16].T for p in range(P)]).contiguous()  # [p, k, i] = W[16p + i, k]
    empty = torch.empty(0, dtype=torch.float16)
    return (panels, empty, empty), weight.double(), weight.double().abs()


def check(qlinear, kind, packed, group, weight, magnitude, N, bias, gen, x=None):
    M, K = weight.shape
    if x is None:
        x = torch.randn(N, K, generator=gen)
    b = torch.randn(M, generator=gen) if bias else None
    y = qlinear(x, kind, *packed, group, b)
    expected = x.double() @ weight.T + (b.double() if bias else 0)
    # fp32 rounding of a sum of K products: bounded by a small multiple of eps * sum |terms|.
    tolerance = 1e-5 * (x.double().abs() @ magnitude.T) + 1e-6
    if kind in (Q8, Q4) and N <= 4 and group % 32 == 0 and K % 32 == 0:
        tolerance = tolerance + input_quantization_bound(x.reshape(-1, K), weight)
    assert y.dtype == torch.float32 and y.shape == expected.shape
    error = (y.double() - expected).abs()
    worst = (error / tolerance).max().item()
    assert worst <= 1, f"kind={kind} M={M} K={K} group={group} N={N} bias={bias}: error {worst:.2f}x tolerance"


def input_quantization_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, M]: sum_k |w_mk| d_nk / 2, with d the int8 step of x's block of 32."""
    N, K = x.shape
    step = x.double().abs().view(N, K // 32, 32).amax(-1) / 127
    return (step.repeat_interleave(32, dim=1) / 2) @ weight.abs().T * 1.0001


def test_decode_rows_error_is_the_input_quantization_and_nothing_more(qlinear) -> None:
    """At 1-4 rows the error bound above is tight: exact when the inputs are already on the int8 grid."""
    gen = torch.Generator().manual_seed(7)
    packed, weight, magnitude = random_q4(16, 64, 32, gen)
    steps = torch.rand(2, 2, 1, generator=gen) + 0.5
    x = (torch.randint(-127, 128, (2, 2, 32), generator=gen) * steps / 127).reshape(2, 64).float()
    x[:, ::32] = steps.view(2, 2) * torch.tensor([1.0, -1.0])[:, None]  # each block's max is +-127 steps
    y = qlinear(x, Q4, *packed, 32, None)
    torch.testing.assert_close(y.double(), x.double() @ weight.T, rtol=1e-5, atol=1e-5)


NS = [1, 2, 3, 4, 5, 16, 33, 100, 200]


@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("M,K,group", [(1, 32, 32), (7, 64, 32), (37, 96, 32), (130, 128, 64), (61, 576, 32),
                                       (19, 256, 128)])
def test_q4_matches_reference(qlinear, N, M, K, group):
    gen = torch.Generator().manual_seed(M * 1000 + K + N)
    packed, weight, magnitude = random_q4(M, K, group, gen)
    for bias in (False, True):
        check(qlinear, Q4, packed, group, weight, magnitude, N, bias, gen)


@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("M,K,group", [(1, 32, 32), (5, 96, 32), (37, 128, 64), (61, 576, 32),
                                       (3, 1, 1), (9, 7, 7), (33, 13, 13), (17, 100, 100), (40, 577, 577),
                                       (11, 576, 576)])
def test_q8_matches_reference(qlinear, N, M, K, group):
    gen = torch.Generator().manual_seed(M * 1000 + K + N + 7)
    packed, weight, magnitude = random_q8(M, K, group, gen)
    for bias in (False, True):
        check(qlinear, Q8, packed, group, weight, magnitude, N, bias, gen)


def random_weight(kind: int, M: int, K: int, gen: torch.Generator):
    """(packed, group, weight, magnitude) of a random weight of `kind`: groups of 32 for the quantized kinds."""
    if kind == F32_PANELS:
        packed, weight, magnitude = random_panels(M, K, gen)
        return packed, M, weight, magnitude
    packed, weight, magnitude = (random_q8 if kind == Q8 else random_q4)(M, K, 32, gen)
    return packed, 32, weight, magnitude


@pytest.mark.parametrize("kind", [Q8, Q4, F32_PANELS])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_and_many_rows(qlinear, kind, threads):
    """Ragged work: 1001 rows (63 panels, the last one 9 rows; the N = 1 panel path in groups of 4)."""
    gen = torch.Generator().manual_seed(threads + 20 * kind)
    packed, group, weight, magnitude = random_weight(kind, 1001, 96, gen)
    with torch_threads(threads):
        for N in (1, 2, 3, 4, 6, 70, 200):
            check(qlinear, kind, packed, group, weight, magnitude, N, True, gen)


@pytest.mark.parametrize("kind", [Q4, F32_PANELS])
def test_non_contiguous_and_batched_input(qlinear, kind):
    gen = torch.Generator().manual_seed(5)
    packed, group, weight, magnitude = random_weight(kind, 20, 64, gen)
    x = torch.randn(64, 9, generator=gen).t()  # [9, 64], not contiguous
    check(qlinear, kind, packed, group, weight, magnitude, 9, True, gen, x=x)
    x3 = torch.randn(2, 3, 64, generator=gen)
    y3 = qlinear(x3, kind, *packed, group, None)
    assert y3.shape == (2, 3, 20)
    torch.testing.assert_close(y3.reshape(6, 20), qlinear(x3.reshape(6, 64), kind, *packed, group, None))
    assert qlinear(x3[0, 0], kind, *packed, group, None).shape == (20,)
    assert qlinear(torch.empty(0, 64), kind, *packed, group, None).shape == (0, 20)


PANEL_NS = [1, 2, 3, 5, 6, 7, 13, 16, 33, 64, 300]


@pytest.mark.parametrize("N", PANEL_NS)
@pytest.mark.parametrize("M,K", [(1, 1), (7, 33), (16, 64), (17, 5), (45, 160), (64, 576), (200, 1536), (301, 96)])
def test_f32_panels_match_reference(qlinear, N, M, K):
    gen = torch.Generator().manual_seed(M * 1000 + K + N + 11)
    packed, weight, magnitude = random_panels(M, K, gen)
    for bias in (False, True):
        check(qlinear, F32_PANELS, packed, M, weight, magnitude, N, bias, gen)


def test_f32_is_linear(qlinear):
    gen = torch.Generator().manual_seed(6)
    w, x, b = torch.randn(10, 33, generator=gen), torch.randn(4, 33, generator=gen), torch.randn(10, generator=gen)
    empty = torch.empty(0, dtype=torch.float16)
    torch.testing.assert_close(qlinear(x, F32, w, empty, empty, 0, b), torch.nn.functional.linear(x, w, b))


def test_rejects_bad_inputs(qlinear):
    gen = torch.Generator().manual_seed(8)
    (q4, s4, m4), _, _ = random_q4(8, 64, 32, gen)
    (q8, s8, _), _, _ = random_q8(8, 64, 32, gen)
    x = torch.randn(2, 64)
    none = torch.empty(0, dtype=torch.float16)
    cases = [
        (lambda: qlinear(x.double(), Q4, q4, s4, m4, 32, None), "x must be float32"),
        (lambda: qlinear(torch.randn(2, 63), Q4, q4, s4, m4, 32, None), "features"),
        (lambda: qlinear(x, Q4, q4.view(torch.int8), s4, m4, 32, None), "uint8"),
        (lambda: qlinear(x, Q8, q8.view(torch.uint8), s8, none, 32, None), "int8"),
        (lambda: qlinear(x, Q4, q4, s4.float(), m4, 32, None), "float16"),
        (lambda: qlinear(x, Q4, q4, s4, m4[:, :1], 32, None), "mins must be"),
        (lambda: qlinear(x, Q4, q4, s4, m4, 16, None), "group"),
        (lambda: qlinear(x, Q8, q8, s8, none, 48, None), "group"),
        (lambda: qlinear(x, Q8, q8, s8, none, 32, torch.randn(7)), "bias"),
        (lambda: qlinear(x, 5, q8, s8, none, 32, None), "kind"),
    ]
    (panels, _, _), _, _ = random_panels(20, 64, gen)
    cases += [
        (lambda: qlinear(x, F32_PANELS, panels, none, none, 33, None), "group must be M"),
        (lambda: qlinear(x, F32_PANELS, panels, none, none, 16, None), "group must be M"),
        (lambda: qlinear(x, F32_PANELS, panels.reshape(32, 64), none, none, 20, None), "panels must be"),
        (lambda: qlinear(x, F32_PANELS, panels.double(), none, none, 20, None), "float32"),
        (lambda: qlinear(torch.randn(2, 63), F32_PANELS, panels, none, none, 20, None), "features"),
        (lambda: qlinear(x, F32_PANELS, panels, none, none, 20, torch.randn(21)), "bias"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


# --- GGUF blocks repacked into the qlinear.h format --------------------------------------------------------


def gguf_fields(blocks: np.ndarray, M: int, K: int, header: int) -> tuple[np.ndarray, np.ndarray]:
    """Split [M, bytes] of GGUF blocks into the fp16 header words [M, K/32, header/2] and the payloads."""
    nb = K // 32
    b = blocks.reshape(M, nb, -1)
    return b[:, :, :header].copy().view(np.float16), b[:, :, header:].copy()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("N", [1, 3, 16, 64, 200])
def test_gguf_blocks_repacked(qlinear, qtype, N):
    gguf_quants = pytest.importorskip("gguf.quants")
    import gguf

    kind_type = getattr(gguf.GGMLQuantizationType, qtype)
    M, K = 45, 160
    rng = np.random.default_rng(N)
    data = rng.standard_normal((M, K)).astype(np.float32)
    blocks = gguf_quants.quantize(data, kind_type)
    dequantized = torch.from_numpy(gguf_quants.dequantize(blocks, kind_type).astype(np.float64)).reshape(M, K)
    if qtype == "Q8_0":
        header, qs = gguf_fields(blocks, M, K, 2)
        packed = (torch.from_numpy(qs.view(np.int8).reshape(M, K)), torch.from_numpy(header[:, :, 0]),
                  torch.empty(0, dtype=torch.float16))
        kind = Q8
        magnitude = 128 * per_column(packed[1].abs(), 32, K)
    else:
        header, qs = gguf_fields(blocks, M, K, 2 if qtype == "Q4_0" else 4)
        d = torch.from_numpy(header[:, :, 0])
        mins = -8 * d if qtype == "Q4_0" else torch.from_numpy(header[:, :, 1])
        packed = (torch.from_numpy(qs.reshape(M, K // 2)), d, mins)
        kind = Q4
        magnitude = 15 * per_column(d.abs(), 32, K) + per_column(mins.abs(), 32, K)
    x = torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32))
    y = qlinear(x, kind, *packed, 32, None)
    expected = x.double() @ dequantized.T
    tolerance = 1e-5 * (x.double().abs() @ magnitude.T) + 1e-6
    if N <= 4:
        tolerance = tolerance + input_quantization_bound(x, dequantized)
    assert ((y.double() - expected).abs() <= tolerance).all()

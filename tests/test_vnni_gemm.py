"""The AVX512-VNNI int8 GEMM (hanlin/kernels/vnni_gemm.cpp): exact against integer products, the same as
torch._int_mm, and the layers give the same output with it or without it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import torch_threads
from hanlin.kernels import cpu_kernels
from hanlin.models.int8_linear import int8_gemm_is_exact
from hanlin.models.quantized import QuantLinear

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(
    kernels is None or not kernels.cpu_has_vnni() or not int8_gemm_is_exact(),
    reason="needs the compiled kernels on a CPU with AVX512-VNNI (and exact torch._int_mm)",
)


def exact(q_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    return (q_MK.long() @ w_NK.long().t()).int()


@pytest.mark.parametrize(
    "M, N, K",
    [(1, 64, 4), (1, 1, 1), (2, 17, 5), (6, 128, 64), (7, 100, 33), (13, 1000, 999), (16, 576, 1536), (48, 192, 576)],
)
def test_vnni_product_is_exact_on_odd_shapes(M: int, N: int, K: int) -> None:
    gen = torch.Generator().manual_seed(M * 1000 + N + K)
    w_NK = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    q_MK = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=gen)
    got = kernels.VnniWeight(w_NK).mm(q_MK)
    assert got.dtype == torch.int32 and got.shape == (M, N)
    assert torch.equal(got, exact(q_MK, w_NK))


def test_vnni_product_at_the_int8_extremes() -> None:
    K = 1024
    w_NK = torch.full((70, K), 127, dtype=torch.int8)
    w_NK[1::2] = -127
    q_MK = torch.full((9, K), -128, dtype=torch.int8)
    q_MK[1::2] = 127
    assert torch.equal(kernels.VnniWeight(w_NK).mm(q_MK), exact(q_MK, w_NK))


def test_int8_mm_takes_vnni_for_decode_batches_and_int_mm_beyond() -> None:
    gen = torch.Generator().manual_seed(0)
    w_NK = torch.randint(-127, 128, (96, 64), dtype=torch.int8, generator=gen)
    vnni = kernels.VnniWeight(w_NK)
    for M in (1, kernels.VNNI_MAX_ROWS, kernels.VNNI_MAX_ROWS + 1, 200):
        q_MK = torch.randint(-128, 128, (M, 64), dtype=torch.int8, generator=gen)
        expected = exact(q_MK, w_NK)
        assert torch.equal(kernels.int8_mm(q_MK, w_NK, vnni), expected)
        assert torch.equal(kernels.int8_mm(q_MK, w_NK, None), expected)


def test_vnni_product_does_not_depend_on_threads() -> None:
    gen = torch.Generator().manual_seed(1)
    w_NK = torch.randint(-127, 128, (1000, 256), dtype=torch.int8, generator=gen)
    q_MK = torch.randint(-128, 128, (16, 256), dtype=torch.int8, generator=gen)
    vnni = kernels.VnniWeight(w_NK)
    with torch_threads(1):
        one = vnni.mm(q_MK)
    with torch_threads(2):
        two = vnni.mm(q_MK)
    assert torch.equal(one, two) and torch.equal(one, exact(q_MK, w_NK))


def test_vnni_weight_refuses_bad_input() -> None:
    with pytest.raises(RuntimeError, match="int8 CPU weight"):
        kernels.VnniWeight(torch.zeros(4, 4))
    vnni = kernels.VnniWeight(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"int8 rows \[M, 8\]"):
        vnni.mm(torch.zeros(2, 7, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="int8 rows"):
        vnni.mm(torch.zeros(2, 8))


def test_a_w8a8_layer_gives_the_same_output_with_vnni_or_int_mm() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(200, 130, bias=True)
    layer = QuantLinear.int8(linear)
    layer.use_int8_activations()
    assert layer.int8_vnni is not None
    x = torch.randn(24, 200)
    with torch.inference_mode():
        with_vnni = layer(x)
        layer.int8_vnni = None
        without = layer(x)
    assert torch.equal(with_vnni, without)


def test_hanlin_no_vnni_turns_it_off() -> None:
    code = "from hanlin.kernels import cpu_kernels; print(cpu_kernels().cpu_has_vnni())"
    env = {**os.environ, "HANLIN_NO_VNNI": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

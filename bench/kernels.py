"""One token's worth of SmolLM2-135M linear layers through each weight format, side by side in one run.

    python bench/kernels.py [--threads 2] [--ns 1,4,16,64,256] [--seconds 1.0] [--formats "fp32 panels,q4 g32"]

Per step: 30 layers x (qkv [960, 576], o [576, 576], gate_up [3072, 576], down [576, 1536]) + lm_head
[49152, 576], i.e. 121 calls on N rows of x (211 with q/k/v and gate/up unfused). Every weight is its own
tensor, so the timings include the memory traffic of a real forward pass (even the 4-bit weights, 76 MB,
exceed the 32 MB L3 cache). GB/s = weight bytes / time; GFLOP/s = 2 N M K summed / time. Formats are interleaved (A B C A B C …)
and each keeps its best time, so a noisy neighbour hurts all of them alike; compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import hanlin.kernels
from hanlin.models.quant_packing import F32_PANELS, pack_panels

HIDDEN, LAYERS = 576, 30
LAYER_SHAPES = [(960, HIDDEN), (HIDDEN, HIDDEN), (3072, HIDDEN), (HIDDEN, 1536)]
LM_HEAD = (49152, HIDDEN)
F32, Q8, Q4 = 0, 1, 2


def token_shapes() -> list[tuple[int, int]]:
    return [shape for _ in range(LAYERS) for shape in LAYER_SHAPES] + [LM_HEAD]


def make_weights(fmt: str, gen: torch.Generator) -> tuple[list[tuple], int]:
    """Random weights of every shape in one token, in `fmt`; returns (argument tuples, weight bytes)."""
    weights, total = [], 0
    empty = torch.empty(0, dtype=torch.float16)
    for M, K in token_shapes():
        if fmt in ("fp32", "fp32 col-major"):
            w = torch.randn(M, K, generator=gen) * 0.02
            if fmt == "fp32 col-major":
                w = w.t().contiguous().t()
            weights.append((F32, w, empty, empty, 0))
            total += w.numel() * 4
        elif fmt == "fp32 panels":  # what the engine runs an fp32 model with (qlinear.h kF32Panels)
            packed = pack_panels(torch.randn(M, K, generator=gen) * 0.02)
            weights.append((F32_PANELS, packed.qdata, empty, empty, packed.group))
            total += packed.qdata.numel() * 4
        elif fmt.startswith("q8"):
            group = K if fmt == "q8 per-channel" else 32
            q = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
            s = (torch.rand(M, K // group, generator=gen) * 1e-3).half()
            weights.append((Q8, q, s, empty, group))
            total += q.numel() + s.numel() * 2
        elif fmt == "q4 g32":
            q = torch.randint(0, 256, (M, K // 2), generator=gen, dtype=torch.uint8)
            s = (torch.rand(M, K // 32, generator=gen) * 1e-2).half()
            m = (-8 * s.float()).half()
            weights.append((Q4, q, s, m, 32))
            total += q.numel() + s.numel() * 4
        else:
            raise ValueError(fmt)
    return weights, total


def token_runner(fmt: str, weights: list[tuple], N: int) -> Callable[[], None]:
    xs = {K: torch.randn(N, K) for K in {K for _, K in token_shapes()}}
    qlinear = hanlin.kernels.cpu_kernels().qlinear
    if fmt in ("fp32", "fp32 col-major"):
        pairs = [(xs[w.shape[1]], w) for _, w, *_ in weights]

        def run() -> None:
            for x, w in pairs:
                F.linear(x, w)
    else:
        calls = [(xs[q.shape[1] if kind in (Q8, F32_PANELS) else q.shape[1] * 2], kind, q, s, m, g)
                 for kind, q, s, m, g in weights]

        def run() -> None:
            for x, kind, q, s, m, g in calls:
                qlinear(x, kind, q, s, m, g, None)
    return run


def best_times(runners: dict[str, Callable[[], None]], seconds: float) -> dict[str, float]:
    best = {name: float("inf") for name in runners}
    for run in runners.values():
        run()  # warm up
    deadline, rounds = time.perf_counter() + seconds * len(runners), 0
    while rounds < 3 or (time.perf_counter() < deadline and rounds < 50):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
        rounds += 1
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ns", default="1,4,16,64,256", help="comma-separated batch sizes (rows of x)")
    parser.add_argument("--formats", default="fp32,fp32 col-major,fp32 panels,q8 per-channel,q8 g32,q4 g32")
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per format and N")
    args = parser.parse_args()
    if hanlin.kernels.cpu_kernels() is None:
        raise SystemExit("compiled CPU kernels unavailable")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    formats = args.formats.split(",")
    weights = {fmt: make_weights(fmt, gen) for fmt in formats}
    flops_per_row = 2 * sum(M * K for M, K in token_shapes())
    print(f"threads={args.threads}  load before: {os.getloadavg()[0]:.2f}")
    print(f"{'N':>4} {'format':<15} {'ms':>8} {'GB/s':>7} {'GFLOP/s':>8} {'x fp32':>7}")
    with torch.inference_mode():
        for N in (int(n) for n in args.ns.split(",")):
            runners = {fmt: token_runner(fmt, weights[fmt][0], N) for fmt in formats}
            best = best_times(runners, args.seconds)
            for fmt in formats:
                t = best[fmt]
                ratio = best[formats[0]] / t
                print(f"{N:>4} {fmt:<15} {t * 1e3:>8.2f} {weights[fmt][1] / t / 1e9:>7.1f} "
                      f"{flops_per_row * N / t / 1e9:>8.1f} {ratio:>7.2f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

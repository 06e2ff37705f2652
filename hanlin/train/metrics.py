"""Training monitoring: FLOPs per token and MFU against a measured peak, JSONL metrics and the progress bar."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hanlin.config import ModelConfig

_PEAK_FLOPS: dict[tuple[str, int], float] = {}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT: 6 N + 12 L H d_head T, where
    N counts the active parameters that do matmuls — the embedding lookup does none, the lm_head does even when
    it is tied to the embedding."""
    _, active = config.parameter_counts()
    lookup = config.vocab_size * config.hidden_size
    matmul_params = active - lookup + (lookup if config.tie_embeddings else 0)
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6.0 * matmul_params + attention


def measured_peak_flops(device: torch.device) -> float:
    """FLOP/s of a 1024³ fp32 matmul on `device` with the current thread count: best of several runs, measured
    once per process and device."""
    key = (str(device), torch.get_num_threads())
    if key not in _PEAK_FLOPS:
        n = 1024
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        best = math.inf
        for _ in range(10):
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - start)
        _PEAK_FLOPS[key] = 2 * n**3 / best
    return _PEAK_FLOPS[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MetricsLog:
    """run_dir/metrics.jsonl, one JSON object per line, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def reset(self) -> None:
        """A fresh run: forget lines an earlier attempt (that saved no checkpoint) left."""
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint; they are run again."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


class ProgressBar:
    """A rich progress bar on stderr with loss, lr, tokens/s and MFU (rank 0; a terminal, or when forced)."""

    def __init__(self, total: int, start: int, enabled: bool, force: bool) -> None:
        self.progress = None
        if not enabled or not (force or sys.stderr.isatty()):
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"), console=Console(stderr=True), transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, stats="")
        self.progress.start()

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        if self.progress is None:
            return
        fields = {}
        if record is not None:
            fields["stats"] = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                               f"{record['tokens_per_s']:,.0f} tok/s  MFU {100 * record['mfu']:.1f}%")
        self.progress.update(self.task, completed=step, **fields)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

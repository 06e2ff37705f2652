"""Pieces the benchmarks share: the machine's description and transformers' decode speed, timed alike."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch


def machine_description() -> str:
    """CPU model, cores, torch and Python versions (plus transformers' when it is installed)."""
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = f"torch {torch.__version__}"
    try:
        import transformers

        versions += f", transformers {transformers.__version__}"
    except ImportError:
        pass
    return f"{model}, {os.cpu_count()} cores, {versions}, Python {platform.python_version()}"


def transformers_decode(model, prompt_ids: list[int], tokens: int, pad_token_id: int) -> Callable[[], float]:
    """A run of `model.generate` (greedy, exactly `tokens` new tokens) → decode tokens/s after the first."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            self.times.append(time.perf_counter())

    def run() -> float:
        clock = Clock()
        with torch.inference_mode():
            model.generate(
                torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=clock,
                pad_token_id=pad_token_id,
            )
        # times[0]: the prompt echoed; times[1]: first new token; times[-1]: end.
        return (tokens - 1) / (clock.times[-1] - clock.times[1])

    return run

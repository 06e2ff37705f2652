"""The public Python API: load a model by name or path, save it as a Hugging Face directory."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hanlin.checkpoints.registry import resolve
from hanlin.config import ModelConfig
from hanlin.engine.options import QUANTIZE_SCHEMES, check_quantize
from hanlin.models import Transformer
from hanlin.models.quantized import quantize_model

__all__ = ["QUANTIZE_SCHEMES", "LoadedModel", "load", "load_config", "save"]

if TYPE_CHECKING:
    from hanlin.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    source: str
    load_seconds: float = 0.0


def load(
    name_or_path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    quantize: str | None = None,
) -> LoadedModel:
    """Loads "smollm2" (the embedded default), a Hugging Face directory or a .gguf file.

    quantize="int8" stores the linear and embedding weights as int8 per output channel (4x fewer bytes than
    fp32); quantize="int4" as 4-bit with an fp16 scale and min per group of 32 inputs (~6x fewer). A GGUF
    file's Q4_0/Q4_1/Q8_0 (int4) or Q8_0 (int8) tensors are taken as stored, without a round trip through fp32.
    quantize="w8a8" loads fp32, smooths activation outliers into the weights, stores int8 per channel and
    computes with int8 activations at every batch size (hanlin.models.quantized.quantize_model).
    """
    from hanlin.checkpoints.gguf import load_gguf
    from hanlin.checkpoints.hf import load_hf_directory
    from hanlin.checkpoints.materialize import return_free_memory
    from hanlin.tokenizer import Tokenizer

    check_quantize(quantize)
    start = time.perf_counter()
    path = resolve(name_or_path)
    with _progress_bar(progress, f"loading {path.name}") as report:
        if path.is_dir():
            config, model = load_hf_directory(path, device=device, dtype=dtype)
            if quantize is not None:
                quantize_model(model, quantize)
                return_free_memory()
            tokenizer = Tokenizer.from_file(path)
        else:
            at_load = None if quantize == "w8a8" else quantize  # w8a8 smooths the fp32 weights first
            config, model, meta = load_gguf(path, device=device, dtype=dtype, progress=report, quantize=at_load)
            if quantize == "w8a8":
                quantize_model(model, quantize)
                return_free_memory()  # the fp32 weights it replaced
            tokenizer = Tokenizer.from_gguf_metadata(meta)
    return LoadedModel(config, model, tokenizer, str(path), time.perf_counter() - start)


def load_config(name_or_path: str | Path) -> tuple[ModelConfig, str]:
    """(config, resolved path) of a model without reading its weights."""
    from hanlin.checkpoints.gguf import read_gguf_config
    from hanlin.checkpoints.hf import read_hf_config

    path = resolve(name_or_path)
    if path.is_dir():
        return read_hf_config(path), str(path)
    return read_gguf_config(path)[0], str(path)


def save(loaded: LoadedModel, directory: str | Path) -> None:
    """Writes config.json, model.safetensors and the tokenizer files that transformers loads."""
    from hanlin.checkpoints.hf import save_hf_directory

    directory = Path(directory)
    save_hf_directory(loaded.config, loaded.model, directory)
    loaded.tokenizer.save(directory)


class _progress_bar:
    """A rich progress bar on stderr (only when asked and stderr is a terminal)."""

    def __init__(self, enabled: bool, description: str) -> None:
        import sys

        self.enabled = enabled and sys.stderr.isatty()
        self.description = description
        self.progress = None
        self.task = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=None)
        return self.report

    def report(self, done: int, total: int) -> None:
        assert self.progress is not None
        self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

"""Runs one scheduled step through the model: packs the chunks, returns logits of the rows that sample."""

from __future__ import annotations

import logging
import os
import time

import torch

from hanlin.checkpoints.materialize import return_free_memory
from hanlin.engine.fused import FusedModel, unsupported_reason
from hanlin.engine.kv_cache import PagedKVCache, build_step_kv
from hanlin.engine.scheduler import ScheduledChunk
from hanlin.models import Transformer
from hanlin.models.quantized import pack_fp32_panels

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = cache.device
        reason = "HANLIN_NO_FUSED=1" if os.environ.get("HANLIN_NO_FUSED") == "1" else unsupported_reason(model, cache)
        if reason is None and os.environ.get("HANLIN_NO_PANELS") != "1":
            _pack_panels(model)
        self.fused = FusedModel(model, cache) if reason is None else None
        if reason is not None:
            log.info("fused CPU layers off (%s): running the PyTorch modules", reason)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """fp32 logits [R, V], one row per chunk that samples, in chunk order."""
        token_ids: list[int] = []
        logit_rows: list[int] = []
        for chunk in chunks:
            seq = chunk.seq
            token_ids.extend(seq.token_at(p) for p in range(chunk.start, chunk.start + chunk.count))
            if chunk.samples:
                logit_rows.append(len(token_ids) - 1)
        step_kv, positions = build_step_kv(self.cache, [(c.seq.block_table, c.start, c.count) for c in chunks])
        input_ids = torch.tensor([token_ids], device=self.device)
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
        if self.fused is not None:
            return self.fused(input_ids[0], positions[0], step_kv, rows).float()
        logits = self.model(input_ids, cache=step_kv, positions=positions, logit_rows=rows)
        return logits[0].float()


def _pack_panels(model: Transformer) -> None:
    """fp32 linears to the kernels' panel layout (qlinear.h kF32Panels), in place: the same values, read front
    to back at every batch size. The embedded model, 2 threads (bench/speed.py): batch-1 decode 26 -> 52 tok/s,
    16 prompts at once 179 -> 300 tok/s, a 512-token prefill 592 -> 685 tok/s. Only here, for inference:
    hanlin.load's models stay trainable nn.Linear. HANLIN_NO_PANELS=1 keeps them (for A/B measurements)."""
    start = time.perf_counter()
    replaced = pack_fp32_panels(model)
    if replaced:
        return_free_memory()  # the replaced column-major weights
        log.info("%d fp32 linears packed in panels for the fused CPU layers in %.2f s", replaced,
                 time.perf_counter() - start)

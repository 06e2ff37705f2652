"""The training loop shared by pretraining, SFT and DPO: exact global-batch loss normalisation, gradient
accumulation, clipping, schedules, MoE balancing, metrics, validation, checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from hanlin.errors import HanlinError
from hanlin.train import distributed
from hanlin.train.batch import BatchSource, LossFn, LossOutput
from hanlin.train.checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    remove_unfinished,
    save_checkpoint,
)
from hanlin.train.config import TrainConfig, save_config
from hanlin.train.metrics import MetricsLog, ProgressBar, flops_per_token, measured_peak_flops
from hanlin.train.moe_balance import ExpertLoadTracker, expert_load_metrics, update_routing_bias
from hanlin.train.optim import build_optimizer, build_scheduler


@dataclass
class TrainResult:
    step: int
    loss: float  # the last step's training loss
    validation_loss: float | None
    tokens_per_s: float = 0.0  # this process' training steps (validation and saving excluded), whole job
    mfu: float = 0.0  # model FLOPs utilisation against peak_gflops per process
    peak_gflops: float = 0.0  # the measured fp32 1024³ matmul rate of one process


class Trainer:
    """Trains `model` on `train` with `loss_fn` as `config` says, writing metrics, config and checkpoints to
    run_dir. Under torchrun (config.distributed "ddp" or "fsdp") every rank builds the same Trainer with its own
    BatchSource shard. `trainable(name, param)` restricts what is trained (e.g. LoRA adapters); loss_fn gets
    the model to call (DDP-wrapped under DDP: reach attributes through distributed.unwrap)."""

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        train: BatchSource,
        loss_fn: LossFn,
        run_dir: str | Path,
        validation: Callable[[], Iterable[Any]] | None = None,
        trainable: Callable[[str, nn.Parameter], bool] | None = None,
        *,
        resume: bool | None = None,
    ) -> None:
        config.check()
        self.config = config
        self.run_dir = Path(run_dir)
        self.train_source = train
        self.loss_fn = loss_fn
        self.validation = validation
        self.resume = config.resume if resume is None else resume
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.distributed != "none":
            distributed.init_from_env(config.device)
        self.dist = distributed.info()
        if config.distributed == "none" and (self.dist.world_size > 1 or distributed.launched_world_size() > 1):
            raise HanlinError("several processes were launched but distributed is 'none'; set distributed=ddp or fsdp")
        self.device = distributed.device_for(config.device, self.dist.local_rank)
        self.model_config = getattr(model, "config", None)
        if trainable is not None:
            for name, param in model.named_parameters():
                param.requires_grad_(bool(trainable(name, param)) and param.requires_grad)
        if config.activation_checkpointing:
            _checkpoint_blocks(model)
        model.to(self.device).train()
        self.model = model
        self.wrapped = distributed.wrap(model, config.distributed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise HanlinError("nothing to train: no parameter requires a gradient")
        self.optimizer = build_optimizer(model, config, self.model_config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.load_tracker = None
        if any(True for _ in getattr(model, "moe_layers", lambda: iter(()))()):
            self.load_tracker = ExpertLoadTracker(model)
        self.tokens_seen = 0
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.dist.is_main)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" and config.mixed_precision else contextlib.nullcontext())

    # ---- the loop -------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Trains to config.steps (from the latest checkpoint when resuming), validating every eval_every steps
        and at the end, checkpointing every checkpoint_every steps and at the end. Writes run_dir/summary.json."""
        config = self.config
        start_step = self._start()
        flops_token = flops_per_token(self.model_config, config.data.seq_len) if self.model_config else 0.0
        peak = measured_peak_flops(self.device)
        self.metrics.write({"step": start_step, "peak_gflops": peak / 1e9, "threads": torch.get_num_threads(),
                            "device": str(self.device), "world_size": self.dist.world_size,
                            "flops_per_token": flops_token, **({"resumed": True} if start_step else {})})
        mfu = lambda tokens_per_s: tokens_per_s * flops_token / (peak * self.dist.world_size)  # noqa: E731
        bar = ProgressBar(config.steps, start_step, self.dist.is_main, config.progress)
        loss, validation_loss = float("nan"), None
        interval_tokens, interval_seconds, run_tokens, run_seconds = 0, 0.0, 0, 0.0
        interval_loads: list[torch.Tensor] | None = None
        try:
            for step in range(start_step + 1, config.steps + 1):
                started = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                loss, step_tokens, step_metrics, grad_norm = self._train_step()
                loads = self._balance_experts()
                seconds = time.perf_counter() - started  # training time only: no validation, no saving
                if loads is not None:
                    interval_loads = loads if interval_loads is None else [a + b for a, b in zip(interval_loads, loads)]
                self.tokens_seen += step_tokens
                interval_tokens, interval_seconds = interval_tokens + step_tokens, interval_seconds + seconds
                run_tokens, run_seconds = run_tokens + step_tokens, run_seconds + seconds
                record = None
                if step % config.log_every == 0 or step == config.steps or step == start_step + 1:
                    tokens_per_s = interval_tokens / interval_seconds if interval_seconds > 0 else 0.0
                    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen,
                              "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s), **step_metrics}
                    if interval_loads is not None:
                        record.update(expert_load_metrics(interval_loads, self.load_tracker.layer_indices))
                    self.metrics.write(record)
                    interval_tokens, interval_seconds, interval_loads = 0, 0.0, None
                bar.update(step, record)
                if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                    self._log_validation(step)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step != config.steps:
                    self.save(step)
            validation_loss = self._log_validation(config.steps)
            if config.steps > start_step:
                self.save(config.steps)
        finally:
            bar.close()
        tokens_per_s = run_tokens / run_seconds if run_seconds > 0 else 0.0
        result = TrainResult(config.steps, loss, validation_loss, tokens_per_s, mfu(tokens_per_s), peak / 1e9)
        self._write_summary(result)
        return result

    def _write_summary(self, result: TrainResult) -> None:
        if not self.dist.is_main:
            return
        total, active = self.model_config.parameter_counts() if self.model_config else (0, 0)
        summary = {**dataclasses.asdict(result), "tokens": self.tokens_seen, "parameters": total,
                   "active_parameters": active, "world_size": self.dist.world_size, "device": str(self.device),
                   "threads": torch.get_num_threads()}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def _train_step(self) -> tuple[float, int, dict[str, float], float]:
        config = self.config
        accum, world = config.data.grad_accum, self.dist.world_size
        batches = [self.train_source.next_batch() for _ in range(accum)]
        known = [getattr(b, "items", None) for b in batches]
        up_front = all(isinstance(n, int) for n in known)
        global_items = distributed.all_reduce_sum([float(sum(known))], self.device)[0] if up_front else 0.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        items, tokens = 0, 0
        metric_sums: dict[str, float] = {}
        for index, batch in enumerate(batches):
            tokens += _tokens(batch)
            batch = batch.to(self.device) if hasattr(batch, "to") else batch
            with distributed.gradient_sync(self.wrapped, index == accum - 1):
                with self.autocast:
                    out: LossOutput = self.loss_fn(self.wrapped, batch)
                if up_front and out.items != known[index]:
                    raise RuntimeError(f"loss_fn counted {out.items} items for a batch whose .items is {known[index]}")
                if up_front:
                    objective = out.loss_sum * (world / max(global_items, 1.0))
                    if out.extra_loss is not None:
                        objective = objective + out.extra_loss / accum
                else:
                    if out.extra_loss is not None:
                        raise HanlinError("a loss with extra_loss needs batches with an `items` attribute")
                    objective = out.loss_sum
                objective.backward()
            loss_sum += out.loss_sum.detach().double()
            items += out.items
            for key, value in out.metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
        keys = sorted(metric_sums)
        totals = distributed.all_reduce_sum(
            [loss_sum.item(), float(items), float(tokens)] + [metric_sums[k] / accum for k in keys], self.device
        )
        global_loss_sum, global_items_seen, global_tokens = totals[:3]
        if not up_front:  # gradients hold summed losses (averaged over ranks): scale to the global mean
            scale = world / max(global_items_seen, 1.0)
            for param in self.params:
                if param.grad is not None:
                    param.grad.mul_(scale)
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {k: v / world for k, v in zip(keys, totals[3:])}
        return global_loss_sum / max(global_items_seen, 1.0), int(global_tokens), metrics, grad_norm

    def _clip(self) -> float:
        max_norm = self.config.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def _balance_experts(self) -> list[torch.Tensor] | None:
        if self.load_tracker is None:
            return None
        loads = self.load_tracker.take()
        if self.config.moe.bias_update_rate > 0:
            update_routing_bias(self.model, loads, self.config.moe.bias_update_rate)
        return [load.detach().cpu() for load in loads]

    # ---- validation -----------------------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        """Mean loss per item over up to config.eval_batches validation batches of every rank (all ranks agree)."""
        if self.validation is None:
            return None
        batches = list(itertools.islice(iter(self.validation()), self.config.eval_batches))
        count = distributed.all_reduce_min(len(batches), self.device)  # FSDP forwards are collective
        loss_sum, items = 0.0, 0
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in batches[:count]:
                    batch = batch.to(self.device) if hasattr(batch, "to") else batch
                    with self.autocast:
                        out = self.loss_fn(self.wrapped, batch)
                    loss_sum += float(out.loss_sum)
                    items += out.items
        finally:
            self.model.train()
        if self.load_tracker is not None:
            self.load_tracker.take()  # validation forwards are not training load
        total_loss, total_items = distributed.all_reduce_sum([loss_sum, float(items)], self.device)
        return total_loss / total_items if total_items else None

    def _log_validation(self, step: int) -> float | None:
        value = self.evaluate()
        if value is not None:
            self.metrics.write({"step": step, "tokens": self.tokens_seen, "validation_loss": value})
        return value

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        return save_checkpoint(self.run_dir, step, self.wrapped, self.optimizer, self.scheduler,
                               self.train_source.state_dict(), self.config, self.model_config, self.tokens_seen)

    def _start(self) -> int:
        """Seeds everything, or restores a checkpoint when resuming; refuses to overwrite an earlier run."""
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is not None and not self.resume:
            raise HanlinError(f"{self.run_dir} already holds checkpoints (latest: {checkpoint.name}); "
                              "resume it with --resume (resume=true) or choose another run directory")
        step, self.tokens_seen = 0, 0
        if checkpoint is not None:
            step, self.tokens_seen = check_compatible(checkpoint, self.config, self.model_config, self.dist.world_size)
            if step > self.config.steps:
                raise HanlinError(f"cannot resume from {checkpoint}: it is at step {step}, past "
                                  f"steps={self.config.steps}; raise steps to train further")
        if checkpoint is None:
            seed = self.config.seed + self.dist.rank
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        else:
            data_state = load_checkpoint(checkpoint, self.wrapped, self.optimizer, self.scheduler)
            self.train_source.load_state_dict(data_state)
        distributed.barrier()  # every rank has read the checkpoint before anything in run_dir changes
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_unfinished(self.run_dir)
            save_config(self.config, self.run_dir / "config.yaml")
            if checkpoint is None:
                self.metrics.reset()
            else:
                self.metrics.truncate_after(step)
        return step


def _tokens(batch: Any) -> int:
    """Input tokens of a micro-batch (what tokens/s counts)."""
    tokens = getattr(batch, "tokens", None)
    if isinstance(tokens, int):
        return tokens
    input_ids = getattr(batch, "input_ids", None)
    return int(input_ids.numel()) if isinstance(input_ids, torch.Tensor) else 0


def _checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward instead of keeping them."""
    for block in getattr(model, "layers", []):
        if getattr(block, "_activation_checkpointed", False):
            continue
        forward = block.forward

        @functools.wraps(forward)
        def checkpointed(*args: Any, _forward: Callable = forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return activation_checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
        block._activation_checkpointed = True

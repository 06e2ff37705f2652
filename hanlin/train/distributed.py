"""torch.distributed for training: process-group setup from torchrun's environment, DDP / FSDP2 wrapping."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from hanlin.errors import HanlinError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def init_from_env(device: str = "cpu") -> DistInfo:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    gloo for CPU training, nccl for CUDA. A plain `python` launch is one process: rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return info()
    if not launched_by_torchrun():
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(minutes=30))
    return DistInfo(rank, world, local_rank)


def info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def device_for(device: str, local_rank: int) -> torch.device:
    """The device this process trains on: "cuda" means this process' local GPU."""
    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise HanlinError("device: cuda was asked for but torch sees no CUDA device; use device=cpu")
        return torch.device("cuda", local_rank if target.index is None else target.index)
    return target


def wrap(model: nn.Module, mode: str) -> nn.Module:
    """DDP or FSDP2 (fully_shard per transformer block, then the root) around `model`; "none" returns it.

    FSDP2 shards in place: the returned module is `model` itself, its parameters DTensors.
    """
    if mode == "none":
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise HanlinError(f"distributed: {mode} needs torch.distributed; launch with torchrun "
                          "(e.g. torchrun --nproc_per_node 2 -m hanlin.cli train pretrain ...)")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Routed experts that get no token in a micro-batch produce no gradient.
        has_moe = any(True for _ in getattr(model, "moe_layers", lambda: iter(()))())
        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=has_moe)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from hanlin.models.moe import MoE

        for module in model.modules():
            if isinstance(module, MoE):
                module.register_forward_hook(_touch_every_expert)
        # A Block returns its K/V (views) for the next layer's cross-layer attention; nothing modifies them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor")
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    raise HanlinError(f"distributed: unknown mode {mode!r}; use none, ddp or fsdp")


def _touch_every_expert(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
    """FSDP2 reduce-scatters a block's gradients as one flat buffer, so every rank must produce a gradient for
    every parameter, also for the experts no local token was routed to: add 0 × one weight of each expert."""
    touch = sum(param.reshape(-1)[0] for expert in module.experts for param in expert.parameters())
    return output + 0.0 * touch


def unwrap(model: nn.Module) -> nn.Module:
    """The module DDP wraps (FSDP2 modules are their own model)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skips the gradient all-reduce / reduce-scatter of a micro-batch that is not the step's last."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
    yield


def model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums a few numbers over all ranks (in float64, so token counts stay exact)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_min(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

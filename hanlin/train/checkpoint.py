"""Training checkpoints: atomic directories run_dir/checkpoints/step-N (+ a `latest` pointer) holding the full
model, optimizer, scheduler, data position, RNG states and config; no pickle anywhere (safetensors + JSON).

Layout of step-N/: model.safetensors + model_config.json (loadable as `init_from`), optimizer.safetensors +
optimizer.json, scheduler.json, trainer.json (step, world size, the run's config), config.yaml, and per rank
rank-R.json + rank-R.safetensors (data position and RNG states). Under torch.distributed every rank calls
save/load; ranks must share the run directory's filesystem.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hanlin.config import ModelConfig
from hanlin.errors import HanlinError
from hanlin.train.config import TrainConfig, save_config
from hanlin.train.distributed import barrier, info, is_fsdp, unwrap
from hanlin.train.init import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE

LATEST = "latest"
TRAINER_FILE = "trainer.json"
# Fields whose change makes a checkpoint unusable for this run (besides the model's own config).
RESUME_FIELDS = ("data.seq_len", "data.micro_batch_size", "data.grad_accum", "sft.lora_rank")


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def remove_unfinished(run_dir: Path) -> None:
    """Temporary directories a killed save left behind."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for stale in list(root.glob(".tmp-step-*")) + list(root.glob(".old-step-*")):
            shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    return path if (path / TRAINER_FILE).is_file() else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_state: dict[str, Any],
    config: TrainConfig,
    model_config: ModelConfig | None,
    tokens: int = 0,
) -> Path:
    """Writes step-N atomically (temp dir, fsync, rename), points `latest` at it, keeps the newest
    config.keep_checkpoints. Collective under torch.distributed."""
    dist = info()
    root = checkpoints_dir(run_dir)
    final = root / f"step-{step}"
    temporary = root / f".tmp-step-{step}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
    barrier()
    _write_state(temporary / f"rank-{dist.rank}", {"data": data_state, "rng": _rng_state()})
    model_state = _model_state(model)
    optim_state = _optimizer_state(model, optimizer)
    if dist.is_main:
        _save_model(temporary, model_state, model_config)
        _write_state(temporary / "optimizer", optim_state)
        _write_json(temporary / "scheduler.json", _encode(scheduler.state_dict(), {}, ""))
        _write_json(temporary / TRAINER_FILE, {
            "step": step, "tokens": tokens, "world_size": dist.world_size, "config": config.to_dict(),
            "model_config": model_config.to_dict() if model_config is not None else None,
        })
        save_config(config, temporary / "config.yaml")
    barrier()
    if dist.is_main:
        _fsync_tree(temporary)
        if final.exists():  # the same step saved before (a resumed run): replace it
            trash = root / f".old-step-{step}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(temporary, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        _fsync(pointer)
        os.replace(pointer, root / LATEST)
        _fsync(root)
        _prune(root, config.keep_checkpoints, keep=final.name)
    barrier()
    return final


def check_compatible(
    checkpoint: Path, config: TrainConfig, model_config: ModelConfig | None, world_size: int
) -> tuple[int, int]:
    """(step, tokens seen) of the checkpoint, or a HanlinError naming the first setting that differs."""
    saved = json.loads((checkpoint / TRAINER_FILE).read_text())
    differences: list[tuple[str, Any, Any]] = []
    if saved["world_size"] != world_size:
        differences.append(("world size (processes)", saved["world_size"], world_size))
    old_model, new_model = saved.get("model_config"), model_config.to_dict() if model_config is not None else None
    if old_model is not None and new_model is not None:
        for key in list(new_model) + [k for k in old_model if k not in new_model]:
            if _normalise(old_model.get(key)) != _normalise(new_model.get(key)):
                differences.append((f"model.{key}", old_model.get(key), new_model.get(key)))
    now = config.to_dict()
    for dotted in RESUME_FIELDS:
        old, new = _lookup(saved["config"], dotted), _lookup(now, dotted)
        if old != new:
            differences.append((dotted, old, new))
    if differences:
        key, old, new = differences[0]
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise HanlinError(f"cannot resume from {checkpoint}: {key} differs (checkpoint {old!r}, this run {new!r})"
                          f"{more}; use the original settings or start a new run directory")
    return int(saved["step"]), int(saved.get("tokens", 0))


def load_checkpoint(
    checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restores model, optimizer, scheduler and this rank's RNG states; returns this rank's data state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    dist = info()
    target = unwrap(model)
    state = load_file(str(checkpoint / MODEL_WEIGHTS_FILE))
    config = getattr(target, "config", None)
    if config is not None and config.tie_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(target, state, options=options)
    optim_state = _read_state(checkpoint / "optimizer")
    set_optimizer_state_dict(target, optimizer, optim_state, options=options)
    scheduler.load_state_dict(_decode(json.loads((checkpoint / "scheduler.json").read_text()), {}))
    rank_state = _read_state(checkpoint / f"rank-{dist.rank}")
    _set_rng_state(rank_state["rng"])
    return rank_state["data"]


# ---- model and optimizer state ------------------------------------------------------------------------------
def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    target = unwrap(model)
    if not is_fsdp(target) and info().world_size == 1:
        return {k: v.detach() for k, v in target.state_dict().items()}
    return get_model_state_dict(target, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(unwrap(model), optimizer, options=options)


def _save_model(directory: Path, state: dict[str, torch.Tensor], model_config: ModelConfig | None) -> None:
    tensors = {}
    tied = model_config is not None and model_config.tie_embeddings
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(directory / MODEL_WEIGHTS_FILE), metadata={"format": "pt"})
    if model_config is not None:
        _write_json(directory / MODEL_CONFIG_FILE, model_config.to_dict())


# ---- RNG ----------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- JSON + safetensors encoding of nested state --------------------------------------------------------------
def _write_state(stem: Path, state: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, "")
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    _write_json(stem.with_suffix(".json"), encoded)


def _read_state(stem: Path) -> Any:
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    return _decode(json.loads(stem.with_suffix(".json").read_text()), tensors)


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON with tensors and arrays moved into `tensors`; tuples and non-string dict keys kept exact."""
    if isinstance(value, torch.Tensor):
        key = path or "."
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = path or "."
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}/k{i}"), _encode(v, tensors, f"{path}/{i}")]
                              for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path or '/'} in a checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy()
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__items__" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


# ---- files --------------------------------------------------------------------------------------------------
def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        _fsync(path)
    _fsync(directory)


def _prune(root: Path, keep_count: int, keep: str) -> None:
    steps = sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    for old in steps[:-keep_count]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value))

"""Training configuration: dataclasses read from a YAML or TOML file plus `a.b=value` overrides, checked strictly."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hanlin.config import ModelConfig
from hanlin.errors import HanlinError


@dataclass
class DataConfig:
    path: str = ""  # prepared token shards (pretraining) or a JSONL file (SFT, DPO)
    validation_path: str | None = None
    seq_len: int = 256
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm clip; 0 turns it off


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly to min_lr_ratio


@dataclass
class MoETrainConfig:
    aux_loss_coef: float = 0.01  # load-balancing loss weight
    z_loss_coef: float = 0.001  # router z-loss weight
    bias_update_rate: float = 0.0  # > 0: auxiliary-loss-free balancing, routing bias step per optimizer step
    expert_lr_scale: float | Literal["auto"] = 1.0  # routed experts' lr multiplier ("auto": sqrt(top_k / E))


@dataclass
class SFTConfig:
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    pack: bool = True


@dataclass
class DPOConfig:
    beta: float = 0.1


@dataclass
class TrainConfig:
    model: dict[str, Any] | None = None  # ModelConfig fields, to train from scratch
    init_from: str | None = None  # a model name, HF directory, GGUF file or Hanlin training checkpoint
    tokenizer: str = "smollm2"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    steps: int = 0
    moe: MoETrainConfig = field(default_factory=MoETrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    activation_checkpointing: bool = False
    mixed_precision: bool = True  # bf16 autocast on CUDA; CPUs always compute in fp32
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    seed: int = 0
    progress: bool = False  # force the progress bar even when stderr is not a terminal
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe values (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        config = _build(cls, data, "")
        config.check()
        return config

    def model_config(self) -> ModelConfig:
        """The `model` section as a ModelConfig (training from scratch)."""
        if self.model is None:
            raise HanlinError("the config has no `model` section (the architecture to train from scratch)")
        return model_config_from_dict(self.model)

    def check(self) -> None:
        """Range checks that types alone cannot express."""
        rules: list[tuple[bool, str, Any]] = [
            (self.steps > 0, "steps must be > 0 (the number of optimizer steps)", self.steps),
            (self.data.seq_len > 0, "data.seq_len must be > 0", self.data.seq_len),
            (self.data.micro_batch_size > 0, "data.micro_batch_size must be > 0", self.data.micro_batch_size),
            (self.data.grad_accum > 0, "data.grad_accum must be > 0", self.data.grad_accum),
            (self.optim.lr > 0, "optim.lr must be > 0", self.optim.lr),
            (0 <= self.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]", self.optim.min_lr_ratio),
            (all(0 <= b < 1 for b in self.optim.betas), "optim.betas must each be in [0, 1)", list(self.optim.betas)),
            (self.optim.eps > 0, "optim.eps must be > 0", self.optim.eps),
            (self.optim.weight_decay >= 0, "optim.weight_decay must be >= 0", self.optim.weight_decay),
            (self.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 turns clipping off)", self.optim.grad_clip),
            (self.schedule.warmup_steps >= 0, "schedule.warmup_steps must be >= 0", self.schedule.warmup_steps),
            (0 <= self.schedule.decay_fraction <= 1, "schedule.decay_fraction must be in [0, 1]",
             self.schedule.decay_fraction),
            (self.moe.bias_update_rate >= 0, "moe.bias_update_rate must be >= 0", self.moe.bias_update_rate),
            (self.moe.expert_lr_scale == "auto" or self.moe.expert_lr_scale > 0,
             'moe.expert_lr_scale must be > 0 or "auto"', self.moe.expert_lr_scale),
            (self.sft.lora_rank >= 0, "sft.lora_rank must be >= 0", self.sft.lora_rank),
            (0 <= self.sft.lora_dropout < 1, "sft.lora_dropout must be in [0, 1)", self.sft.lora_dropout),
            (self.dpo.beta > 0, "dpo.beta must be > 0", self.dpo.beta),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: only at the end)", self.checkpoint_every),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1", self.keep_checkpoints),
            (self.log_every > 0, "log_every must be > 0", self.log_every),
            (self.eval_every >= 0, "eval_every must be >= 0 (0: only at the end)", self.eval_every),
            (self.eval_batches > 0, "eval_batches must be > 0", self.eval_batches),
            (self.threads >= 0, "threads must be >= 0 (0: torch's default)", self.threads),
            (self.model is None or self.init_from is None,
             "give either `model` (train from scratch) or `init_from` (start from a checkpoint), not both", ""),
        ]
        for ok, message, value in rules:
            if not ok:
                raise HanlinError(f"config: {message}" + (f" (got {value!r})" if value != "" else ""))
        if self.model is not None:
            model_config_from_dict(self.model)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a config file's `model` section, with errors that name the key."""
    checked = _build(ModelConfig, data, "model.")
    return ModelConfig.from_dict(_plain(dataclasses.asdict(checked)))


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Reads a .yaml/.yml/.toml file (or starts from the defaults when path is None), applies "a.b=value"
    overrides (values read as YAML scalars) and checks every key, type and range."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_config_file(Path(path))
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise HanlinError(f"override {override!r}: expected key=value, e.g. optim.lr=1e-3")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise HanlinError(f"override {override!r}: cannot read the value ({error})") from None
        _set_path(data, key.strip().split("."), value, override)
    return TrainConfig.from_dict(data)


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML or TOML config file; HanlinError naming the file when it is missing or malformed."""
    if not path.is_file():
        raise HanlinError(f"{path}: no such config file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(path.read_text()) or {}
        elif suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            raise HanlinError(f"{path}: unknown config format {suffix!r}; use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise HanlinError(f"{path}: cannot parse the config ({error})") from None
    if not isinstance(data, dict):
        raise HanlinError(f"{path}: expected a mapping of config keys at the top level")
    return data


def _set_path(data: dict[str, Any], keys: list[str], value: Any, override: str) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise HanlinError(f"override {override!r}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiates dataclass `cls` from a mapping, refusing unknown keys and values of the wrong type."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise HanlinError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise HanlinError(
            f"unknown config key {prefix}{unknown[0]}; valid keys{' in ' + where if prefix else ''}: "
            + ", ".join(fields)
        )
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise HanlinError(f"missing config key {prefix}{missing[0]}")
    values = {key: _convert(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    try:
        return cls(**values)
    except ValueError as error:  # the dataclass' own checks (e.g. ModelConfig.__post_init__)
        raise HanlinError(f"{where}: {error}") from None


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except HanlinError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else _type_error(key, _describe(hint), value)
    if origin is Literal:
        if value not in args:
            raise HanlinError(f"config key {key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, _describe(hint), value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _type_error(key, _describe(hint), value)
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _type_error(key, "a mapping", value)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(key, "true or false", value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, "an integer", value)
        return value
    if hint is float:
        # YAML 1.1 (PyYAML) reads 3e-4 as a string; accept any text that is a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _type_error(key, "a number", value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(key, "a number", value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(key, "a string", value)
        return value
    if hint is Any:
        return value
    raise HanlinError(f"config key {key}: unsupported type {hint!r}")


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "null")


def _type_error(key: str, expected: str, value: Any) -> HanlinError:
    return HanlinError(f"config key {key}: expected {expected}, got {value!r} ({type(value).__name__})")

"""Hugging Face checkpoint directories (config.json + safetensors, one file or sharded) ⇄ Hanlin models.

Names are mapped through one canonical spelling (Llama/Qwen style, without the "model." prefix): every family's
file names are rewritten to it on load and rewritten from it on save.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hanlin.checkpoints.hf_config import (
    HUNYUAN_FAMILIES,
    attention_biases,
    config_from_hf,
    config_to_hf,
    hf_family,
)
from hanlin.checkpoints.materialize import materialize
from hanlin.config import ModelConfig
from hanlin.errors import CheckpointError
from hanlin.models import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_CONVERT_HINT = (
    "Hanlin loads safetensors only, because unpickling a checkpoint can run arbitrary code. Convert it where you "
    "trust the file, e.g. `transformers.AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst)` "
    "(which writes model.safetensors), then load dst."
)

_TO_CANONICAL = [
    (re.compile(r"^model\."), ""),
    (re.compile(r"\.block_sparse_moe\."), ".mlp."),
    (re.compile(r"\.experts\.(\d+)\.w1\."), r".experts.\1.gate_proj."),
    (re.compile(r"\.experts\.(\d+)\.w3\."), r".experts.\1.up_proj."),
    (re.compile(r"\.experts\.(\d+)\.w2\."), r".experts.\1.down_proj."),
    (re.compile(r"\.mlp\.gate\.wg\."), ".mlp.gate."),
    (re.compile(r"\.self_attn\.query_layernorm\."), ".self_attn.q_norm."),
    (re.compile(r"\.self_attn\.key_layernorm\."), ".self_attn.k_norm."),
    (re.compile(r"\.mlp\.shared_mlp\."), ".mlp.shared_expert."),
]
_FROM_CANONICAL = {
    "hunyuan": [
        (re.compile(r"\.self_attn\.q_norm\."), ".self_attn.query_layernorm."),
        (re.compile(r"\.self_attn\.k_norm\."), ".self_attn.key_layernorm."),
        (re.compile(r"\.mlp\.gate\."), ".mlp.gate.wg."),
        (re.compile(r"\.mlp\.shared_expert\."), ".mlp.shared_mlp."),
    ],
    "mixtral": [
        (re.compile(r"\.mlp\.gate\."), ".block_sparse_moe.gate."),
        (re.compile(r"\.mlp\.experts\.(\d+)\.gate_proj\."), r".block_sparse_moe.experts.\1.w1."),
        (re.compile(r"\.mlp\.experts\.(\d+)\.up_proj\."), r".block_sparse_moe.experts.\1.w3."),
        (re.compile(r"\.mlp\.experts\.(\d+)\.down_proj\."), r".block_sparse_moe.experts.\1.w2."),
    ],
}
# Hanlin name (inside layers.{i}.) → canonical name, where the two differ only by spelling.
_LAYER_RENAMES = {
    "input_norm.weight": "input_layernorm.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.selection_bias": "mlp.gate.e_score_correction_bias",
}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_EXPERT_KEY = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")

Part = tuple[str, tuple[int, ...]]


def canonical_name(name: str) -> str:
    for pattern, replacement in _TO_CANONICAL:
        name = pattern.sub(replacement, name)
    return name


def family_name(canonical: str, family: str) -> str:
    """How transformers 5 spells a canonical tensor name on disk for `family`."""
    rules = _FROM_CANONICAL["hunyuan"] if family in HUNYUAN_FAMILIES else _FROM_CANONICAL.get(family, [])
    for pattern, replacement in rules:
        canonical = pattern.sub(replacement, canonical)
    return canonical if canonical.startswith("lm_head.") else "model." + canonical


def hf_parts(config: ModelConfig, key: str, shape: tuple[int, ...]) -> list[Part]:
    """The canonical tensors that, concatenated along dim 0, make the Hanlin tensor `key` of `shape`."""
    match = _LAYER_KEY.fullmatch(key)
    if match is None:
        return [(key, shape)]
    layer, rest = int(match[1]), match[2]
    prefix = f"layers.{layer}."
    if rest.startswith("attn.qkv_proj."):
        kind = rest.rsplit(".", 1)[1]
        q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        rows = [("q_proj", q_dim)] + ([("k_proj", kv_dim), ("v_proj", kv_dim)] if config.owns_kv(layer) else [])
        return [(f"{prefix}self_attn.{name}.{kind}", (n, *shape[1:])) for name, n in rows]
    if rest.endswith("gate_up_proj.weight"):
        base = rest[: -len("gate_up_proj.weight")]
        half = (shape[0] // 2, *shape[1:])
        return [(f"{prefix}{base}gate_proj.weight", half), (f"{prefix}{base}up_proj.weight", half)]
    if rest.startswith("attn."):
        return [(f"{prefix}self_{rest}", shape)]
    return [(prefix + _LAYER_RENAMES.get(rest, rest), shape)]


class _Weights:
    """Every tensor of a checkpoint's safetensors files, found by canonical name and read on demand."""

    def __init__(self, directory: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.config, self.family, self.device, self.dtype = config, hf_family(config), device, dtype
        self.files = _weight_files(directory)
        self._stack = ExitStack()
        self._where: dict[str, tuple[Path, Any, str]] = {}
        self._used: set[str] = set()
        self._fused: dict[str, torch.Tensor] = {}  # the current layer's stacked expert tensors
        for file in self.files:
            try:
                handle = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except (SafetensorError, OSError) as error:
                self.close()
                message = f"{file}: not a readable safetensors file, truncated or corrupt ({error})"
                raise CheckpointError(message) from error
            for name in handle.keys():
                canonical = canonical_name(name)
                if canonical in self._where:
                    self.close()
                    raise CheckpointError(f"{file}: tensor {name!r} duplicates {self._where[canonical][2]!r}")
                self._where[canonical] = (file, handle, name)

    def close(self) -> None:
        self._stack.close()

    def read(self, canonical: str, shape: tuple[int, ...]) -> torch.Tensor:
        if canonical not in self._where:
            from_fused = self._read_from_fused(canonical, shape)
            if from_fused is None:
                where = ", ".join(str(f) for f in self.files)
                raise CheckpointError(f"{where}: missing tensor {family_name(canonical, self.family)!r}")
            return from_fused
        file, handle, name = self._where[canonical]
        found = tuple(handle.get_slice(name).get_shape())
        if found != shape:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {list(found)}, but config.json implies {list(shape)}"
            )
        self._used.add(canonical)
        try:
            tensor = handle.get_tensor(name)
        except SafetensorError as error:
            raise CheckpointError(f"{file}: cannot read tensor {name!r}, truncated or corrupt ({error})") from error
        return tensor.to(device=self.device, dtype=self.dtype)

    def _read_from_fused(self, canonical: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """One expert's projection out of transformers 5's stacked [E, 2F, D] gate_up / [E, D, F] down tensors."""
        match = _EXPERT_KEY.fullmatch(canonical)
        if match is None:
            return None
        layer, expert, kind = int(match[1]), int(match[2]), match[3]
        fused = f"layers.{layer}.mlp.experts.{'down_proj' if kind == 'down' else 'gate_up_proj'}"
        if fused not in self._where:
            return None
        if fused not in self._fused:
            assert self.config.moe is not None
            count = self.config.moe.num_experts
            stacked = (count, *shape) if kind == "down" else (count, 2 * shape[0], *shape[1:])
            self._fused = {n: t for n, t in self._fused.items() if n.startswith(f"layers.{layer}.")}
            self._fused[fused] = self.read(fused, stacked)
        tensor = self._fused[fused]
        rows = shape[0]
        part = {"gate": tensor[expert, :rows], "up": tensor[expert, rows:], "down": tensor[expert]}[kind]
        return part.clone()

    def unused(self) -> list[str]:
        return [self._where[c][2] for c in self._where if c not in self._used]

    def is_zero(self, name: str) -> bool:
        _, handle, original = self._where[canonical_name(name)]
        return not bool(handle.get_tensor(original).any())


def _weight_files(directory: Path) -> list[Path]:
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from error
        for shard in shards:
            if not (directory / shard).is_file():
                raise CheckpointError(f"{index}: names shard {shard!r}, which is missing from {directory}")
        return [directory / shard for shard in shards]
    pickled = sorted({p.name for pattern in _PICKLE_PATTERNS for p in directory.glob(pattern)})
    if pickled:
        raise CheckpointError(f"{directory}: found {', '.join(pickled)} but no {WEIGHTS_FILE}. {_CONVERT_HINT}")
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def read_hf_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; expected a Hugging Face checkpoint directory")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config_from_hf(hf, source=str(path))


def load_hf_directory(
    path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[ModelConfig, Transformer]:
    """Builds the model on the meta device and assigns tensors read from the memory-mapped safetensors files.

    dtype defaults to float32 on CPU and bfloat16 on CUDA.
    """
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; expected a Hugging Face checkpoint directory")
    config = read_hf_config(directory)
    target = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or (torch.bfloat16 if target.type == "cuda" else torch.float32)
    weights = _Weights(directory, config, target, dtype)
    try:
        state = _read_state(weights, config)
        _refuse_unused(weights, config)
    finally:
        weights.close()
    return config, materialize(config, state, str(directory), target, dtype)


def _expected_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return Transformer(config).state_dict()


def _read_state(weights: _Weights, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hanlin tensors, fused (q/k/v, gate/up) one at a time so that no second copy of the model builds up."""
    state = {}
    for key, meta in _expected_state(config).items():
        if config.tie_embeddings and key == "lm_head.weight":
            continue
        parts = [weights.read(name, shape) for name, shape in hf_parts(config, key, tuple(meta.shape))]
        state[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return state


def _refuse_unused(weights: _Weights, config: ModelConfig) -> None:
    """Tensors the config has no place for mean the config and the weights disagree; a few are harmless."""
    unexpected = []
    for name in weights.unused():
        canonical = canonical_name(name)
        match = _LAYER_KEY.fullmatch(canonical)
        if canonical.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and canonical == "lm_head.weight"):
            continue
        if match and not config.owns_kv(int(match[1])) and match[2] == "self_attn.k_norm.weight":
            continue  # CLA layers of some Hunyuan checkpoints keep an unused key norm
        if match and match[2].endswith("_proj.bias") and weights.is_zero(name):
            continue  # a zero bias written for a family whose code always has one
        unexpected.append(name)
    if unexpected:
        shown = ", ".join(repr(n) for n in unexpected[:5])
        if len(unexpected) > 5:
            shown += f" and {len(unexpected) - 5} more"
        raise CheckpointError(f"{', '.join(map(str, weights.files))}: tensors the config has no place for: {shown}")


def save_hf_directory(config: ModelConfig, model: Transformer, path: str | Path) -> None:
    """Writes config.json and model.safetensors with the names transformers 5 saves for the config's family."""
    state = model.state_dict()
    unknown = sorted(state.keys() - _expected_state(config).keys())
    if unknown:
        raise CheckpointError(
            f"cannot save a model with tensors a plain Transformer of its config lacks (quantized?): {unknown[:3]}"
        )
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(config)
    family = hf["model_type"]
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if config.tie_embeddings and key == "lm_head.weight":
            continue
        parts = hf_parts(config, key, tuple(tensor.shape))
        pieces = tensor.detach().split([shape[0] for _, shape in parts]) if len(parts) > 1 else [tensor.detach()]
        for (name, _), piece in zip(parts, pieces):
            # safetensors wants contiguous tensors that share no storage (split pieces do; loaded weights may be
            # stored column-major).
            own = piece.clone(memory_format=torch.contiguous_format) if len(parts) > 1 else piece.contiguous()
            tensors[family_name(name, family)] = own
    _add_family_biases(config, family, hf, tensors)
    dtype = model.embed_tokens.weight.dtype
    hf["dtype"] = str(dtype).removeprefix("torch.")
    (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def _add_family_biases(config: ModelConfig, family: str, hf: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Zero biases where the family's code always builds one (e.g. Qwen2's q/k/v) but the model has none."""
    qkv_bias, out_bias = attention_biases(family, hf)
    dtype = next(iter(tensors.values())).dtype
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    for layer in range(config.num_layers):
        zeros: list[tuple[str, int]] = []
        if qkv_bias and not config.attention_bias:
            zeros.append(("q_proj", q_dim))
            if config.owns_kv(layer):
                zeros += [("k_proj", kv_dim), ("v_proj", kv_dim)]
        if out_bias and not config.attention_out_bias:
            zeros.append(("o_proj", config.hidden_size))
        for proj, size in zeros:
            tensors[family_name(f"layers.{layer}.self_attn.{proj}.bias", family)] = torch.zeros(size, dtype=dtype)

"""A trained model → a Hugging Face directory (config.json, model.safetensors, tokenizer, generation config).

That directory is also Hanlin's serving format: `hanlin serve --model DIR` and `hanlin.api.load(DIR)` read it,
and transformers' AutoModelForCausalLM / AutoTokenizer load it as they load any checkpoint of the family.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from hanlin.checkpoints.hf import save_hf_directory
from hanlin.checkpoints.materialize import materialize
from hanlin.config import ModelConfig
from hanlin.errors import HanlinError
from hanlin.tokenizer import Tokenizer

GENERATION_CONFIG_FILE = "generation_config.json"
# Module names that DDP, activation checkpointing and torch.compile put between a model and its tensors.
_WRAPPER_SEGMENTS = ("module", "_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def export_hf(
    model: nn.Module,
    model_config: ModelConfig,
    tokenizer: Tokenizer,
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Writes `model` (a Transformer, possibly wrapped by DDP, FSDP2, activation checkpointing or
    torch.compile, LoRA adapters merged into the exported weights) and `tokenizer` to `directory`, replacing
    an earlier export there, and returns the path.

    Under torch.distributed every rank must call it (FSDP2 gathers the full weights collectively);
    rank 0 alone writes. dtype: the stored dtype (default: the model's).
    """
    directory = Path(directory)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise HanlinError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model embeds only {model_config.vocab_size}; "
            "export with the tokenizer the model was trained with"
        )
    _check_target(directory)
    state = full_state_dict(model)
    if _rank() == 0:
        _write(state, model_config, tokenizer, directory, dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return directory


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU under a plain Transformer's names, LoRA adapters merged (empty on ranks
    other than 0 under FSDP2)."""
    from hanlin.train.lora import LoRALinear

    adapters = {_plain_name(name): m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if _is_fsdp2(model):
        if adapters:
            raise HanlinError("cannot export a sharded (FSDP2) model with LoRA adapters; merge them first (merge_lora)")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    else:
        state = model.state_dict()
    plain = {_plain_name(name): tensor.detach().to("cpu") for name, tensor in state.items()}
    for name, adapter in adapters.items():  # fold LoRA updates into their weights; the model is left as it is
        del plain[f"{name}.lora_A"], plain[f"{name}.lora_B"]
        plain[f"{name}.weight"] = adapter.merged().weight.detach().to("cpu")
    return plain


def write_generation_config(tokenizer: Tokenizer, directory: Path) -> None:
    """generation_config.json: the ids that start a text and that stop generation."""
    stops = sorted(tokenizer.stop_token_ids)
    generation: dict[str, object] = {}
    if tokenizer.bos_token_id is not None:
        generation["bos_token_id"] = tokenizer.bos_token_id
    if stops:
        # The tokenizer's own eos first: transformers uses the first id as the padding fallback.
        eos = tokenizer.eos_token_id
        ordered = ([eos] if eos is not None else []) + [i for i in stops if i != eos]
        generation["eos_token_id"] = ordered[0] if len(ordered) == 1 else ordered
    if tokenizer.pad_token_id is not None:
        generation["pad_token_id"] = tokenizer.pad_token_id
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")


def _write(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    tokenizer: Tokenizer,
    directory: Path,
    dtype: torch.dtype | None,
) -> None:
    dtype = dtype or next(iter(state.values())).dtype
    # A plain Transformer over the state's tensors (shape and name checks name the offending tensor).
    plain = materialize(config, state, "the model being exported", "cpu", dtype)
    temporary = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_hf_directory(config, plain, temporary)
        tokenizer.save(temporary)
        write_generation_config(tokenizer, temporary)
        _replace(temporary, directory)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _check_target(directory: Path) -> None:
    """Refuse to replace anything but an earlier export (or an empty directory)."""
    if directory.is_file():
        raise HanlinError(f"{directory}: is a file; choose a directory to export to")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / "config.json").is_file():
        raise HanlinError(
            f"{directory}: exists and is not an exported model (no config.json); choose a new or empty directory"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)


def _replace(temporary: Path, directory: Path) -> None:
    """Rename the finished export into place; an earlier export there is moved aside first, then removed."""
    if not directory.exists():
        os.replace(temporary, directory)
        return
    old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(directory, old)
    os.replace(temporary, directory)
    shutil.rmtree(old, ignore_errors=True)


def _plain_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def _is_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def export_from_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Exports a training checkpoint: a run directory (its latest checkpoint) or one of its
    checkpoints/step-N directories. The tokenizer defaults to the one the run's config.yaml names."""
    from hanlin.train.data import load_tokenizer
    from hanlin.train.init import load_training_checkpoint, training_checkpoint_dir

    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise HanlinError(f"{path}: no such directory; give a training run directory or a checkpoints/step-N directory")
    directory = training_checkpoint_dir(path)
    if directory is None:
        raise HanlinError(
            f"{path}: not a training checkpoint (no model_config.json here, and no checkpoints/latest in it)"
        )
    run_config = _run_config(directory)
    name = tokenizer or run_config.get("tokenizer", "smollm2")
    if not isinstance(name, str) or not name:
        raise HanlinError(f"{directory}: the run's `tokenizer` must name a model or directory; pass --tokenizer")
    if _has_lora(directory):
        model_config, model = _load_with_lora(directory, run_config)
    else:
        model_config, model = load_training_checkpoint(directory)
    return export_hf(model, model_config, load_tokenizer(name)[0], out_dir, dtype=dtype)


def _run_config(checkpoint_dir: Path) -> dict:
    """The config.yaml saved with the checkpoint (or, failing that, in its run directory)."""
    from hanlin.train.config import read_config_file

    for candidate in (checkpoint_dir / "config.yaml", checkpoint_dir.parent.parent / "config.yaml"):
        if candidate.is_file():
            return read_config_file(candidate)
    raise HanlinError(f"{checkpoint_dir}: no config.yaml beside the checkpoint says which tokenizer it was trained "
                      "with; pass --tokenizer")


def _has_lora(checkpoint_dir: Path) -> bool:
    from safetensors import safe_open

    from hanlin.train.init import MODEL_WEIGHTS_FILE
    from hanlin.train.lora import ADAPTER_NAMES

    with safe_open(str(checkpoint_dir / MODEL_WEIGHTS_FILE), framework="pt") as weights:
        return any(name.rsplit(".", 1)[-1] in ADAPTER_NAMES for name in weights.keys())


def _load_with_lora(checkpoint_dir: Path, run_config: dict) -> tuple[ModelConfig, nn.Module]:
    """An SFT checkpoint with LoRA adapters: the model rebuilt with the run's adapters (export merges them)."""
    from safetensors.torch import load_file

    from hanlin.models import Transformer
    from hanlin.train.init import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE
    from hanlin.train.lora import apply_lora

    model_config = ModelConfig.from_dict(json.loads((checkpoint_dir / MODEL_CONFIG_FILE).read_text()))
    sft = run_config.get("sft") or {}
    if not sft.get("lora_rank"):
        raise HanlinError(f"{checkpoint_dir}: the weights hold LoRA adapters but config.yaml has no sft.lora_rank")
    model = Transformer(model_config)
    apply_lora(model, int(sft["lora_rank"]), float(sft.get("lora_alpha", 16.0)))
    state = load_file(str(checkpoint_dir / MODEL_WEIGHTS_FILE))
    if model_config.tie_embeddings:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise HanlinError(f"{checkpoint_dir}: weights do not match {MODEL_CONFIG_FILE} ({error})") from None
    missing = [n for n in result.missing_keys if not n.endswith("selection_bias")]
    if missing or result.unexpected_keys:
        raise HanlinError(f"{checkpoint_dir}: weights do not match {MODEL_CONFIG_FILE} "
                          f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model_config, model

"""Model construction for training: fresh weights (GPT-2 style init) or weights loaded from a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from hanlin.config import ModelConfig
from hanlin.errors import HanlinError
from hanlin.models import Transformer
from hanlin.models.layers import RMSNorm
from hanlin.models.moe import Router
from hanlin.train.config import TrainConfig

# Linear layers whose output is added straight onto the residual stream.
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")
MODEL_CONFIG_FILE = "model_config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"


def init_weights(model: Transformer, std: float = 0.02, seed: int = 0) -> None:
    """Normal(0, std) for matrices and embeddings, std / sqrt(2 * layers) for residual output projections
    (GPT-2, nanoGPT), ones for norms, zeros for biases and routing biases. Deterministic from `seed` alone."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    residual_std = std / math.sqrt(2 * model.config.num_layers)
    done: set[int] = set()

    def normal_(param: torch.Tensor, scale: float) -> None:
        if id(param) in done:  # tied lm_head / embedding: initialised once
            return
        done.add(id(param))
        values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, scale, generator=generator)
        with torch.no_grad():
            param.copy_(values.to(param.dtype))

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            normal_(module.weight, residual_std if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS else std)
            if module.bias is not None:
                with torch.no_grad():
                    module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            normal_(module.weight, std)
        elif isinstance(module, RMSNorm):
            with torch.no_grad():
                module.weight.fill_(1.0)
        elif isinstance(module, Router):
            normal_(module.weight, std)
            if module.selection_bias is not None:
                module.selection_bias.zero_()


def build_model(config: TrainConfig) -> tuple[ModelConfig, Transformer]:
    """The model to train, on the CPU in fp32 and in train mode: from `model` (fresh weights seeded by
    config.seed) or from `init_from` (a model name, HF directory, GGUF file, or a Hanlin training checkpoint:
    a run directory or one of its checkpoints/step-N directories)."""
    if config.model is not None and config.init_from is not None:
        raise HanlinError("give either `model` (train from scratch) or `init_from` (start from a checkpoint), not both")
    if config.model is not None:
        model_config = config.model_config()
        model = Transformer(model_config)
        init_weights(model, seed=config.seed)
    elif config.init_from is not None:
        model_config, model = _load(config.init_from)
    else:
        raise HanlinError("the config needs `model` (an architecture to train from scratch) or `init_from` "
                          "(a model name, Hugging Face directory or checkpoint to start from)")
    return model_config, model.train()


def load_training_checkpoint(directory: Path) -> tuple[ModelConfig, Transformer]:
    """The model saved in a Hanlin training checkpoint directory (model_config.json + model.safetensors)."""
    from safetensors.torch import load_file

    model_config = ModelConfig.from_dict(json.loads((directory / MODEL_CONFIG_FILE).read_text()))
    model = Transformer(model_config)
    state = load_file(str(directory / MODEL_WEIGHTS_FILE))
    if model_config.tie_embeddings:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("selection_bias")]:
        raise HanlinError(f"{directory}: weights do not match {MODEL_CONFIG_FILE} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model_config, model


def training_checkpoint_dir(path: Path) -> Path | None:
    """The checkpoint directory a path names (a step directory or a run directory's latest), if any."""
    if (path / MODEL_CONFIG_FILE).is_file():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        step_dir = path / "checkpoints" / latest.read_text().strip()
        if (step_dir / MODEL_CONFIG_FILE).is_file():
            return step_dir
    return None


def _load(name_or_path: str) -> tuple[ModelConfig, Transformer]:
    from hanlin.api import load

    path = Path(name_or_path).expanduser()
    checkpoint = training_checkpoint_dir(path) if path.is_dir() else None
    if checkpoint is not None:
        return load_training_checkpoint(checkpoint)
    loaded = load(name_or_path, device="cpu", dtype=torch.float32, quantize=None)
    model = loaded.model
    # The loader lays linear weights out column-major for fast decoding; training wants plain row-major
    # parameters (fused AdamW and DDP buckets expect contiguous tensors). Tied weights are one Parameter.
    for param in model.parameters():
        if not param.is_contiguous():
            param.data = param.data.contiguous()
    for param in model.parameters():
        param.requires_grad_(True)
    return loaded.config, model

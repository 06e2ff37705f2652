"""Turn checkpoint tensors (all at once, or read one by one) into a ready Transformer without a second copy."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from hanlin.config import ModelConfig
from hanlin.errors import CheckpointError
from hanlin.models import Transformer
from hanlin.models.quant_packing import PackedWeight, pack_weight
from hanlin.models.quantized import QuantEmbedding, QuantLinear, tie_quantized_embedding
from hanlin.models.weight_layout import store_linear_weights_column_major


def materialize(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    source: str,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> Transformer:
    """Builds the model on the meta device and assigns the given tensors as its parameters."""
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device("meta"):
        model = Transformer(config)
    _check_names_and_shapes(config, model, {name: tuple(t.shape) for name, t in state.items()}, source)
    state = {n: t.to(device=device, dtype=dtype) for n, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_buffers(device)
    store_linear_weights_column_major(model)
    return model.eval()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def return_free_memory() -> None:
    """Hands freed heap memory back to the OS. Reading weights one by one frees a temporary per weight
    between long-lived packed ones; glibc keeps such holes (its mmap threshold grows after large frees), which
    on SmolLM2 int8 left ~250 MB of dead heap in the RSS."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class WeightSource(Protocol):
    """One checkpoint weight, read on demand (so a model is built without holding a second copy)."""

    shape: tuple[int, ...]

    def fp32(self) -> torch.Tensor: ...

    def packed(self, scheme: str, group: int) -> PackedWeight | None: ...


def _check_names_and_shapes(
    config: ModelConfig, model: Transformer, shapes: dict[str, tuple[int, ...]], source: str
) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, shape in shapes.items():
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name}")
        if tuple(shape) != expected[name]:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(shape)}, the config needs {expected[name]}"
            )
    missing = [n for n in expected if n not in shapes and not (config.tie_embeddings and n == "lm_head.weight")]
    missing = [n for n in missing if not n.endswith("selection_bias")]
    if missing:
        more = " …" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing tensors: {', '.join(missing[:5])}{more}")


def _is_quantized(model: Transformer, name: str, min_out_features: int) -> bool:
    if name == "embed_tokens.weight":
        return True
    module_name, _, kind = name.rpartition(".")
    module = model.get_submodule(module_name)
    return kind == "weight" and isinstance(module, nn.Linear) and module.out_features >= min_out_features


def materialize_lazily(
    config: ModelConfig,
    sources: dict[str, WeightSource],
    source: str,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    *,
    quantize: str | None = None,
    group: int = 32,
    min_out_features: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> Transformer:
    """Builds the model on the meta device and fills it one weight at a time. With `quantize`, the linears
    (out_features >= min_out_features) and the token embedding become packed modules, built from the
    source's blocks where it holds them in a format the scheme takes, from its fp32 values otherwise; no
    fp32 copy of a packed weight is kept."""
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device("meta"):
        model = Transformer(config)
    _check_names_and_shapes(config, model, {n: s.shape for n, s in sources.items()}, source)
    packed_names = [n for n in sources if quantize and _is_quantized(model, n, min_out_features)]
    done = 0
    # Plain tensors first, so that a quantized linear finds its bias already loaded.
    for name, weight in sources.items():
        if name in packed_names:
            continue
        module_name, _, attr = name.rpartition(".")
        values = weight.fp32().to(device=device, dtype=dtype)
        setattr(model.get_submodule(module_name), attr, nn.Parameter(values))
        return_free_memory()
        done += 1
        if progress is not None:
            progress(done, len(sources))
    for name in packed_names:
        assert quantize is not None
        weight = sources[name]
        packed = weight.packed(quantize, group)
        if packed is None:  # quantized here: the vocabulary matrices get int8 under int4 (see quantize_model)
            scheme = "int8" if name in ("embed_tokens.weight", "lm_head.weight") else quantize
            packed = pack_weight(weight.fp32(), scheme, group)
        packed = PackedWeight(
            packed.kind, packed.qdata.to(device), packed.scales.to(device), packed.mins.to(device), packed.group
        )
        if name == "embed_tokens.weight":
            if config.tie_embeddings:
                model.lm_head = QuantLinear(packed)
                tie_quantized_embedding(model, dtype)
            else:
                model.embed_tokens = QuantEmbedding(packed, dtype)
        else:
            module_name = name.rpartition(".")[0]
            parent_name, _, child = module_name.rpartition(".")
            bias = model.get_submodule(module_name).bias
            setattr(model.get_submodule(parent_name), child, QuantLinear(packed, bias))
        del packed
        return_free_memory()
        done += 1
        if progress is not None:
            progress(done, len(sources))
    if config.tie_embeddings and not quantize:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_buffers(device)
    store_linear_weights_column_major(model)
    return model.eval()

"""Turn a name → tensor mapping into a ready Transformer without holding a second copy of the weights."""

from __future__ import annotations

import torch

from hanlin.config import ModelConfig
from hanlin.errors import CheckpointError
from hanlin.models import Transformer
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
    expected = model.state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[name].shape)}"
            )
    missing = [n for n in expected if n not in state and not (config.tie_embeddings and n == "lm_head.weight")]
    missing = [n for n in missing if not n.endswith("selection_bias")]
    if missing:
        raise CheckpointError(f"{source}: missing tensors: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    state = {n: t.to(device=device, dtype=dtype) for n, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_buffers(device)
    store_linear_weights_column_major(model)
    return model.eval()

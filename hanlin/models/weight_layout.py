"""Weight memory layout for CPU matrix-vector products.

Measured on the 2-core AVX2 machines (docs/benchmarks.md): F.linear with a column-major weight
([out, in] view of a contiguous [in, out] buffer) reaches ~1.6x the bandwidth of the row-major
layout at batch 1, because PyTorch then runs x @ W^T as a plain GEMM on contiguous memory. The engine's
fused CPU path re-lays these weights once more, in the kernels' panels (hanlin/engine/runner.py,
quantized.pack_fp32_panels); models for training keep this layout.
"""

from __future__ import annotations

import torch
from torch import nn


def store_linear_weights_column_major(model: nn.Module) -> None:
    """Re-lays every 2-D weight read by F.linear as column-major; values and names are unchanged."""
    converted: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.stride() == (1, weight.shape[0]):
            continue
        if id(weight) not in converted:
            converted[id(weight)] = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)
        module.weight = converted[id(weight)]
    # Tied embeddings share the lm_head parameter: point the embedding at the same re-laid tensor.
    for module in model.modules():
        if isinstance(module, nn.Embedding) and id(module.weight) in converted:
            module.weight = converted[id(module.weight)]

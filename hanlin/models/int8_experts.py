"""MoE experts computed in int8 (the w8a8 scheme): each token's activations are quantized once, before they are
gathered for its k experts, and each expert runs gate/up GEMM -> SwiGLU + quantize -> down GEMM in int8."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from hanlin.kernels import cpu_kernels
from hanlin.models.int8_linear import quantize_rows
from hanlin.models.layers import SwiGLU
from hanlin.models.quantized import QuantLinear


def computes_int8(experts: nn.ModuleList, x_ND: torch.Tensor) -> bool:
    """Whether the experts are w8a8 layers and this input takes their int8 path (see QuantLinear.computes_int8)."""
    first = experts[0]
    return (
        isinstance(first, SwiGLU) and isinstance(first.gate_up_proj, QuantLinear)
        and isinstance(first.down_proj, QuantLinear) and first.gate_up_proj.computes_int8(x_ND)
    )


def expert_outputs(
    experts: nn.ModuleList, active: list[tuple[int, int]], x_ND: torch.Tensor, token_of_sorted: torch.Tensor
) -> torch.Tensor:
    """float32 [S, D]: the outputs of the sorted slots, each active (expert id, row count) in turn, from one
    compiled call (computes_int8 holds only where the kernels are built)."""
    q_SD, scale_S, zero_S = (t.index_select(0, token_of_sorted) for t in quantize_rows(x_ND))
    ids, counts = zip(*active)
    return _compiled(experts).forward(q_SD, scale_S, zero_S, list(ids), list(counts))


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # expert list -> kernels.Int8Experts


def _compiled(experts: nn.ModuleList):
    """The kernels' Int8Experts over these experts' tensors (shared, not copied), built once per expert list
    (kept beside the modules, not in them, so that the model still copies and pickles)."""
    compiled = _COMPILED.get(experts)
    if compiled is None:
        compiled = cpu_kernels().Int8Experts(
            [[e.gate_up_proj.qdata, *e.gate_up_proj.int8_terms(), e.down_proj.qdata, *e.down_proj.int8_terms()]
             for e in experts],
            [(e.gate_up_proj.int8_vnni, e.down_proj.int8_vnni) for e in experts],
        )
        _COMPILED[experts] = compiled
    return compiled

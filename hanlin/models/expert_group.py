"""The routed experts of an MoE layer for training on CPU: gather, SwiGLU experts and weighted combine as one
autograd step by the compiled kernels (moe_experts.cpp), forward and backward.

Where PyTorch's ops run the experts one after another, each matmul split across the threads, the kernel runs
experts side by side, one per thread; no gathered, permuted or concatenated copies go through autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from hanlin.kernels import cpu_kernels
from hanlin.models.layers import SwiGLU, training_on_cpu


def kernel_applies(experts: nn.ModuleList, x_ND: torch.Tensor) -> bool:
    """Training on fp32 CPU with the kernels built, and every expert a plain SwiGLU (no LoRA or other wrapper)."""
    if not all(type(e) is SwiGLU and _plain(e.gate_up_proj) and _plain(e.down_proj) for e in experts):
        return False
    weights = [p for e in experts for p in (e.gate_up_proj.weight, e.down_proj.weight)]
    return training_on_cpu(x_ND, *weights) and cpu_kernels().moe_experts_available()


def _plain(linear: nn.Module) -> bool:
    return type(linear) is nn.Linear and linear.bias is None


def expert_group(x_ND: torch.Tensor, weights_NK: torch.Tensor, order_S: torch.Tensor, counts: list[int],
                 experts: nn.ModuleList) -> torch.Tensor:
    """sum_j weights[n, j] * expert_{id[n, j]}(x[n]) for slots sorted by expert: order_S maps sorted position to slot
    (token * K + choice), counts[e] rows per expert; positions past sum(counts) are dropped slots."""
    gate_up = [e.gate_up_proj.weight for e in experts]
    down = [e.down_proj.weight for e in experts]
    return _ExpertGroup.apply(x_ND.contiguous(), weights_NK.contiguous(), order_S.contiguous(), counts,
                              *gate_up, *down)


class _ExpertGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, weights_NK, order_S, counts, *expert_weights):
        E = len(counts)
        gate_up, down = list(expert_weights[:E]), list(expert_weights[E:])
        out_ND, x_sorted, gate_up_sorted, y_sorted = cpu_kernels().moe_experts_forward(
            x_ND, weights_NK, order_S, counts, gate_up, down
        )
        ctx.save_for_backward(x_ND, weights_NK, order_S, x_sorted, gate_up_sorted, y_sorted, *expert_weights)
        ctx.counts = counts
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, weights_NK, order_S, x_sorted, gate_up_sorted, y_sorted, *expert_weights = ctx.saved_tensors
        E = len(ctx.counts)
        grad_x, grad_weights, grad_gate_up, grad_down = cpu_kernels().moe_experts_backward(
            grad_ND.contiguous(), x_ND, weights_NK, order_S, ctx.counts, expert_weights[:E], expert_weights[E:],
            x_sorted, gate_up_sorted, y_sorted,
        )
        return grad_x, grad_weights, None, None, *grad_gate_up, *grad_down

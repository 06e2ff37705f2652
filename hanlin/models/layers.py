"""Small building blocks shared by every architecture: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hanlin.kernels import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if training_on_cpu(x, self.weight):
            return _RMSNormRows.apply(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def training_on_cpu(*tensors: torch.Tensor) -> bool:
    """Gradients wanted through these fp32 CPU tensors, with the compiled kernels built: training's kernels."""
    return (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not torch.is_autocast_enabled("cpu") and cpu_kernels() is not None
    )


class _RMSNormRows(torch.autograd.Function):
    """RMSNorm over the last dimension by the compiled kernels (rms_norm.cpp), forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x_ND = x.reshape(-1, x.shape[-1]).contiguous()
        y_ND, r_N = cpu_kernels().rms_norm_forward(x_ND, weight.contiguous(), eps)
        ctx.save_for_backward(x_ND, weight, r_N)
        return y_ND.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_ND, weight, r_N = ctx.saved_tensors
        grad_ND = grad_y.reshape(x_ND.shape).contiguous()
        grad_x_ND, grad_weight = cpu_kernels().rms_norm_backward(grad_ND, x_ND, weight.contiguous(), r_N)
        return grad_x_ND.view(grad_y.shape), grad_weight, None


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are fused into one [2F, D] projection."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if training_on_cpu(gate_up):
            return self.down_proj(_SwiGLUActivation.apply(gate_up))
        gate, up = gate_up.split(self.hidden, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class _SwiGLUActivation(torch.autograd.Function):
    """silu(gate) * up over [..., 2F] (gate, then up) by the compiled kernels (swiglu.cpp), forward and backward."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up_N2F = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
        ctx.save_for_backward(gate_up_N2F)
        return cpu_kernels().swiglu_forward(gate_up_N2F).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (gate_up_N2F,) = ctx.saved_tensors
        grad_NF = grad_out.reshape(gate_up_N2F.shape[0], -1).contiguous()
        return cpu_kernels().swiglu_backward(grad_NF, gate_up_N2F).view(*grad_out.shape[:-1], gate_up_N2F.shape[-1])

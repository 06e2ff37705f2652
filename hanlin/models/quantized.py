"""Weight-only int8 (per output channel, symmetric) linear layers, quantized at load time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hanlin.kernels import int8_kernel

# Up to this many rows the compiled kernel (reads 1 byte per weight) wins; above it the matmul is
# compute-bound and dequantizing once into an fp32 GEMM is faster.
KERNEL_MAX_ROWS = 8


class Int8Linear(nn.Module):
    def __init__(self, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = weight_q.shape[1]
        self.out_features = weight_q.shape[0]
        self.register_buffer("weight_q", weight_q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        weight_q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(weight_q, scale, linear.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_q.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_NK = x.reshape(-1, self.in_features)
        kernel = int8_kernel() if x.device.type == "cpu" and x.dtype == torch.float32 else None
        if kernel is not None and x_NK.shape[0] <= KERNEL_MAX_ROWS and not x.requires_grad:
            y = kernel.int8_linear(x_NK, self.weight_q, self.scale, self.bias)
        else:
            y = F.linear(x_NK, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, *, min_out_features: int = 16) -> int:
    """Replaces every nn.Linear (router gates excepted) by an Int8Linear in place; returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.out_features >= min_out_features:
                setattr(parent, name, Int8Linear.from_linear(child))
                replaced += 1
    return replaced

"""Summed cross-entropy of x @ W^T against labels without materializing the [N, V] logits: training's lm_head
and loss fused.

Rows go through in chunks of about CHUNK_BYTES of logits. When gradients are wanted, each chunk's logits are
turned into their own gradient right away (softmax - one_hot, the compiled kernels' cross_entropy_grad_) and
multiplied back into the gradients of x and W during the forward pass, so backward only scales them by the
loss's gradient. The GEMMs are the three an unfused lm_head + loss does, but no full logits, log-softmax or
their gradients ever go through memory, and rows whose label is ignored are never multiplied at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hanlin.kernels import cpu_kernels

CHUNK_BYTES = 16 << 20  # fp32 logits per chunk: a chunk stays in the last-level cache


def linear_cross_entropy(x_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """sum over labels != ignore_index of cross_entropy(x @ weight^T, label): a float32 scalar."""
    fused = (
        x_ND.device.type == "cpu" and x_ND.dtype == torch.float32 and weight_VD.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu") and cpu_kernels() is not None
    )
    if not fused:
        logits_NV = F.linear(x_ND, weight_VD).float()
        return F.cross_entropy(logits_NV, labels_N, ignore_index=ignore_index, reduction="sum")
    wants_grad = torch.is_grad_enabled() and (x_ND.requires_grad or weight_VD.requires_grad)
    return _LinearCrossEntropy.apply(x_ND, weight_VD, labels_N, ignore_index, wants_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor, ignore_index: int,
                wants_grad: bool):
        kernels = cpu_kernels()
        kept_N = labels_N != ignore_index
        rows = None if bool(kept_N.all()) else kept_N.nonzero().squeeze(1)
        x_RD = x_ND.contiguous() if rows is None else x_ND.index_select(0, rows)
        labels_R = labels_N if rows is None else labels_N.index_select(0, rows)
        weight_VD = weight_VD.contiguous()
        R, V = x_RD.shape[0], weight_VD.shape[0]
        grad_x_RD = torch.empty_like(x_RD) if wants_grad and ctx.needs_input_grad[0] else None
        grad_weight_VD = torch.zeros_like(weight_VD) if wants_grad and ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32)
        chunk = max(1, CHUNK_BYTES // (4 * V))
        logits_buffer = x_RD.new_empty(min(chunk, R), V)  # one allocation for every chunk
        for start in range(0, R, chunk):
            x_CD = x_RD[start : start + chunk]
            logits_CV = torch.mm(x_CD, weight_VD.t(), out=logits_buffer[: len(x_CD)])
            total += kernels.cross_entropy_grad_(logits_CV, labels_R[start : start + chunk], ignore_index).sum()
            if grad_x_RD is not None:
                torch.mm(logits_CV, weight_VD, out=grad_x_RD[start : start + chunk])
            if grad_weight_VD is not None:
                grad_weight_VD.addmm_(logits_CV.t(), x_CD)
        grad_x_ND = grad_x_RD
        if grad_x_RD is not None and rows is not None:
            grad_x_ND = x_ND.new_zeros(x_ND.shape).index_copy_(0, rows, grad_x_RD)
        ctx.save_for_backward(grad_x_ND, grad_weight_VD)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_x_ND, grad_weight_VD = ctx.saved_tensors
        return (
            None if grad_x_ND is None else grad_x_ND * grad_total,
            None if grad_weight_VD is None else grad_weight_VD * grad_total,
            None,
            None,
            None,
        )

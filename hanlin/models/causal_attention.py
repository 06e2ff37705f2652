"""Causal self-attention for training on CPU: the compiled kernels' forward and backward (causal_attention.cpp).

Each query row i attends to keys key_start[b, i] .. i: 0 .. i for plain causal rows; packed documents and sliding
windows move the start. Query blocks multiply only the keys they can see and keep their scores in cache between
the GEMMs and the softmax, where ATen's CPU flash attention streams every key block through an online softmax.
Short rows keep their probabilities from the forward for the backward (KEEP_PROBS_UP_TO).
"""

from __future__ import annotations

import torch

from hanlin.kernels import cpu_kernels


def kernel_applies(q_BHTD: torch.Tensor) -> bool:
    """Whether causal_attention can take these queries: fp32 on a CPU with the compiled kernels and a BLAS."""
    if q_BHTD.device.type != "cpu" or q_BHTD.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    kernels = cpu_kernels()
    return kernels is not None and kernels.causal_attention_available()


def causal_attention(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor,
                     key_start_BT: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), keys key_start .. i of row i) v, with k and v's heads shared by groups of q heads."""
    return _CausalAttention.apply(q_BHTD, k_BHTD, v_BHTD, key_start_BT)


def key_starts(document_ids_BT: torch.Tensor | None, B: int, T: int, window: int | None,
               device: torch.device) -> torch.Tensor | None:
    """First key each query may see: its document's first token (documents contiguous), no further back than
    window - 1 tokens; None when that is 0 everywhere (plain causal)."""
    index_BT = torch.arange(T, device=device).expand(B, T)
    start_BT = None if document_ids_BT is None else document_starts(document_ids_BT)
    if window is not None and T > window:
        earliest_BT = (index_BT - window + 1).clamp(min=0)
        start_BT = earliest_BT if start_BT is None else torch.maximum(start_BT, earliest_BT)
    return start_BT


def document_starts(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """Index of the first token of each token's (contiguous) document: [B, T] -> [B, T]."""
    B, T = document_ids_BT.shape
    index_BT = torch.arange(T, device=document_ids_BT.device).expand(B, T)
    first_BT = torch.ones_like(document_ids_BT, dtype=torch.bool)
    first_BT[:, 1:] = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
    return torch.where(first_BT, index_BT, torch.zeros_like(index_BT)).cummax(dim=1).values


# The forward keeps its probabilities for the backward (which then skips recomputing q k^T and its exp) when they
# take at most this many times q's elements: short rows, where they cost no more memory than the MLP's activations.
KEEP_PROBS_UP_TO = 4


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHTD, k_BHTD, v_BHTD, key_start_BT):
        q_BHTD, k_BHTD, v_BHTD = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_BHTD, k_BHTD, v_BHTD))
        out_BHTD, lse_BHT, probs = cpu_kernels().causal_attention_forward(
            q_BHTD, k_BHTD, v_BHTD, key_start_BT, KEEP_PROBS_UP_TO * q_BHTD.numel()
        )
        ctx.save_for_backward(q_BHTD, k_BHTD, v_BHTD, out_BHTD, lse_BHT, probs)
        ctx.key_start_BT = key_start_BT
        return out_BHTD

    @staticmethod
    def backward(ctx, grad_BHTD):
        q_BHTD, k_BHTD, v_BHTD, out_BHTD, lse_BHT, probs = ctx.saved_tensors
        dq, dk, dv = cpu_kernels().causal_attention_backward(
            grad_BHTD, q_BHTD, k_BHTD, v_BHTD, out_BHTD, lse_BHT, ctx.key_start_BT, probs
        )
        return dq, dk, dv, None

"""Mixture-of-Experts feed-forward: router, grouped expert compute, optional shared experts, and (training only)
expert capacity with Hunyuan-style recycle routing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hanlin.config import MoEConfig
from hanlin.models import expert_group, int8_experts
from hanlin.models.layers import SwiGLU


class Router(nn.Module):
    """Scores experts per token and picks top-k (softmax or sigmoid, optional group limit and selection bias)."""

    def __init__(self, dim: int, moe: MoEConfig) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, dim))
        # Aux-loss-free balancing bias: changes which experts are chosen, never their weights.
        self.register_buffer(
            "selection_bias", torch.zeros(moe.num_experts) if moe.router_bias else None, persistent=moe.router_bias
        )

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (router logits [N, E], top-k weights [N, k], top-k expert ids [N, k])."""
        moe = self.moe
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        if moe.score_func == "softmax":
            scores_NE = logits_NE.softmax(dim=-1)
        else:
            scores_NE = logits_NE.sigmoid()
        choice_NE = scores_NE if self.selection_bias is None else scores_NE + self.selection_bias
        if moe.n_group > 1:
            choice_NE = self._limit_to_groups(choice_NE)
        if self.selection_bias is None and moe.n_group == 1:
            weights_NK, ids_NK = torch.topk(scores_NE, moe.top_k, dim=-1)
        else:
            ids_NK = torch.topk(choice_NE, moe.top_k, dim=-1).indices
            weights_NK = scores_NE.gather(1, ids_NK)
        if moe.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + (1e-20 if moe.score_func == "sigmoid" else 0))
        weights_NK = weights_NK * moe.routed_scaling_factor
        return logits_NE, weights_NK.to(x_ND.dtype), ids_NK

    def _limit_to_groups(self, choice_NE: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        N = choice_NE.shape[0]
        grouped = choice_NE.view(N, moe.n_group, -1)
        # A group's score is the sum of its two best experts (DeepSeek-V3); one expert per group: its score.
        group_score_NG = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        keep_NG = torch.zeros_like(group_score_NG, dtype=torch.bool)
        keep_NG.scatter_(1, group_score_NG.topk(moe.topk_group, dim=-1).indices, True)
        return grouped.masked_fill(~keep_NG[..., None], float("-inf")).view(N, -1)


class MoE(nn.Module):
    def __init__(self, dim: int, moe: MoEConfig) -> None:
        super().__init__()
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.router = Router(dim, moe)
        # One module per expert: the grouped loop then touches whole weights, never slices of a stacked tensor.
        self.experts = nn.ModuleList(SwiGLU(dim, moe.expert_dim) for _ in range(moe.num_experts))
        self.shared_expert = SwiGLU(dim, moe.shared_expert_dim) if moe.shared_expert_dim else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if moe.shared_expert_gate else None
        self.capacity_factor = moe.capacity_factor
        # Monitoring and training losses read these after each forward.
        self.last_router_logits: torch.Tensor | None = None  # [N, E] fp32
        self.last_expert_ids: torch.Tensor | None = None  # [N, k] the router's top-k choice
        self.last_routed_ids: torch.Tensor | None = None  # [N, k] experts that ran each slot (-1: dropped)
        self.last_tokens_per_expert: torch.Tensor | None = None  # [E] slots each expert computed
        self.last_dropped = 0  # slots over capacity with no expert left to take them
        self.last_rerouted = 0  # slots over capacity re-routed to another expert

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        logits_NE, weights_NK, ids_NK = self.router(x_ND)
        self.last_router_logits = logits_NE
        self.last_expert_ids = ids_NK
        dropped = 0
        if self.capacity_factor is not None and self.training:
            N, k, E = ids_NK.shape[0], self.top_k, self.num_experts
            capacity = math.ceil(self.capacity_factor * N * k / E)
            ids_NK, dropped, self.last_rerouted = recycle_route(ids_NK, E, capacity)
            if dropped:
                weights_NK = weights_NK.masked_fill(ids_NK < 0, 0.0)
        else:
            self.last_rerouted = 0
        self.last_dropped = dropped
        self.last_routed_ids = ids_NK
        out_ND = self._grouped_experts(x_ND, weights_NK, ids_NK, dropped)
        if self.shared_expert is not None:
            shared_ND = self.shared_expert(x_ND)
            if self.shared_expert_gate is not None:
                shared_ND = torch.sigmoid(self.shared_expert_gate(x_ND)) * shared_ND
            out_ND = out_ND + shared_ND
        return out_ND.view(B, T, D)

    def _grouped_experts(
        self, x_ND: torch.Tensor, weights_NK: torch.Tensor, ids_NK: torch.Tensor, dropped: int = 0
    ) -> torch.Tensor:
        """Sort the N*k (token, slot) pairs by expert, run one matmul chain per selected expert (only their
        weights are read), then unsort and sum each token's k weighted outputs. `dropped` slots (id -1, weight
        0) sort last and get zero rows without running any expert.

        Training on CPU hands all of it to the compiled kernels (expert_group: experts side by side on threads).
        Otherwise gathers only, no scatter-add, forward or backward (see _Gather, _Permute): on the 2-core CPUs,
        with 2 threads and a busy neighbour, one index_add_ of 8 rows was measured at ~100 ms (6 µs on 1 thread).
        """
        N, D = x_ND.shape
        k = self.top_k
        flat_ids = ids_NK.reshape(-1)
        if dropped:
            flat_ids = flat_ids.masked_fill(flat_ids < 0, self.num_experts)
        order = torch.argsort(flat_ids, stable=True)  # sorted position -> slot (token * k + j)
        counts_E = torch.bincount(flat_ids, minlength=self.num_experts)[: self.num_experts]
        self.last_tokens_per_expert = counts_E
        if expert_group.kernel_applies(self.experts, x_ND):
            return expert_group.expert_group(x_ND, weights_NK, order, counts_E.tolist(), self.experts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)  # slot -> sorted position
        active = [(expert_id, count) for expert_id, count in enumerate(counts_E.tolist()) if count]
        if not dropped and int8_experts.computes_int8(self.experts, x_ND):
            y_sorted = int8_experts.expert_outputs(self.experts, active, x_ND, order // k)
        else:
            x_sorted = _Gather.apply(x_ND, order // k, inverse, k)
            # One split (not a slice per expert: each slice's backward would zero-fill a full-size gradient).
            pieces = x_sorted.split([count for _, count in active] + ([dropped] if dropped else []))
            outputs = [self.experts[expert_id](x_e) for (expert_id, _), x_e in zip(active, pieces)]
            if dropped:
                outputs.append(x_sorted.new_zeros(dropped, D))
            y_sorted = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        y_NKD = _Permute.apply(y_sorted, inverse, order).view(N, k, D)
        return torch.bmm(weights_NK.unsqueeze(1), y_NKD).squeeze(1)


def recycle_route(ids_NK: torch.Tensor, num_experts: int, capacity: int) -> tuple[torch.Tensor, int, int]:
    """Caps every expert at `capacity` slots and re-routes the overflow at random (Hunyuan-Large's recycle
    routing, Sun et al. 2024: tokens over an expert's capacity are randomly reassigned to experts that
    still have room instead of being dropped). Returns (routed ids [N, k] with -1 for a dropped slot, number
    dropped, number re-routed).

    Who keeps a place: the router's choices are served in priority order, every token's first choice before
    any second choice and, within a choice rank, in token order (GShard's / Switch's top-k dispatch order).
    A slot past its expert's capacity goes to an expert drawn uniformly from those that still have room and
    that the token does not already use; the draws of one choice rank are made together and, where more draws
    land on an expert than it has room for, the earlier tokens win and the rest draw again. A slot with no such
    expert left is dropped. Deterministic given the torch RNG (the draws use torch.rand on ids_NK's device).
    """
    N, k = ids_NK.shape
    E = num_experts
    priority_ids = ids_NK.t().reshape(-1)  # [k * N]: choice rank major, token minor
    kept = _rank_within_expert(priority_ids, E) < capacity
    routed_NK = priority_ids.masked_fill(~kept, -1).view(k, N).t().contiguous()
    if bool(kept.all()):
        return routed_NK, 0, 0
    room_E = capacity - torch.bincount(priority_ids[kept], minlength=E)
    taken_NE = torch.zeros(N, E, dtype=torch.bool, device=ids_NK.device)
    taken_NE.scatter_(1, ids_NK, True)
    for j in range(k):
        tokens_T = (routed_NK[:, j] < 0).nonzero().squeeze(1)
        while tokens_T.numel():
            allowed_TE = ~taken_NE[tokens_T] & (room_E > 0)
            has_room_T = allowed_TE.any(dim=1)
            tokens_T, allowed_TE = tokens_T[has_room_T], allowed_TE[has_room_T]
            if not tokens_T.numel():
                break
            # Uniform among the allowed experts: the largest of uniform draws, the others masked below 0.
            pick_T = torch.rand(allowed_TE.shape, device=ids_NK.device).masked_fill(~allowed_TE, -1.0).argmax(dim=1)
            fits_T = _rank_within_expert(pick_T, E) < room_E[pick_T]
            placed_T, expert_T = tokens_T[fits_T], pick_T[fits_T]
            routed_NK[placed_T, j] = expert_T
            taken_NE[placed_T, expert_T] = True
            room_E = room_E - torch.bincount(expert_T, minlength=E)
            tokens_T = tokens_T[~fits_T]  # their expert filled up this round: it is excluded next round
    dropped = int((routed_NK < 0).sum())
    return routed_NK, dropped, int((~kept).sum()) - dropped


def _rank_within_expert(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each entry, how many earlier entries chose the same expert: [S] -> [S]."""
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(ids.numel(), device=ids.device) - starts[ids[order]]
    return rank


class _Gather(torch.autograd.Function):
    """x_ND rows in sorted-slot order (rows[p] = x[slot_p // k]); backward sums each token's k slot gradients."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, token_of_sorted: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x_ND.index_select(0, token_of_sorted)

    @staticmethod
    def backward(ctx, grad_SD: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad_slots = grad_SD.index_select(0, inverse)
        return grad_slots.view(-1, ctx.k, grad_slots.shape[-1]).sum(dim=1), None, None, None


class _Permute(torch.autograd.Function):
    """rows[i] = x[index[i]] for a permutation index; backward applies the inverse permutation (a gather)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None

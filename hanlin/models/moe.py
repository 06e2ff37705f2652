"""Mixture-of-Experts feed-forward: router, grouped expert compute, optional shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hanlin.config import MoEConfig
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
        # Monitoring and training losses read these after each forward.
        self.last_router_logits: torch.Tensor | None = None
        self.last_tokens_per_expert: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        logits_NE, weights_NK, ids_NK = self.router(x_ND)
        self.last_router_logits = logits_NE
        out_ND = self._grouped_experts(x_ND, weights_NK, ids_NK)
        if self.shared_expert is not None:
            shared_ND = self.shared_expert(x_ND)
            if self.shared_expert_gate is not None:
                shared_ND = torch.sigmoid(self.shared_expert_gate(x_ND)) * shared_ND
            out_ND = out_ND + shared_ND
        return out_ND.view(B, T, D)

    def _grouped_experts(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
        """Sort (token, slot) pairs by expert, run one matmul chain per active expert, scatter back weighted."""
        flat_ids = ids_NK.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        token_of_slot = order // self.top_k
        counts_E = torch.bincount(flat_ids, minlength=self.num_experts)
        self.last_tokens_per_expert = counts_E
        x_sorted = x_ND.index_select(0, token_of_slot)
        outputs = []
        for expert_id, x_e in zip(range(self.num_experts), x_sorted.split(counts_E.tolist())):
            if x_e.shape[0]:
                outputs.append(self.experts[expert_id](x_e))
        y_sorted = torch.cat(outputs) * weights_NK.reshape(-1, 1).index_select(0, order)
        return torch.zeros_like(x_ND).index_add_(0, token_of_slot, y_sorted)

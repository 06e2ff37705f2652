"""MoE layer: grouped expert compute against a naive dense reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hanlin.config import MoEConfig
from hanlin.models.moe import MoE

D = 32


def build(seed: int = 0, dtype: torch.dtype = torch.float64, **moe_options) -> MoE:
    options = dict(num_experts=8, top_k=3, expert_dim=24)
    options.update(moe_options)
    torch.manual_seed(seed)
    moe = MoE(D, MoEConfig(**options))
    for p in moe.parameters():
        nn.init.normal_(p, std=0.3)
    if moe.router.selection_bias is not None:
        moe.router.selection_bias.normal_(std=0.3)
    return moe.to(dtype)


def swiglu(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w_gate, w_up = module.gate_up_proj.weight.split(module.hidden)
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ module.down_proj.weight.T


def reference(moe: MoE, x_BTD: torch.Tensor) -> torch.Tensor:
    """Every token through its top-k experts one at a time, weighted; dense routing written out in full."""
    cfg = moe.router.moe
    x_ND = x_BTD.reshape(-1, D)
    logits = x_ND.float() @ moe.router.weight.float().T
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    choice = scores if moe.router.selection_bias is None else scores + moe.router.selection_bias
    out = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        ids = choice[n].topk(cfg.top_k).indices
        weights = scores[n, ids]
        if cfg.norm_topk_prob:
            weights = weights / weights.sum()
        weights = (weights * cfg.routed_scaling_factor).to(x_ND.dtype)
        for w, e in zip(weights, ids.tolist()):
            out[n] = out[n] + w * swiglu(moe.experts[e], x_ND[n])
    if moe.shared_expert is not None:
        shared = swiglu(moe.shared_expert, x_ND)
        if moe.shared_expert_gate is not None:
            shared = torch.sigmoid(x_ND @ moe.shared_expert_gate.weight.T) * shared
        out = out + shared
    return out.view_as(x_BTD)


ROUTINGS = {
    "softmax": dict(),
    "softmax-norm": dict(norm_topk_prob=True),
    "sigmoid-norm-scaled": dict(score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5),
    "sigmoid-bias": dict(score_func="sigmoid", router_bias=True),
    "shared": dict(shared_expert_dim=16),
    "shared-gated": dict(shared_expert_dim=16, shared_expert_gate=True, norm_topk_prob=True),
}


@pytest.mark.parametrize("tokens", [1, 2, 7, 64])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_matches_dense_reference_forward_and_backward(routing: str, tokens: int):
    moe = build(**ROUTINGS[routing])
    x = torch.randn(1, tokens, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    out = moe(x)
    expected = reference(moe, x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    counts = moe.last_tokens_per_expert
    assert counts.shape == (8,) and int(counts.sum()) == tokens * 3
    assert moe.last_router_logits.shape == (tokens, 8)

    upstream = torch.randn_like(out)
    params = [p for p in moe.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x, *params], upstream, allow_unused=True)
    ref_grads = torch.autograd.grad(expected, [x_ref, *params], upstream, allow_unused=True)
    names = ["x"] + [n for n, p in moe.named_parameters() if p.requires_grad]
    for name, g, r in zip(names, grads, ref_grads):
        if r is None:  # an expert no token chose
            assert g is None or torch.count_nonzero(g) == 0, name
        else:
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=name)


def test_batched_input_and_every_expert_active():
    moe = build(num_experts=4, top_k=2)
    x = torch.randn(3, 20, D, dtype=torch.float64)
    torch.testing.assert_close(moe(x), reference(moe, x), rtol=1e-10, atol=1e-10)
    assert bool((moe.last_tokens_per_expert > 0).all())


def test_group_limited_routing_runs_the_routers_choice():
    moe = build(num_experts=8, top_k=2, n_group=4, topk_group=2, score_func="sigmoid", norm_topk_prob=True, router_bias=True)
    x = torch.randn(1, 9, D, dtype=torch.float64)
    _, weights, ids = moe.router(x.view(-1, D))
    expected = torch.stack([
        sum(w * swiglu(moe.experts[e], x[0, n]) for w, e in zip(weights[n], ids[n].tolist())) for n in range(9)
    ])
    torch.testing.assert_close(moe(x)[0], expected, rtol=1e-10, atol=1e-10)


class ScaledLinear(nn.Module):
    """Stands in for a quantized linear: a module with its own storage that only forward()s x → y."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("w_t", linear.weight.detach().t().contiguous() * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w_t) * 2.0


def test_experts_are_called_as_modules():
    moe = build(num_experts=6, top_k=2)
    x = torch.randn(1, 5, D, dtype=torch.float64)
    with torch.no_grad():
        expected = moe(x)
        for expert in moe.experts:
            expert.gate_up_proj = ScaledLinear(expert.gate_up_proj)
            expert.down_proj = ScaledLinear(expert.down_proj)
        torch.testing.assert_close(moe(x), expected)


def test_float32_inference_mode_matches_autograd_path():
    moe = build(dtype=torch.float32, num_experts=16, top_k=4)
    x = torch.randn(2, 5, D)
    with torch.inference_mode():
        fast = moe(x)
    torch.testing.assert_close(fast, moe(x).detach())
    torch.testing.assert_close(fast, reference(moe, x).detach(), rtol=1e-5, atol=1e-5)

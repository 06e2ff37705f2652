"""MoE training: balancing losses against hand-computed values, expert-load tracking, auxiliary-loss-free bias,
capacity with recycle routing, expert learning-rate rule and load statistics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hanlin.config import ModelConfig, MoEConfig
from hanlin.errors import HanlinError
from hanlin.models.moe import MoE
from hanlin.models.transformer import Transformer
from hanlin.train.moe_balance import (
    ExpertLoadTracker,
    expert_load_metrics,
    expert_lr_multiplier,
    is_expert_parameter,
    moe_aux_loss,
    update_routing_bias,
)

torch.set_num_threads(1)


def settings(**overrides) -> SimpleNamespace:
    values = dict(aux_loss_coef=0.01, z_loss_coef=0.001, bias_update_rate=0.0, expert_lr_scale=1.0)
    values.update(overrides)
    return SimpleNamespace(**values)


class Stack(nn.Module):
    """The smallest "model" the balancing code accepts: MoE layers and `moe_layers()`."""

    def __init__(self, *moes: MoE) -> None:
        super().__init__()
        self.moes = nn.ModuleList(moes)

    def moe_layers(self):
        return iter(self.moes)


def routed_by_hand(logits: list[list[float]], score_func: str = "softmax", top_k: int = 2) -> MoE:
    """An MoE layer whose forward produced exactly these router logits: token n is the n-th unit vector and
    router.weight[e, n] = logits[n][e]."""
    N, E = len(logits), len(logits[0])
    D = max(N, E)
    moe = MoE(D, MoEConfig(num_experts=E, top_k=top_k, expert_dim=4, score_func=score_func))
    torch.manual_seed(0)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :N] = torch.tensor(logits).T
    moe(torch.eye(D)[:N].unsqueeze(0))
    torch.testing.assert_close(moe.last_router_logits, torch.tensor(logits), rtol=0, atol=1e-6)
    return moe


# Softmax probabilities are small integers over their sum: token 0 [4,2,1,1]/8, token 1 [1,1,6,2]/10,
# token 2 [2,1,1,4]/8. Top-2: token 0 -> e0, e1; token 1 -> e2, e3; token 2 -> e3, e0.
SOFTMAX_LOGITS = [[math.log(v) for v in row] for row in ([4, 2, 1, 1], [1, 1, 6, 2], [2, 1, 1, 4])]
# f = slots per expert / 6 = [2, 1, 1, 2] / 6
# P = mean probabilities = [(.5+.1+.25), (.25+.1+.125), (.125+.6+.125), (.125+.2+.5)] / 3
SOFTMAX_AUX = 4 * (2 * 0.85 + 1 * 0.475 + 1 * 0.85 + 2 * 0.825) / (6 * 3)  # = 1.03888...
SOFTMAX_Z = (math.log(8) ** 2 + math.log(10) ** 2 + math.log(8) ** 2) / 3  # logsumexp = log(sum of exps)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# Sigmoid scores token 0 [.8,.6,.2,.4] and token 1 [.9,.3,.1,.7]; both sum to 2, so the normalised scores are
# [.4,.3,.1,.2] and [.45,.15,.05,.35]. Top-2: token 0 -> e0, e1; token 1 -> e0, e3.
SIGMOID_SCORES = [[0.8, 0.6, 0.2, 0.4], [0.9, 0.3, 0.1, 0.7]]
SIGMOID_LOGITS = [[logit(p) for p in row] for row in SIGMOID_SCORES]
# f = [2, 1, 0, 1] / 4; P = [.425, .225, .075, .275]
SIGMOID_AUX = 4 * (2 * 0.425 + 1 * 0.225 + 0 * 0.075 + 1 * 0.275) / 4  # = 1.35
SIGMOID_Z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in SIGMOID_LOGITS) / 2


@pytest.mark.parametrize(
    "logits, score_func, aux, z",
    [(SOFTMAX_LOGITS, "softmax", SOFTMAX_AUX, SOFTMAX_Z), (SIGMOID_LOGITS, "sigmoid", SIGMOID_AUX, SIGMOID_Z)],
    ids=["softmax", "sigmoid"],
)
def test_balancing_and_z_loss_match_hand_computed_values(logits, score_func, aux, z):
    model = Stack(routed_by_hand(logits, score_func))
    loss, metrics = moe_aux_loss(model, settings(aux_loss_coef=0.1, z_loss_coef=0.01))
    assert metrics["moe/aux_loss"] == pytest.approx(aux, rel=1e-6)
    assert metrics["moe/z_loss"] == pytest.approx(z, rel=1e-6)
    assert metrics["moe/aux_loss_coef"] == 0.1 and metrics["moe/z_loss_coef"] == 0.01
    assert float(loss.detach()) == pytest.approx(0.1 * aux + 0.01 * z, rel=1e-6)


def test_losses_are_averaged_over_layers():
    model = Stack(routed_by_hand(SOFTMAX_LOGITS), routed_by_hand([[0.0] * 4] * 3))
    # Uniform logits: P = 1/4 everywhere, so E * sum f_i P_i = 1 whatever f; logsumexp = log 4.
    loss, metrics = moe_aux_loss(model, settings(aux_loss_coef=1.0, z_loss_coef=0.0))
    assert metrics["moe/aux_loss"] == pytest.approx((SOFTMAX_AUX + 1.0) / 2, rel=1e-6)
    assert metrics["moe/z_loss"] == pytest.approx((SOFTMAX_Z + math.log(4) ** 2) / 2, rel=1e-6)
    assert float(loss.detach()) == pytest.approx((SOFTMAX_AUX + 1.0) / 2, rel=1e-6)


def test_balancing_loss_is_huggingface_mixtral_value_over_top_k():
    transformers_mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(3)
    logits = (torch.randn(13, 8) * 2).tolist()
    _, metrics = moe_aux_loss(Stack(routed_by_hand(logits, top_k=3)), settings())
    theirs = transformers_mixtral.load_balancing_loss_func((torch.tensor(logits),), num_experts=8, top_k=3)
    # Hugging Face sums the top-k ranks' balance terms separately: k times the per-slot form.
    assert metrics["moe/aux_loss"] == pytest.approx(float(theirs) / 3, rel=1e-5)


def tiny_moe_model(seed: int = 0, **moe_options) -> Transformer:
    options = dict(num_experts=8, top_k=2, expert_dim=16)
    options.update(moe_options)
    config = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64,
        moe=MoEConfig(first_k_dense=1, **options),
    )
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.1) if param.dim() >= 2 else param.fill_(1.0)
        for layer in model.moe_layers():
            if layer.router.selection_bias is not None:
                layer.router.selection_bias.zero_()
    return model.train()


def test_no_loss_without_moe_layers_or_coefficients():
    dense = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64))
    assert moe_aux_loss(dense, settings()) == (None, {})
    model = tiny_moe_model()
    model(torch.randint(0, 64, (2, 8)))
    loss, metrics = moe_aux_loss(model, settings(aux_loss_coef=0.0, z_loss_coef=0.0))
    assert loss is None and metrics["moe/aux_loss"] > 0 and metrics["moe/aux_loss_coef"] == 0.0


def test_balancing_terms_train_the_routers_only():
    model = tiny_moe_model()
    model(torch.randint(0, 64, (2, 8)))
    loss, _ = moe_aux_loss(model, settings(aux_loss_coef=1.0, z_loss_coef=1.0))
    loss.backward()
    routers = [name for name, _ in model.named_parameters() if ".router." in name]
    assert routers == ["layers.1.mlp.router.weight", "layers.2.mlp.router.weight"]
    for name, param in model.named_parameters():
        if ".router." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif name.startswith(("layers.2.mlp.experts.", "norm.", "lm_head.")):
            assert param.grad is None or not param.grad.any(), name  # after the last router: untouched


def test_tracker_sums_micro_batches_and_resets():
    model = tiny_moe_model()
    tracker = ExpertLoadTracker(model)
    assert tracker.layer_indices == [1, 2]
    expected = [torch.zeros(8) for _ in tracker.layers]
    for batch in range(3):
        model(torch.randint(0, 64, (2, 5 + batch)))
        for total, layer in zip(expected, model.moe_layers()):
            total += layer.last_tokens_per_expert.float()  # no capacity limit: computed = chosen
    model.eval()
    model(torch.randint(0, 64, (2, 9)))  # validation forward: not counted
    loads = tracker.take()
    for load, total in zip(loads, expected):
        torch.testing.assert_close(load, total, rtol=0, atol=0)
        assert float(load.sum()) == 2 * (5 + 6 + 7) * 2  # tokens * top_k
    assert all(float(load.sum()) == 0 for load in tracker.take())
    tracker.close()
    model.train()
    model(torch.randint(0, 64, (2, 4)))
    assert all(float(load.sum()) == 0 for load in tracker.take())


def test_tracker_ignores_checkpoint_recomputation():
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, expert_dim=8))
    for p in moe.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 10, 16, requires_grad=True)
    with ExpertLoadTracker(Stack(moe)) as tracker:
        checkpoint(moe, x, use_reentrant=False).sum().backward()
        assert float(tracker.take()[0].sum()) == 10 * 2


def test_bias_update_direction_and_magnitude():
    model = tiny_moe_model(num_experts=4, router_bias=True)
    loads = [torch.tensor([10.0, 2.0, 4.0, 0.0]), torch.tensor([4.0, 4.0, 4.0, 4.0])]  # means 4 and 4
    update_routing_bias(model, loads, 0.125)
    first, second = (layer.router.selection_bias for layer in model.moe_layers())
    assert first.tolist() == [-0.125, 0.125, 0.0, 0.125]
    assert second.tolist() == [0.0, 0.0, 0.0, 0.0]
    update_routing_bias(model, loads, 0.125)
    assert first.tolist() == [-0.25, 0.25, 0.0, 0.25]


def test_bias_changes_selection_not_gate_weights():
    model = tiny_moe_model(num_experts=4, router_bias=True, score_func="sigmoid")
    layer = next(model.moe_layers())
    with torch.no_grad():
        layer.router.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    x = torch.randn(6, 32)
    logits, weights, ids = layer.router(x)
    assert (ids == 3).any(dim=1).all()  # the bias forces expert 3 into every token's top-2
    torch.testing.assert_close(weights, logits.sigmoid().gather(1, ids))


def test_bias_update_needs_router_bias():
    model = tiny_moe_model(num_experts=4)
    loads = [torch.ones(4), torch.ones(4)]
    update_routing_bias(model, loads, 0.0)  # rate 0: nothing to do, no error
    with pytest.raises(HanlinError, match=r"moe.router_bias: true"):
        update_routing_bias(model, loads, 0.01)


def collapsed_router_model() -> Transformer:
    """Most tokens prefer experts 0 and 1: the embeddings share a direction u that those routers favour."""
    model = tiny_moe_model(router_bias=True, score_func="sigmoid")
    u = torch.randn(32, generator=torch.Generator().manual_seed(0))
    u = u / u.norm()
    with torch.no_grad():
        model.embed_tokens.weight += 0.3 * u
        for layer in model.moe_layers():
            layer.router.weight[0] += 4.0 * u
            layer.router.weight[1] += 2.8 * u
    return model


def train_max_load(rate: float, steps: int = 40) -> list[float]:
    """Max load (mean over the MoE layers) of each step of a short AdamW run on random tokens."""
    model = collapsed_router_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)
    history = []
    with ExpertLoadTracker(model) as tracker:
        for _ in range(steps):
            ids = torch.randint(0, 64, (8, 33), generator=data)
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loads = tracker.take()
            update_routing_bias(model, loads, rate)
            metrics = expert_load_metrics(loads, tracker.layer_indices)
            history.append(sum(metrics[f"moe/layer{i}/max_load"] for i in tracker.layer_indices) / 2)
    return history


def test_aux_loss_free_bias_reduces_imbalance_of_a_collapsed_router():
    without = train_max_load(0.0)
    with_bias = train_max_load(0.01)
    assert without[0] == with_bias[0] > 2.5  # balanced would be 1.0; 4.0 = all slots on 2 of 8 experts
    late_without = sum(without[-10:]) / 10  # training on its own makes the collapse worse (measured ~3.5)
    late_with = sum(with_bias[-10:]) / 10  # (measured ~1.7)
    assert late_without > 3.0
    assert late_with < min(0.65 * late_without, 0.8 * with_bias[0])


# ---- capacity factor and recycle routing ------------------------------------------------------------------


def skewed_moe(capacity_factor: float | None, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(16, MoEConfig(num_experts=8, top_k=2, expert_dim=8, capacity_factor=capacity_factor))
    for p in moe.parameters():
        nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        moe.router.weight[0] += 1.5  # tokens with a positive mean lean towards experts 0 and 1
        moe.router.weight[1] += 1.0
    return moe.double()


def skewed_tokens(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, n, 16, generator=g) + 0.5).double()


def reference_capacity_output(moe: MoE, x_BTD: torch.Tensor, routed: list[list[int]]) -> torch.Tensor:
    """Each token through the experts it was routed to, weighted by the score of the expert it first chose."""
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
    scores = (x_ND.float() @ moe.router.weight.float().T).softmax(-1)
    chosen = scores.topk(moe.top_k, dim=-1)
    rows = []
    for n in range(x_ND.shape[0]):
        row = torch.zeros_like(x_ND[n])
        for j, expert in enumerate(routed[n]):
            if expert >= 0:
                row = row + chosen.values[n, j].to(x_ND.dtype) * moe.experts[expert](x_ND[n : n + 1])[0]
        rows.append(row)
    return torch.stack(rows).view_as(x_BTD)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_caps_experts_and_recycles_overflow(capacity_factor: float):
    N, k, E = 40, 2, 8
    C = math.ceil(capacity_factor * N * k / E)
    moe = skewed_moe(capacity_factor)
    x = skewed_tokens(N).requires_grad_(True)
    torch.manual_seed(5)
    out = moe(x)
    chosen = moe.last_expert_ids.tolist()
    routed = moe.last_routed_ids.tolist()

    # The router's first choices are served before second choices, each rank in token order.
    used = [0] * E
    kept = [[False] * k for _ in range(N)]
    for j in range(k):
        for n in range(N):
            if used[chosen[n][j]] < C:
                used[chosen[n][j]] += 1
                kept[n][j] = True
    assert max(used) == C  # the router is skewed enough to overflow
    final = [sum(row.count(e) for row in routed) for e in range(E)]
    assert max(final) <= C
    assert final == moe.last_tokens_per_expert.tolist()
    rerouted = dropped = 0
    for n in range(N):
        live = [e for e in routed[n] if e >= 0]
        assert len(live) == len(set(live))  # never the same expert twice for a token
        for j in range(k):
            if kept[n][j]:
                assert routed[n][j] == chosen[n][j]
            elif routed[n][j] >= 0:
                rerouted += 1
                assert routed[n][j] not in chosen[n]  # a new expert, one that had room
            else:
                dropped += 1
                # Dropped only when every expert this token could still use was full.
                assert all(final[e] == C for e in range(E) if e not in chosen[n] and e not in routed[n])
    assert (rerouted, dropped) == (moe.last_rerouted, moe.last_dropped)
    _, metrics = moe_aux_loss(Stack(moe), settings())
    assert metrics["moe/rerouted_fraction"] == rerouted / (N * k)
    assert metrics["moe/dropped_fraction"] == dropped / (N * k)
    assert rerouted > 0
    if capacity_factor < 1:
        assert dropped >= N * k - C * E

    # Forward and backward equal the slot-by-slot reference (rerouted slots keep their first gate weight).
    x_ref = x.detach().clone().requires_grad_(True)
    expected = reference_capacity_output(moe, x_ref, routed)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    params = [moe.router.weight, moe.experts[0].down_proj.weight]
    grads = torch.autograd.grad(out, [x, *params], grad_out)
    grads_ref = torch.autograd.grad(expected, [x_ref, *params], grad_out)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_recycle_routing_is_deterministic_given_the_seed():
    moe = skewed_moe(0.75)
    x = skewed_tokens(64)
    torch.manual_seed(11)
    first = moe(x)
    first_routed = moe.last_routed_ids.clone()
    torch.manual_seed(11)
    second = moe(x)
    assert torch.equal(first_routed, moe.last_routed_ids) and torch.equal(first, second)


def test_capacity_is_training_only():
    limited, unlimited = skewed_moe(0.5), skewed_moe(None)
    unlimited.load_state_dict(limited.state_dict())
    x = skewed_tokens(40)
    limited.eval(), unlimited.eval()
    assert torch.equal(limited(x), unlimited(x))
    assert limited.last_dropped == limited.last_rerouted == 0
    assert torch.equal(limited.last_routed_ids, limited.last_expert_ids)
    unlimited.train()
    assert torch.equal(unlimited(x), limited(x))  # no capacity configured: training routes as serving does


def test_capacity_factor_must_be_positive():
    with pytest.raises(HanlinError, match="capacity_factor"):
        MoEConfig(num_experts=4, top_k=2, expert_dim=8, capacity_factor=0.0)
    config = ModelConfig.from_dict({**tiny_moe_model().config.to_dict(), "moe": {
        "num_experts": 4, "top_k": 2, "expert_dim": 8, "capacity_factor": 1.5}})
    assert config.moe.capacity_factor == 1.5


# ---- expert learning rate and load statistics -----------------------------------------------------------


def test_expert_lr_multiplier():
    config = tiny_moe_model().config  # 2 of 8 experts
    assert expert_lr_multiplier(config, settings(expert_lr_scale=1.0)) == 1.0
    assert expert_lr_multiplier(config, settings(expert_lr_scale=0.3)) == 0.3
    assert expert_lr_multiplier(config, settings(expert_lr_scale="auto")) == pytest.approx(0.5)  # sqrt(2/8)
    assert expert_lr_multiplier(config, settings(expert_lr_scale="2")) == 2.0
    dense = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)
    assert expert_lr_multiplier(dense, settings(expert_lr_scale="auto")) == 1.0
    for bad in ("fast", -1.0, 0, float("nan")):
        with pytest.raises(HanlinError, match=r"moe.expert_lr_scale must be a positive number or \"auto\""):
            expert_lr_multiplier(config, settings(expert_lr_scale=bad))


def test_is_expert_parameter_selects_routed_experts_only():
    model = tiny_moe_model(shared_expert_dim=8)
    names = [name for name, _ in model.named_parameters()]
    experts = [name for name in names if is_expert_parameter(name)]
    assert experts and all(".mlp.experts." in name for name in experts)
    assert len(experts) == 2 * 8 * 2  # 2 MoE layers x 8 experts x (gate_up, down)
    assert not any(is_expert_parameter(name) for name in names if "shared_expert" in name or "router" in name)
    assert is_expert_parameter("module.layers.1.mlp.experts.0.down_proj.weight")


def test_expert_load_metrics():
    metrics = expert_load_metrics([torch.tensor([6.0, 2.0, 0.0, 0.0]), torch.zeros(4), torch.ones(4)], [1, 2, 4])
    # fractions [.75, .25, 0, 0]: max .75 * 4 = 3; population std of the fractions 0.306186 over mean .25
    assert metrics["moe/layer1/max_load"] == pytest.approx(3.0)
    assert metrics["moe/layer1/cv"] == pytest.approx(math.sqrt(((0.5**2) + 0 + 2 * (0.25**2)) / 4) / 0.25)
    assert metrics["moe/layer1/load"] == [0.75, 0.25, 0.0, 0.0]
    assert not any(key.startswith("moe/layer2/") for key in metrics)  # routed nothing
    assert metrics["moe/layer4/max_load"] == pytest.approx(1.0) and metrics["moe/layer4/cv"] == 0.0

"""Keeping MoE experts balanced while training: balancing losses, auxiliary-loss-free routing bias, expert-load
counts and statistics, and the routed experts' learning-rate multiplier.

Each rule names the paper it follows. Every function takes the model (anything with `moe_layers()`, e.g.
hanlin.models.transformer.Transformer) and reads what each MoE layer kept from its latest forward
(`last_router_logits`, `last_expert_ids`); none of this runs during inference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from hanlin.config import ModelConfig
from hanlin.errors import HanlinError
from hanlin.models.moe import MoE

if TYPE_CHECKING:
    from hanlin.train.config import MoETrainConfig  # noqa: F401  (the settings these functions are given)


class _HasMoELayers(Protocol):
    def moe_layers(self) -> Iterator[MoE]: ...


def moe_aux_loss(model: _HasMoELayers, settings: MoETrainConfig) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The weighted balancing terms of the latest forward: (aux_loss_coef * LB + z_loss_coef * Z, metrics).

    LB, the load-balancing loss (Switch Transformer, Fedus et al. 2021, eq. 4; the form Mixtral and OLMoE
    train with): per MoE layer, E * sum_i f_i * P_i, where f_i is the fraction of the N*k routed slots whose
    top-k choice was expert i (the router's choice, before any capacity limit) and P_i the mean over tokens
    of expert i's router probability — softmax probabilities for score_func "softmax", sigmoid scores
    normalised to sum to 1 per token for "sigmoid" (DeepSeek-V3's form). f is a count and carries no
    gradient; P does, which pushes probability away from over-used experts. Perfect balance gives 1.0 for any
    E and k. (Hugging Face's load_balancing_loss_func sums the top-k ranks separately, so it reports k times
    this value, and it pools all layers' tokens where this averages the layers' losses.)

    Z, the router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): per layer, the mean over tokens of
    logsumexp(logits)^2, which keeps router logits small and the softmax numerically stable.

    Both are averaged over the MoE layers. Every token of the forward counts, padding and positions whose
    label is ignored included: the router saw them and routed them, and they take expert capacity the same.

    Returns (None, metrics) when both coefficients are 0 and (None, {}) for a model without MoE layers.
    Metrics: moe/aux_loss and moe/z_loss (unweighted, layer means) and the two coefficients; with a capacity
    factor configured, also moe/rerouted_fraction and moe/dropped_fraction (of all layers' routed slots).
    """
    layers = list(model.moe_layers())
    if not layers:
        return None, {}
    aux_coef, z_coef = float(settings.aux_loss_coef), float(settings.z_loss_coef)
    wants_loss = aux_coef != 0.0 or z_coef != 0.0
    with torch.set_grad_enabled(wants_loss and torch.is_grad_enabled()):
        balance_terms, z_terms = [], []
        for layer in layers:
            logits_NE, ids_NK = layer.last_router_logits, layer.last_expert_ids
            if logits_NE is None or ids_NK is None:
                raise RuntimeError("moe_aux_loss reads the latest forward: run the model first")
            balance_terms.append(load_balancing_loss(logits_NE, ids_NK, layer.router.moe.score_func))
            z_terms.append(router_z_loss(logits_NE))
        aux = torch.stack(balance_terms).mean()
        z = torch.stack(z_terms).mean()
    metrics = {
        "moe/aux_loss": float(aux.detach()),
        "moe/z_loss": float(z.detach()),
        "moe/aux_loss_coef": aux_coef,
        "moe/z_loss_coef": z_coef,
    }
    if any(layer.capacity_factor is not None for layer in layers):
        slots = sum(layer.last_expert_ids.numel() for layer in layers)
        metrics["moe/rerouted_fraction"] = sum(layer.last_rerouted for layer in layers) / slots
        metrics["moe/dropped_fraction"] = sum(layer.last_dropped for layer in layers) / slots
    if not wants_loss:
        return None, metrics
    return aux_coef * aux + z_coef * z, metrics


def load_balancing_loss(logits_NE: torch.Tensor, ids_NK: torch.Tensor, score_func: str) -> torch.Tensor:
    """One layer's E * sum_i f_i * P_i (see moe_aux_loss)."""
    N, E = logits_NE.shape
    logits_NE = logits_NE.float()
    if score_func == "softmax":
        probs_NE = logits_NE.softmax(dim=-1)
    else:
        scores_NE = logits_NE.sigmoid()
        probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
    fraction_E = torch.bincount(ids_NK.reshape(-1), minlength=E).to(probs_NE.dtype) / ids_NK.numel()
    return E * (fraction_E * probs_NE.mean(dim=0)).sum()


def router_z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """One layer's mean over tokens of logsumexp(logits)^2 (see moe_aux_loss)."""
    return torch.logsumexp(logits_NE.float(), dim=-1).square().mean()


class ExpertLoadTracker:
    """Counts the slots each expert was chosen for, per MoE layer, over every forward (micro-batch) until
    `take()`; the counts feed the routing-bias update and the load statistics.

    Forward hooks on the MoE modules do the counting, so a model without a tracker pays nothing. It counts the
    router's top-k choice (`last_expert_ids`, before any capacity limit: the demand the bias must balance);
    forwards in eval mode are skipped unless `training_only=False`, so validation between steps does not mix
    in; re-running a forward inside backward (activation checkpointing's recomputation) is not counted twice.
    `layer_indices` are the transformer block indices of the tracked layers (for naming metrics).
    """

    def __init__(self, model: nn.Module, *, training_only: bool = True) -> None:
        self.layers: list[MoE] = list(model.moe_layers())  # type: ignore[operator]
        blocks = getattr(model, "layers", [])
        block_indices = [i for i, block in enumerate(blocks) if isinstance(getattr(block, "mlp", None), MoE)]
        self.layer_indices = block_indices if len(block_indices) == len(self.layers) else list(range(len(self.layers)))
        self.training_only = training_only
        self._counts = [torch.zeros(layer.num_experts, dtype=torch.int64) for layer in self.layers]
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int):
        def count(module: MoE, inputs: Any, output: Any) -> None:
            if self.training_only and not module.training:
                return
            if torch._C._current_graph_task_id() != -1:  # inside backward: a checkpointed forward being re-run
                return
            ids = module.last_expert_ids.reshape(-1)
            counts = self._counts[index]
            if counts.device != ids.device:
                counts = self._counts[index] = counts.to(ids.device)
            counts += torch.bincount(ids, minlength=module.num_experts)

        return count

    def take(self) -> list[torch.Tensor]:
        """Slots per expert ([E] float, one tensor per MoE layer) since the last take, summed over ranks when
        torch.distributed is initialised (a collective: call it on every rank at the same step); resets."""
        counts, self._counts = self._counts, [torch.zeros_like(c) for c in self._counts]
        if dist.is_available() and dist.is_initialized() and counts:
            flat = torch.cat(counts)
            dist.all_reduce(flat)
            counts = list(flat.split([c.numel() for c in counts]))
        return [c.float() for c in counts]

    def close(self) -> None:
        """Removes the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ExpertLoadTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@torch.no_grad()
def update_routing_bias(model: _HasMoELayers, loads: Sequence[torch.Tensor], rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3, Liu et al. 2024, §2.1.2; Wang et al. 2024, "Auxiliary-
    Loss-Free Load Balancing Strategy for Mixture-of-Experts"): after each step, every MoE layer's
    selection bias moves by `rate` towards balance, bias_i += rate * sign(mean(load) - load_i): overloaded
    experts become less likely to be chosen, underloaded ones more. The bias only changes which experts
    are chosen, never the gate weights of those chosen (hanlin.models.moe.Router). `loads` come from
    ExpertLoadTracker.take() (identical on every rank, so the biases stay identical).
    """
    if rate == 0:
        return
    layers = list(model.moe_layers())
    if len(loads) != len(layers):
        raise ValueError(f"got loads for {len(loads)} MoE layers, the model has {len(layers)}")
    if any(layer.router.selection_bias is None for layer in layers):
        raise HanlinError(
            "moe.bias_update_rate > 0 needs a routing bias: set `moe.router_bias: true` in the model config "
            "(or set the bias update rate to 0)"
        )
    for layer, load_E in zip(layers, loads):
        bias_E = layer.router.selection_bias
        load_E = load_E.to(device=bias_E.device, dtype=torch.float32)
        bias_E += (rate * torch.sign(load_E.mean() - load_E)).to(bias_E.dtype)


def expert_lr_multiplier(config: ModelConfig, settings: MoETrainConfig) -> float:
    """The learning-rate multiplier of the routed experts' parameters (see is_expert_parameter).

    `settings.expert_lr_scale` is either a positive number, used as is, or "auto": sqrt(top_k / num_experts).

    Why "auto" is that rule: a routed expert sees about top_k / E of the batch's tokens (exactly that when
    balanced), so its gradient is a mean over a k/E-times smaller effective batch. With Adam the step size does
    not shrink with the gradient (the update is normalised), but the gradient is noisier, and the optimal
    Adam learning rate grows like the square root of the batch size while the batch is below the noise scale
    (Malladi et al. 2022, the square-root scaling rule for adaptive methods; Li et al. 2024, "Surge
    phenomenon in optimal learning rate and batch size scaling"). Hunyuan-Large (Sun et al. 2024,
    "expert-specific learning rate scaling") applies that relation to give its specialised experts, which
    see 1/16 of the tokens, a lower learning rate than the shared expert. So the experts' learning rate
    is the dense parameters' times sqrt(k / E): 0.5 for 2 of 8 experts, 0.25 for 1 of 16. Shared experts
    see every token and keep the base rate. (The opposite heuristic, raising the expert rate by
    sqrt(E / k), fits plain SGD on a loss summed over tokens, where an expert's gradient is k/E times
    smaller; AdamW's normalisation removes that effect.) A dense model gets 1.0 for "auto".
    """
    scale = settings.expert_lr_scale
    if isinstance(scale, str):
        text = scale.strip().lower()
        if text == "auto":
            if config.moe is None:
                return 1.0
            return math.sqrt(config.moe.top_k / config.moe.num_experts)
        try:
            scale = float(text)
        except ValueError:
            raise HanlinError(f"moe.expert_lr_scale must be a positive number or \"auto\", got {scale!r}") from None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise HanlinError(f"moe.expert_lr_scale must be a positive number or \"auto\", got {scale!r}")
    return float(scale)


def is_expert_parameter(name: str) -> bool:
    """True for a routed expert's weight (`layers.{i}.mlp.experts.{e}.…`, under any wrapper prefix such as
    DDP's `module.` or torch.compile's `_orig_mod.`); shared experts and routers are not routed experts."""
    return ".mlp.experts." in f".{name}"


def expert_load_metrics(
    loads: Sequence[torch.Tensor], layer_indices: Sequence[int] | None = None
) -> dict[str, float | list[float]]:
    """Per MoE layer i (its block index from `layer_indices`, else its position in `loads`):
    moe/layer{i}/max_load — the busiest expert's fraction of the slots times E (1.0 = perfectly balanced,
    E = every slot on one expert); moe/layer{i}/cv — coefficient of variation of the per-expert counts
    (population standard deviation / mean; 0 = balanced); moe/layer{i}/load — every expert's fraction.
    Layers that routed nothing are left out."""
    if layer_indices is not None and len(layer_indices) != len(loads):
        raise ValueError(f"{len(layer_indices)} layer indices for {len(loads)} loads")
    metrics: dict[str, float | list[float]] = {}
    for position, load_E in enumerate(loads):
        load_E = load_E.detach().double().cpu()
        total = float(load_E.sum())
        if total <= 0:
            continue
        i = position if layer_indices is None else layer_indices[position]
        fraction_E = load_E / total
        metrics[f"moe/layer{i}/max_load"] = float(fraction_E.max()) * load_E.numel()
        metrics[f"moe/layer{i}/cv"] = float(fraction_E.std(correction=0) / fraction_E.mean())
        metrics[f"moe/layer{i}/load"] = fraction_E.tolist()
    return metrics

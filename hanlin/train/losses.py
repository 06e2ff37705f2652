"""Language-modelling loss over packed rows: summed token cross-entropy plus the MoE balancing terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hanlin.train.batch import IGNORE_INDEX, LMBatch, LossOutput
from hanlin.train.config import MoETrainConfig
from hanlin.train.distributed import unwrap


def lm_loss(model: nn.Module, batch: LMBatch, moe_settings: MoETrainConfig | None = None) -> LossOutput:
    """Sum of next-token cross-entropy over labels != IGNORE_INDEX (items: their count). For MoE models
    the load-balancing and z-losses of this forward (weighted by `moe_settings`, default coefficients when
    None) come back as extra_loss and their values in metrics."""
    logits_BTV = model(batch.input_ids, document_ids=batch.document_ids)
    loss_sum, items = token_cross_entropy(logits_BTV, batch.labels)
    extra, metrics = None, {}
    inner = unwrap(model)
    if any(True for _ in inner.moe_layers()):
        from hanlin.train.moe_balance import moe_aux_loss

        extra, metrics = moe_aux_loss(inner, moe_settings or MoETrainConfig())
    return LossOutput(loss_sum, items, extra, metrics)


def token_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy in fp32, number of target tokens)."""
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1]).float()
    labels_N = labels_BT.reshape(-1)
    loss_sum = F.cross_entropy(logits_NV, labels_N, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((labels_N != IGNORE_INDEX).sum())


def lm_loss_with(settings: MoETrainConfig):
    """lm_loss bound to a config's MoE coefficients (the LossFn that pretraining hands the Trainer)."""

    def loss_fn(model: nn.Module, batch: LMBatch) -> LossOutput:
        return lm_loss(model, batch, settings)

    return loss_fn

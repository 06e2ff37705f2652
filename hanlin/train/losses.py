"""Language-modelling loss over packed rows: summed token cross-entropy plus the MoE balancing terms."""

from __future__ import annotations

from torch import nn

from hanlin.train.batch import LMBatch, LossOutput
from hanlin.train.config import MoETrainConfig
from hanlin.train.distributed import unwrap


def lm_loss(model: nn.Module, batch: LMBatch, moe_settings: MoETrainConfig | None = None) -> LossOutput:
    """Sum of next-token cross-entropy over labels != IGNORE_INDEX (items: their count). For MoE models
    the load-balancing and z-losses of this forward (weighted by `moe_settings`, default coefficients when
    None) come back as extra_loss and their values in metrics."""
    loss_sum = model(batch.input_ids, document_ids=batch.document_ids, labels=batch.labels)
    items = batch.items
    extra, metrics = None, {}
    inner = unwrap(model)
    if any(True for _ in inner.moe_layers()):
        from hanlin.train.moe_balance import moe_aux_loss

        extra, metrics = moe_aux_loss(inner, moe_settings or MoETrainConfig())
    return LossOutput(loss_sum, items, extra, metrics)


def lm_loss_with(settings: MoETrainConfig):
    """lm_loss bound to a config's MoE coefficients (the LossFn that pretraining hands the Trainer)."""

    def loss_fn(model: nn.Module, batch: LMBatch) -> LossOutput:
        return lm_loss(model, batch, settings)

    return loss_fn

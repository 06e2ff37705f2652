"""What flows from the data side of training into the loop: micro-batches and the loss functions over them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

IGNORE_INDEX = -100  # label of a position that carries no loss


@dataclass
class LMBatch:
    """Packed rows for next-token prediction: labels[b, t] is the token that should follow input_ids[b, t]."""

    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, IGNORE_INDEX where there is no target
    document_ids: torch.Tensor | None = None  # [B, T] int64; equal ids = one document (None: one per row)

    @property
    def items(self) -> int:
        """Target tokens: the LossOutput.items of language modelling, known before the forward pass."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> LMBatch:
        docs = None if self.document_ids is None else self.document_ids.to(device)
        return LMBatch(self.input_ids.to(device), self.labels.to(device), docs)


class BatchSource(Protocol):
    """An endless, deterministic stream of this rank's micro-batches whose position can be saved and restored."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class LossOutput:
    """One micro-batch's loss, in a form the loop can normalise exactly over a global batch.

    loss_sum / items is the micro-batch's mean loss (items: target tokens for language modelling, pairs for
    DPO); the loop divides the sum by the global batch's items (all micro-batches, all ranks), so gradients
    match whatever way the batch is split. extra_loss (MoE balancing, already weighted) is a per-micro-batch
    mean added with weight 1 / micro-batches. A batch that knows its item count before the forward (an int
    `items` attribute, as LMBatch has) lets the loop scale each micro-batch's loss up front; for a batch without
    one the loop rescales the summed gradients afterwards, which needs extra_loss to be None.
    """

    loss_sum: torch.Tensor
    items: int
    extra_loss: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # logged as the mean over the step's micro-batches


LossFn = Callable[[nn.Module, Any], LossOutput]

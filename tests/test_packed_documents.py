"""Packed training rows: document_ids keep attention and positions inside each document."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hanlin.config import ModelConfig, MoEConfig
from hanlin.models.transformer import Transformer


def tiny(moe: bool = False, window: int | None = None) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
        sliding_window=window, moe=MoEConfig(num_experts=4, top_k=2, expert_dim=16) if moe else None,
    )
    model = Transformer(config).double()
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    return model.eval()


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_packed_row_equals_each_document_alone(moe: bool, window: int | None) -> None:
    model = tiny(moe, window)
    docs = [torch.randint(0, 97, (1, n)) for n in (5, 1, 7)]
    packed = torch.cat(docs, dim=1)
    ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    out = model(packed, document_ids=ids)
    start = 0
    for doc in docs:
        alone = model(doc)
        assert torch.allclose(out[:, start : start + doc.shape[1]], alone, atol=1e-12)
        start += doc.shape[1]


def test_two_rows_with_different_boundaries() -> None:
    model = tiny()
    a, b, c = (torch.randint(0, 97, (1, n)) for n in (4, 6, 10))
    rows = torch.cat([torch.cat([a, b], 1), c], 0)
    ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    out = model(rows, document_ids=ids)
    assert torch.allclose(out[0, 4:], model(b)[0], atol=1e-12)
    assert torch.allclose(out[1], model(c)[0], atol=1e-12)


def test_document_ids_refuse_a_cache_or_padding_mask() -> None:
    model = tiny()
    x = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="document_ids"):
        model(x, attention_mask=torch.ones(1, 4), document_ids=torch.zeros(1, 4, dtype=torch.long))

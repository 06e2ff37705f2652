"""Perplexity: windows, the scoring formula, and a model whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import tiny_model
from hanlin.config import ModelConfig
from hanlin.eval.perplexity import model_logits, perplexity, windows


def test_windows_split_without_overlap_and_drop_a_lone_last_token() -> None:
    assert list(windows(list(range(10)), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(windows(list(range(9)), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(windows(list(range(100)), 10, max_windows=3)) == [list(range(10)), list(range(10, 20)), list(range(20, 30))]
    with pytest.raises(ValueError):
        list(windows([1, 2, 3], 1))


def test_uniform_predictions_give_the_vocabulary_size() -> None:
    result = perplexity(lambda chunk: torch.zeros(len(chunk), 50), list(range(40)), window=16)
    assert result.perplexity == pytest.approx(50.0, rel=1e-5)
    assert (result.scored_tokens, result.windows) == (15 + 15 + 7, 3)


def test_tiny_model_perplexity_matches_a_direct_cross_entropy() -> None:
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model = tiny_model(config, std=0.1)
    ids = torch.randint(0, 64, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    result = perplexity(model_logits(model), ids, window=20)
    nll = []
    with torch.inference_mode():
        for start in (0, 20, 40):
            chunk = torch.tensor([ids[start : start + 20]])
            logits = model(chunk)[0]
            nll.append(F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="none"))
    expected = math.exp(torch.cat(nll).mean().item())
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.scored_tokens == 19 + 19 + 9


def test_too_short_text_is_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        perplexity(lambda chunk: torch.zeros(len(chunk), 5), [7], window=8)

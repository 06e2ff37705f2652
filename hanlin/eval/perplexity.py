"""Perplexity of a causal LM over a token stream, scored in independent windows.

Each window of `window` tokens is run from an empty context and every token but its first is scored, so the
number depends only on the model and the window, and llama.cpp (or any engine that returns logits) can be
scored the same way for a like-for-like comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# token ids [T] → fp32 logits [T, V] of one window run from an empty context
WindowLogits = Callable[[list[int]], torch.Tensor]


@dataclass
class Perplexity:
    perplexity: float
    mean_nll: float  # nats per scored token
    scored_tokens: int
    windows: int


def windows(token_ids: list[int], window: int, max_windows: int | None = None) -> Iterator[list[int]]:
    """Consecutive, non-overlapping windows; a final window shorter than 2 tokens is dropped."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    count = 0
    for start in range(0, len(token_ids), window):
        chunk = token_ids[start : start + window]
        if len(chunk) < 2 or (max_windows is not None and count >= max_windows):
            return
        count += 1
        yield chunk


def perplexity(logits_of: WindowLogits, token_ids: list[int], window: int = 512, max_windows: int | None = None) -> Perplexity:
    total_nll, scored, count = 0.0, 0, 0
    for chunk in windows(token_ids, window, max_windows):
        logits_TV = logits_of(chunk).float()
        targets = torch.tensor(chunk[1:])
        total_nll += F.cross_entropy(logits_TV[:-1], targets, reduction="sum").item()
        scored += len(chunk) - 1
        count += 1
    if scored == 0:
        raise ValueError("the text is too short to score: it needs at least 2 tokens")
    mean = total_nll / scored
    return Perplexity(math.exp(mean), mean, scored, count)


def model_logits(model: torch.nn.Module) -> WindowLogits:
    """Window logits from a hanlin Transformer (one plain forward, no KV cache)."""

    @torch.inference_mode()
    def logits_of(chunk: list[int]) -> torch.Tensor:
        return model(torch.tensor([chunk]))[0]

    return logits_of

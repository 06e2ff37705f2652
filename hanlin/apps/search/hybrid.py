"""Reciprocal-rank fusion: merge ranked lists by summing 1 / (k + rank) (Cormack et al., 2009)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from hanlin.apps.search.lexical import cjk_fraction

RRF_K = 60
CANDIDATES = 50  # how deep each ranking is taken before fusing


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], *, k: int = RRF_K,
                           weights: Sequence[float] | None = None) -> list[tuple[Hashable, float]]:
    """(item, fused score) best first; an item missing from a ranking gets nothing from it.

    Ties keep the order in which items first appear (the first ranking wins), so fusion is deterministic.
    """
    weights = list(weights) if weights is not None else [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError("one weight per ranking")
    scores: dict[Hashable, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    order = {item: position for position, item in enumerate(scores)}
    return sorted(scores.items(), key=lambda pair: (-pair[1], order[pair[0]]))


ENGLISH_ONLY_MODELS = frozenset({"all-MiniLM-L6-v2"})


def dense_weight(query: str, model: str) -> float:
    """How much the dense ranking counts in hybrid fusion.

    all-MiniLM-L6-v2's vocabulary maps most Chinese characters to [UNK], so its vectors of Chinese text
    are close to noise (dense recall@1 2/15 on our Chinese questions, against 15/15 for jieba BM25) and
    fusing them in hurts (hybrid 9/15): its share shrinks with the query's share of CJK letters.
    """
    return 1.0 - cjk_fraction(query) if model in ENGLISH_ONLY_MODELS else 1.0

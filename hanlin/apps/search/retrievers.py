"""Combining retrievers and the hits of several queries, and fitting passages into a token budget."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace

from hanlin.apps.search.errors import SearchError
from hanlin.apps.search.types import Passage, Retriever

MAX_PASSAGE_TOKENS = 500  # one passage longer than this is cut (at a sentence or word)


class MergedRetriever:
    """Several retrievers as one: their lists interleaved rank by rank (scores of different retrievers don't compare).

    A retriever that fails with a SearchError (an empty index, an unreachable web backend) is skipped while
    another one answers; when all fail, the first error is raised.
    """

    def __init__(self, retrievers: Sequence[Retriever]) -> None:
        if not retrievers:
            raise SearchError("no retriever to search: give an index or a web search URL")
        self.retrievers = list(retrievers)

    def search(self, query: str, k: int = 5) -> list[Passage]:
        results: list[list[Passage]] = []
        errors: list[SearchError] = []
        for retriever in self.retrievers:
            try:
                results.append(retriever.search(query, k))
            except SearchError as error:
                errors.append(error)
        if not results:
            raise errors[0]
        return interleave(results)[:k]


def passage_key(passage: Passage) -> tuple[object, ...]:
    if passage.chunk_id is not None:
        return ("chunk", passage.source, passage.chunk_id)
    return ("text", passage.source, passage.location, " ".join(passage.text.split())[:300])


def interleave(ranked_lists: Sequence[Sequence[Passage]]) -> list[Passage]:
    """Round-robin over the lists (first list first at each rank), each passage once."""
    merged: list[Passage] = []
    seen: set[tuple[object, ...]] = set()
    for rank in range(max((len(r) for r in ranked_lists), default=0)):
        for ranked in ranked_lists:
            if rank < len(ranked) and (key := passage_key(ranked[rank])) not in seen:
                seen.add(key)
                merged.append(ranked[rank])
    return merged


def select_passages(candidates: Sequence[Passage], *, max_passages: int, budget_tokens: int,
                    count_tokens: Callable[[str], int]) -> list[Passage]:
    """The first candidates that fit budget_tokens together (each cut to MAX_PASSAGE_TOKENS), at most max_passages."""
    chosen: list[Passage] = []
    left = budget_tokens
    for passage in candidates:
        if len(chosen) >= max_passages or left < 40:
            break
        text = truncate_to_tokens(passage.text, min(MAX_PASSAGE_TOKENS, left), count_tokens)
        if not text:
            continue
        left -= count_tokens(text) + 16  # + the delimiters and the title line
        chosen.append(replace(passage, text=text))
    return chosen


def truncate_to_tokens(text: str, limit: int, count_tokens: Callable[[str], int]) -> str:
    """text cut to at most limit tokens after its last whole sentence that fits (else a word), marked with '…'."""
    text = text.strip()
    if count_tokens(text) <= limit:
        return text
    kept = ""
    for piece in re.findall(r".+?(?:[.!?。！？](?=\s)|[。！？]|\n|$)\s*", text, re.DOTALL):
        if count_tokens(f"{kept}{piece}".rstrip() + " …") > limit:
            break
        kept += piece
    if not kept:  # the first sentence alone is too long: cut it at a word (a character for Chinese)
        joiner = " " if " " in text else ""
        units = text.split(" ") if joiner else list(text)
        low, high = 0, len(units)
        while low < high:  # the most units that fit
            middle = (low + high + 1) // 2
            if count_tokens(joiner.join(units[:middle]) + " …") <= limit:
                low = middle
            else:
                high = middle - 1
        kept = joiner.join(units[:low])
    return f"{kept.rstrip()} …" if kept.strip() else ""

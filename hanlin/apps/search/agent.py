"""The search agent: plan → search → read → answer → check citations, as a stream of events.

Two writers: "inline" gives the model every passage and asks for [n] citations in its answer (for models
that can cite); "per-source" asks about one passage at a time and cites each sentence with the passage it
came from (per_source.py; for small models, which can't bind numbers to passages). "auto" picks per-source
for a small model (hanlin.apps.search.llm.is_small_model) and inline otherwise; max_queries "auto" skips
the planner (1 query) for a small model, whose plans are mostly unusable, and allows 3 otherwise.

    for event in run("question", retriever=index, llm=LocalChatModel(hanlin.LLM("smollm2"))): ...
    result = ask("question", index="~/.local/share/hanlin/index.db")
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hanlin.apps.search.citations import NOT_FOUND_TEXT, CheckedAnswer, check_answer
from hanlin.apps.search.errors import EmptyIndexError, SearchError
from hanlin.apps.search.llm import is_small_model
from hanlin.apps.search.per_source import SENTENCE_MAX_TOKENS, write_per_source
from hanlin.apps.search.planner import make_plan
from hanlin.apps.search.prompts import per_source_overhead
from hanlin.apps.search.retrievers import MAX_PASSAGE_TOKENS, MergedRetriever, interleave, select_passages
from hanlin.apps.search.types import ChatModel, Event, Passage, Retriever
from hanlin.apps.search.writer import ANSWER_MAX_TOKENS, passage_budget, write_answer
from hanlin.errors import HanlinError

if TYPE_CHECKING:
    from hanlin.apps.search.index import SearchIndex
    from hanlin.llm import LLM

MAX_QUESTION_CHARS = 2000
MAX_QUERIES = 5  # the planner's sub-queries are bounded (one level, no recursion)
MAX_K = 8
MAX_READ_PASSAGES = 8
HIT_TEXT_CHARS = 300
WRITERS = ("auto", "per-source", "inline")


@dataclass
class SearchResult:
    question: str
    answer: str  # checked answer text with inline [n] citations (n = 1-based source number)
    sentences: list[dict[str, Any]]  # {"text", "citations": [int], "supported": bool}
    sources: list[Passage]  # sources[n-1] is citation [n]
    plan: list[str]  # the queries searched
    not_found: bool
    events: list[Event] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        cited = {n for s in self.sentences if s["supported"] for n in s["citations"]}
        return {
            "question": self.question, "answer": self.answer, "sentences": self.sentences,
            "sources": [{"id": n, **p.to_dict(), "cited": n in cited} for n, p in enumerate(self.sources, 1)],
            "plan": self.plan, "not_found": self.not_found, "usage": self.usage, "seconds": self.seconds,
        }


def run(question: str, *, retriever: Retriever, llm: ChatModel, max_queries: int | str = "auto", k: int = 4,
        context_tokens: int | None = None, temperature: float = 0.0,
        max_answer_tokens: int = ANSWER_MAX_TOKENS, writer: str = "auto") -> Iterator[Event]:
    """The steps of one search as events: plan, search×n, read, answer_delta×m, answer, sources, done.

    writer: "auto" | "per-source" | "inline"; max_queries: 1..5 or "auto" (see the module docstring).
    max_answer_tokens caps the whole answer (inline) or each sentence (per-source, at most 48).

    A mistake a user can fix (empty question, empty index, unreachable backend...) ends the stream with an
    `error` event instead of raising. Closing the generator early aborts the generation in progress.
    """
    try:
        yield from _steps(question, retriever, llm, max_queries, k, context_tokens, temperature, max_answer_tokens,
                          writer)
    except HanlinError as error:
        yield Event("error", {"message": " ".join(str(error).split()), "error": type(error).__name__})


def _steps(question: str, retriever: Retriever, llm: ChatModel, max_queries: int | str, k: int,
           context_tokens: int | None, temperature: float, max_answer_tokens: int, writer: str) -> Iterator[Event]:
    started = time.perf_counter()
    usage_start = (llm.prompt_tokens, llm.completion_tokens)
    question = _check_question(question)
    writer, max_queries = choose_writer(writer, llm), choose_max_queries(max_queries, llm)
    max_queries, k = max(1, min(max_queries, MAX_QUERIES)), max(1, min(k, MAX_K))
    check_not_empty(retriever)

    plan = make_plan(question, llm, max_queries=max_queries, temperature=temperature)
    yield Event("plan", {"queries": plan.queries, "fallback": plan.fallback})

    ranked_lists: list[list[Passage]] = []
    for i, query in enumerate(plan.queries):
        try:
            hits = retriever.search(query, k)
        except SearchError:
            if i == 0:  # the question's own search is the backbone: its failure is the run's
                raise
            hits = []  # a failed sub-query only loses its hits
        ranked_lists.append(hits)
        yield Event("search", {"query": query, "hits": [_hit(p) for p in hits]})

    if writer == "per-source":  # each passage is read alone: at most k of them, each within the context
        most = min(MAX_READ_PASSAGES, k)
        budget = most * _per_source_room(llm, question, min(max_answer_tokens, SENTENCE_MAX_TOKENS), context_tokens)
    else:
        most = min(MAX_READ_PASSAGES, k + len(plan.queries) - 1)
        budget = passage_budget(llm, question, answer_tokens=max_answer_tokens, context_tokens=context_tokens)
    passages = select_passages(interleave(ranked_lists), max_passages=most, budget_tokens=budget,
                               count_tokens=llm.count_tokens)
    yield Event("read", {"passages": [_numbered(n, p) for n, p in enumerate(passages, 1)]})

    pieces: list[str] = []
    if passages:
        if writer == "per-source":
            deltas = write_per_source(question, passages, llm, max_tokens=min(max_answer_tokens, SENTENCE_MAX_TOKENS),
                                      temperature=temperature)
        else:
            deltas = write_answer(question, passages, llm, max_tokens=max_answer_tokens, temperature=temperature)
        for delta in deltas:
            pieces.append(delta)
            yield Event("answer_delta", {"text": delta})
    checked = check_answer("".join(pieces), passages, question=question) if pieces else CheckedAnswer(NOT_FOUND_TEXT, [], True)
    yield Event("answer", {
        "text": checked.text, "sentences": checked.sentences, "not_found": checked.not_found,
        "dropped_citations": checked.dropped_citations, "raw_text": "".join(pieces), "writer": writer,
    })
    cited = checked.cited
    sources = [{**_numbered(n, p), "cited": n in cited} for n, p in enumerate(passages, 1)]
    yield Event("sources", {"sources": sources})
    yield Event("done", {
        "usage": {"prompt_tokens": llm.prompt_tokens - usage_start[0],
                  "completion_tokens": llm.completion_tokens - usage_start[1]},
        "seconds": round(time.perf_counter() - started, 3),
    })


def choose_writer(writer: str, llm: ChatModel) -> str:
    """The writer to use: per-source or inline as asked, or for "auto" per-source for a small model."""
    if writer not in WRITERS:
        raise SearchError(f"writer must be one of {', '.join(WRITERS)}, got {writer!r}")
    if writer == "auto":
        return "per-source" if is_small_model(llm) else "inline"
    return writer


def choose_max_queries(max_queries: int | str, llm: ChatModel) -> int:
    """The number of queries to plan: max_queries, or for "auto" 1 (no planner call) for a small model, else 3."""
    if max_queries == "auto":
        return 1 if is_small_model(llm) else 3
    if isinstance(max_queries, bool) or not isinstance(max_queries, int):
        raise SearchError(f"max_queries must be \"auto\" or a number from 1 to {MAX_QUERIES}, got {max_queries!r}")
    return max_queries


def _per_source_room(llm: ChatModel, question: str, answer_tokens: int, context_tokens: int | None) -> int:
    """Tokens one passage may take in a per-source prompt (with the question and the sentence's room)."""
    context = min(context_tokens or llm.context_tokens or 8192, llm.context_tokens or 8192)
    room = context - answer_tokens - llm.count_tokens(per_source_overhead(question)) - 64  # 64: chat markup
    return max(0, min(MAX_PASSAGE_TOKENS, room)) + 16  # + select_passages' allowance for delimiters


def _check_question(question: str) -> str:
    question = " ".join((question or "").split())
    if not question:
        raise SearchError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise SearchError(f"the question is {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
    return question


def check_not_empty(retriever: Retriever) -> None:
    """Fail before the planner spends model time when the only thing to search is an empty index."""
    chunk_count = getattr(retriever, "chunk_count", None)
    if callable(chunk_count) and chunk_count() == 0:
        where = getattr(retriever, "path", "")
        where = f" {where}" if where and where != ":memory:" else ""
        raise EmptyIndexError(f"the index{where} is empty: add documents with `hanlin index add PATH`")


def _hit(passage: Passage) -> dict[str, Any]:
    text = passage.text if len(passage.text) <= HIT_TEXT_CHARS else passage.text[: HIT_TEXT_CHARS - 1] + "…"
    return {"source": passage.source, "title": passage.title, "location": passage.location,
            "score": round(float(passage.score), 4), "text": text}


def _numbered(n: int, passage: Passage) -> dict[str, Any]:
    return {"id": n, "source": passage.source, "title": passage.title, "location": passage.location,
            "text": passage.text}


# ---- ask(): the Python entry point ----------------------------------------------------------------


def ask(question: str, *, index: str | Path | SearchIndex | None = None, web: str | None = None,
        llm: LLM | ChatModel | str | None = None, max_queries: int | str = "auto", k: int = 4,
        context_tokens: int | None = None, temperature: float = 0.0,
        max_answer_tokens: int = ANSWER_MAX_TOKENS, writer: str = "auto") -> SearchResult:
    """Answer question from an index (a path or a SearchIndex) and/or the web (a SearXNG URL), with checked citations.

    The options are run()'s. Raises SearchError (a HanlinError) for what a user can fix: no index and no
    web given, a missing or empty index, an empty question.
    """
    retriever, opened = open_retriever(index, web)
    try:
        model = chat_model(llm)
        events = list(_steps(question, retriever, model, max_queries, k, context_tokens, temperature,
                             max_answer_tokens, writer))
    finally:
        if opened is not None:
            opened.close()
    return result_from_events(question, events)


def result_from_events(question: str, events: list[Event]) -> SearchResult:
    """A SearchResult gathered from the events of one complete run (an error event raises SearchError)."""
    by_type: dict[str, Event] = {}
    for event in events:
        if event.type == "error":
            raise SearchError(event.data["message"])
        by_type[event.type] = event
    answer, done = by_type["answer"].data, by_type["done"].data
    sources = [Passage(text=s["text"], source=s["source"], title=s["title"], location=s["location"])
               for s in by_type["sources"].data["sources"]]
    return SearchResult(
        question=question, answer=answer["text"], sentences=answer["sentences"], sources=sources,
        plan=by_type["plan"].data["queries"], not_found=answer["not_found"], events=events,
        usage=done["usage"], seconds=done["seconds"],
    )


def open_retriever(index: str | Path | SearchIndex | None, web: str | None) -> tuple[Retriever, SearchIndex | None]:
    """The retriever for an index and/or a web backend, and the index this call opened (to close), if any."""
    retrievers: list[Retriever] = []
    opened = None
    if index is not None:
        if isinstance(index, (str, Path)):
            from hanlin.apps.search.index import SearchIndex

            path = Path(index).expanduser()
            if str(index) != ":memory:" and not path.is_file():
                raise SearchError(f"no index at {path}: create one with `hanlin index add PATH`")
            opened = SearchIndex(path)
            retrievers.append(opened)
        else:
            retrievers.append(index)
    if web:
        from hanlin.apps.search.web import WebRetriever

        retrievers.append(WebRetriever(web))
    if not retrievers:
        raise SearchError("nothing to search: give an index (index=PATH) or a SearXNG URL (web=URL)")
    return (retrievers[0] if len(retrievers) == 1 else MergedRetriever(retrievers)), opened


def chat_model(llm: LLM | ChatModel | str | None) -> ChatModel:
    """A ChatModel for llm: None → the embedded smollm2, a name/path → that model, an LLM → wrapped."""
    from hanlin.apps.search.llm import LocalChatModel

    if llm is None or isinstance(llm, str):
        return LocalChatModel(_load_llm(llm or "smollm2"))
    if hasattr(llm, "stream_chat"):
        return llm  # type: ignore[return-value]
    return LocalChatModel(llm)  # type: ignore[arg-type]


@lru_cache(maxsize=2)
def _load_llm(name: str) -> LLM:
    from hanlin.llm import LLM

    return LLM(name)

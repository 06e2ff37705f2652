"""`hanlin ask "question"`: AI search over the local index and/or the web, steps shown live, checked citations."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from hanlin.cli_index import IndexOption, default_index_path
from hanlin.cli_options import env_option

if TYPE_CHECKING:
    from hanlin.apps.search.types import Event

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)
SHOWN_HITS = 3


def ask(
    question: Annotated[str, typer.Argument(help="The question to answer from your documents (or the web).")],
    index: IndexOption = None,
    web: Annotated[str | None, env_option("--web", env="WEB", help="SearXNG URL to search the web too (or alone when there is no index).")] = None,
    model: Annotated[str, env_option("--model", "-m", env="MODEL", help="Model name (smollm2), .gguf file or Hugging Face directory.")] = "smollm2",
    max_queries: Annotated[str, env_option("--max-queries", env="MAX_QUERIES", help="Most search queries, the question included: 1 to 5 (1 skips planning), or auto (1 for a small model, else 3).")] = "auto",
    k: Annotated[int, env_option("-k", "--k", env="K", help="Passages retrieved per query.")] = 4,
    max_tokens: Annotated[int, env_option("--max-tokens", "-n", env="MAX_TOKENS", help="Most tokens in the answer (per-source writer: in each sentence, at most 48).")] = 256,
    writer: Annotated[str, env_option("--writer", env="WRITER", help="per-source (one passage at a time, each sentence cited with its passage), inline "
                                                       "(the model cites [n] itself) or auto (per-source under 1B parameters).")] = "auto",
    temperature: Annotated[float, env_option("--temperature", env="TEMPERATURE", help="Sampling temperature; 0 = greedy.")] = 0.0,
    json_output: Annotated[bool, env_option("--json", env="JSON", help="Print the result as one JSON object.")] = False,
    quantize: Annotated[str | None, env_option("--quantize", "-q", env="QUANTIZE", help="Quantize weights at load: int8, int4 or w8a8.")] = None,
    device: Annotated[str | None, env_option("--device", env="DEVICE", help="torch device (cpu, cuda, ...).")] = None,
) -> None:
    """Answer QUESTION from the indexed documents, citing them: plan, search, read, answer, check citations."""
    from hanlin.apps.search.agent import WRITERS, check_not_empty, open_retriever, result_from_events, run
    from hanlin.apps.search.errors import SearchError
    from hanlin.apps.search.llm import LocalChatModel

    if not question.strip():
        raise SearchError("the question is empty")
    queries = _max_queries(max_queries)
    if writer not in WRITERS:
        raise SearchError(f"--writer must be one of {', '.join(WRITERS)}, got {writer!r}")
    if not 1 <= k <= 8:
        raise SearchError(f"-k must be between 1 and 8, got {k}")
    index_path = index.expanduser() if index is not None else default_index_path()
    if not index_path.is_file():
        if index is not None or not web:
            raise SearchError(f"no index at {index_path}: run `hanlin index add PATH` first (or give --web URL)")
        index_path = None  # type: ignore[assignment]
    retriever, opened = open_retriever(index_path, web)
    try:
        check_not_empty(retriever)  # before minutes go into loading the model
        from hanlin.cli import engine_for, load_model

        llm = LocalChatModel(engine_for(load_model(model, device, quantize), model))
        show = _LiveSteps(enabled=not json_output)
        events = []
        for event in run(question, retriever=retriever, llm=llm, max_queries=queries, k=k, temperature=temperature,
                         max_answer_tokens=max_tokens, writer=writer):
            events.append(event)
            show(event)
            if event.type == "error":
                raise SearchError(event.data["message"])
    finally:
        if opened is not None:
            opened.close()
    result = result_from_events(question, events)
    if json_output:
        print(json.dumps(result.to_dict(), ensure_ascii=False))


def _max_queries(value: str) -> int | str:
    from hanlin.apps.search.errors import SearchError

    if value.strip().lower() == "auto":
        return "auto"
    if not value.strip().isdigit() or not 1 <= int(value) <= 5:
        raise SearchError(f"--max-queries must be auto or a number from 1 to 5, got {value!r}")
    return int(value)


class _LiveSteps:
    """Prints each event as it arrives: steps and the raw answer on stderr, the checked answer and sources on stdout."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.streaming = False

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        handler = getattr(self, f"_{event.type}", None)
        if handler is not None:
            handler(event.data)

    def _plan(self, data: dict[str, Any]) -> None:
        note = " [dim](no usable plan: searching the question itself)[/]" if data["fallback"] else ""
        stderr.print(f"[bold cyan]plan[/] {escape(' · '.join(data['queries']))}{note}")

    def _search(self, data: dict[str, Any]) -> None:
        stderr.print(f"[bold cyan]search[/] {escape(data['query'])} [dim]({len(data['hits'])} hits)[/]")
        for hit in data["hits"][:SHOWN_HITS]:
            where = f" — {hit['location']}" if hit["location"] else ""
            stderr.print(f"  [dim]·[/] {escape(hit['title'] or hit['source'])}{escape(where)} [dim]{hit['score']:.3f}[/]")

    def _read(self, data: dict[str, Any]) -> None:
        titles = ", ".join(f"[{p['id']}] {p['title'] or p['source']}" for p in data["passages"])
        stderr.print(f"[bold cyan]read[/] {len(data['passages'])} passages: {escape(titles)}")
        stderr.print("[bold cyan]writing[/] ", end="")

    def _answer_delta(self, data: dict[str, Any]) -> None:
        self.streaming = True
        sys.stderr.write(data["text"])
        sys.stderr.flush()

    def _answer(self, data: dict[str, Any]) -> None:
        if self.streaming:
            sys.stderr.write("\n")
        unsupported = [s["text"] for s in data["sentences"] if not s["supported"]]
        if unsupported:
            stderr.print(f"[yellow]left out, no supporting citation:[/] [dim]{escape(' '.join(unsupported))}[/]",
                         soft_wrap=True)
        if data["dropped_citations"]:
            stderr.print(f"[dim]{len(data['dropped_citations'])} citation(s) dropped by the check[/]")
        stdout.print()
        stdout.print(escape(data["text"]), style="bold", soft_wrap=True)

    def _sources(self, data: dict[str, Any]) -> None:
        if not data["sources"]:
            return
        stdout.print()
        stdout.print("[bold]Sources[/]")
        for source in data["sources"]:
            where = f" — {source['location']}" if source["location"] else ""
            style = "" if source["cited"] else "dim"
            stdout.print(f"[{source['id']}] {escape(source['title'] or source['source'])}{escape(where)}",
                         style=style, soft_wrap=True)
            stdout.print(f"    {escape(source['source'])}", style="dim", soft_wrap=True)

    def _done(self, data: dict[str, Any]) -> None:
        usage = data["usage"]
        stderr.print(f"[dim]{data['seconds']:.1f}s · {usage['prompt_tokens']} prompt + "
                     f"{usage['completion_tokens']} completion tokens[/]")


def register(app: typer.Typer) -> None:
    app.command(name="ask")(ask)


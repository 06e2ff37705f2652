"""`hanlin index add|list|remove|stats|search`: the local search index of txt, md, html and pdf files."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hanlin.cli_options import env_option

if TYPE_CHECKING:
    from hanlin.apps.search.index import AddReport, SearchIndex

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)

index_app = typer.Typer(help="Build and query the local search index (used by `hanlin ask`).", no_args_is_help=True)

SNIPPET_CHARS = 240
LISTED_SKIPS = 20  # skipped files listed one by one; beyond that, counted by reason


def register(app: typer.Typer) -> None:
    """Add `index` (add, list, remove, stats, search) to the main app."""
    app.add_typer(index_app, name="index")


def default_index_path() -> Path:
    """$HANLIN_INDEX, else ~/.local/share/hanlin/index.db."""
    return Path(os.environ.get("HANLIN_INDEX") or "~/.local/share/hanlin/index.db").expanduser()


IndexOption = Annotated[Path | None, env_option("--index", env="INDEX", help="Index file (default: ~/.local/share/hanlin/index.db).")]
EmbeddingModelOption = Annotated[str, env_option("--embedding-model", env="EMBEDDING_MODEL", help="Encoder for dense search: minilm or a BERT model directory.")]
JsonOption = Annotated[bool, env_option("--json", env="JSON", help="Print JSON instead of text.")]


def _open(index: Path | None, embedding_model: str = "minilm", *, create: bool = False,
          lexical: str | None = None) -> SearchIndex:
    from hanlin.apps.search.errors import SearchError
    from hanlin.apps.search.index import SearchIndex

    path = index.expanduser() if index is not None else default_index_path()
    if not create and not path.is_file():
        raise SearchError(f"no index at {path}: run `hanlin index add PATH` first")
    if path.is_dir():
        raise SearchError(f"--index {path} is a folder; give the index file's path")
    return SearchIndex(path, embedding_model=embedding_model, lexical=lexical)


def _console() -> Console:
    return stdout if stdout.is_terminal else Console(highlight=False, width=max(stdout.width, 160))


@index_app.command("add")
def add_command(
    paths: Annotated[list[Path], typer.Argument(help="Files (.txt, .md, .html, .pdf) or folders (read recursively).", show_default=False)],
    index: IndexOption = None,
    embedding_model: EmbeddingModelOption = "minilm",
    lexical: Annotated[str | None, env_option("--lexical", env="LEXICAL", help="Chinese handling of a NEW index: jieba (word segmentation) or trigram.")] = None,
) -> None:
    """Index files and folders; unchanged files are skipped, changed ones re-indexed, deleted ones dropped."""
    from hanlin.apps.search.errors import SearchError

    missing = [str(path) for path in paths if not path.expanduser().exists()]
    if missing:
        raise SearchError(f"no such file or folder: {', '.join(missing)}")
    with _open(index, embedding_model, create=True, lexical=lexical) as search_index:
        done = 0

        def progress(path: str) -> None:
            nonlocal done
            done += 1
            status.update(f"[dim]{done} file(s) looked at · {escape(Path(path).name)}[/]")

        with stderr.status("[dim]reading files…[/]") as status:
            report = search_index.add(paths, progress=progress)
        _print_skipped(report)
        _console().print(_add_summary(report, search_index.path), soft_wrap=True)


def _print_skipped(report: AddReport) -> None:
    if len(report.skipped) <= LISTED_SKIPS:
        for path, reason in report.skipped:
            stderr.print(f"[yellow]skipped[/] {escape(path)}: {escape(reason)}", soft_wrap=True)
        return
    for reason, count in Counter(_reason_kind(reason) for _, reason in report.skipped).most_common():
        stderr.print(f"[yellow]skipped[/] {count} file(s): {escape(reason)}", soft_wrap=True)


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0]


def _add_summary(report: AddReport, path: str) -> str:
    megabytes = report.bytes / 1e6
    speed = megabytes / report.seconds if report.seconds > 0 else 0.0
    removed = f", {len(report.removed)} removed (deleted from disk)" if report.removed else ""
    return (f"[bold]{len(report.added)}[/] added, [bold]{len(report.updated)}[/] updated, "
            f"{len(report.unchanged)} unchanged, {len(report.skipped)} skipped{removed} · {report.chunks:,} chunks from "
            f"{megabytes:.2f} MB in {report.seconds:.1f} s ({speed:.2f} MB/s) → {escape(path)}")


@index_app.command("list")
def list_command(index: IndexOption = None, json_output: JsonOption = False) -> None:
    """The indexed documents: source, title, kind, chunks, size and modification time."""
    with _open(index) as search_index:
        documents = search_index.documents()
    if json_output:
        print(json.dumps([asdict(document) for document in documents], ensure_ascii=False))
        return
    table = Table(box=box.SIMPLE_HEAD)
    for name, justify in (("source", "left"), ("title", "left"), ("kind", "left"), ("chunks", "right"), ("KB", "right"), ("modified", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for document in documents:
        table.add_row(escape(document.source), escape(document.title), document.kind, f"{document.chunks:,}",
                      f"{document.bytes / 1000:,.1f}", _when(document.mtime))
    console = _console()
    console.print(table)
    console.print(f"{len(documents)} document(s)")


def _when(mtime: float) -> str:
    import datetime

    if not mtime:
        return ""
    return datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")


@index_app.command("remove")
def remove_command(
    paths: Annotated[list[str], typer.Argument(help="Files, folders (everything under them) or URLs to drop from the index.", show_default=False)],
    index: IndexOption = None,
) -> None:
    """Remove documents from the index (the files themselves are not touched)."""
    from hanlin.apps.search.errors import SearchError

    with _open(index) as search_index:
        removed = search_index.remove(paths)
    if not removed:
        raise SearchError(f"not in the index: {', '.join(paths)}")
    for source in removed:
        _console().print(f"removed {escape(source)}", soft_wrap=True)
    _console().print(f"{len(removed)} document(s) removed")


@index_app.command("stats")
def stats_command(index: IndexOption = None, json_output: JsonOption = False) -> None:
    """Documents, chunks, bytes, embedding model and file size of the index."""
    with _open(index) as search_index:
        stats = search_index.stats()
    if json_output:
        print(json.dumps(asdict(stats), ensure_ascii=False))
        return
    table = Table(box=box.SIMPLE, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [("index", stats.path), ("documents", f"{stats.documents:,}"), ("chunks", f"{stats.chunks:,}"),
            ("text indexed", f"{stats.bytes / 1e6:,.2f} MB"), ("embedding model", f"{stats.embedding_model} ({stats.dim or '?'} dimensions)"),
            ("embedded per chunk", f"first {stats.embedding_window} tokens" if stats.embedding_window else "whole chunk"),
            ("lexical", stats.lexical), ("file size", f"{stats.file_size / 1e6:,.2f} MB")]
    for name, value in rows:
        table.add_row(name, escape(value))
    _console().print(table)


@index_app.command("search")
def search_command(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    index: IndexOption = None,
    mode: Annotated[str, env_option("--mode", env="SEARCH_MODE", help="hybrid (BM25 + dense, fused by rank), bm25 or dense.")] = "hybrid",
    k: Annotated[int, env_option("-k", "--k", env="K", help="How many passages to show.")] = 5,
    embedding_model: EmbeddingModelOption = "minilm",
    json_output: JsonOption = False,
) -> None:
    """The passages that best match QUERY, with their source, location and score (for checking the index)."""
    with _open(index, embedding_model) as search_index:
        passages = search_index.search(query, k, mode=mode)
    if json_output:
        print(json.dumps([passage.to_dict() for passage in passages], ensure_ascii=False))
        return
    console = _console()
    if not passages:
        console.print("no matching passages")
    for rank, passage in enumerate(passages, start=1):
        where = f"{passage.source}" + (f" · {passage.location}" if passage.location else "")
        console.print(f"[bold]{rank}.[/] {escape(passage.title)} [dim]({escape(where)}) score {passage.score:.4f}[/]", soft_wrap=True)
        console.print(f"   {escape(_snippet(passage.text))}", soft_wrap=True)


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[:SNIPPET_CHARS - 1] + "…"

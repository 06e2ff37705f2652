"""`hanlin eval search`: retrieval recall, answer accuracy and citation scores of AI search on a QA set."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hanlin.cli_data import output_console
from hanlin.cli_options import env_option

stderr = Console(stderr=True, highlight=False)

eval_app = typer.Typer(help="Evaluate applications on their QA sets.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `eval` (with `search`) to the main app."""
    app.add_typer(eval_app, name="eval")


@eval_app.command("search")
def search_command(
    qa: Annotated[Path | None, env_option("--qa", env="EVAL_QA", help="QA file (JSON lines); default evals/search/qa.jsonl.", show_default=False)] = None,
    corpus: Annotated[list[Path] | None, env_option("--corpus", env="EVAL_CORPUS", help="Corpus folder the QA sources are relative to (repeatable); default ../shared/data/corpora and evals/search/zh.", show_default=False)] = None,
    index: Annotated[Path | None, env_option("--index", env="EVAL_INDEX", help="Index file to build or reuse; default runs/search-eval/index-<corpus hash>.db.", show_default=False)] = None,
    modes: Annotated[str, env_option("--modes", env="EVAL_MODES", help="Retrieval modes to score, comma-separated.")] = "bm25,dense,hybrid",
    k: Annotated[int, env_option("--k", "-k", env="EVAL_K", help="Passages retrieved per question (recall@k).")] = 5,
    no_answers: Annotated[bool, env_option("--no-answers", env="EVAL_NO_ANSWERS", help="Score retrieval only; do not run the agent.")] = False,
    model: Annotated[str, env_option("--model", "-m", env="MODEL", help="Model that writes the answers (smollm2, .gguf file or HF directory).")] = "smollm2",
    limit: Annotated[int | None, env_option("--limit", env="EVAL_LIMIT", help="Ask only this many questions, spread over the set.", show_default=False)] = None,
    json_output: Annotated[bool, env_option("--json", env="JSON", help="Print the report as one JSON object.")] = False,
    output: Annotated[Path | None, env_option("--output", "-o", env="EVAL_OUTPUT", help="Also write the full JSON report (with per-question results) here.", show_default=False)] = None,
) -> None:
    """Score BM25, dense and hybrid retrieval (recall@k, MRR) and the agent's answers (EM, F1, ALCE citations)."""
    from hanlin.apps.search.evaluation import DEFAULT_CORPORA, DEFAULT_QA, evaluate

    progress = (lambda line: stderr.print(f"[dim]{escape(line)}[/]", soft_wrap=True)) if sys.stderr.isatty() else None
    report = evaluate(
        qa or DEFAULT_QA, corpus or list(DEFAULT_CORPORA), index_path=index,
        modes=[m.strip() for m in modes.split(",") if m.strip()], k=k, answer=not no_answers,
        llm=model, limit=limit, progress=progress,
    )
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if json_output:
        summary = {key: value for key, value in report.items() if key != "per_question"}
        print(json.dumps(summary, ensure_ascii=False))
        return
    console = output_console()
    console.print(retrieval_table(report))
    if report.get("chinese_lexical"):
        console.print(lexical_table(report))
    if report.get("answers"):
        console.print(answers_table(report))
    console.print(summary_line(report), soft_wrap=True)


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def retrieval_table(report: dict[str, Any]) -> Table:
    k = report["k"]
    table = Table(title=f"Retrieval (recall and MRR, %; {report['questions']} questions)", box=box.SIMPLE_HEAD)
    table.add_column("mode")
    for group in ("all", "en", "zh"):
        table.add_column(f"R@{k} {group}", justify="right")
    table.add_column("R@1 all", justify="right")
    table.add_column("MRR all", justify="right")
    table.add_column("ms/query", justify="right")
    for mode, groups in report["retrieval"].items():
        table.add_row(
            mode, *(_pct(groups.get(g, {}).get("recall_at_k")) for g in ("all", "en", "zh")),
            _pct(groups["all"]["recall_at_1"]), _pct(groups["all"]["mrr"]),
            f"{1000 * report['seconds_per_query'][mode]:.0f}",
        )
    return table


def lexical_table(report: dict[str, Any]) -> Table:
    lexical = report["chinese_lexical"]
    title = f"Chinese lexical search (BM25, {lexical['questions']} Chinese questions, Chinese documents only)"
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("tokenizer")
    table.add_column(f"R@{report['k']}", justify="right")
    table.add_column("R@1", justify="right")
    table.add_column("MRR", justify="right")
    for name in ("jieba", "trigram"):
        row = lexical.get(name, {})
        if "error" in row:
            table.add_row(name, escape(row["error"]), "", "")
        else:
            table.add_row(name, _pct(row.get("recall_at_k")), _pct(row.get("recall_at_1")), _pct(row.get("mrr")))
    return table


def answers_table(report: dict[str, Any]) -> Table:
    answers = report["answers"]
    table = Table(title="Answers (%; raw = the writer's text before the citation check; citations by ALCE)",
                  box=box.SIMPLE_HEAD)
    table.add_column("questions")
    names = ("n", "EM", "contains", "F1", "raw contains", "not found", "gold read", "cit. precision", "cit. recall")
    for name in names:
        table.add_column(name, justify="right")
    for group in ("all", "en", "zh"):
        row = answers.get(group)
        if row:
            table.add_row(group, str(row["questions"]), _pct(row["exact_match"]), _pct(row["contains"]),
                          _pct(row["f1"]), _pct(row.get("raw_contains")), _pct(row["not_found_rate"]),
                          _pct(row["gold_read_rate"]),
                          _pct(row["citation_precision"]), _pct(row["citation_recall"]))
    return table


def summary_line(report: dict[str, Any]) -> str:
    build = report["index"]
    parts = [f"index {escape(build['path'])}: {build['documents']} documents, {build['chunks']:,} chunks, "
             f"{build['bytes'] / 1e6:.2f} MB ({escape(str(build['embedding_model']))})"]
    if build.get("mb_per_s"):
        parts.append(f"indexed {build['bytes_indexed_now'] / 1e6:.2f} MB in {build['seconds']:.1f} s "
                     f"({build['mb_per_s']:.2f} MB/s)")
    answers = report.get("answers") or {}
    if answers.get("all"):
        row = answers["all"]
        parts.append(f"{row['seconds_per_question']:.1f} s per question")
        if row.get("first_token_seconds"):
            first = row["first_token_seconds"]
            parts.append(f"first token median {first['median']:.1f} s, max {first['max']:.1f} s")
    if answers.get("errors"):
        parts.append(f"[red]{len(answers['errors'])} question(s) failed[/]")
    return " · ".join(parts)

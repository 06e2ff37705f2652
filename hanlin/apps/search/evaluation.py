"""`hanlin eval search`: retrieval recall, answer accuracy and ALCE citation scores on a QA set.

A QA file is JSON lines {"id", "question", "answer", "evidence", "source", "lang"}; `source` is relative to
one of the corpus folders, `evidence` a verbatim piece of it (see eval_metrics for the matching rules). Only
the questions whose source file lies in the given corpus folders are asked, so a subset of the corpora
evaluates the matching subset of the questions.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hanlin.apps.search import eval_metrics as metrics
from hanlin.apps.search.errors import SearchError

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_QA = REPO_ROOT / "evals" / "search" / "qa.jsonl"
DEFAULT_CORPORA = (REPO_ROOT.parent / "shared" / "data" / "corpora", REPO_ROOT / "evals" / "search" / "zh")
RUNS_DIR = REPO_ROOT / "runs" / "search-eval"
MODES = ("bm25", "dense", "hybrid")
LANGS = ("en", "zh")

Progress = Callable[[str], None]


@dataclass
class QARecord:
    id: str
    question: str
    answer: str
    evidence: str
    source: str
    lang: str


@dataclass
class QuestionResult:
    id: str
    lang: str
    ranks: dict[str, int | None] = field(default_factory=dict)  # mode → 1-based gold rank within k
    prediction: str | None = None
    raw_prediction: str | None = None  # the writer's text before the citation check (when the agent reports it)
    raw_contains: bool | None = None
    exact_match: bool | None = None
    contains: bool | None = None
    f1: float | None = None
    not_found: bool | None = None
    gold_read: bool | None = None  # the gold passage was among the passages given to the writer
    sentences: int | None = None
    supported_sentences: int | None = None
    citations: int | None = None
    relevant_citations: int | None = None
    timings: dict[str, float] = field(default_factory=dict)  # plan, search, first_token, total (seconds)
    error: str | None = None


# ---- inputs -------------------------------------------------------------------------------------------


def load_qa(path: str | Path) -> list[QARecord]:
    """Read a QA file; a missing file or a malformed line is a SearchError naming it."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"QA file not found: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            records.append(QARecord(**{name: str(raw[name]) for name in QARecord.__dataclass_fields__}))
        except (ValueError, KeyError, TypeError) as error:
            raise SearchError(f"{path}:{number}: not a QA record ({error})") from None
    if not records:
        raise SearchError(f"QA file has no questions: {path}")
    return records


def check_corpora(corpus_dirs: Sequence[str | Path]) -> list[Path]:
    dirs = [Path(d).resolve() for d in corpus_dirs]
    for d in dirs:
        if not d.exists():
            raise SearchError(f"corpus folder not found: {d}")
    if not dirs:
        raise SearchError("no corpus folder given")
    return dirs


def records_in_corpora(records: Iterable[QARecord], corpus_dirs: Sequence[Path]) -> list[QARecord]:
    """The records whose source file lies in one of the corpus folders (a corpus may also be a single file)."""
    def present(record: QARecord) -> bool:
        return any((d / record.source).is_file() if d.is_dir() else d.name == Path(record.source).name
                   for d in corpus_dirs)

    return [r for r in records if present(r)]


def default_index_path(corpus_dirs: Sequence[Path], lexical: str | None = None) -> Path:
    """runs/search-eval/index-<hash of the corpus folders>.db: one cached index per corpus set."""
    key = "\n".join(sorted(str(d) for d in corpus_dirs)) + f"\n{lexical or ''}"
    return RUNS_DIR / f"index-{hashlib.sha256(key.encode()).hexdigest()[:12]}{'-' + lexical if lexical else ''}.db"


def open_index(path: str | Path, corpus_dirs: Sequence[Path], *, lexical: str | None = None,
               progress: Progress | None = None) -> tuple[Any, dict[str, Any]]:
    """Open (or build) the index at `path` and bring it up to date with the corpora; return it and build facts."""
    from hanlin.apps.search.index import SearchIndex

    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    index = SearchIndex(path, lexical=lexical) if lexical else SearchIndex(path)
    report = index.add([str(d) for d in corpus_dirs], progress=progress)
    indexed = len(report.added) + len(report.updated)
    stats = index.stats()
    build = {
        "path": str(path), "documents": stats.documents, "chunks": stats.chunks, "bytes": stats.bytes,
        "embedding_model": stats.embedding_model, "lexical": getattr(stats, "lexical", None),
        "files_indexed_now": indexed,
        "skipped": [list(s) for s in report.skipped],
        "seconds": report.seconds if indexed else None,
        "mb_per_s": (report.bytes / 1e6 / report.seconds) if indexed and report.seconds > 0 else None,
        "bytes_indexed_now": report.bytes if indexed else 0,
    }
    return index, build


# ---- retrieval ----------------------------------------------------------------------------------------


def retrieval_ranks(index: Any, records: Sequence[QARecord], modes: Sequence[str], k: int,
                    results: dict[str, QuestionResult], progress: Progress | None = None) -> dict[str, float]:
    """Fill each result's gold rank per mode; return seconds per query per mode."""
    seconds: dict[str, float] = {}
    for mode in modes:
        start = time.perf_counter()
        for record in records:
            passages = index.search(record.question, k, mode=mode)
            results[record.id].ranks[mode] = metrics.gold_rank(
                [(p.source, p.text) for p in passages], record.evidence, record.source)
        seconds[mode] = (time.perf_counter() - start) / max(1, len(records))
        if progress:
            progress(f"retrieval {mode}: {len(records)} questions, {seconds[mode] * 1000:.0f} ms per query")
    return seconds


def retrieval_table(records: Sequence[QARecord], results: dict[str, QuestionResult], modes: Sequence[str],
                    k: int) -> dict[str, dict[str, dict[str, float]]]:
    """mode → group ("all", "en", "zh") → recall@1, recall@k, MRR, questions."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for mode in modes:
        table[mode] = {}
        for group in ("all", *LANGS):
            chosen = [r for r in records if group == "all" or r.lang == group]
            if chosen:
                table[mode][group] = asdict(metrics.retrieval_scores([results[r.id].ranks[mode] for r in chosen], k))
    return table


def compare_chinese_lexical(records: Sequence[QARecord], corpus_dirs: Sequence[Path], k: int,
                            progress: Progress | None = None) -> dict[str, Any]:
    """BM25 recall on the Chinese questions with each lexical mode, each over an index of their folders only."""
    chinese = [r for r in records if r.lang == "zh"]
    if not chinese:
        return {}
    dirs = sorted({d for d in corpus_dirs for r in chinese if d.is_dir() and (d / r.source).is_file()})
    out: dict[str, Any] = {"questions": len(chinese), "corpus": [str(d) for d in dirs]}
    for lexical in ("jieba", "trigram"):
        try:
            index, _ = open_index(":memory:", dirs, lexical=lexical)
        except TypeError as error:  # an index without the lexical option
            out[lexical] = {"error": str(error)}
            continue
        with index:
            results = {r.id: QuestionResult(r.id, r.lang) for r in chinese}
            retrieval_ranks(index, chinese, ("bm25",), k, results)
            out[lexical] = asdict(metrics.retrieval_scores([results[r.id].ranks["bm25"] for r in chinese], k))
        if progress:
            progress(f"chinese lexical {lexical}: recall@{k} {out[lexical]['recall_at_k']:.2f}")
    return out


# ---- answers ------------------------------------------------------------------------------------------


def chat_model(llm: Any = None) -> Any:
    """The writer: a ChatModel as is, else hanlin.LLM (default "smollm2") wrapped by the agent's adapter."""
    from hanlin.apps.search.llm import LocalChatModel

    if llm is not None and hasattr(llm, "stream_chat"):
        return llm
    if llm is None or isinstance(llm, str):
        import hanlin

        llm = hanlin.LLM(llm or "smollm2")
    return LocalChatModel(llm)


def answer_question(record: QARecord, index: Any, model: Any, result: QuestionResult, *,
                    supports: metrics.SupportTest, **options: Any) -> None:
    """Run the agent on one question; fill the result's answer, citation and timing fields."""
    from hanlin.search import run

    start = time.perf_counter()
    stamps: dict[str, float] = {}
    read: dict[int, dict[str, Any]] = {}
    final: dict[str, Any] | None = None
    for event in run(record.question, retriever=index, llm=model, **options):
        now = time.perf_counter() - start
        if event.type == "plan":
            stamps.setdefault("plan", now)
        elif event.type == "search":
            stamps["search"] = now
        elif event.type == "read":
            stamps["read"] = now
            read = {int(p["id"]): p for p in event.data.get("passages", [])}
        elif event.type == "answer_delta":
            stamps.setdefault("first_token", now)
        elif event.type == "answer":
            final = event.data
        elif event.type == "error":
            result.error = str(event.data.get("message"))
    stamps["total"] = time.perf_counter() - start
    result.timings = stamps
    if final is None:
        result.error = result.error or "the run gave no answer"
        return
    text = str(final.get("text", ""))
    result.prediction = text
    result.not_found = bool(final.get("not_found"))
    result.exact_match = metrics.exact_match(text, record.answer, record.lang)
    result.contains = metrics.contains_answer(text, record.answer, record.lang)
    if "raw_text" in final:
        result.raw_prediction = str(final["raw_text"])
        result.raw_contains = metrics.contains_answer(result.raw_prediction, record.answer, record.lang)
    result.f1 = metrics.token_f1(text, record.answer, record.lang)
    result.gold_read = metrics.gold_rank([(p.get("source", ""), p.get("text", "")) for p in read.values()],
                                         record.evidence, record.source) is not None
    if not result.not_found:
        sentences = [(s["text"], [int(c) for c in s.get("citations", [])]) for s in final.get("sentences", [])]
        scores = metrics.citation_scores(sentences, {i: p.get("text", "") for i, p in read.items()}, supports)
        result.sentences, result.supported_sentences = scores.sentences, scores.supported_sentences
        result.citations, result.relevant_citations = scores.citations, scores.relevant_citations


def answer_table(records: Sequence[QARecord], results: dict[str, QuestionResult]) -> dict[str, Any]:
    """Answer accuracy per language group, not-found rate, ALCE citation scores and timings."""
    table: dict[str, Any] = {}
    for group in ("all", *LANGS):
        chosen = [results[r.id] for r in records if group == "all" or r.lang == group]
        done = [q for q in chosen if q.prediction is not None]
        if not done:
            continue
        cited = [q for q in done if not q.not_found and q.sentences]
        row: dict[str, Any] = {
            "questions": len(done),
            "exact_match": _mean(q.exact_match for q in done),
            "contains": _mean(q.contains for q in done),
            "raw_contains": _mean(q.raw_contains for q in done),  # the writer's text before the check
            "f1": _mean(q.f1 for q in done),
            "not_found_rate": _mean(q.not_found for q in done),
            "gold_read_rate": _mean(q.gold_read for q in done),
            # ALCE averages per answer; answers that say "not found" make no claims and are left out
            "citation_recall": _mean(q.supported_sentences / q.sentences for q in cited),
            "citation_precision": _mean((q.relevant_citations / q.citations) if q.citations else 0.0 for q in cited),
            "answers_with_claims": len(cited),
            "sentences": sum(q.sentences or 0 for q in cited),
            "citations": sum(q.citations or 0 for q in cited),
            "relevant_citations": sum(q.relevant_citations or 0 for q in cited),
        }
        if group == "all":
            first = [q.timings["first_token"] for q in done if "first_token" in q.timings]
            row["seconds_per_question"] = _mean(q.timings.get("total", 0.0) for q in done)
            row["first_token_seconds"] = {"median": statistics.median(first), "max": max(first)} if first else None
        table[group] = row
    errors = [results[r.id] for r in records if results[r.id].error]
    table["errors"] = [{"id": q.id, "error": q.error} for q in errors]
    return table


def _mean(values: Iterable[Any]) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ---- the whole evaluation -----------------------------------------------------------------------------


def evaluate(qa_path: str | Path = DEFAULT_QA, corpus_dirs: Sequence[str | Path] = DEFAULT_CORPORA, *,
             index_path: str | Path | None = None, modes: Sequence[str] = MODES, k: int = 5,
             answer: bool = True, llm: Any = None, limit: int | None = None, compare_lexical: bool = True,
             agent_options: dict[str, Any] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate retrieval (and, with answer=True, the agent's answers) on the QA set; return a JSON-able report."""
    for mode in modes:
        if mode not in MODES:
            raise SearchError(f"unknown retrieval mode {mode!r} (choose from {', '.join(MODES)})")
    if k < 1:
        raise SearchError("k must be at least 1")
    dirs = check_corpora(corpus_dirs)
    every = load_qa(qa_path)
    records = records_in_corpora(every, dirs)
    if not records:
        raise SearchError(f"none of the {len(every)} questions in {qa_path} has its source in the given corpora")
    if limit is not None:
        records = _spread(records, limit)
    index_path = Path(index_path) if index_path else default_index_path(dirs)
    if progress:
        progress(f"index {index_path}: bringing it up to date with {len(dirs)} corpus folder(s)")
    index, build = open_index(index_path, dirs, progress=progress)
    results = {r.id: QuestionResult(r.id, r.lang) for r in records}
    report: dict[str, Any] = {
        "qa": str(qa_path), "corpora": [str(d) for d in dirs], "k": k, "modes": list(modes),
        "questions": len(records), "by_lang": {lang: sum(r.lang == lang for r in records) for lang in LANGS},
        "index": build,
    }
    with index:
        report["seconds_per_query"] = retrieval_ranks(index, records, modes, k, results, progress)
        report["retrieval"] = retrieval_table(records, results, modes, k)
        if compare_lexical:
            report["chinese_lexical"] = compare_chinese_lexical(records, dirs, k, progress)
        if answer:
            from hanlin.apps.search.citations import supports

            model = chat_model(llm)
            for number, record in enumerate(records, 1):
                answer_question(record, index, model, results[record.id], supports=supports, **(agent_options or {}))
                if progress:
                    q = results[record.id]
                    progress(f"answer {number}/{len(records)} {record.id}: "
                             f"{'not found' if q.not_found else ('ok' if q.contains else 'miss')} "
                             f"({q.timings.get('total', 0):.1f} s)")
            report["answers"] = answer_table(records, results)
    report["per_question"] = [asdict(results[r.id]) for r in records]
    return report


def _spread(records: list[QARecord], limit: int) -> list[QARecord]:
    """`limit` records taken evenly across the set, so a small run still mixes sources and languages."""
    if limit >= len(records):
        return records
    if limit <= 0:
        raise SearchError("--limit must be at least 1")
    step = len(records) / limit
    return [records[int(i * step)] for i in range(limit)]

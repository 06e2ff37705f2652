"""AI search speed on CPU: indexing throughput, and first-token latency of a question over a ≥ 10k-chunk index.

    python bench/search.py [--questions 8] [--skip-indexing | --skip-first-token] [--rebuild]

Two measurements (the search issue's speed bars):
  indexing     MB of text per second into a fresh index of ../shared/data/corpora, embeddings included
               (all-MiniLM-L6-v2 run by Hanlin's encoder); the encoder is loaded before the clock starts.
               Bar: ≥ 1 MB per 10 s.
  first token  seconds from a question to the agent's first answer_delta event, with the embedded model
               (SmolLM2-135M) writing, over an index of ≥ 10,000 chunks, broken down into planning, searching
               (+ passage selection) and the writer's prefill. Bar: < 5 s.
The corpora give fewer than 10,000 chunks, so the 10k index holds the corpora plus verbatim copies of them
until it passes 10,000 chunks: realistic for latency (FTS5 and vector-matrix sizes), not for retrieval quality.
It is built once and cached under runs/search-bench/. The first question is a warm-up (model and vector
loading), reported apart. Load averages are printed: the machine is shared, compare runs side by side.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from peers import machine_description

import hanlin
from hanlin.apps.search.evaluation import DEFAULT_CORPORA, DEFAULT_QA, check_corpora, default_index_path, load_qa
from hanlin.apps.search.index import SearchIndex
from hanlin.apps.search.llm import LocalChatModel
from hanlin.embeddings import load_embedder
from hanlin.search import run

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPORA = REPO_ROOT.parent / "shared" / "data" / "corpora"
BENCH_DIR = REPO_ROOT / "runs" / "search-bench"
TARGET_CHUNKS = 10_000


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def bench_indexing(corpus: Path) -> dict[str, float]:
    """Index the corpora into a fresh temporary index; MB/s over the whole add() call, encoder preloaded."""
    embedder = load_embedder("minilm")
    embedder.embed(["warm-up"])
    with tempfile.TemporaryDirectory(prefix="hanlin-bench-") as tmp:
        with SearchIndex(Path(tmp) / "index.db", embedder=embedder) as index:
            report = index.add([corpus])
            chunks = index.chunk_count()
    mb = report.bytes / 1e6
    return {"mb": mb, "seconds": report.seconds, "mb_per_s": mb / report.seconds, "chunks": chunks,
            **{f"{name}_s": value for name, value in report.timings.items()}}


def ten_thousand_chunk_index(rebuild: bool) -> tuple[Path, int, int]:
    """runs/search-bench/index-10k.db: the corpora plus copies of their files until ≥ 10,000 chunks.

    Starts from a copy of `hanlin eval search`'s cached index of the corpora when there is one (the same
    text, already embedded). Returns (path, chunks, files copied).
    """
    path, corpus = BENCH_DIR / "index-10k.db", BENCH_DIR / "corpus-10k"
    if rebuild:
        path.unlink(missing_ok=True)
        shutil.rmtree(corpus, ignore_errors=True)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    base = default_index_path(check_corpora(DEFAULT_CORPORA))
    if not path.exists() and base.exists():
        source = sqlite3.connect(base)  # VACUUM INTO: a consistent copy, write-ahead log included
        try:
            source.execute("VACUUM INTO ?", (str(path),))
        finally:
            source.close()
    with SearchIndex(path) as index:
        if index.chunk_count() == 0:
            print(f"building {path} (once; cached) ...", flush=True)
            index.add([CORPORA])
        copied = len([f for f in corpus.rglob("*") if f.is_file()]) if corpus.exists() else 0
        files = sorted(f for f in CORPORA.rglob("*") if f.is_file())
        round_ = 1 + copied // len(files)
        while index.chunk_count() < TARGET_CHUNKS:
            for file in files:
                target = corpus / f"copy-{round_}" / file.relative_to(CORPORA)
                if target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)
                index.add([target])
                copied += 1
                if index.chunk_count() >= TARGET_CHUNKS:
                    break
            round_ += 1
            print(f"  {index.chunk_count():,} chunks, {copied} files copied", flush=True)
        return path, index.chunk_count(), copied


def time_question(question: str, index: SearchIndex, model: LocalChatModel) -> dict[str, float]:
    """Seconds from the question to: the plan, the passages read, the first answer token, the end."""
    start = time.perf_counter()
    marks: dict[str, float] = {}
    for event in run(question, retriever=index, llm=model):
        now = time.perf_counter() - start
        if event.type == "plan":
            marks.setdefault("plan", now)
        elif event.type == "read":
            marks["read"] = now
        elif event.type == "answer_delta":
            marks.setdefault("first_token", now)
        elif event.type == "error":
            raise SystemExit(f"the run failed: {event.data.get('message')}")
    marks["total"] = time.perf_counter() - start
    return marks


def bench_first_token(path: Path, questions: list[str]) -> tuple[dict[str, float], list[dict[str, float]]]:
    load_start = time.perf_counter()
    model = LocalChatModel(hanlin.LLM("smollm2"))
    with SearchIndex(path) as index:
        index.search("warm up", 1, mode="hybrid")  # loads the encoder and the vector matrix
        loads = {"load_s": time.perf_counter() - load_start}
        loads.update({f"warmup_{k}": v for k, v in time_question(questions[0], index, model).items()})
        return loads, [time_question(q, index, model) for q in questions[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8, help="timed questions (plus one warm-up)")
    parser.add_argument("--skip-indexing", action="store_true", help="skip the indexing-speed measurement")
    parser.add_argument("--indexing-corpus", type=Path, default=CORPORA,
                        help="folder indexed for the speed measurement")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached 10k-chunk index")
    parser.add_argument("--skip-first-token", action="store_true", help="measure indexing only")
    args = parser.parse_args()
    if not CORPORA.is_dir():
        raise SystemExit(f"the corpora are not here: {CORPORA}")
    print(machine_description())
    loads = [load_average()]

    if not args.skip_indexing:
        result = bench_indexing(args.indexing_corpus)
        loads.append(load_average())
        verdict = "meets" if result["mb_per_s"] >= 0.1 else "MISSES"
        print(f"\nindexing {args.indexing_corpus}: {result['mb']:.2f} MB of text ({result['chunks']:,} chunks) "
              f"in {result['seconds']:.1f} s: {result['mb_per_s']:.3f} MB/s = {10 * result['mb_per_s']:.2f} MB per 10 s "
              f"({verdict} the bar of 1 MB per 10 s)")
        parts = {k[:-2]: v for k, v in result.items() if k.endswith("_s") and k != "mb_per_s"}
        print("  time in: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts.items()))
    if args.skip_first_token:
        print(f"load average: {' -> '.join(loads)}")
        return

    path, chunks, copies = ten_thousand_chunk_index(args.rebuild)
    records = load_qa(DEFAULT_QA)
    english = [r.question for r in records if r.lang == "en"]
    chinese = [r.question for r in records if r.lang == "zh"]
    n = args.questions + 1
    picked = english[:: max(1, len(english) // max(1, n - 2))][: n - 2] + chinese[:2]
    warm, timed = bench_first_token(path, picked)
    loads.append(load_average())

    print(f"\nfirst token over {path.name}: {chunks:,} chunks (corpora + {copies} verbatim file copies), "
          "embedded model smollm2")
    print(f"  load (LLM + encoder + vectors) {warm['load_s']:.1f} s; warm-up question: first token "
          f"{warm.get('warmup_first_token', float('nan')):.1f} s")
    print(f"  {'question':<10}{'plan':>8}{'search+read':>13}{'prefill':>9}{'first token':>13}{'total':>8}")
    for i, t in enumerate(timed, 1):
        first = t.get("first_token", float("nan"))
        search, prefill = t["read"] - t["plan"], first - t["read"]
        print(f"  {i:<10}{t['plan']:>8.2f}{search:>13.2f}{prefill:>9.2f}{first:>13.2f}{t['total']:>8.1f}")
    firsts = [t["first_token"] for t in timed if "first_token" in t]
    if firsts:
        worst = max(firsts)
        print(f"  first token: median {statistics.median(firsts):.2f} s, max {worst:.2f} s "
              f"({'meets' if worst < 5 else 'MISSES'} the bar of < 5 s)")
    print(f"\nload average (1/5/15 min) at the start and after each part: {' | '.join(loads)}")


if __name__ == "__main__":
    main()

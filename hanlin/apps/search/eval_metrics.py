"""Metrics of the search evaluation: gold-passage matching, recall@k/MRR, answer EM/F1, ALCE citation scores.

Gold-passage rule. A QA record names its source file and an `evidence` string copied verbatim from it. A
retrieved passage is the gold passage when it comes from that file and its text contains the evidence after
`normalize_for_match` (NFKC, case folded, curly quotes made straight, all whitespace removed — so line breaks,
re-wrapping and the spaces a chunker adds or drops do not matter). When a chunk boundary cuts the evidence,
the chunk that holds the larger part still counts: its text must end with a prefix of the evidence, or start
with a suffix of it, covering at least `SPLIT_FRACTION` of the evidence (and `SPLIT_MIN_CHARS` characters).

Answer rule (SQuAD style). English: lower case, punctuation and the articles a/an/the removed, whitespace
collapsed; tokens are words. Chinese: punctuation and whitespace removed; tokens are characters. Inline
citation markers like [2] are removed from predictions first.

Citations (ALCE, Gao et al. 2023, "Enabling Large Language Models to Generate Text with Citations").
For an answer with sentences s_i citing passage sets C_i and a support test φ(passages, sentence):
- citation recall = mean over sentences of [C_i non-empty and φ(concat(C_i), s_i)];
- citation precision = relevant citations / all citations, where a citation c of s_i is relevant when
  φ(concat(C_i), s_i) holds and not both (a) φ(c, s_i) fails and (b) φ(concat(C_i − {c}), s_i) still holds —
  i.e. a citation counts when it supports the sentence on its own, or when the support breaks without it.
  A citation of an unsupported sentence is never relevant. An answer with no citations has precision 0.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SPLIT_FRACTION = 0.5
SPLIT_MIN_CHARS = 12

_QUOTES = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "「": '"', "」": '"'})
_WHITESPACE = re.compile(r"\s+")
_CITATION = re.compile(r"\[\d+(?:\s*[,，]\s*\d+)*\]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CJK_PUNCTUATION = "，。！？；：、（）《》“”‘’「」『』【】—…·～"
_PUNCTUATION = set(string.punctuation) | set(_CJK_PUNCTUATION)

SupportTest = Callable[[str, str], bool]


# ---- gold passages ------------------------------------------------------------------------------------


def normalize_for_match(text: str) -> str:
    """The form in which evidence and chunks are compared: NFKC, case folded, straight quotes, no whitespace."""
    return _WHITESPACE.sub("", unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold())


def evidence_in_text(text: str, evidence: str) -> bool:
    """Whether `text` holds the evidence, whole or (cut by a chunk boundary) its larger part at one of its ends."""
    chunk, gold = normalize_for_match(text), normalize_for_match(evidence)
    if not gold:
        return False
    if gold in chunk:
        return True
    need = max(SPLIT_MIN_CHARS, math.ceil(SPLIT_FRACTION * len(gold)))
    if need >= len(gold):
        return False
    for size in range(min(len(gold) - 1, len(chunk)), need - 1, -1):
        if chunk.endswith(gold[:size]) or chunk.startswith(gold[-size:]):
            return True
    return False


def source_matches(passage_source: str, source: str) -> bool:
    """A passage's absolute path (or URL) names the record's file, given relative to its corpus root."""
    passage_source = passage_source.replace("\\", "/")
    return passage_source == source or passage_source.endswith("/" + source.lstrip("/"))


def gold_rank(passages: Sequence[tuple[str, str]], evidence: str, source: str) -> int | None:
    """1-based rank of the first (source, text) passage that is the gold passage; None when none is."""
    for rank, (passage_source, text) in enumerate(passages, 1):
        if source_matches(passage_source, source) and evidence_in_text(text, evidence):
            return rank
    return None


@dataclass
class RetrievalScores:
    questions: int
    recall_at_1: float
    recall_at_k: float
    mrr: float
    k: int


def retrieval_scores(ranks: Sequence[int | None], k: int) -> RetrievalScores:
    """Recall@1, recall@k and mean reciprocal rank (a miss counts 0) over the gold ranks of some questions."""
    n = len(ranks)
    if n == 0:
        return RetrievalScores(0, math.nan, math.nan, math.nan, k)
    hits = [r for r in ranks if r is not None]
    return RetrievalScores(
        questions=n,
        recall_at_1=sum(r == 1 for r in hits) / n,
        recall_at_k=sum(r <= k for r in hits) / n,
        mrr=sum(1.0 / r for r in hits if r <= k) / n,
        k=k,
    )


# ---- answers ------------------------------------------------------------------------------------------


def strip_citations(text: str) -> str:
    return _CITATION.sub("", text)


def normalize_answer(text: str, lang: str = "en") -> str:
    """SQuAD normalisation (English) or punctuation/whitespace removal (Chinese), after dropping [n] markers."""
    text = unicodedata.normalize("NFKC", strip_citations(text)).translate(_QUOTES).casefold()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    if lang == "zh":
        return _WHITESPACE.sub("", text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_tokens(text: str, lang: str = "en") -> list[str]:
    normalized = normalize_answer(text, lang)
    return list(normalized) if lang == "zh" else normalized.split()


def exact_match(prediction: str, gold: str, lang: str = "en") -> bool:
    return normalize_answer(prediction, lang) == normalize_answer(gold, lang)


def contains_answer(prediction: str, gold: str, lang: str = "en") -> bool:
    """The normalised gold answer occurs in the normalised prediction (on word boundaries for English)."""
    pred, want = normalize_answer(prediction, lang), normalize_answer(gold, lang)
    if not want:
        return False
    if lang == "zh":
        return want in pred
    return f" {want} " in f" {pred} "


def token_f1(prediction: str, gold: str, lang: str = "en") -> float:
    """SQuAD token F1 (characters for Chinese)."""
    pred, want = answer_tokens(prediction, lang), answer_tokens(gold, lang)
    if not pred or not want:
        return float(pred == want)
    common = sum((Counter(pred) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(want)
    return 2 * precision * recall / (precision + recall)


# ---- citations (ALCE) ---------------------------------------------------------------------------------


@dataclass
class CitationScores:
    sentences: int
    supported_sentences: int  # citation-recall numerator
    citations: int
    relevant_citations: int  # citation-precision numerator

    @property
    def recall(self) -> float:
        return self.supported_sentences / self.sentences if self.sentences else math.nan

    @property
    def precision(self) -> float:
        return self.relevant_citations / self.citations if self.citations else 0.0


def citation_scores(sentences: Sequence[tuple[str, Sequence[int]]], passages: dict[int, str],
                    supports: SupportTest) -> CitationScores:
    """ALCE citation recall and precision of one answer; `passages` maps citation numbers to passage text.

    A citation number with no passage (an invented source) supports nothing and is never relevant.
    """

    def joint(ids: Sequence[int]) -> bool:
        texts = [passages[i] for i in ids if i in passages]
        return bool(texts) and supports(sentence, "\n".join(texts))

    supported = relevant = total = 0
    for sentence, cited in sentences:
        cited = list(dict.fromkeys(cited))  # a repeated [n] counts once
        total += len(cited)
        if not cited or not joint(cited):
            continue
        supported += 1
        if len(cited) == 1:
            relevant += 1
            continue
        for c in cited:
            alone = c in passages and supports(sentence, passages[c])
            rest_suffices = joint([other for other in cited if other != c])
            relevant += alone or not rest_suffices
    return CitationScores(len(sentences), supported, total, relevant)

"""Citation check: every [n] an answer cites must exist and be supported by passage n (lexical overlap).

The checker only ever removes citations: it never adds one the model did not write. A sentence left
without a supporting citation is marked unsupported and kept out of the checked answer text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hanlin.apps.search.types import Passage

NOT_FOUND_TEXT = "Not found in the sources."
SUPPORT_THRESHOLD = 0.6  # fraction of a sentence's content tokens that must occur in the passage
MIN_OVERLAP = 2  # and at least this many of them (one shared word is never support)

# [1]  [1, 2]  [1][2]  [source 1]  【1】  【1，2】
_NUMBERS = r"(\d{1,3}(?:\s*[,，;]\s*\d{1,3})*)"
CITATION = re.compile(rf"\[\s*(?:(?:source|passage)\s*)?{_NUMBERS}\s*\]|【\s*{_NUMBERS}\s*】", re.IGNORECASE)
_CITATIONS = rf"(?:\s*(?:{CITATION.pattern}))*"
# A sentence ends at . ! ? (then a space or the end) or at Chinese 。！？；, taking trailing quotes and citations.
_SENTENCE = re.compile(
    rf"[^\n]*?(?:[.!?]+[\"'”’)]*{_CITATIONS}(?=\s|$)|[。！？；]+[”’」』)]*{_CITATIONS}|$)",
    re.IGNORECASE,
)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[\u3400-\u4dbf\u4e00-\u9fff]+")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_NOT_FOUND = re.compile(
    r"not (?:be )?(?:found|mentioned|provided|stated|given|contained|available)|"
    r"(?:do|does|did) not (?:contain|mention|say|provide|include)|no information|cannot (?:be )?(?:found|answer)|"
    r"未找到|没有找到|找不到|没有提到|未提及|没有相关",
    re.IGNORECASE,
)

STOPWORDS = frozenset(
    """a about above after again against all also am an and any are aren't as at be because been before being
    below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during
    each few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers
    herself him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself just let's me
    more most mustn't my myself no nor not of off on once only or other ought our ours ourselves out over own
    same shan't she she'd she'll she's should shouldn't so some such than that that's the their theirs them
    themselves then there there's these they they'd they'll they're they've this those through to too under
    until up very was wasn't we we'd we'll we're we've were weren't what what's when when's where where's which
    while who who's whom why why's will with won't would wouldn't you you'd you'll you're you've your yours
    yourself yourselves one also according source sources passage passages says said answer question
    的 了 是 在 和 与 及 或 也 都 就 而 及 其 这 那 之 于 以 对 为 被 把 个 有 中 上 下 吗 呢 吧 啊""".split()
)


@dataclass
class CheckedAnswer:
    text: str  # the checked answer: supported sentences with their kept citations, or NOT_FOUND_TEXT
    sentences: list[dict[str, Any]]  # every sentence the model wrote: {"text", "citations": [int], "supported": bool}
    not_found: bool
    dropped_citations: list[dict[str, Any]] = field(default_factory=list)  # {"sentence", "citation", "reason"}
    raw_citations: int = 0  # citations the model wrote (before the check)

    @property
    def cited(self) -> set[int]:
        return {n for s in self.sentences if s["supported"] for n in s["citations"]}


def content_tokens(text: str) -> list[str]:
    """Lower-cased words and CJK bigrams of text, without stopwords and citation markers."""
    tokens: list[str] = []
    for word in _WORD.findall(CITATION.sub(" ", text.lower())):
        if _CJK.match(word):  # bigrams within the runs between stopword characters; a lone character stays
            for run in "".join(" " if c in STOPWORDS else c for c in word).split():
                tokens.extend([run] if len(run) == 1 else [a + b for a, b in zip(run, run[1:])])
        elif word not in STOPWORDS and not (len(word) == 1 and not word.isdigit()):
            tokens.append(_stem(word))
    return tokens


def _stem(word: str) -> str:
    """A light plural/possessive strip so 'startups' matches 'startup'."""
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    return word


def support_score(sentence: str, passage: str) -> tuple[float, int]:
    """(fraction of the sentence's distinct content tokens found in the passage, how many were found)."""
    wanted = set(content_tokens(sentence))
    if not wanted:
        return 0.0, 0
    found = wanted & set(content_tokens(passage))
    return len(found) / len(wanted), len(found)


def supports(sentence: str, passage: str, *, question: str | None = None) -> bool:
    """Whether passage lexically supports sentence: most of its content words occur there.

    With the question given, the sentence must also say something beyond restating it: most of its
    content words that are not in the question must occur in the passage (and there must be one).
    """
    fraction, overlap = support_score(sentence, passage)
    if fraction < SUPPORT_THRESHOLD or overlap < MIN_OVERLAP:
        return False
    if question is None:
        return True
    novel = set(content_tokens(sentence)) - set(content_tokens(question))
    return bool(novel) and len(novel & set(content_tokens(passage))) / len(novel) >= 0.5


def split_sentences(text: str) -> list[str]:
    """Sentences of an English or Chinese text; citation markers after the full stop stay with the sentence."""
    sentences = []
    for line in text.splitlines():
        for match in _SENTENCE.finditer(line):
            sentence = match.group(0).strip()
            if sentence:
                sentences.append(sentence)
    return sentences


def parse_citations(sentence: str) -> list[int]:
    """Source numbers cited in sentence, in order, without repeats."""
    numbers: list[int] = []
    for match in CITATION.finditer(sentence):
        for part in re.split(r"[,，;]", match.group(1) or match.group(2)):
            n = int(part.strip())
            if n not in numbers:
                numbers.append(n)
    return numbers


def strip_citations(sentence: str) -> str:
    text = CITATION.sub("", sentence)
    text = re.sub(r"\s+([.!?,;:。！？；，])", r"\1", text)
    return " ".join(text.split())


def says_not_found(text: str) -> bool:
    return bool(_NOT_FOUND.search(text))


def check_answer(text: str, passages: Sequence[Passage], *, question: str | None = None) -> CheckedAnswer:
    """Verify each citation of text against passages (numbered from 1); drop the unsupported ones.

    A sentence that only restates the question (given) supports nothing, whatever its overlap."""
    sentences: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    raw = 0
    for sentence in split_sentences(text):
        plain, i = strip_citations(sentence), len(sentences)
        kept: list[int] = []
        for n in parse_citations(sentence):
            raw += 1
            if not plain:  # a bare "[2]" on a line of its own: nothing it could support
                dropped.append({"sentence": i - 1, "citation": n, "reason": "no sentence"})
            elif not 1 <= n <= len(passages):
                dropped.append({"sentence": i, "citation": n, "reason": "no such source"})
            elif says_not_found(plain) or not supports(plain, passages[n - 1].text, question=question):
                dropped.append({"sentence": i, "citation": n, "reason": "not supported"})
            else:
                kept.append(n)
        if plain:
            sentences.append({"text": plain, "citations": kept, "supported": bool(kept)})
    supported = [s for s in sentences if s["supported"]]
    answer = " ".join(with_citations(s["text"], s["citations"]) for s in supported) if supported else NOT_FOUND_TEXT
    return CheckedAnswer(answer, sentences, not supported, dropped, raw)


def with_citations(sentence: str, citations: Sequence[int]) -> str:
    """sentence with its citation markers put before its final punctuation: 'It was Lisp [1].'"""
    if not citations:
        return sentence
    marks = "".join(f"[{n}]" for n in citations)
    match = re.search(r"[.!?。！？；]+[\"'”’)」』]*$", sentence)
    if match is None:
        return f"{sentence} {marks}"
    space = "" if _CJK.search(sentence[-3:] or "") else " "
    return f"{sentence[: match.start()]}{space}{marks}{sentence[match.start():]}"

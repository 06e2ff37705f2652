"""What goes into the FTS5 table and how a user's query becomes a safe MATCH expression.

Two ways to handle Chinese, chosen when an index is created:
- "jieba": Chinese runs are segmented into words by jieba and stored space-separated, so FTS5's
  unicode61 tokenizer (with the Porter stemmer for English) sees words; queries are segmented the same way.
- "trigram": the text is stored as is under FTS5's trigram tokenizer; a query matches by its character
  trigrams. Trigrams cannot match terms of one or two characters: those fall back to a LIKE scan.
User text is never parsed as FTS5 syntax: every term is a double-quoted string, terms are OR-ed (BM25
ranks documents that match more and rarer terms higher).
"""

from __future__ import annotations

import logging
import re
import threading

LEXICAL_MODES = ("jieba", "trigram")
DEFAULT_LEXICAL = "jieba"

FTS_TOKENIZERS = {
    "jieba": "porter unicode61 remove_diacritics 2",
    "trigram": "trigram",
}

_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]+")
_TERM = re.compile(r"[^\W_]+", re.UNICODE)
_CJK_QUESTION_WORDS = re.compile(
    "什么|哪些|哪个|哪里|哪儿|哪一|如何|怎么|怎样|为什么|为何|是否|多少|几个|谁|吗|呢|吧|请问|的是|是什么")

ENGLISH_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves
""".split())
CHINESE_STOPWORDS = frozenset("""
的 了 是 在 和 与 及 或 也 都 就 而 被 把 对 从 向 这 那 这个 那个 一个 有 没有 吗 呢 吧 啊 之 其 为 以 于 上 中 下
什么 哪些 哪个 哪里 如何 怎么 怎样 为什么 为何 是否 多少 几个 谁 请问 我 你 他 她 它 我们 你们 他们 可以 能 会
""".split())

_jieba_lock = threading.Lock()
_jieba = None


def check_mode(mode: str) -> str:
    from hanlin.apps.search.errors import SearchError

    if mode not in LEXICAL_MODES:
        raise SearchError(f"unknown lexical mode {mode!r} (choose from {', '.join(LEXICAL_MODES)})")
    return mode


def has_cjk(text: str) -> bool:
    return _CJK_RUN.search(text) is not None


def cjk_fraction(text: str) -> float:
    """Share of the letters in `text` that are CJK (0 for text without letters)."""
    letters = sum(len(match.group()) for match in _TERM.finditer(text))
    cjk = sum(len(match.group()) for match in _CJK_RUN.finditer(text))
    return cjk / letters if letters else 0.0


def index_text(text: str, mode: str) -> str:
    """The text stored in the FTS5 column for a chunk."""
    if mode == "jieba" and has_cjk(text):
        jieba = _load_jieba()
        return _CJK_RUN.sub(lambda run: " " + " ".join(jieba.cut_for_search(run.group())) + " ", text)
    return text


def match_expression(query: str, mode: str) -> str | None:
    """An FTS5 MATCH expression OR-ing the query's terms, or None when no term can be matched."""
    terms = query_terms(query, mode)
    if mode == "trigram":
        terms = [term for term in terms if len(term) >= 3]
    if not terms:
        return None
    return " OR ".join(_quote(term) + ("*" if _is_single_cjk(term, mode) else "") for term in terms)


def substring_terms(query: str) -> list[str]:
    """For a trigram index's LIKE fallback: terms shorter than a trigram, and the character bigrams of the
    query's CJK pieces (a two-character word such as 警报 is the commonest Chinese word length)."""
    terms = [term for term in query_terms(query, "trigram") if len(term) < 3]
    for piece in _cjk_pieces(query):
        terms += [piece[i:i + 2] for i in range(len(piece) - 1)]
    return list(dict.fromkeys(term for term in terms if term not in CHINESE_STOPWORDS))


def query_terms(query: str, mode: str) -> list[str]:
    """The query's distinct search terms, stopwords left out unless nothing else remains."""
    if mode == "jieba":
        raw = _jieba_terms(query)
    else:
        raw = _trigram_terms(query)
    raw = [term.lower() for term in raw if term.strip()]
    kept = [term for term in raw if term not in ENGLISH_STOPWORDS and term not in CHINESE_STOPWORDS]
    return list(dict.fromkeys(kept or raw))


def _jieba_terms(query: str) -> list[str]:
    terms: list[str] = []
    position = 0
    for run in _CJK_RUN.finditer(query):
        terms += _TERM.findall(query[position:run.start()])
        terms += [word for word in _load_jieba().cut(run.group()) if word.strip()]
        position = run.end()
    terms += _TERM.findall(query[position:])
    return terms


def _trigram_terms(query: str) -> list[str]:
    """Latin words whole; each CJK run (question words cut out) as its overlapping character trigrams."""
    terms: list[str] = []
    position = 0
    for run in _CJK_RUN.finditer(query):
        terms += _TERM.findall(query[position:run.start()])
        for piece in _CJK_QUESTION_WORDS.split(run.group()):
            if len(piece) <= 3:
                terms.append(piece)
            else:
                terms += [piece[i:i + 3] for i in range(len(piece) - 2)]
        position = run.end()
    terms += _TERM.findall(query[position:])
    return terms


def _cjk_pieces(query: str) -> list[str]:
    return [piece for run in _CJK_RUN.finditer(query) for piece in _CJK_QUESTION_WORDS.split(run.group()) if piece]


def _is_single_cjk(term: str, mode: str) -> bool:
    # a one-character query word also finds the longer words jieba made of it (猫 → 猫咪)
    return mode == "jieba" and len(term) == 1 and has_cjk(term)


def _quote(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def _load_jieba():
    global _jieba
    with _jieba_lock:
        if _jieba is None:
            import jieba

            jieba.setLogLevel(logging.WARNING)
            jieba.initialize()
            _jieba = jieba
    return _jieba

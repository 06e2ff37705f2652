"""Documents → Chunks (passages for BM25, the dense encoder and the writer), cut at paragraph and sentence
boundaries.

Lengths are estimated in encoder (WordPiece) tokens, within ~7% of the real tokenizer on English prose and
one token per CJK character, as BERT tokenizers do. The encoder embeds a chunk's first 128 tokens
(index_schema.EMBEDDING_WINDOW); BM25 and the writer read all of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hanlin.apps.search.documents import Document, Section

DEFAULT_SIZE = 220  # estimated encoder tokens: ~170 English words or ~210 Chinese characters
DEFAULT_OVERLAP = 30  # at most one short sentence carried into the next chunk


@dataclass
class Chunk:
    text: str
    location: str
    ordinal: int


@dataclass
class _Unit:
    """A sentence (or a piece of an overlong one) with where it came from."""

    text: str
    tokens: int
    section: int
    paragraph_start: bool
    first_line: int
    last_line: int


_CJK_CHAR = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_ASCII_WORD = re.compile(r"[A-Za-z]+")
_LONG_ASCII_WORD = re.compile(r"[A-Za-z]{10,}")
_NUMBER = re.compile(r"[0-9]+")
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_OTHER_WORD = re.compile(r"[^\W\d_A-Za-z\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s)|[。！？；…]+[”’」』）\"']*")
_SOFT_BREAK = re.compile(r"[，、,;:：]\s*|\s+")
_WHITESPACE = re.compile(r"\s+")
_CJK_OR_PUNCTUATION = r"[\u3000-\u303f\u3400-\u9fff\uff00-\uffef]"
_SPACE_BETWEEN_CJK = re.compile(f"(?<={_CJK_OR_PUNCTUATION}) (?={_CJK_OR_PUNCTUATION})")


def estimate_tokens(text: str) -> int:
    """Encoder tokens of `text` (without [CLS]/[SEP]), estimated without loading a tokenizer."""
    count = len(_CJK_CHAR.findall(text)) + len(_ASCII_WORD.findall(text)) + len(_PUNCTUATION.findall(text))
    count += sum((len(word) - 6) // 4 for word in _LONG_ASCII_WORD.findall(text))  # rare long words split
    count += sum(1 + (len(number) - 1) // 2 for number in _NUMBER.findall(text))
    count += sum(1 + len(word) // 4 for word in _OTHER_WORD.findall(text))
    return count


def chunk_document(doc: Document, *, size: int = DEFAULT_SIZE, overlap: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """Pack sentences into chunks of at most `size` estimated tokens, preferring paragraph boundaries.

    Chunks never cross md/html sections (headings change the topic); PDF chunks may run across pages
    ("pages 3–4"). A chunk starts with the previous chunk's last sentence when it fits in `overlap`.
    """
    if size < 8:
        raise ValueError("chunk size must be at least 8 tokens")
    overlap = max(0, min(overlap, size // 2))
    units = [unit for index, section in enumerate(doc.sections) for unit in _section_units(section, index, size)]
    chunks: list[Chunk] = []
    current: list[_Unit] = []
    carried = 0  # how many units at the start of `current` repeat the previous chunk's end

    def emit(keep_overlap: bool) -> None:
        nonlocal current, carried
        chunks.append(Chunk(_join(current), _location(doc, current), len(chunks)))
        tail = current[-1]
        keep = keep_overlap and 0 < tail.tokens <= overlap and len(current) > 1
        current, carried = ([tail], 1) if keep else ([], 0)

    for position, unit in enumerate(units):
        if current:
            tokens = sum(u.tokens for u in current)
            if unit.section != current[-1].section and doc.kind != "pdf":
                emit(keep_overlap=False)
            elif tokens + unit.tokens > size:
                emit(keep_overlap=True)
            elif unit.paragraph_start and tokens >= size // 2 and tokens + _paragraph_tokens(units, position) > size:
                emit(keep_overlap=True)  # the next paragraph would not fit whole: start it in a fresh chunk
            if carried and current[0].tokens + unit.tokens > size:  # no room beside the carried sentence
                current, carried = [], 0
        current.append(unit)
    if len(current) > carried:
        chunks.append(Chunk(_join(current), _location(doc, current), len(chunks)))
    return chunks


def _paragraph_tokens(units: list[_Unit], start: int) -> int:
    total, first = 0, units[start]
    for index in range(start, len(units)):
        unit = units[index]
        if index > start and (unit.paragraph_start or unit.section != first.section):
            break
        total += unit.tokens
    return total


def _section_units(section: Section, section_index: int, size: int) -> list[_Unit]:
    units: list[_Unit] = []
    text = section.text
    line, position = section.first_line, 0  # the line number at offset `position`
    for paragraph_start, paragraph_end in _spans(text, _PARAGRAPH_BREAK):
        first_in_paragraph = True
        for sentence_start, sentence_end in _sentence_spans(text, paragraph_start, paragraph_end):
            sentence = _normalise(text[sentence_start:sentence_end])
            if not sentence:
                continue
            line += text.count("\n", position, sentence_start)
            position = sentence_start
            last_line = line + text.count("\n", sentence_start, sentence_end)
            tokens = estimate_tokens(sentence)
            pieces = [(sentence, tokens)] if tokens <= size else _split_long(sentence, size)
            for piece, piece_tokens in pieces:
                units.append(_Unit(piece, piece_tokens, section_index, first_in_paragraph, line, last_line))
                first_in_paragraph = False
    return units


def _spans(text: str, separator: re.Pattern[str]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for match in separator.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _sentence_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, position = [], start
    for match in _SENTENCE_END.finditer(text, start, end):
        spans.append((position, match.end()))
        position = match.end()
    if position < end:
        spans.append((position, end))
    return spans


def _split_long(sentence: str, size: int) -> list[tuple[str, int]]:
    """A sentence longer than a chunk, cut at commas/spaces (or anywhere, for unbroken CJK runs)."""
    pieces: list[str] = []
    current, current_tokens = "", 0
    for start, end in _spans_keep_separators(sentence):
        part = sentence[start:end]
        part_tokens = estimate_tokens(part)
        if part_tokens > size:  # no break at all: cut by characters
            step = max(1, size // 2)
            pieces += [part[offset:offset + step] for offset in range(0, len(part), step)]
            continue
        if current and current_tokens + part_tokens > size:
            pieces.append(current)
            current, current_tokens = "", 0
        current += part
        current_tokens += part_tokens
    pieces.append(current)
    stripped = (piece.strip() for piece in pieces)
    return [(piece, estimate_tokens(piece)) for piece in stripped if piece]


def _spans_keep_separators(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for match in _SOFT_BREAK.finditer(text):
        spans.append((start, match.end()))
        start = match.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _normalise(text: str) -> str:
    return _SPACE_BETWEEN_CJK.sub("", _WHITESPACE.sub(" ", text).strip())


def _join(units: list[_Unit]) -> str:
    text = ""
    for index, unit in enumerate(units):
        if index == 0:
            text = unit.text
        elif unit.paragraph_start or unit.section != units[index - 1].section:
            text += "\n\n" + unit.text
        elif _CJK_CHAR.match(unit.text[:1]) and _CJK_CHAR.match(text[-1:]) or text[-1:] in "。！？；，、":
            text += unit.text
        else:
            text += " " + unit.text
    return text


def _location(doc: Document, units: list[_Unit]) -> str:
    if doc.kind == "txt":
        first, last = units[0].first_line, units[-1].last_line
        return f"line {first}" if first == last else f"lines {first}–{last}"
    if doc.kind == "pdf":
        pages = [doc.sections[units[0].section].location, doc.sections[units[-1].section].location]
        if pages[0] == pages[1]:
            return pages[0]
        return f"pages {pages[0].removeprefix('page ')}–{pages[1].removeprefix('page ')}"
    return doc.sections[units[0].section].location

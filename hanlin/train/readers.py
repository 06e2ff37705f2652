"""Documents out of text, JSONL and Parquet files (or folders of them), in a fixed, deterministic order."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hanlin.errors import HanlinError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
LARGE_TEXT_CHARS = 64 * 1024  # a plain text file longer than this is cut at paragraph boundaries
_BLANK_LINES = re.compile(r"\n(?:[ \t\r]*\n)+")
_NEWLINE = re.compile(r"\n")


@dataclass
class SourceFiles:
    """The files to read, in reading order, and those skipped (path, reason)."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


class UnreadableFile(Exception):
    """A file that cannot be read as its format at all: it is skipped with a warning."""


def collect_files(inputs: list[Path], exclude: list[Path] = ()) -> SourceFiles:
    """Inputs in the order given; a folder expands to its files recursively, sorted by relative path.

    Hidden files and folders inside a folder are ignored; files with other suffixes are skipped (and listed).
    Paths under any of `exclude` (the output being written) are never read.
    """
    if not inputs:
        raise HanlinError("no input given: pass text (.txt, .md), JSONL or Parquet files, or folders of them")
    excluded = [p.resolve() for p in exclude]
    sources = SourceFiles()
    seen: set[Path] = set()

    def add(path: Path) -> None:
        real = path.resolve()
        if real in seen or any(real == e or e in real.parents for e in excluded):
            return
        seen.add(real)
        if path.suffix.lower() in SUPPORTED_SUFFIXES:
            sources.files.append(path)
        else:
            supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
            sources.skipped.append((path, f"unsupported file type (supported: {supported})"))

    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            for child in sorted(path.rglob("*"), key=lambda p: p.relative_to(path).as_posix()):
                hidden = any(part.startswith(".") for part in child.relative_to(path).parts)
                if child.is_file() and not hidden:
                    add(child)
        elif path.is_file():
            add(path)
        else:
            raise HanlinError(f"{path}: no such file or directory")
    return sources


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file: a text file is one document (cut into ~64 KiB pieces at blank lines when
    larger), each JSONL line and each Parquet row is one. Whitespace-only documents are left out.

    Raises UnreadableFile when the file cannot be read as its format, HanlinError when a record is wrong.
    """
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        documents = split_large_text(_read_text(path))
    elif suffix in JSONL_SUFFIXES:
        documents = _jsonl_documents(path, text_field)
    elif suffix in PARQUET_SUFFIXES:
        documents = _parquet_documents(path, text_field)
    else:
        raise UnreadableFile(f"unsupported file type {suffix or '(none)'}")
    for text in documents:
        if text.strip():
            yield text


def split_large_text(text: str, target_chars: int = LARGE_TEXT_CHARS) -> list[str]:
    """`text` as pieces of about target_chars each, cut after a blank line (after a line break where a piece
    has no blank line); the pieces joined give `text` back."""
    if len(text) <= target_chars:
        return [text]
    pieces = []
    for part in _cut(text, _BLANK_LINES, target_chars):
        pieces.extend(_cut(part, _NEWLINE, target_chars) if len(part) > 2 * target_chars else [part])
    return pieces


def _cut(text: str, boundary: re.Pattern[str], target_chars: int) -> list[str]:
    """Cut at the first boundary at or after every target_chars characters."""
    pieces, start = [], 0
    for match in boundary.finditer(text):
        if match.end() - start >= target_chars and match.end() < len(text):
            pieces.append(text[start : match.end()])
            start = match.end()
    pieces.append(text[start:])
    return pieces


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UnreadableFile(f"not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise UnreadableFile(error.strerror or str(error)) from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as error:
        raise UnreadableFile(error.strerror or str(error)) from None
    with handle:
        try:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield _jsonl_text(path, number, line, text_field)
        except UnicodeDecodeError as error:
            raise UnreadableFile(f"not UTF-8 text (byte {error.start} of a line)") from None


def _jsonl_text(path: Path, number: int, line: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        message = f"{path}, line {number}: not valid JSON ({error.msg}); each line must be one JSON object"
        raise HanlinError(message) from None
    if not isinstance(record, dict):
        raise HanlinError(
            f"{path}, line {number}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}"
        )
    if text_field not in record:
        fields = ", ".join(sorted(record)) or "none"
        raise HanlinError(
            f"{path}, line {number}: no {text_field!r} field (fields: {fields}); name the text field with --text-field"
        )
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise HanlinError(f"{path}, line {number}: field {text_field!r} holds {type(value).__name__}, not text")
    return value


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise UnreadableFile(f"not a readable Parquet file: {error}") from None
    with parquet:
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise HanlinError(
                f"{path}: no {text_field!r} column (columns: {', '.join(names) or 'none'}); "
                "name the text column with --text-field"
            )
        column_type = parquet.schema_arrow.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise HanlinError(f"{path}: column {text_field!r} holds {column_type}, not text")
        try:
            for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    yield value or ""
        except (OSError, pa.ArrowException) as error:
            raise UnreadableFile(f"Parquet data unreadable: {error}") from None

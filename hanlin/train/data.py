"""Token shards for training: `prepare` turns documents into memory-mapped token files; `TokenDataset` reads them.

A dataset directory holds, per split (train, validation), `<split>.bin` (every document's tokens followed by
EOS, one flat array of uint16 or uint32) and `<split>.idx.npy` (int64 offset of each document's first token,
with the total appended), and one `meta.json` describing the tokenizer, the sources and the counts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from hanlin.errors import HanlinError
from hanlin.tokenizer import Tokenizer
from hanlin.train.readers import SourceFiles, UnreadableFile, collect_files, read_documents

FORMAT = "hanlin-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
MAKE_ONE = "make one with: hanlin data prepare INPUT... --out DIR"
_BATCH_CHARS = 1 << 20  # text handed to the tokenizer at once (it spreads a batch over the cores)
_BATCH_DOCUMENTS = 1024


class DataWarning(UserWarning):
    """Something in the input was left out (an unreadable or unsupported file)."""


@dataclass
class SplitSummary:
    documents: int = 0
    tokens: int = 0


@dataclass
class PrepareSummary:
    out_dir: Path
    tokenizer: str
    vocab_size: int
    dtype: str
    splits: dict[str, SplitSummary]
    sources: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.splits.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.splits.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# ---- tokenizer ---------------------------------------------------------------------------------
def load_tokenizer(name_or_path: str | Path) -> tuple[Tokenizer, str]:
    """(tokenizer, resolved path) of a model name, Hugging Face directory or .gguf file, without its weights."""
    from hanlin.checkpoints.registry import resolve

    path = resolve(name_or_path)
    if path.is_dir():
        return Tokenizer.from_file(path), str(path)
    from hanlin.checkpoints.gguf import open_gguf
    from hanlin.checkpoints.gguf_metadata import read_gguf_metadata

    return Tokenizer.from_gguf_metadata(read_gguf_metadata(open_gguf(path))), str(path)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of the vocabulary (every id and its token): equal for the same vocabulary in any file format."""
    vocab = sorted((i, t) for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items())
    text = json.dumps([tokenizer.vocab_size, vocab], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---- the split -----------------------------------------------------------------------------------
def validation_documents(num_documents: int, fraction: float, seed: int) -> np.ndarray:
    """[num_documents] bool, True for validation: a hash of (seed, document index) below `fraction`; at least
    one validation document when there are two or more (and fraction > 0), and always one train document."""
    u = _uniform_hash(num_documents, seed)
    chosen = u < fraction
    if fraction > 0 and num_documents >= 2 and not chosen.any():
        chosen[np.argmin(u)] = True
    if num_documents and chosen.all():
        chosen[np.argmax(u)] = False
    return chosen


def _uniform_hash(n: int, seed: int) -> np.ndarray:
    """splitmix64 of each index mixed with the seed, as floats in [0, 1)."""
    seed_mix = _splitmix64(np.array([seed % (1 << 64)], dtype=np.uint64))[0]
    z = _splitmix64(np.arange(n, dtype=np.uint64) ^ seed_mix)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


# ---- prepare -------------------------------------------------------------------------------------
def prepare(
    inputs: list[Path],
    out_dir: Path,
    tokenizer: Tokenizer,
    *,
    validation_fraction: float = 0.01,
    seed: int = 0,
    text_field: str = "text",
    append_eos: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    tokenizer_name: str | None = None,
    tokenizer_source: str | None = None,
) -> PrepareSummary:
    """Tokenize every document of `inputs` into token shards in `out_dir`, split into train/validation by
    document. The directory appears complete or not at all (written next to it, then renamed)."""
    start = time.perf_counter()
    out_dir = Path(out_dir).expanduser()
    inputs = [Path(p).expanduser() for p in inputs]
    if not 0 <= validation_fraction < 1:
        raise HanlinError(f"the validation fraction must be in [0, 1), got {validation_fraction}")
    if append_eos and tokenizer.eos_token_id is None:
        raise HanlinError("the tokenizer has no EOS token to end documents with; pick another tokenizer")
    _check_out_dir(out_dir, inputs, overwrite)
    sources = collect_files(inputs, exclude=[out_dir])
    dtype = token_dtype(tokenizer.vocab_size)
    name = tokenizer_name or "custom"
    with _progress(progress) as bar:
        counts = _count_documents(sources, text_field, bar)
        _warn_skipped(sources)
        total = sum(counts.values())
        if total == 0:
            readable = ", ".join(str(p) for p in inputs)
            raise HanlinError(
                f"no documents found in {readable}; give text (.txt, .md), JSONL or Parquet files with text"
            )
        is_validation = validation_documents(total, validation_fraction, seed)
        partial = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
        partial.mkdir(parents=True)
        try:
            splits = _write_shards(partial, sources.files, text_field, tokenizer, dtype, is_validation, append_eos, bar)
            meta = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "tokenizer": {
                    "name": name, "source": tokenizer_source, "vocab_size": tokenizer.vocab_size,
                    "eos_id": tokenizer.eos_token_id, "fingerprint": tokenizer_fingerprint(tokenizer),
                },
                "dtype": dtype.name,
                "append_eos": append_eos,
                "splits": {split: vars(summary) for split, summary in splits.items()},
                "sources": [str(p) for p in sources.files],
                "skipped": [[str(p), why] for p, why in sources.skipped],
                "seed": seed,
                "validation_fraction": validation_fraction,
                "text_field": text_field,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            (partial / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
            _replace(partial, out_dir)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return PrepareSummary(
        out_dir, name, tokenizer.vocab_size, dtype.name, splits, meta["sources"],
        [(str(p), why) for p, why in sources.skipped], time.perf_counter() - start,
    )


def _check_out_dir(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise HanlinError(f"{out_dir} is a file; --out must name a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise HanlinError(f"{out_dir} is not empty; choose another directory or pass --overwrite to replace it")
    if not (out_dir / "meta.json").is_file():
        raise HanlinError(
            f"{out_dir} is not empty and is not a Hanlin dataset (no meta.json); refusing to replace it"
            " — choose a new or empty directory"
        )
    real = out_dir.resolve()
    for path in inputs:
        if path.resolve() == real or real in path.resolve().parents:
            raise HanlinError(f"input {path} is inside {out_dir}, which --overwrite would delete")


def _count_documents(sources: SourceFiles, text_field: str, bar: _Bar) -> dict[Path, int]:
    """Documents per readable file (the split needs the total before any is written); unreadable files
    move to sources.skipped."""
    counts: dict[Path, int] = {}
    bar.start("reading files", len(sources.files))
    for path in sources.files:
        try:
            counts[path] = sum(1 for _ in read_documents(path, text_field))
        except UnreadableFile as error:
            sources.skipped.append((path, str(error)))
        bar.advance(1)
    sources.files = [p for p in sources.files if p in counts]
    return counts


def _warn_skipped(sources: SourceFiles) -> None:
    if sources.skipped:
        listed = "; ".join(f"{path} ({why})" for path, why in sources.skipped)
        warnings.warn(f"skipped {len(sources.skipped)} file(s): {listed}", DataWarning, stacklevel=3)


def _write_shards(
    directory: Path,
    files: list[Path],
    text_field: str,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    is_validation: np.ndarray,
    append_eos: bool,
    bar: _Bar,
) -> dict[str, SplitSummary]:
    summaries = {split: SplitSummary() for split in SPLITS}
    starts: dict[str, list[int]] = {split: [] for split in SPLITS}
    outputs = {split: (directory / f"{split}.bin").open("wb") for split in SPLITS}
    eos = [tokenizer.eos_token_id] if append_eos else []
    bar.start("tokenizing documents", len(is_validation))
    try:
        documents = (text for path in files for text in read_documents(path, text_field))
        index = 0
        for batch in _batches(documents):
            try:
                encodings = tokenizer.backend.encode_batch_fast(batch, add_special_tokens=False)
            except Exception as error:  # tokenizers raises a bare Exception (e.g. no unknown token for a word)
                message = f"the tokenizer failed on the input: {error}; use a tokenizer that covers this text"
                raise HanlinError(message) from None
            for encoding in encodings:
                split = SPLITS[1] if is_validation[index] else SPLITS[0]
                ids = encoding.ids + eos
                starts[split].append(summaries[split].tokens)
                np.asarray(ids, dtype=dtype).tofile(outputs[split])
                summaries[split].documents += 1
                summaries[split].tokens += len(ids)
                index += 1
            bar.advance(len(batch), tokens=sum(s.tokens for s in summaries.values()))
    finally:
        for handle in outputs.values():
            handle.close()
    if index != len(is_validation):
        counted = len(is_validation)
        raise HanlinError(f"the input changed while it was read ({counted} documents, then {index}); run again")
    for split in SPLITS:
        np.save(directory / f"{split}.idx.npy", np.array([*starts[split], summaries[split].tokens], dtype=np.int64))
    return summaries


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _replace(partial: Path, out_dir: Path) -> None:
    """Move the finished `partial` directory to `out_dir`, replacing what is there (already checked)."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        partial.rename(out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    out_dir.rename(old)
    partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


class _Bar:
    """A rich progress bar on stderr (files read, then documents tokenized with a token count); or nothing."""

    def __init__(self, progress: Any | None) -> None:
        self.progress = progress
        self.task: Any = None

    def start(self, description: str, total: int) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(description, total=total, detail="")

    def advance(self, done: int, tokens: int | None = None) -> None:
        if self.progress is not None:
            detail = {} if tokens is None else {"detail": f"{tokens:,} tokens"}
            self.progress.update(self.task, advance=done, **detail)


@contextmanager
def _progress(enabled: bool) -> Iterator[_Bar]:
    if not (enabled and sys.stderr.isatty()):
        yield _Bar(None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"))
    with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True), transient=True) as progress:
        yield _Bar(progress)


# ---- reading a dataset -----------------------------------------------------------------------------
class TokenDataset:
    """One split of a prepared dataset, memory-mapped: `tokens` [num_tokens] and `doc_starts`
    [num_documents + 1] (each document's first token offset, then num_tokens)."""

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        self.directory = Path(directory).expanduser()
        self.split = split
        self.meta = read_meta(self.directory)
        splits = self.meta["splits"]
        if split not in splits:
            raise HanlinError(f"{self.directory} has no {split!r} split (it has: {', '.join(splits)})")
        counts = splits[split]
        dtype = np.dtype(self.meta["dtype"])
        data_path = self.directory / f"{split}.bin"
        index_path = self.directory / f"{split}.idx.npy"
        num_tokens, num_documents = int(counts["tokens"]), int(counts["documents"])
        size = data_path.stat().st_size if data_path.is_file() else None
        if size != num_tokens * dtype.itemsize:
            found = "is missing" if size is None else f"has {size} bytes"
            raise HanlinError(
                f"{data_path} {found}, but meta.json says {num_tokens} {dtype.name} tokens: the dataset is "
                f"incomplete or corrupt; {MAKE_ONE} --overwrite"
            )
        self.tokens: np.ndarray = (
            np.memmap(data_path, dtype=dtype, mode="r", shape=(num_tokens,)) if num_tokens else np.zeros(0, dtype)
        )
        try:
            starts = np.load(index_path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise HanlinError(f"{index_path}: unreadable document index ({error}); {MAKE_ONE} --overwrite") from None
        if (starts.dtype != np.int64 or starts.shape != (num_documents + 1,) or starts[0] != 0
                or starts[-1] != num_tokens or np.any(np.diff(starts) < 0)):
            raise HanlinError(
                f"{index_path} does not match meta.json ({num_documents} documents); {MAKE_ONE} --overwrite"
            )
        self.doc_starts: np.ndarray = starts

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def tokenizer_name(self) -> str:
        return str(self.meta["tokenizer"]["name"])

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.doc_starts[index] : self.doc_starts[index + 1]]

    def check_tokenizer(self, tokenizer: Tokenizer, name: str | None = None) -> None:
        """Raise HanlinError when the dataset was made with a different vocabulary than `tokenizer`'s."""
        made = self.meta["tokenizer"]
        fingerprint = tokenizer_fingerprint(tokenizer)
        if made["vocab_size"] == tokenizer.vocab_size and made["fingerprint"] == fingerprint:
            return
        given = name or "the model's tokenizer"
        raise HanlinError(
            f"{self.directory} was prepared with tokenizer {made['name']!r} (vocabulary {made['vocab_size']}, "
            f"fingerprint {made['fingerprint']}) but training uses {given!r} (vocabulary {tokenizer.vocab_size}, "
            f"fingerprint {fingerprint}); prepare the data again with: hanlin data prepare INPUT... --out DIR "
            f"--tokenizer {name or 'MODEL'}"
        )


def read_meta(directory: Path) -> dict[str, Any]:
    """A dataset's meta.json, checked; HanlinError naming the path and how to make one otherwise."""
    path = directory / "meta.json"
    if not directory.is_dir():
        raise HanlinError(f"{directory}: no such dataset directory; {MAKE_ONE}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HanlinError(f"{directory} is not a prepared dataset (no meta.json); {MAKE_ONE}") from None
    except (OSError, ValueError) as error:
        raise HanlinError(f"{path}: unreadable ({error}); {MAKE_ONE} --overwrite") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HanlinError(f"{path} does not describe a Hanlin token dataset; {MAKE_ONE}")
    if meta.get("version") != FORMAT_VERSION:
        raise HanlinError(
            f"{path}: dataset format version {meta.get('version')} is not supported (this Hanlin reads "
            f"version {FORMAT_VERSION}); {MAKE_ONE} --overwrite"
        )
    try:
        np.dtype(meta["dtype"])
        for counts in meta["splits"].values():
            int(counts["tokens"]), int(counts["documents"])
        meta["tokenizer"]["vocab_size"], meta["tokenizer"]["fingerprint"], meta["tokenizer"]["name"]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise HanlinError(f"{path} is incomplete ({error!r} missing or wrong); {MAKE_ONE} --overwrite") from None
    return meta

"""SearchIndex: documents, chunks, an FTS5 table (BM25) and embedding vectors in one SQLite file.

Dense search loads every vector into one NumPy matrix (cached until the index changes) and ranks by a
matrix-vector product: 10k chunks × 384 dimensions is 15 MB and a millisecond. Hybrid search fuses the
BM25 and dense rankings by reciprocal rank.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hanlin.apps.search.chunking import DEFAULT_OVERLAP, DEFAULT_SIZE, Chunk, chunk_document
from hanlin.apps.search.documents import Document, file_kind, parse_document
from hanlin.apps.search.errors import EmptyIndexError, SearchError
from hanlin.apps.search.hybrid import CANDIDATES, dense_weight, reciprocal_rank_fusion
from hanlin.apps.search.index_files import collect_files, resolve_source
from hanlin.apps.search.index_schema import connect, ensure_schema, read_meta, write_meta
from hanlin.apps.search.lexical import index_text, match_expression, substring_terms
from hanlin.apps.search.types import Passage
from hanlin.errors import HanlinError

if TYPE_CHECKING:
    from hanlin.embeddings import Embedder

SEARCH_MODES = ("hybrid", "bm25", "dense")
EMBED_BATCH = 32  # the encoder sorts by length; 32 vs 64 measured equal within noise
EMBED_GROUP = 256  # chunks gathered across files before one embed() call, so small files share batches


@dataclass
class AddReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    chunks: int = 0  # chunks written
    seconds: float = 0.0
    bytes: int = 0  # bytes of the files (re)indexed
    removed: list[str] = field(default_factory=list)  # indexed files under an added folder that no longer exist
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("read", "chunk", "embed", "write"), 0.0))


@dataclass
class DocumentInfo:
    source: str
    title: str
    kind: str
    mtime: float
    chunks: int
    bytes: int


@dataclass
class IndexStats:
    documents: int
    chunks: int
    bytes: int
    embedding_model: str
    dim: int | None
    path: str
    file_size: int
    lexical: str
    embedding_window: int | None  # encoder tokens embedded per chunk; None: the whole chunk (older files)


@dataclass
class _Pending:
    doc: Document
    chunks: list[Chunk]
    size: int
    sha256: str


class SearchIndex:
    """A local index of files and pages; implements the Retriever protocol. Safe to share between threads."""

    def __init__(self, path: str | Path, *, embedder: Embedder | None = None, embedding_model: str = "minilm",
                 lexical: str | None = None, chunk_size: int = DEFAULT_SIZE,
                 chunk_overlap: int = DEFAULT_OVERLAP) -> None:
        """lexical: "jieba" or "trigram" for a new index (None: the file's choice, else jieba);
        chunk_size / chunk_overlap: estimated encoder tokens (see chunking.py)."""
        self.path = str(path) if str(path) == ":memory:" else str(Path(path).expanduser())
        self._lock = threading.RLock()
        self._db = connect(self.path)
        try:
            self._meta = ensure_schema(self._db, lexical)
        except Exception:
            self._db.close()
            raise
        self.lexical = self._meta["lexical"]
        self.embedding_window = int(self._meta["embedding_window"]) if "embedding_window" in self._meta else None
        self._embedder = embedder
        self._embedding_model = embedding_model
        self._chunking = {"size": chunk_size, "overlap": chunk_overlap}
        self._generation = 0  # bumped by this object's writes (PRAGMA data_version sees other connections')
        self._vectors_key: tuple[int, int] | None = None
        self._matrix = np.zeros((0, 0), dtype=np.float32)
        self._matrix_ids = np.zeros(0, dtype=np.int64)

    # --- adding -------------------------------------------------------------------------------------

    def add(self, paths: Sequence[str | Path], *, progress: Callable[[str], None] | None = None) -> AddReport:
        """Index files and folders (recursively). Unchanged files (same mtime and size, or same content)
        are skipped; changed ones replaced, each in its own transaction; unreadable ones reported in
        `skipped` while the rest indexes. Files deleted from an added folder leave the index."""
        started = time.perf_counter()
        report = AddReport()
        pending: list[_Pending] = []
        notify = progress or (lambda message: None)
        files = collect_files(list(paths))
        report.removed = self._remove_deleted([Path(resolve_source(p)) for p in paths if Path(p).expanduser().is_dir()])
        for file in files:
            item = self._prepare_file(file, report)
            notify(str(file))
            if item is None:
                continue
            pending.append(item)
            if sum(len(p.chunks) for p in pending) >= EMBED_GROUP:
                self._store(pending, report)
                pending = []
        self._store(pending, report)
        report.seconds = time.perf_counter() - started
        return report

    def add_documents(self, docs: Sequence[Document]) -> int:
        """Index documents made elsewhere (web pages); a document replaces one with the same source."""
        report = AddReport()
        pending = []
        for doc in docs:
            text = doc.text.encode("utf-8")
            chunks = chunk_document(doc, **self._chunking)
            if chunks:
                pending.append(_Pending(doc, chunks, len(text), hashlib.sha256(text).hexdigest()))
        self._store(pending, report)
        return report.chunks

    def _prepare_file(self, file: Path, report: AddReport) -> _Pending | None:
        source = str(file)
        try:
            file_kind(file)
            stat = file.stat()
            with self._lock:
                row = self._db.execute("SELECT mtime, size, sha256 FROM documents WHERE source = ?",
                                       (source,)).fetchone()
            if row and row[0] == stat.st_mtime and row[1] == stat.st_size:
                report.unchanged.append(source)
                return None
            clock = time.perf_counter()
            data = file.read_bytes()
            sha256 = hashlib.sha256(data).hexdigest()
            if row and row[2] == sha256:
                with self._lock:
                    self._db.execute("UPDATE documents SET mtime = ?, size = ? WHERE source = ?",
                                     (stat.st_mtime, stat.st_size, source))
                report.unchanged.append(source)
                return None
            doc = parse_document(file, data, mtime=stat.st_mtime)
            report.timings["read"] += time.perf_counter() - clock
            clock = time.perf_counter()
            chunks = chunk_document(doc, **self._chunking)
            report.timings["chunk"] += time.perf_counter() - clock
        except HanlinError as error:
            report.skipped.append((source, str(error)))
            return None
        except OSError as error:
            report.skipped.append((source, f"cannot read: {error.strerror or error}"))
            return None
        except Exception as error:  # a parser failing on one odd file must not stop the others
            report.skipped.append((source, f"cannot parse: {type(error).__name__}: {error}"))
            return None
        if not chunks:
            report.skipped.append((source, "no text to index"))
            return None
        return _Pending(doc, chunks, len(data), sha256)

    def _store(self, pending: list[_Pending], report: AddReport) -> None:
        """Embed the pending documents' chunks in one call, then write each document in one transaction."""
        if not pending:
            return
        embedder = self.embedder
        clock = time.perf_counter()
        texts = [chunk.text for item in pending for chunk in item.chunks]
        vectors = embedder.embed(texts, batch_size=EMBED_BATCH, max_tokens=self.embedding_window)
        report.timings["embed"] += time.perf_counter() - clock
        clock = time.perf_counter()
        offset = 0
        for item in pending:
            count = len(item.chunks)
            replaced = self._write(item, vectors[offset:offset + count])
            offset += count
            (report.updated if replaced else report.added).append(item.doc.source)
            report.chunks += count
            report.bytes += item.size
        report.timings["write"] += time.perf_counter() - clock

    def _write(self, item: _Pending, vectors: np.ndarray) -> bool:
        """Replace the document's rows atomically; True when it was in the index before."""
        doc = item.doc
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT id FROM documents WHERE source = ?", (doc.source,)).fetchone()
                values = (doc.title, doc.kind, doc.mtime, item.size, item.sha256, time.time())
                if row:
                    document_id = row[0]
                    self._delete_chunks(document_id)
                    self._db.execute("UPDATE documents SET title = ?, kind = ?, mtime = ?, size = ?, sha256 = ?, "
                                     "indexed_at = ? WHERE id = ?", (*values, document_id))
                else:
                    document_id = self._db.execute(
                        "INSERT INTO documents(source, title, kind, mtime, size, sha256, indexed_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (doc.source, *values)).lastrowid
                for chunk, vector in zip(item.chunks, vectors):
                    chunk_id = self._db.execute(
                        "INSERT INTO chunks(document_id, ordinal, text, location, vector) VALUES (?, ?, ?, ?, ?)",
                        (document_id, chunk.ordinal, chunk.text, chunk.location, vector.tobytes())).lastrowid
                    self._db.execute("INSERT INTO chunks_fts(rowid, body) VALUES (?, ?)",
                                     (chunk_id, index_text(chunk.text, self.lexical)))
                if "embedding_model" not in self._meta:
                    embedder = self.embedder
                    write_meta(self._db, {"embedding_model": embedder.name, "embedding_dim": str(embedder.dim)})
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._meta = read_meta(self._db)
            self._generation += 1
        return row is not None

    def _delete_chunks(self, document_id: int) -> None:
        self._db.execute("DELETE FROM chunks_fts WHERE rowid IN (SELECT id FROM chunks WHERE document_id = ?)",
                         (document_id,))
        self._db.execute("DELETE FROM chunks WHERE document_id = ?", (document_id,))

    # --- removing and listing -----------------------------------------------------------------------

    def remove(self, paths: Sequence[str | Path]) -> list[str]:
        """Remove documents by path or URL; a folder removes everything under it. Returns the sources removed."""
        removed: list[str] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for path in paths:
                    source = resolve_source(path)
                    prefix = source.rstrip("/") + "/"
                    rows = self._db.execute(
                        "SELECT id, source FROM documents WHERE source = ? OR source = ? "
                        "OR substr(source, 1, ?) = ?", (source, str(path), len(prefix), prefix)).fetchall()
                    for document_id, document_source in rows:
                        self._delete_chunks(document_id)
                        self._db.execute("DELETE FROM documents WHERE id = ?", (document_id,))
                        removed.append(document_source)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._generation += 1
        return list(dict.fromkeys(removed))

    def _remove_deleted(self, folders: list[Path]) -> list[str]:
        with self._lock:
            sources = [row[0] for row in self._db.execute("SELECT source FROM documents").fetchall()]
        gone = [source for source in sources if "://" not in source and not os.path.exists(source)
                and any(source.startswith(str(folder).rstrip("/") + "/") for folder in folders)]
        return self.remove(gone) if gone else []

    def documents(self) -> list[DocumentInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT d.source, d.title, d.kind, d.mtime, COUNT(c.id), d.size FROM documents d "
                "LEFT JOIN chunks c ON c.document_id = d.id GROUP BY d.id ORDER BY d.source").fetchall()
        return [DocumentInfo(*row) for row in rows]

    def stats(self) -> IndexStats:
        with self._lock:
            documents, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM documents").fetchone()
            meta = read_meta(self._db)
        file_size = 0
        if self.path != ":memory:":
            file_size = sum(os.path.getsize(p) for p in (self.path, self.path + "-wal") if os.path.exists(p))
        model = meta.get("embedding_model") or (self._embedder.name if self._embedder else self._embedding_model)
        dim = int(meta["embedding_dim"]) if "embedding_dim" in meta else None
        return IndexStats(documents, self.chunk_count(), size, model, dim, self.path, file_size, self.lexical,
                          self.embedding_window)

    def chunk_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    # --- searching ----------------------------------------------------------------------------------

    def search(self, query: str, k: int = 5, *, mode: str = "hybrid") -> list[Passage]:
        """The k best passages for `query` (mode "hybrid", "bm25" or "dense"), best first."""
        if mode not in SEARCH_MODES:
            raise SearchError(f"unknown search mode {mode!r} (choose from {', '.join(SEARCH_MODES)})")
        if not query or not query.strip():
            raise SearchError("the query is empty")
        if k < 1:
            raise SearchError("k must be at least 1")
        if self.chunk_count() == 0:
            where = "" if self.path == ":memory:" else f" {self.path}"
            raise EmptyIndexError(f"the index{where} is empty: add documents with `hanlin index add PATH`")
        query = query.strip()
        if mode == "bm25":
            ranked = self._bm25(query, k)
        elif mode == "dense":
            ranked = self._dense(query, k)
        else:
            lexical = [chunk_id for chunk_id, _ in self._bm25(query, CANDIDATES)]
            dense = [chunk_id for chunk_id, _ in self._dense(query, CANDIDATES)]
            weights = [1.0, dense_weight(query, self.embedder.name)]
            fused = reciprocal_rank_fusion([lexical, dense], weights=weights)
            ranked = [(chunk_id, score) for chunk_id, score in fused if score > 0][:k]
        return self._passages(ranked)

    def _bm25(self, query: str, limit: int) -> list[tuple[int, float]]:
        expression = match_expression(query, self.lexical)
        ranked: list[tuple[int, float]] = []
        with self._lock:
            if expression is not None:
                rows = self._db.execute(
                    "SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? "
                    "ORDER BY bm25(chunks_fts) LIMIT ?", (expression, limit)).fetchall()
                ranked = [(chunk_id, -score) for chunk_id, score in rows]
            if self.lexical == "trigram" and len(ranked) < limit and (terms := substring_terms(query)):
                ranked += self._substring_search(terms, limit, after=ranked)
        return ranked

    def _substring_search(self, terms: list[str], limit: int, *,
                          after: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """Chunks containing terms too short for trigrams, by distinct terms then occurrences; ranked
        below the trigram matches already in `after` (their scores scaled under the lowest of those)."""
        patterns = ["%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%" for term in terms]
        where = " OR ".join("text LIKE ? ESCAPE '\\'" for _ in patterns)
        rows = self._db.execute(f"SELECT id, lower(text) FROM chunks WHERE {where}", patterns).fetchall()
        seen = {chunk_id for chunk_id, _ in after}
        scored = []
        for chunk_id, text in rows:
            if chunk_id not in seen:
                counts = [text.count(term) for term in terms]
                scored.append((chunk_id, sum(1 for c in counts if c) + min(sum(counts), 99) / 100))
        scored.sort(key=lambda pair: (-pair[1], pair[0]))
        scored = scored[:limit - len(after)]
        if after and scored:
            floor, top = after[-1][1], scored[0][1]
            scored = [(chunk_id, floor * score / (top + 1)) for chunk_id, score in scored]
        return scored

    def _dense(self, query: str, limit: int) -> list[tuple[int, float]]:
        matrix, ids = self._vectors()
        if not len(ids):
            return []
        query_vector = self.embedder.embed([query])[0]
        scores = matrix @ query_vector
        limit = min(limit, len(ids))
        top = np.argpartition(-scores, limit - 1)[:limit]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(ids[i]), float(scores[i])) for i in top]

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            key = (self._generation, self._db.execute("PRAGMA data_version").fetchone()[0])
            if key != self._vectors_key:
                self.embedder  # checks the index's embedding model before its vectors are used
                rows = self._db.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
                dim = int(self._meta.get("embedding_dim", 0)) or self.embedder.dim
                self._matrix_ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
                self._matrix = np.frombuffer(b"".join(row[1] for row in rows), dtype="<f4").reshape(len(rows), dim)
                self._vectors_key = key
            return self._matrix, self._matrix_ids

    def _passages(self, ranked: list[tuple[int, float]]) -> list[Passage]:
        if not ranked:
            return []
        ids = [chunk_id for chunk_id, _ in ranked]
        with self._lock:
            rows = self._db.execute(
                f"SELECT c.id, c.text, d.source, d.title, c.location FROM chunks c JOIN documents d "
                f"ON d.id = c.document_id WHERE c.id IN ({','.join('?' * len(ids))})", ids).fetchall()
        by_id = {row[0]: row for row in rows}
        return [Passage(text=by_id[i][1], source=by_id[i][2], title=by_id[i][3], location=by_id[i][4],
                        score=score, chunk_id=i) for i, score in ranked if i in by_id]

    # --- the embedding model ------------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        """The encoder (loaded on first use), checked against the model the index was built with."""
        with self._lock:
            if self._embedder is None:
                from hanlin.embeddings import load_embedder

                self._embedder = load_embedder(self._embedding_model)
            built_with, dim = self._meta.get("embedding_model"), self._meta.get("embedding_dim")
            if built_with and (built_with != self._embedder.name or int(dim or 0) != self._embedder.dim):
                raise SearchError(
                    f"the index {self.path} was built with the embedding model {built_with} ({dim} dimensions), "
                    f"not {self._embedder.name} ({self._embedder.dim}); use that model or a new index file")
            return self._embedder

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

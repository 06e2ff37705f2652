"""The index's SQLite file: connection settings, tables, and the meta table that pins its choices."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from hanlin.apps.search.errors import SearchError
from hanlin.apps.search.lexical import DEFAULT_LEXICAL, FTS_TOKENIZERS, check_mode

SCHEMA_VERSION = "1"
# A chunk's vector embeds its first EMBEDDING_WINDOW encoder tokens ([CLS] and [SEP] included); BM25 reads
# all of it. all-MiniLM-L6-v2 was trained on 128-token inputs: on evals/search, windows of 128 / 96 / 64 /
# whole chunks (≤ 256) gave dense recall@5 78.4 / 67.0 / 65.9 / 71.6 (literal questions) and 56.8 / 61.4 /
# 50.0 / 52.3 (paraphrased), hybrid 89.8 / 84.1 / 83.0 / 90.9 and 62.5 / 62.5 / 59.1 / 63.6, at ~1.8x the
# indexing speed of whole chunks (docs/experiments/search.md). Index files made before this setting have no
# meta entry and keep embedding whole chunks.
EMBEDDING_WINDOW = 128

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL UNIQUE,      -- absolute file path or URL
    title TEXT NOT NULL,
    kind TEXT NOT NULL,               -- txt | md | html | pdf | web
    mtime REAL NOT NULL,
    size INTEGER NOT NULL,            -- bytes of the file (of the text, for web pages)
    sha256 TEXT NOT NULL,
    indexed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    location TEXT NOT NULL,
    vector BLOB NOT NULL              -- float32 little-endian, L2-normalised, embedding_dim values
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id, ordinal);
"""


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection usable from several threads (the caller serialises access with a lock)."""
    in_memory = str(path) == ":memory:"
    if not in_memory:
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        connection = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        if not in_memory:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        return connection
    except sqlite3.DatabaseError as error:
        raise SearchError(f"cannot open the index {path}: {error}") from error


def ensure_schema(connection: sqlite3.Connection, lexical: str | None) -> dict[str, str]:
    """Create the tables on a new file (with `lexical`, default jieba); check an existing one. Returns meta."""
    try:
        existing = connection.execute("SELECT name FROM sqlite_master WHERE name = 'meta'").fetchone()
        meta = read_meta(connection) if existing else {}
    except sqlite3.DatabaseError as error:
        raise SearchError(f"not a Hanlin index (or a damaged one): {error}") from error
    if meta:
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise SearchError(f"index schema version {meta.get('schema_version')!r} is not the supported "
                              f"{SCHEMA_VERSION!r}: rebuild the index")
        if lexical is not None and lexical != meta["lexical"]:
            raise SearchError(f"this index was created with lexical={meta['lexical']!r}, not {lexical!r}; "
                              "create a new index file to change it")
        return meta
    lexical = check_mode(lexical or DEFAULT_LEXICAL)
    with connection:
        connection.execute("BEGIN")
        for statement in _TABLES.split(";"):
            if statement.strip():
                connection.execute(statement)
        # a plain (content-storing) FTS5 table keyed by chunk id: the FTS text differs from the chunk text
        # in jieba mode (segmented), and SQLite < 3.43 has no contentless-delete tables
        connection.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(body, "
                           f"tokenize='{FTS_TOKENIZERS[lexical]}')")
        connection.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                               [("schema_version", SCHEMA_VERSION), ("lexical", lexical),
                                ("embedding_window", str(EMBEDDING_WINDOW))])
    return read_meta(connection)


def read_meta(connection: sqlite3.Connection) -> dict[str, str]:
    return dict(connection.execute("SELECT key, value FROM meta").fetchall())


def write_meta(connection: sqlite3.Connection, values: dict[str, str]) -> None:
    connection.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(values.items()))

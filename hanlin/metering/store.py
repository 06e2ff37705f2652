"""API keys and usage rows in SQLite or PostgreSQL; only a SHA-256 hash of each key is ever stored."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from hanlin.errors import HanlinError
from hanlin.metering.backends import ConnectionPool, PostgresBackend, SQLiteBackend, backend_for, default_db

DEFAULT_DB = default_db()
KEY_PREFIX = "hk-"
PREFIX_LENGTH = len(KEY_PREFIX) + 6  # "hk-3f9a1c": enough to tell keys apart in a listing, useless to an attacker
STATUSES = ("completed", "length", "aborted", "failed")
GROUPINGS = ("key", "model", "day")
NO_KEY = "(no key)"  # the group of requests served without an API key

_KEY_COLUMNS = "id, name, prefix, created_at, revoked_at, quota_tokens, used_tokens"
_USAGE_COLUMNS = (
    "request_id, key_id, model, prompt_tokens, cached_tokens, completion_tokens, ttft_seconds, "
    "duration_seconds, status, endpoint, created_at"
)


@dataclass
class KeyInfo:
    id: int
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    quota_tokens: int | None
    used_tokens: int

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def exhausted(self) -> bool:
        return self.quota_tokens is not None and self.used_tokens >= self.quota_tokens

    @property
    def status(self) -> str:
        """One of revoked, exhausted, active."""
        return "revoked" if not self.active else "exhausted" if self.exhausted else "active"


@dataclass
class UsageRecord:
    request_id: str
    key_id: int | None
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_seconds: float | None
    duration_seconds: float
    status: str  # one of STATUSES
    endpoint: str = ""
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))  # naive means UTC


@dataclass
class UsageTotal:
    group: str  # a key's name, a model or a UTC day (YYYY-MM-DD)
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    completed: int = 0  # requests by status
    length: int = 0
    aborted: int = 0
    failed: int = 0


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


class MeteringStore:
    """Keys and usage in one database. Thread-safe: every call borrows a pooled connection of its own."""

    def __init__(self, backend: SQLiteBackend | PostgresBackend) -> None:
        self._db = backend
        self.backend = backend.name
        self.url = backend.url  # password redacted
        self._pool = ConnectionPool(backend.connect, backend.usable, backend.max_connections)

    @classmethod
    def open(cls, url: str | None = None) -> MeteringStore:
        """Open (creating the schema if missing) a SQLite path or sqlite:///path (default DEFAULT_DB) or postgresql://..."""
        backend = backend_for(url)
        backend.open()
        store = cls(backend)
        try:
            with store._pool.connection() as conn:
                backend.create_schema(conn)
        except HanlinError:
            store.close()
            raise
        except (backend.error, OSError) as error:
            store.close()
            raise HanlinError(backend.describe_error(error)) from None
        return store

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> MeteringStore:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def is_transient(self, error: Exception) -> bool:
        """Whether a failed write may succeed if tried again (locked database, dropped connection)."""
        return isinstance(error, self._db.transient)

    def is_database_error(self, error: Exception) -> bool:
        """Whether the error came from the database driver (sqlite3.Error or psycopg.Error)."""
        return isinstance(error, self._db.error)

    # ---- keys ----

    def create_key(self, name: str, quota_tokens: int | None = None) -> tuple[str, KeyInfo]:
        """Make a key; the plaintext is returned here once and never stored."""
        name = name.strip()
        if not name:
            raise HanlinError("a key needs a non-empty name")
        if quota_tokens is not None and quota_tokens < 1:
            raise HanlinError(f"the token quota must be >= 1, got {quota_tokens}")
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        now = self._db.to_db_time(datetime.now(UTC))
        try:
            with self._write() as conn:
                row = self._one(
                    conn,
                    f"INSERT INTO api_keys (name, prefix, key_hash, created_at, quota_tokens) VALUES (?, ?, ?, ?, ?) "
                    f"RETURNING {_KEY_COLUMNS}",
                    (name, plaintext[:PREFIX_LENGTH], hash_key(plaintext), now, quota_tokens),
                )
        except self._db.integrity:  # the unique index on active names
            raise HanlinError(f"an active key named {name!r} already exists; revoke it or pick another name") from None
        return plaintext, self._key(row)

    def list_keys(self) -> list[KeyInfo]:
        with self._read() as conn:
            rows = self._all(conn, f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id", ())
        return [self._key(row) for row in rows]

    def revoke_key(self, name_or_prefix: str) -> KeyInfo:
        """Revoke the active key with this name or prefix."""
        with self._write() as conn:
            rows = self._all(
                conn, f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL AND name = ?", (name_or_prefix,)
            ) or self._all(
                conn, f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL AND prefix = ?", (name_or_prefix,)
            )
            if not rows:
                known = self._one(conn, "SELECT 1 FROM api_keys WHERE name = ? OR prefix = ?", (name_or_prefix,) * 2)
                state = "is already revoked" if known else "does not exist (see `hanlin keys list`)"
                raise HanlinError(f"the key {name_or_prefix!r} {state}")
            if len(rows) > 1:
                raise HanlinError(f"the prefix {name_or_prefix!r} matches {len(rows)} active keys; revoke by name")
            row = self._one(
                conn,
                f"UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL RETURNING {_KEY_COLUMNS}",
                (self._db.to_db_time(datetime.now(UTC)), rows[0][0]),
            )
        if row is None:  # revoked by someone else since the lookup
            raise HanlinError(f"the key {name_or_prefix!r} is already revoked")
        return self._key(row)

    def has_active_keys(self) -> bool:
        with self._read() as conn:
            return self._one(conn, "SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1", ()) is not None

    def verify_key(self, plaintext: str) -> KeyInfo | None:
        """The key's info, or None when it is unknown or revoked (an exhausted key is returned: check .exhausted)."""
        with self._read() as conn:
            row = self._one(conn, f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", (hash_key(plaintext),))
        if row is None:
            return None
        key = self._key(row)
        return key if key.active else None

    # ---- usage ----

    def record_usage(self, record: UsageRecord) -> None:
        """Insert the row and add its tokens to the key's used_tokens, in one transaction."""
        if record.status not in STATUSES:
            raise HanlinError(f"usage status must be one of {', '.join(STATUSES)}, got {record.status!r}")
        with self._write() as conn:
            if record.key_id is not None:
                tokens = record.prompt_tokens + record.completion_tokens
                sql = self._db.sql("UPDATE api_keys SET used_tokens = used_tokens + ? WHERE id = ?")
                if conn.execute(sql, (tokens, record.key_id)).rowcount != 1:
                    raise HanlinError(f"no API key has id {record.key_id}; request {record.request_id} not recorded")
            conn.execute(
                self._db.sql(f"INSERT INTO usage_records ({_USAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                (
                    record.request_id, record.key_id, record.model, record.prompt_tokens, record.cached_tokens,
                    record.completion_tokens, record.ttft_seconds, record.duration_seconds, record.status,
                    record.endpoint, self._db.to_db_time(record.created_at),
                ),
            )

    def usage_totals(self, by: str = "key") -> list[UsageTotal]:
        """Totals per key name, model or UTC day, in that order."""
        if by not in GROUPINGS:
            raise HanlinError(f"--by must be one of {', '.join(GROUPINGS)}, got {by!r}")
        day = self._db.day_sql.format(column="u.created_at")
        group = {"key": "u.key_id, k.name, k.prefix", "model": "u.model", "day": day}[by]
        by_status = ", ".join(f"SUM(CASE WHEN u.status = '{s}' THEN 1 ELSE 0 END)" for s in STATUSES)
        with self._read() as conn:
            rows = self._all(
                conn,
                f"SELECT {group}, COUNT(*), SUM(u.prompt_tokens), SUM(u.cached_tokens), SUM(u.completion_tokens), "
                f"{by_status} FROM usage_records u LEFT JOIN api_keys k ON k.id = u.key_id GROUP BY {group}",
                (),
            )
        if by == "key":  # label by name; a name reused after a revoke gets its prefix to tell the two apart
            names = [row[1] for row in rows]
            labels = [
                NO_KEY if key_id is None else name if names.count(name) == 1 else f"{name} ({prefix})"
                for key_id, name, prefix, *_ in rows
            ]
            rows = [(label, *row[3:]) for label, row in zip(labels, rows, strict=True)]
        totals = [UsageTotal(str(row[0]), *(int(v) for v in row[1:])) for row in rows]
        return sorted(totals, key=lambda t: t.group)

    def usage_rows(self, limit: int | None = None) -> list[UsageRecord]:
        """Usage rows, oldest first; with a limit, the newest `limit` of them."""
        sql = f"SELECT {_USAGE_COLUMNS} FROM usage_records ORDER BY created_at DESC, id DESC"
        with self._read() as conn:
            rows = self._all(conn, sql + " LIMIT ?", (limit,)) if limit is not None else self._all(conn, sql, ())
        return [UsageRecord(*row[:10], created_at=self._db.from_db_time(row[10])) for row in reversed(rows)]

    # ---- plumbing ----

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Any]:
        with self._pool.connection() as conn, self._db.transaction(conn):
            yield conn

    def _one(self, conn: Any, sql: str, params: tuple[Any, ...]) -> Any:
        return conn.execute(self._db.sql(sql), params).fetchone()

    def _all(self, conn: Any, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return conn.execute(self._db.sql(sql), params).fetchall()

    def _key(self, row: Any) -> KeyInfo:
        key_id, name, prefix, created_at, revoked_at, quota, used = row
        created = self._db.from_db_time(created_at)
        assert created is not None
        return KeyInfo(key_id, name, prefix, created, self._db.from_db_time(revoked_at), quota, used)

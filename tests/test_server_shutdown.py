"""SIGTERM: running streams finish (or are aborted after --shutdown-timeout), every usage row is written,
the process exits 0."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

MODEL = "smollm2"


def open_stream(url: str, body: dict[str, Any], got_first: threading.Event, events: list[Any]) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.Client(timeout=300) as http, http.stream("POST", url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        payload = line[6:]
                        events.append(payload if payload == "[DONE]" else json.loads(payload))
                        if len(events) == 1:
                            got_first.set()
        except Exception as error:  # noqa: BLE001
            events.append(error)
            got_first.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigterm_finishes_streams_then_aborts_after_timeout(start_server) -> None:  # type: ignore[no-untyped-def]
    patient = start_server("--shutdown-timeout", "120")
    hasty = start_server("--shutdown-timeout", "1")
    patient.wait_ready()
    hasty.wait_ready()

    short = {"model": MODEL, "prompt": "Tell me a story:", "max_tokens": 5, "ignore_eos": True, "stream": True}
    runs = [(threading.Event(), []) for _ in range(3)]
    threads = [open_stream(patient.url, {**short, "prompt": f"Story {i}:"}, ev, out) for i, (ev, out) in enumerate(runs)]
    long = {"model": MODEL, "prompt": "An endless story:", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    long_first, long_events = threading.Event(), []
    long_thread = open_stream(hasty.url, long, long_first, long_events)
    for event, _ in runs:
        assert event.wait(300)
    assert long_first.wait(300)

    patient.terminate()
    hasty.terminate()
    time.sleep(1.0)
    with pytest.raises(httpx.ConnectError):  # no new connections once shutdown has begun
        httpx.get(patient.url + "/health", timeout=5)

    for thread in [*threads, long_thread]:
        thread.join(300)
    assert patient.wait(120) == 0, patient.output
    assert hasty.wait(120) == 0, hasty.output

    for _, events in runs:
        assert events[-1] == "[DONE]", events
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    rows = patient.usage_rows()
    assert len(rows) == 3 and {r.status for r in rows} == {"length"} and {r.completion_tokens for r in rows} == {5}

    assert long_events[-1] == "[DONE]", long_events
    assert long_events[-2]["error"]["code"] == "server_shutting_down"
    (row,) = hasty.usage_rows()
    assert row.status == "aborted" and 1 <= row.completion_tokens < 2000
    assert "Traceback" not in patient.output + hasty.output

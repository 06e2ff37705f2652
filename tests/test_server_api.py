"""`hanlin serve` end to end: the official openai client (and raw httpx for the SSE bytes) against a live
server on the embedded model. Generations are kept short: these machines have two busy cores."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from conftest import REPO_ROOT, LiveServer, sse_events

MODEL = "smollm2"
HELLO = [{"role": "user", "content": "Say hello in three words."}]


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    """The tokenizer hanlin.load builds for the embedded model (from the GGUF metadata, without the weights)."""
    from hanlin.checkpoints.gguf import read_gguf_config
    from hanlin.checkpoints.registry import resolve
    from hanlin.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(read_gguf_config(resolve(MODEL))[1])


def raw_stream(server: LiveServer, path: str, body: dict[str, Any]) -> list[Any]:
    with httpx.Client(timeout=300) as http, http.stream("POST", server.url + path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response.read().decode())


def error_of(excinfo: pytest.ExceptionInfo) -> dict[str, Any]:  # type: ignore[type-arg]
    body = excinfo.value.body
    assert set(body) >= {"message", "type", "param", "code"}, body
    return body


# ---- generation ---------------------------------------------------------------------------------


def test_chat_usage_matches_the_tokenizer(live_server: LiveServer, client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    expected = tokenizer.encode(tokenizer.apply_chat_template(HELLO, add_generation_prompt=True))
    counted = httpx.post(live_server.url + "/tokenize", json={"messages": HELLO}).json()
    assert counted["tokens"] == expected and counted["count"] == len(expected) and counted["max_model_len"] > 0
    usage = reply.usage
    assert usage.prompt_tokens == len(expected)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0
    generated = tokenizer.encode(choice.message.content)
    assert usage.completion_tokens >= len(generated) - 1  # a stop token counts but shows no text
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 8
    # The usage row says the same.
    row = live_server.wait_for_usage_row(reply.id)
    assert (row.prompt_tokens, row.completion_tokens, row.status) == (
        usage.prompt_tokens, usage.completion_tokens, "length" if choice.finish_reason == "length" else "completed")
    assert row.endpoint == "/v1/chat/completions" and row.key_id is None and row.duration_seconds > 0


def test_chat_stream_matches_non_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_raw_sse_chunk_sequence_with_n_2(live_server: LiveServer) -> None:
    events = raw_stream(live_server, "/v1/chat/completions", {
        "model": MODEL, "messages": HELLO, "max_tokens": 6, "n": 2, "temperature": 0.8, "seed": 3,
        "stream": True, "stream_options": {"include_usage": True},
    })
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["model"] == MODEL
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert all(len(c["choices"]) == 1 for c in chunks[:-1])
        assert mine[0]["delta"] == {"role": "assistant", "content": ""} and mine[0]["finish_reason"] is None
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] in ("stop", "length")
        middle = mine[1:-1]
        assert all(set(c["delta"]) == {"content"} and c["finish_reason"] is None for c in middle)
    # Role chunks for every choice come before any content.
    assert [c["choices"][0]["delta"].get("role") for c in chunks[:2]] == ["assistant", "assistant"]
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + usage_chunk["usage"]["completion_tokens"]


def test_raw_sse_completions_without_usage(live_server: LiveServer) -> None:
    events = raw_stream(live_server, "/v1/completions",
                        {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0,
                         "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["choices"][0]["text"] == ""
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_n_2_non_streaming_counts_the_prompt_once(client: openai.OpenAI) -> None:
    one = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0)
    two = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=1.0, n=2, seed=11)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert 2 <= two.usage.completion_tokens <= 8
    if all(c.finish_reason == "length" for c in two.choices):
        assert two.usage.completion_tokens == 8


def test_completions_batched_prompts_echo_and_usage(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompts = ["Once upon a time", "The sky is"]
    reply = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0, n=2, echo=True)
    assert reply.object == "text_completion" and [c.index for c in reply.choices] == [0, 1, 2, 3]
    for choice in reply.choices:
        assert choice.text.startswith(prompts[choice.index // 2])
    assert reply.choices[0].text == reply.choices[1].text  # greedy: both choices of a prompt agree
    assert reply.usage.prompt_tokens == sum(len(tokenizer.encode(p, add_special_tokens=True)) for p in prompts)
    ids = tokenizer.encode("Hello there", add_special_tokens=True)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_logprobs_chat_and_completions(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely token
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    streamed = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=1, stream=True)
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]
    text = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=4, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == text.choices[0].text
    assert all(len(top) >= 2 for top in lp.top_logprobs)


def test_stop_strings_end_the_text_and_never_leak(client: openai.OpenAI) -> None:
    prompt = "Count: one, two, three, four, five, six,"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert len(free) > 6, free
    stop = free[len(free) // 2: len(free) // 2 + 3]
    expected = free[: free.index(stop)]
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=stop,
                                            stream=True))
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == expected and stop not in streamed
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logit_bias_and_stop_token_ids(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    forced = tokenizer.encode(" banana")[0]
    reply = client.completions.create(model=MODEL, prompt="My favourite fruit:", max_tokens=3, temperature=0,
                                      logit_bias={str(forced): 100})
    assert reply.choices[0].text == tokenizer.decode([forced] * 3)
    reply = client.completions.create(model=MODEL, prompt="My favourite fruit:", max_tokens=3, temperature=0,
                                      extra_body={"stop_token_ids": [forced]}, logit_bias={str(forced): 100})
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].text == ""
    assert reply.usage.completion_tokens == 1


def test_seed_reproducible_under_concurrent_load(client: openai.OpenAI) -> None:
    def seeded() -> str:
        return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0,
                                              seed=1234).choices[0].message.content or ""

    def noise(i: int) -> str:
        return client.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=8, temperature=1.0,
                                         seed=i).choices[0].text

    alone = seeded()
    with ThreadPoolExecutor(6) as pool:
        others = [pool.submit(noise, i) for i in range(3)]
        together = [pool.submit(seeded) for _ in range(2)]
        results = [f.result() for f in together]
        [f.result() for f in others]
    assert results == [alone, alone]


# ---- errors -------------------------------------------------------------------------------------


def test_malformed_bodies_get_openai_errors(live_server: LiveServer) -> None:
    url = live_server.url + "/v1/chat/completions"
    cases = [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (json.dumps({"model": MODEL, "messages": "hi"}).encode(), "messages", "invalid_type"),
        (json.dumps({"model": MODEL, "messages": HELLO, "temperature": "warm"}).encode(), "temperature", "invalid_type"),
        (json.dumps({"model": MODEL, "messages": HELLO, "temperature": 3}).encode(), "temperature", "invalid_value"),
        (json.dumps({"model": MODEL, "messages": HELLO, "bogus": 1}).encode(), "bogus", "unknown_parameter"),
        (json.dumps({"model": MODEL}).encode(), "messages", "missing_required_parameter"),
    ]
    for body, param, code in cases:
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), body
    for method, path, status in (("GET", "/v1/nope", 404), ("DELETE", "/v1/models", 405), ("GET", "/v1/completions", 405)):
        response = httpx.request(method, live_server.url + path)
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[0].role"),
])
def test_unsupported_fields_are_refused(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    body = {"messages": HELLO, **extra}
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=MODEL, max_tokens=4, **body)  # type: ignore[arg-type]
    assert error_of(excinfo)["param"] == param


def test_accepted_harmless_fields(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "developer", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_completion_tokens=2, temperature=0, user="u1", store=False, response_format={"type": "text"},
        service_tier="auto", modalities=["text"], parallel_tool_calls=False,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True, "stop_token_ids": [2]},
    )
    assert reply.usage.completion_tokens == 2 and reply.choices[0].finish_reason == "length"


def test_context_limits(client: openai.OpenAI, live_server: LiveServer) -> None:
    context = httpx.get(live_server.base_url + "/models").json()["data"][0]["max_model_len"]
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.completions.create(model=MODEL, prompt=[1] * (context + 5), max_tokens=1)
    error = error_of(excinfo)
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert str(context + 5) in error["message"] and str(context) in error["message"]
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=context)
    error = error_of(excinfo)
    assert error["param"] == "max_tokens" and str(context) in error["message"]
    prompt_tokens = httpx.post(live_server.url + "/tokenize", json={"messages": HELLO}).json()["count"]
    assert f"prompt has {prompt_tokens} tokens" in error["message"] and f"max_tokens is {context}" in error["message"]


def test_unknown_model_is_404_and_aliases_work(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=1)
    assert error_of(excinfo)["code"] == "model_not_found"
    names = [m.id for m in client.models.list()]
    assert names[0] == MODEL and len(names) == 2
    reply = client.completions.create(model=names[1], prompt="Hi", max_tokens=1)
    assert reply.model == names[1]


def test_tokenize_detokenize(live_server: LiveServer, tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokens = httpx.post(live_server.url + "/tokenize", json={"prompt": "Hello, world"}).json()["tokens"]
    assert tokens == tokenizer.encode("Hello, world", add_special_tokens=True)
    assert httpx.post(live_server.url + "/detokenize", json={"tokens": tokens}).json() == {"prompt": "Hello, world"}
    bad = httpx.post(live_server.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# ---- disconnects, metrics -----------------------------------------------------------------------


def test_stream_disconnect_aborts_and_meters(live_server: LiveServer) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 400, "temperature": 0.7, "stream": True}
    with httpx.Client(timeout=300) as http, http.stream("POST", live_server.url + "/v1/chat/completions",
                                                         json=body) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        next(line for line in lines if line.startswith("data: "))  # one content chunk, then hang up
    row = live_server.wait_for_usage_row(first["id"])
    assert row.status == "aborted" and 1 <= row.completion_tokens < 400


def test_non_streaming_disconnect_aborts(live_server: LiveServer) -> None:
    seen = {r.request_id for r in live_server.usage_rows()}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.url + "/v1/completions", timeout=2.0,
                   json={"model": MODEL, "prompt": "A long story:", "max_tokens": 400, "ignore_eos": True})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = [r for r in live_server.usage_rows() if r.request_id not in seen and r.endpoint == "/v1/completions"]
        if new:
            break
        time.sleep(0.2)
    assert len(new) == 1 and new[0].status == "aborted" and new[0].completion_tokens < 400


def test_metrics_exposes_the_metric_names(live_server: LiveServer, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    text = httpx.get(live_server.url + "/metrics").text
    for name in ("hanlin_requests_total", "hanlin_prompt_tokens_total", "hanlin_cached_prompt_tokens_total",
                 "hanlin_completion_tokens_total", "hanlin_requests_waiting", "hanlin_requests_running",
                 "hanlin_kv_cache_usage_ratio", "hanlin_prefix_cache_hit_rate",
                 "hanlin_time_to_first_token_seconds_bucket", "hanlin_time_per_output_token_seconds_bucket"):
        assert name in text, name
    assert 'hanlin_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_health_and_page(live_server: LiveServer) -> None:
    assert httpx.get(live_server.url + "/health").json()["status"] == "ok"
    page = httpx.get(live_server.url + "/")
    assert page.status_code in (200, 404)
    if page.status_code == 200:
        assert "text/html" in page.headers["content-type"]
        for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            assert httpx.get(live_server.url + asset).status_code == 200, asset


def test_port_in_use_is_one_clear_line(live_server: LiveServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = live_server.url.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "hanlin.cli", "serve", "--port", port, "--db",
                             str(tmp_path / "hanlin.db")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "already in use" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

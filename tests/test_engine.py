"""The engine on tiny random models: continuous batching, paged KV cache, prefix caching, preemption."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine_helpers import tiny_loaded
from hanlin.engine.async_engine import AsyncEngine
from hanlin.engine.engine import LLMEngine
from hanlin.engine.options import EngineOptions
from hanlin.engine.outputs import InvalidRequestError, QueueFullError
from hanlin.engine.sampling import SamplingParams
from hanlin.llm import LLM

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded(context=512)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (k,), generator=g).tolist() for k in lengths]


def uncached_greedy(model, prompt: list[int], n: int, window: int | None = None) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def llm(loaded, **options) -> LLM:
    return LLM.from_loaded(loaded, **{"block_size": 4, **options})


def test_batched_greedy_equals_each_request_alone_and_an_uncached_loop(loaded) -> None:
    batch = prompts(32)
    engine = llm(loaded, max_batched_tokens=64)
    together = [c.token_ids for c in engine.generate(batch, max_tokens=12, **GREEDY)]
    alone = [llm(loaded, max_num_seqs=1).generate([p], max_tokens=12, **GREEDY)[0].token_ids for p in batch]
    assert together == alone
    assert together[:4] == [uncached_greedy(loaded.model, p, 12) for p in batch[:4]]
    stats = engine.engine.stats()
    assert stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting == 0


def test_preemption_when_blocks_run_out_recomputes_and_gives_the_same_tokens(loaded) -> None:
    batch = prompts(8, seed=1, lo=10, hi=30)
    small = llm(loaded, kv_cache_blocks=24, max_batched_tokens=32)
    outputs = [c.token_ids for c in small.generate(batch, max_tokens=40, **GREEDY)]
    assert small.engine.stats().preemptions > 0
    roomy = llm(loaded)
    assert outputs == [c.token_ids for c in roomy.generate(batch, max_tokens=40, **GREEDY)]
    assert small.engine.blocks.num_used == 0


def test_sliding_window_attention_over_pages_matches_the_masked_full_forward() -> None:
    windowed = tiny_loaded(context=256, sliding_window=8)
    batch = prompts(3, seed=2, lo=5, hi=20)
    got = [c.token_ids for c in llm(windowed, max_batched_tokens=7).generate(batch, max_tokens=16, **GREEDY)]
    assert got == [uncached_greedy(windowed.model, p, 16) for p in batch]


def test_prefix_cache_reuses_a_shared_system_prompt(loaded) -> None:
    system = prompts(1, seed=3, lo=40, hi=41)[0]
    questions = [system + tail for tail in prompts(3, seed=4, lo=3, hi=9)]
    cached = llm(loaded)
    first = cached.generate([questions[0]], max_tokens=8, **GREEDY)[0]
    assert first.cached_tokens == 0
    later = cached.generate(questions[1:], max_tokens=8, **GREEDY)
    assert [c.cached_tokens for c in later] == [40, 40]  # 10 full blocks of 4 shared tokens
    stats = cached.engine.stats()
    assert stats.prefix_cache_hit_tokens == 80 and stats.prefix_cache_queried_tokens == sum(map(len, questions))
    uncached = llm(loaded, enable_prefix_caching=False)
    expected = uncached.generate(questions, max_tokens=8, **GREEDY)
    assert [first.token_ids] + [c.token_ids for c in later] == [c.token_ids for c in expected]
    assert all(c.cached_tokens == 0 for c in expected)


def test_a_fully_cached_prompt_still_computes_its_last_token(loaded) -> None:
    prompt = prompts(1, seed=5, lo=16, hi=17)[0]
    engine = llm(loaded)
    a = engine.generate([prompt], max_tokens=6, **GREEDY)[0]
    b = engine.generate([prompt], max_tokens=6, **GREEDY)[0]
    assert a.token_ids == b.token_ids and b.cached_tokens == 12


def test_chunked_prefill_never_stalls_running_decodes(loaded) -> None:
    engine = LLMEngine(loaded, EngineOptions(block_size=4, max_batched_tokens=16))
    params = SamplingParams(max_tokens=30, **GREEDY)
    for i, p in enumerate(prompts(2, seed=6, lo=4, hi=8)):
        engine.add_request(f"short{i}", p, params)
    while engine.scheduler.waiting or any(s.num_computed < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()
    engine.add_request("long", prompts(1, seed=7, lo=200, hi=201)[0], SamplingParams(max_tokens=2, **GREEDY))
    for _ in range(10):  # 200 prompt tokens at 14 per step: the short ones get a token every step meanwhile
        produced = {out.request_id for out in engine.step() if any(d.token_ids for d in out.deltas)}
        assert {"short0", "short1"} <= produced
    long_seq = next(s for s in engine.scheduler.running if s.request_id == "long")
    assert 0 < long_seq.num_computed < 200


def test_seeded_sampling_is_the_same_whatever_shares_the_batch(loaded) -> None:
    prompt = prompts(1, seed=8)[0]
    params = dict(temperature=1.0, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm(loaded).generate([prompt], **params)[0].token_ids
    crowd = prompts(7, seed=9)
    mixed = llm(loaded).generate(crowd[:3] + [prompt] + crowd[3:], **{**params, "seed": None})
    seeded_in_crowd = llm(loaded).generate(crowd[:3] + [prompt] + crowd[3:], **params)
    assert seeded_in_crowd[3].token_ids == alone
    assert len({tuple(c.token_ids) for c in mixed}) > 1
    two = llm(loaded).generate([prompt], n=2, **params)[0]
    assert two.choices[0].token_ids == alone and two.choices[1].token_ids != alone


def test_stop_strings_end_the_reply_and_are_never_shown(loaded) -> None:
    engine = llm(loaded)
    prompt = prompts(1, seed=10)[0]
    free = engine.generate([prompt], max_tokens=30, **GREEDY)[0]
    stop = free.text[10:13]
    assert len(stop) == 3
    stopped = engine.generate([prompt], max_tokens=30, stop=[stop], **GREEDY)[0]
    assert stopped.finish_reason == "stop" and stopped.choices[0].stop_reason == stop
    assert stopped.text == free.text[: free.text.index(stop)]
    pieces = [e.text for e in engine.stream(prompt, SamplingParams(max_tokens=30, stop=[stop], **GREEDY))]
    assert "".join(pieces) == stopped.text


def test_stop_token_ids_and_eos(loaded) -> None:
    engine = llm(loaded)
    prompt = prompts(1, seed=11)[0]
    free = engine.generate([prompt], max_tokens=20, **GREEDY)[0]
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    out = engine.generate([prompt], max_tokens=20, stop_token_ids=[stop_id], **GREEDY)[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    assert out.choices[0].stop_reason == stop_id


def test_logprobs_are_the_models_log_softmax_and_logit_bias_forces_a_token(loaded) -> None:
    engine = llm(loaded)
    prompt = prompts(1, seed=12)[0]
    out = engine.generate([prompt], max_tokens=3, logprobs=3, **GREEDY)[0]
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and len(logprobs) == 3
    with torch.inference_mode():
        reference = loaded.model(torch.tensor([prompt]))[0, -1].log_softmax(-1)
    first = logprobs[0]
    assert first.token_id == out.token_ids[0] and abs(first.logprob - float(reference[first.token_id])) < 1e-4
    assert [t.token_id for t in first.top] == reference.topk(3).indices.tolist()
    assert first.top[0].logprob >= first.top[1].logprob >= first.top[2].logprob
    forced = engine.generate([prompt], max_tokens=4, logit_bias={65: 100.0}, **GREEDY)[0]
    assert forced.token_ids == [65] * 4


def test_bad_requests_are_refused_with_the_field_named(loaded) -> None:
    engine = LLMEngine(loaded, EngineOptions(max_model_len=64))
    with pytest.raises(InvalidRequestError, match="64") as error:
        engine.add_request("a", list(range(64)), SamplingParams())
    with pytest.raises(InvalidRequestError, match="at most 4 tokens") as error:
        engine.add_request("b", list(range(60)), SamplingParams(max_tokens=10))
    assert error.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as error:
        engine.add_request("c", [1, 2], SamplingParams(logit_bias={10**6: 1.0}))
    assert error.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError) as error:
        engine.add_request("d", [1, 2], SamplingParams(top_p=0.0))
    assert error.value.param == "top_p"
    with pytest.raises(InvalidRequestError):
        engine.add_request("e", [], SamplingParams())
    assert not engine.has_unfinished()


def test_abort_frees_blocks_and_reports_the_tokens_so_far(loaded) -> None:
    engine = LLMEngine(loaded, EngineOptions(block_size=4))
    engine.add_request("x", prompts(1, seed=13)[0], SamplingParams(max_tokens=100, **GREEDY))
    for _ in range(5):
        engine.step()
    assert engine.blocks.num_used > 0
    (out,) = engine.abort("x")
    assert out.finished and out.deltas[0].finish_reason == "abort" and out.completion_tokens == 5
    assert engine.blocks.num_used == 0 and not engine.has_unfinished()


def test_async_engine_streams_concurrently_aborts_on_exit_and_bounds_its_queue(loaded) -> None:
    async def scenario() -> None:
        engine = AsyncEngine(LLMEngine(loaded, EngineOptions(block_size=4, max_queued=4, max_num_seqs=2)))
        engine.start()
        params = SamplingParams(max_tokens=10, **GREEDY)

        async def collect(prompt: list[int]) -> list[int]:
            tokens: list[int] = []
            async for out in engine.generate(prompt, params):
                for delta in out.deltas:
                    tokens.extend(delta.token_ids)
            return tokens

        batch = prompts(4, seed=14)
        results = await asyncio.gather(*(collect(p) for p in batch))
        assert results == [c.token_ids for c in llm(loaded).generate(batch, max_tokens=10, **GREEDY)]

        stream = engine.generate(batch[0], SamplingParams(max_tokens=400, **GREEDY))
        await stream.__anext__()
        await stream.aclose()  # the client went away
        for _ in range(100):
            if engine.stats().kv_blocks_used == 0 and engine.stats().running == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.stats().kv_blocks_used == 0

        await engine.shutdown(timeout=5)
        assert not engine.accepting

        idle = AsyncEngine(LLMEngine(loaded, EngineOptions(block_size=4, max_queued=4)))  # never started
        streams = [idle.generate(p, params) for p in prompts(4, seed=15)]
        pending = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError) as full:
            await idle.generate(batch[1], params).__anext__()
        assert full.value.retry_after >= 1
        idle.start()
        await asyncio.wait_for(asyncio.gather(*pending), timeout=30)
        for s in streams:
            await s.aclose()
        await idle.shutdown(timeout=5)

    asyncio.run(scenario())

"""Client side of `bench/serve.py`: seeded prompts, one measured streaming request, closed-loop load,
the disconnect ("chaos") run, and the statistics. No server management here.

Every request goes through the official `openai` async client, streaming a chat completion with
`stream_options={"include_usage": True}`; times are taken on the client when each chunk arrives.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from openai import APIStatusError, AsyncOpenAI

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "corpora" / "gutenberg_big.txt"

INSTRUCTIONS = (
    "Summarize the following passage in a few sentences.",
    "What happens in this passage? Explain it simply.",
    "Rewrite this passage in modern English.",
    "List the characters mentioned in this passage and describe each one.",
    "Continue this story for a paragraph.",
    "What is the mood of this passage, and why?",
    "Write three questions a teacher could ask about this passage.",
    "Translate the main idea of this passage into one short sentence.",
)

# Used when ../shared/data is absent (users' machines): a seeded word salad of ordinary English.
_FALLBACK_WORDS = (
    "the old keeper walked along the cliff at dawn and watched the grey sea while gulls cried over "
    "the harbour a letter arrived from the city asking him to leave his lamp and return to a family "
    "he had not seen for many years he read it twice folded it carefully and climbed the stairs to "
    "trim the wick as the fog rolled in from the west and the ships sounded their horns far away"
).split()


# ---- prompts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    id: int
    messages: list[dict[str, str]]
    chars: int  # of the passage


def _corpus_words() -> tuple[list[str], str]:
    if DATA.is_file():
        text = DATA.read_text(encoding="utf-8", errors="replace")
        return re.sub(r"\s+", " ", text).split(" "), "../shared/data/corpora/gutenberg_big.txt"
    return list(_FALLBACK_WORDS), "built-in seeded word list (../shared/data is absent)"


def build_prompts(count: int, seed: int, min_chars: int = 20, max_chars: int = 500) -> tuple[list[Prompt], str]:
    """`count` distinct chat prompts: an instruction plus a random passage of min..max characters (cut at
    word boundaries).

    With SmolLM2's chat template (its default system prompt and the instruction take ~40 tokens) that is
    ~45-250 prompt tokens, ~100 on average. Every prompt is distinct, so no request is answered from
    another's prefix cache beyond the shared template head (which both servers can reuse).
    """
    words, source = _corpus_words()
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        chars = rng.randint(min_chars, max_chars)
        start = rng.randrange(0, max(1, len(words) - chars))
        passage: list[str] = []
        length = 0
        for word in words[start:] if len(words) > chars else rng.choices(words, k=chars):
            if passage and length + 1 + len(word) > chars:
                break
            passage.append(word)
            length += len(word) + (1 if len(passage) > 1 else 0)
        instruction = INSTRUCTIONS[rng.randrange(len(INSTRUCTIONS))]
        text = " ".join(passage)
        prompts.append(Prompt(i, [{"role": "user", "content": f"{instruction}\n\n{text}"}], len(text)))
    return prompts, source


# ---- one request ----------------------------------------------------------------------------------


@dataclass
class Record:
    """What the client saw of one streamed request (times in seconds from just before the request is sent)."""

    prompt_id: int
    ok: bool = False
    status: str = "pending"  # ok | disconnected | rejected (429) | error
    error: str | None = None
    http_status: int | None = None
    sent_at: float = 0.0  # perf_counter when sent
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each non-empty content delta
    tokens: int = 0  # output tokens (see token_source)
    token_source: str = ""  # usage | max_tokens (finish "length" with EOS suppressed) | chunks
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    text_chars: int = 0

    @property
    def itl(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.tokens - 1)

    def as_json(self, with_chunks: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not with_chunks:
            out.pop("chunk_times")
        out["tpot"] = self.tpot
        return out


@dataclass(frozen=True)
class Target:
    """A server under test and how to ask it for exactly `max_tokens` tokens."""

    name: str
    base_url: str  # .../v1
    model: str
    extra_body: dict[str, Any]  # hanlin: {"ignore_eos": True}; llama.cpp: {"min_tokens": max_tokens}

    def client(self, timeout: float = 900.0) -> AsyncOpenAI:
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        # max_retries=0: a retried 429 or 5xx would hide exactly what this benchmark is looking for.
        return AsyncOpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=timeout,
                           http_client=httpx.AsyncClient(limits=limits, timeout=timeout))


async def stream_one(client: AsyncOpenAI, target: Target, prompt: Prompt, max_tokens: int, seed: int,
                     disconnect_after: int | None = None) -> Record:
    """Stream one chat completion, timing each content chunk. `disconnect_after`: close the stream after
    that many content chunks (a client going away mid-stream)."""
    rec = Record(prompt.id)
    t0 = time.perf_counter()
    rec.sent_at = t0
    stream = None
    try:
        stream = await client.chat.completions.create(
            model=target.model, messages=prompt.messages, max_tokens=max_tokens, temperature=0.0, seed=seed,
            stream=True, stream_options={"include_usage": True}, extra_body=target.extra_body,
        )
        async for chunk in stream:
            now = time.perf_counter() - t0
            if chunk.usage is not None:
                rec.tokens = chunk.usage.completion_tokens
                rec.prompt_tokens = chunk.usage.prompt_tokens
                rec.token_source = "usage"
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    rec.chunk_times.append(now)
                    rec.text_chars += len(choice.delta.content)
                if choice.finish_reason is not None:
                    rec.finish_reason = choice.finish_reason
            if disconnect_after is not None and len(rec.chunk_times) >= disconnect_after:
                await stream.close()
                rec.status = "disconnected"
                rec.e2e = time.perf_counter() - t0
                rec.ttft = rec.chunk_times[0] if rec.chunk_times else None
                return rec
        rec.e2e = time.perf_counter() - t0
    except APIStatusError as error:
        rec.http_status = error.status_code
        rec.status = "rejected" if error.status_code == 429 else "error"
        rec.error = f"HTTP {error.status_code}: {_short(str(error))}"
        return rec
    except Exception as error:  # noqa: BLE001 - every failure is a result here
        rec.status = "error"
        rec.error = f"{type(error).__name__}: {_short(str(error))}"
        return rec
    finally:
        if stream is not None and rec.status != "disconnected":
            await stream.close()
    if rec.chunk_times:
        rec.ttft = rec.chunk_times[0]
    if rec.token_source != "usage":
        # llama-cpp-python sends no usage chunk in streams: with EOS suppressed (min_tokens = max_tokens) a
        # "length" finish means exactly max_tokens tokens; otherwise count content chunks (~1 token each).
        if rec.finish_reason == "length":
            rec.tokens, rec.token_source = max_tokens, "max_tokens"
        else:
            rec.tokens, rec.token_source = len(rec.chunk_times), "chunks"
    problems = []
    if rec.finish_reason != "length":
        problems.append(f"finish_reason {rec.finish_reason!r} (expected 'length': EOS is suppressed)")
    if rec.tokens != max_tokens:
        problems.append(f"{rec.tokens} output tokens, expected {max_tokens}")
    if not rec.chunk_times:
        problems.append("no content chunks")
    if problems:
        rec.status, rec.error = "error", "; ".join(problems)
    else:
        rec.status, rec.ok = "ok", True
    return rec


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


# ---- load -----------------------------------------------------------------------------------------


@dataclass
class LevelResult:
    server: str
    concurrency: int
    requests: int
    wall: float
    records: list[Record]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    cpu_s: float | None = None  # CPU seconds the server process used during the level (when known)

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.records if r.ok]
        tokens = sum(r.tokens for r in ok)
        errors = [r for r in self.records if r.status == "error"]
        out: dict[str, Any] = {
            "server": self.server, "concurrency": self.concurrency, "requests": self.requests,
            "ok": len(ok), "errors": len(errors), "rejected_429": sum(r.status == "rejected" for r in self.records),
            "wall_s": self.wall, "req_per_s": len(ok) / self.wall if self.wall else 0.0,
            "output_tok_per_s": tokens / self.wall if self.wall else 0.0, "output_tokens": tokens,
            "token_source": sorted({r.token_source for r in ok}),
            "prompt_tokens_mean": _mean([r.prompt_tokens for r in ok if r.prompt_tokens is not None]),
            "load_before": self.load_before, "load_after": self.load_after,
            "rss_before_mb": self.rss_before_mb, "rss_after_mb": self.rss_after_mb, "server_cpu_s": self.cpu_s,
            "tok_per_server_cpu_s": tokens / self.cpu_s if self.cpu_s else None,
            "first_errors": [r.error for r in errors[:5]],
        }
        for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", [r.tpot for r in ok]),
                             ("itl", [g for r in ok for g in r.itl]), ("e2e", [r.e2e for r in ok])):
            clean = [v for v in values if v is not None]
            out[name] = {f"p{q}": percentile(clean, q) for q in (50, 90, 99)} | {"mean": _mean(clean)}
        return out


async def run_level(target: Target, prompts: Sequence[Prompt], concurrency: int, max_tokens: int, seed: int,
                    rss: Callable[[], float | None] = lambda: None) -> LevelResult:
    """Closed loop: `concurrency` clients, each sending its next prompt as soon as the last one ended."""
    client = target.client()
    queue: asyncio.Queue[Prompt] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    records: list[Record] = []

    async def worker() -> None:
        while True:
            try:
                prompt = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            records.append(await stream_one(client, target, prompt, max_tokens, seed))

    load_before, rss_before = _loadavg(), rss()
    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        wall = time.perf_counter() - start
        await client.close()
    records.sort(key=lambda r: r.prompt_id)
    return LevelResult(target.name, concurrency, len(prompts), wall, records, load_before, _loadavg(),
                       rss_before, rss())


async def warm_up(target: Target, prompts: Sequence[Prompt], max_tokens: int, seed: int) -> list[Record]:
    """One request alone, then the rest together (first-call allocations, thread pools, caches of code)."""
    client = target.client()
    try:
        first = await stream_one(client, target, prompts[0], max_tokens, seed)
        rest = await asyncio.gather(*(stream_one(client, target, p, max_tokens, seed) for p in prompts[1:]))
    finally:
        await client.close()
    return [first, *rest]


# ---- chaos: clients that go away mid-stream --------------------------------------------------------


async def run_chaos(target: Target, prompts: Sequence[Prompt], max_tokens: int, seed: int,
                    disconnect_share: float = 0.25) -> dict[str, Any]:
    """All prompts at once; a seeded random `disconnect_share` of the clients close their stream after a
    random number of content chunks. Anything but a completed stream, an intended disconnect or a 429 is
    an error."""
    rng = random.Random(seed + 7919)
    leavers = set(rng.sample(range(len(prompts)), round(disconnect_share * len(prompts))))
    cut = {i: rng.randint(1, max(1, max_tokens - 2)) for i in sorted(leavers)}
    client = target.client()
    start = time.perf_counter()
    try:
        records = await asyncio.gather(*(
            stream_one(client, target, p, max_tokens, seed, disconnect_after=cut.get(i))
            for i, p in enumerate(prompts)))
    finally:
        wall = time.perf_counter() - start
        await client.close()
    unexpected = []
    for i, r in enumerate(records):
        if i in cut and r.status not in ("disconnected", "rejected"):
            unexpected.append(f"client {i} should have disconnected after {cut[i]} chunks but ended "
                              f"{r.status}: {r.error}")
        elif i not in cut and r.status not in ("ok", "rejected"):
            unexpected.append(f"client {i}: {r.status}: {r.error}")
    return {
        "streams": len(prompts), "max_tokens": max_tokens, "wall_s": wall,
        "planned_disconnects": len(cut), "disconnected": sum(r.status == "disconnected" for r in records),
        "completed": sum(r.status == "ok" for r in records),
        "rejected_429": sum(r.status == "rejected" for r in records),
        "errors": len(unexpected), "error_details": unexpected[:10],
        "records": [r.as_json(with_chunks=False) for r in records],
    }


# ---- /metrics -------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {"name{labels}": value} (labels kept verbatim)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m and not line.startswith("#"):
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


async def fetch_metrics(root_url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{root_url}/metrics")
        response.raise_for_status()
        return parse_metrics(response.text)


# ---- statistics -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3

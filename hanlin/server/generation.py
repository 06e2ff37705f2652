"""One HTTP request's engine work, metered exactly once.

Each prompt becomes one engine request, consumed by a producer task the server owns (not the HTTP
handler), so a client that goes away only triggers an abort: the producer still sees the request's last
output, and the usage row carries the tokens really generated. When every producer has ended, one
UsageRecord goes to the writer and the metrics are updated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from hanlin.engine.outputs import EngineStoppedError, InvalidRequestError, QueueFullError, RequestOutput
from hanlin.server.errors import APIError

if TYPE_CHECKING:
    from hanlin.engine.sampling import SamplingParams
    from hanlin.server.state import ServerState

log = logging.getLogger("hanlin.server")

Item = tuple[int, RequestOutput | BaseException | None]  # (prompt index, output | mid-stream error | end marker)


def engine_error(error: BaseException) -> APIError:
    """The engine's refusals as OpenAI errors."""
    if isinstance(error, QueueFullError):
        retry = max(1, round(error.retry_after))
        return APIError(429, str(error), type="requests", code="rate_limit_exceeded",
                        headers={"Retry-After": str(retry)})
    if isinstance(error, InvalidRequestError):
        return APIError(400, str(error), param=error.param, code="invalid_request")
    if isinstance(error, EngineStoppedError):
        return APIError(503, str(error), code="server_shutting_down", headers={"Retry-After": "5"})
    if isinstance(error, APIError):
        return error
    return APIError(500, f"engine error: {type(error).__name__}: {error}", code="engine_error")


class RequestRun:
    def __init__(self, state: ServerState, *, request_id: str, endpoint: str, key_id: int | str | None,
                 prompts: list[list[int]], params: list[SamplingParams], n: int, started: float) -> None:
        self.state = state
        self.request_id = request_id
        self.endpoint = endpoint
        self.key_id = key_id
        self.prompts = prompts
        self.params = params
        self.n = n
        self.started = started  # time.monotonic() when the request arrived
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.last: list[RequestOutput | None] = [None] * len(prompts)
        self.finish_reasons: dict[tuple[int, int], str] = {}
        self.first_token_at: float | None = None
        self.failed = False
        self.client_gone = False
        self.refused = 0  # prompts the engine refused before starting them
        self._accepted: list[asyncio.Future[BaseException | None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._remaining = len(prompts)

    def engine_id(self, index: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{index}"

    async def start(self) -> None:
        """Submit every prompt; returns once each has produced its first output. A refusal → APIError."""
        loop = asyncio.get_running_loop()
        for index in range(len(self.prompts)):
            self._accepted.append(loop.create_future())
            self._tasks.append(asyncio.create_task(self._produce(index), name=f"hanlin-{self.engine_id(index)}"))
        self.state.runs.add(self)
        outcomes = await asyncio.gather(*self._accepted)
        refusal = next((o for o in outcomes if o is not None), None)
        if refusal is not None:
            self.abort(client_gone=False)
            raise engine_error(refusal)

    async def _produce(self, index: int) -> None:
        accepted = self._accepted[index]
        engine = self.state.engine
        assert engine is not None
        started = False  # whether the engine produced anything for this prompt
        try:
            async for output in engine.generate(self.prompts[index], self.params[index], n=self.n,
                                                request_id=self.engine_id(index)):
                started = True
                self._account(index, output)
                if not accepted.done():
                    accepted.set_result(None)
                self.queue.put_nowait((index, output))
        except Exception as error:  # noqa: BLE001 - reported to the handler, never lost
            if not started:
                if not accepted.done():
                    accepted.set_result(error)
            else:
                log.error("request %s failed: %s", self.engine_id(index), error)
                self.failed = True
                self.queue.put_nowait((index, error))
        finally:
            if not started:
                self.refused += 1
                if not accepted.done():
                    accepted.set_result(EngineStoppedError("the request was cancelled"))
            self.queue.put_nowait((index, None))
            self._remaining -= 1
            if self._remaining == 0:
                self._finish()

    def _account(self, index: int, output: RequestOutput) -> None:
        self.last[index] = output
        if self.first_token_at is None and any(d.token_ids for d in output.deltas):
            self.first_token_at = time.monotonic()
        for delta in output.deltas:
            if delta.finish_reason is not None:
                self.finish_reasons[(index, delta.index)] = delta.finish_reason
        if output.error:
            self.failed = True

    async def items(self) -> AsyncIterator[tuple[int, RequestOutput | BaseException]]:
        """Outputs (and mid-stream errors) of every prompt in arrival order, until all have ended."""
        open_prompts = len(self.prompts)
        while open_prompts:
            index, item = await self.queue.get()
            if item is None:
                open_prompts -= 1
            else:
                yield index, item

    def abort(self, client_gone: bool = True) -> None:
        """Stop generating (the client left, or the request was refused): the engine ends it within a step."""
        if client_gone and self._remaining:
            self.client_gone = True
        engine = self.state.engine
        if engine is not None:
            for index in range(len(self.prompts)):
                engine.abort(self.engine_id(index))

    @property
    def done(self) -> bool:
        return self._remaining == 0

    # ---- accounting ---------------------------------------------------------------------------------

    @property
    def prompt_tokens(self) -> int:
        return sum(o.prompt_tokens if o else len(p) for o, p in zip(self.last, self.prompts))

    @property
    def cached_tokens(self) -> int:
        return sum(o.cached_tokens for o in self.last if o)

    @property
    def completion_tokens(self) -> int:
        return sum(o.completion_tokens for o in self.last if o)

    def usage(self) -> dict[str, object]:
        prompt, completion = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def status(self) -> str:
        reasons = set(self.finish_reasons.values())
        if self.failed or "error" in reasons:
            return "failed"
        if self.client_gone or "abort" in reasons or len(self.finish_reasons) < len(self.prompts) * self.n:
            return "aborted"
        return "length" if "length" in reasons else "completed"

    def _finish(self) -> None:
        self.state.runs.discard(self)
        if self.refused == len(self.prompts):  # nothing ran: no usage row
            return
        ended = time.monotonic()
        status = self.status()
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        metrics = self.state.metrics
        metrics.finished.labels(status=status).inc()
        metrics.prompt_tokens.inc(self.prompt_tokens)
        metrics.cached_tokens.inc(self.cached_tokens)
        metrics.completion_tokens.inc(self.completion_tokens)
        metrics.duration.observe(ended - self.started)
        if ttft is not None:
            metrics.ttft.observe(ttft)
            per_choice = self.completion_tokens / (len(self.prompts) * self.n)
            if per_choice > 1 and self.first_token_at is not None:
                metrics.tpot.observe((ended - self.first_token_at) / (per_choice - 1))
        self.state.record_usage(
            request_id=self.request_id, key_id=self.key_id, prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens, completion_tokens=self.completion_tokens, ttft_seconds=ttft,
            duration_seconds=ended - self.started, status=status, endpoint=self.endpoint,
        )

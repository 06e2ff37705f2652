"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` chunks, then `data: [DONE]`."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from hanlin.engine.outputs import RequestOutput, TokenLogprob
from hanlin.server.errors import APIError
from hanlin.server.generation import engine_error

if TYPE_CHECKING:
    from hanlin.server.generation import RequestRun

DONE = "data: [DONE]\n\n"
MIN_LOGPROB = -9999.0  # JSON has no -Infinity: a token the filters ruled out reports this, as OpenAI does


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def logprob_value(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def shutdown_error() -> APIError:
    return APIError(503, "the server shut down before the request finished", code="server_shutting_down")


def finish_error(output: RequestOutput, reasons: set[str]) -> APIError | None:
    """An engine-side end that is not a normal finish: "error" → 500, "abort" (shutdown) → 503."""
    if "error" in reasons or output.error:
        return APIError(500, f"generation failed: {output.error or 'engine error'}", code="engine_error")
    if "abort" in reasons:
        return shutdown_error()
    return None


class View(Protocol):
    """Turns engine outputs into one endpoint's JSON (chat or text completions)."""

    include_usage: bool

    def first_chunks(self) -> list[dict[str, Any]]: ...
    def chunks(self, prompt_index: int, output: RequestOutput) -> list[dict[str, Any]]: ...
    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]: ...
    def add(self, prompt_index: int, output: RequestOutput) -> None: ...
    def response(self, usage: dict[str, Any]) -> dict[str, Any]: ...


async def stream_events(run: RequestRun, view: View) -> AsyncIterator[str]:
    """The SSE body. Cancelled by a client disconnect: the run is then aborted (its row says "aborted")."""
    completed = False
    try:
        for chunk in view.first_chunks():
            yield sse(chunk)
        failure: APIError | None = None
        async for index, item in run.items():
            if failure is not None:
                continue  # drain until every prompt has ended
            if isinstance(item, BaseException):
                failure = engine_error(item)
                run.abort(client_gone=False)
                continue
            reasons = {d.finish_reason for d in item.deltas if d.finish_reason}
            failure = finish_error(item, reasons)
            for chunk in view.chunks(index, item):
                yield sse(chunk)
            if failure is not None:
                run.abort(client_gone=False)
        if failure is not None:
            yield sse(failure.body())
        elif view.include_usage:
            yield sse(view.usage_chunk(run.usage()))
        yield DONE
        completed = True
    finally:
        if not completed and not run.done:
            run.abort(client_gone=True)


async def collect(run: RequestRun, view: View) -> dict[str, Any]:
    """The whole response of a non-streaming request."""
    async for index, item in run.items():
        if isinstance(item, BaseException):
            run.abort(client_gone=False)
            raise engine_error(item)
        reasons = {d.finish_reason for d in item.deltas if d.finish_reason}
        failure = finish_error(item, reasons)
        if failure is not None:
            run.abort(client_gone=False)
            raise failure
        view.add(index, item)
    return view.response(run.usage())


def chat_logprobs(items: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [{
        "token": lp.token, "logprob": logprob_value(lp.logprob), "bytes": lp.bytes,
        "top_logprobs": [{"token": t.token, "logprob": logprob_value(t.logprob), "bytes": t.bytes} for t in lp.top],
    } for lp in items]

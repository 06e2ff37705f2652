"""What every generation endpoint does around its own JSON: parse, start the run, answer (streamed or
not), and abort the run when the client goes away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from hanlin.server.errors import APIError, bad_request, validation_error
from hanlin.server.generation import RequestRun
from hanlin.server.streaming import View, collect, stream_events

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's "client closed request": never seen by the client, only in logs and metrics
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as `model`; malformed JSON, wrong types and unknown fields → 400 naming the field."""
    raw = await request.body()
    if not raw.strip():
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad_request(f"The request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_error(error) from None


class ClientGone(Exception):
    pass


class DisconnectWatcher:
    """Notices the client closing its connection while a handler waits (call only after the body is read)."""

    def __init__(self, request: Request) -> None:
        self._receive = request.receive
        self.task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return

    async def race(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, or raise ClientGone (cancelling it) if the client leaves first."""
        work = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait({work, self.task}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            raise
        if work in done:
            return work.result()
        work.cancel()
        raise ClientGone

    def stop(self) -> None:
        self.task.cancel()


class RunStream(StreamingResponse):
    """The SSE response; however it ends (even cancelled before its first byte), an unfinished run is stopped."""

    def __init__(self, events: AsyncIterator[str], *, is_done: Callable[[], bool], stop: Callable[[], None],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(events, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})
        self.is_done = is_done
        self.stop = stop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.is_done():
                self.stop()


async def respond(request: Request, run: RequestRun, view: View, stream: bool) -> Response:
    watcher = DisconnectWatcher(request)
    try:
        try:
            await watcher.race(run.start())
            if stream:
                watcher.stop()  # from here on Starlette watches, and cancels the stream when the client leaves
                return RunStream(stream_events(run, view), is_done=lambda: run.done,
                                 stop=lambda: run.abort(client_gone=True))
            return JSONResponse(await watcher.race(collect(run, view)))
        except ClientGone:
            run.abort(client_gone=True)
            return Response(status_code=CLIENT_CLOSED)
        except asyncio.CancelledError:  # the server gave up on this request (graceful-shutdown timeout)
            run.abort(client_gone=True)
            raise
        except APIError:
            if not run.done:
                run.abort(client_gone=False)
            raise
    finally:
        watcher.stop()

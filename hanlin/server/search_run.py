"""One POST /v1/search: the agent in a worker thread, its events handed to the event loop, metered once.

The worker thread iterates the agent's event generator and passes every event (or the exception that
ended it) to the loop with call_soon_threadsafe; the HTTP side reads them with items(). cancel() (the
client went away) aborts the engine call in progress and makes the worker close the generator. When the
worker ends, one usage row is written with the tokens of every engine call the search made (none when
no engine call ran: a refused request is not metered, as elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from hanlin.apps.search.errors import EmptyIndexError, FetchError, SearchError
from hanlin.apps.search.types import Event, Retriever
from hanlin.engine.outputs import EngineStoppedError, InvalidRequestError, QueueFullError
from hanlin.errors import HanlinError
from hanlin.server.errors import APIError
from hanlin.server.generation import engine_error
from hanlin.server.search_llm import EngineChatModel, SearchCancelled

if TYPE_CHECKING:
    from hanlin.engine.async_engine import AsyncEngine
    from hanlin.server.state import ServerState

log = logging.getLogger("hanlin.server")
ENDPOINT = "/v1/search"

# Opens the retriever in the worker thread (SQLite connections belong to the thread that made them);
# returns it and the function that closes it.
RetrieverOpener = Callable[[], tuple[Retriever, Callable[[], None]]]


def search_error(error: BaseException) -> APIError:
    """A failure of a search run as the HTTP error it answers when nothing has been streamed yet."""
    if isinstance(error, (APIError, QueueFullError, InvalidRequestError, EngineStoppedError)):
        return engine_error(error)
    if isinstance(error, EmptyIndexError):
        return APIError(400, str(error), param="source", code="empty_index")
    if isinstance(error, FetchError):
        return APIError(502, f"web search failed: {error}", type="server_error", code="web_search_failed")
    if isinstance(error, SearchError | HanlinError):
        return APIError(400, str(error), code="search_error")
    return APIError(500, f"search failed: {type(error).__name__}: {error}", code="search_failed")


class SearchRun:
    def __init__(self, state: ServerState, engine: AsyncEngine, *, request_id: str, key_id: int | str | None,
                 question: str, open_retriever: RetrieverOpener, options: dict[str, Any],
                 max_tokens: int | None, started: float) -> None:
        """options: run()'s keyword arguments besides question, retriever and llm (max_queries, k...)."""
        self.state = state
        self.request_id = request_id
        self.key_id = key_id
        self.question = question
        self.open_retriever = open_retriever
        self.options = options
        self.started = started
        self.loop = asyncio.get_running_loop()
        self.llm = EngineChatModel(engine, self.loop, request_id=request_id, max_tokens=max_tokens,
                                   on_accepted=self._wake_ready)
        self.error: BaseException | None = None  # the exception that ended the worker, if any
        self.status = "failed"
        self._pending: deque[Event | BaseException] = deque()
        self._emitted = 0
        self._ended = False
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()  # set at the engine's first output or at the end

    # ---- the loop side ------------------------------------------------------------------------------

    def start(self) -> None:
        self.state.runs.add(self)  # type: ignore[arg-type] - shutdown waits for every run's usage row
        threading.Thread(target=self._work, name=f"hanlin-{self.request_id}", daemon=True).start()

    async def ready(self) -> None:
        """Returns once the engine has started the run's first model call, or the run has ended: a refusal
        (busy, shutting down) or a failure before that is still an HTTP error, as for chat."""
        await self._ready.wait()

    def early_failure(self) -> APIError | None:
        """The HTTP error to answer instead of a response, when the run ended in failure before the engine
        ran any of its model calls (its earlier steps are dropped)."""
        if self.llm.calls_started or not self._pending or self._emitted > len(self._pending):
            return None
        last = self._pending[-1]
        if isinstance(last, BaseException):
            return search_error(last)
        if last.type == "error":
            return self.failure(last)
        return None

    def failure(self, event: Event) -> APIError:
        """An error event from the agent as an HTTP error (for a whole, unstreamed response). The agent
        reports the errors a user can fix (HanlinError) as events, naming the error's class."""
        if self.llm.refusal is not None:  # the engine refused a call: busy (429), shutting down (503)...
            return search_error(self.llm.refusal)
        message = str(event.data.get("message") or "unknown error")
        kind = event.data.get("error")
        if kind == "EmptyIndexError":
            return APIError(400, message, param="source", code="empty_index")
        if kind == "FetchError":
            return APIError(502, f"web search failed: {message}", type="server_error", code="web_search_failed")
        if kind == "EngineStoppedError":
            return APIError(503, message, code="server_shutting_down", headers={"Retry-After": "5"})
        if kind is not None and kind != "HanlinError":  # a SearchError subclass: the request's to fix
            return APIError(400, message, code="search_error")
        return APIError(500, f"search failed: {message}", code="search_failed")

    async def items(self) -> AsyncIterator[Event | BaseException]:
        """Every event in order; an exception as the last item when the run failed outside the agent."""
        while True:
            while self._pending:
                yield self._pending.popleft()
            if self._ended:
                return
            self._changed.clear()
            await self._changed.wait()

    def cancel(self) -> None:
        """The client went away: stop the agent and abort its engine call (the row says "aborted")."""
        if not self._ended:
            self.llm.cancel()

    @property
    def done(self) -> bool:
        return self._ended

    def _wake_ready(self) -> None:
        self._ready.set()

    def _push(self, item: Event | BaseException) -> None:
        self._emitted += 1
        self._pending.append(item)
        self._changed.set()

    def _end(self, status: str) -> None:
        self.status = status
        self._ended = True
        self._changed.set()
        self._ready.set()
        self.state.runs.discard(self)  # type: ignore[arg-type]
        self._meter()

    # ---- the worker thread --------------------------------------------------------------------------

    def _send(self, function: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def _work(self) -> None:
        from hanlin.apps.search.agent import run as run_agent

        status = "failed"
        close: Callable[[], None] | None = None
        try:
            retriever, close = self.open_retriever()
            events = run_agent(self.question, retriever=retriever, llm=self.llm, **self.options)
            try:
                for event in events:
                    if self.llm.cancelled.is_set():
                        break
                    self._send(self._push, event)
                    if event.type == "error":  # a shutdown's abort is "aborted", as for chat
                        status = "aborted" if event.data.get("error") == "EngineStoppedError" else "failed"
                        break
                    if event.type == "done":
                        status = "completed"
            finally:
                events.close()  # type: ignore[attr-defined]
        except SearchCancelled:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the HTTP side, which reports it
            if not self.llm.cancelled.is_set():
                log.warning("search %s failed: %r", self.request_id, error)
                self.error = error
                self._send(self._push, error)
        finally:
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    log.exception("closing the retriever of %s failed", self.request_id)
            if self.llm.cancelled.is_set():
                status = "aborted"
            self._send(self._end, status)

    # ---- metering -----------------------------------------------------------------------------------

    def _meter(self) -> None:
        llm = self.llm
        if llm.calls_started == 0:  # no engine work ran: refused, or failed before generating
            return
        ended = time.monotonic()
        ttft = None if llm.first_token_at is None else llm.first_token_at - self.started
        metrics = self.state.metrics
        metrics.finished.labels(status=self.status).inc()
        metrics.prompt_tokens.inc(llm.prompt_tokens)
        metrics.cached_tokens.inc(llm.cached_tokens)
        metrics.completion_tokens.inc(llm.completion_tokens)
        metrics.duration.observe(ended - self.started)
        if ttft is not None:
            metrics.ttft.observe(ttft)
        self.state.record_usage(
            request_id=self.request_id, key_id=self.key_id, prompt_tokens=llm.prompt_tokens,
            cached_tokens=llm.cached_tokens, completion_tokens=llm.completion_tokens, ttft_seconds=ttft,
            duration_seconds=ended - self.started, status=self.status, endpoint=ENDPOINT,
        )

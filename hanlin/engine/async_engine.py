"""The engine loop in a background thread, with a coroutine front for the server.

HTTP handlers never run the model: they put commands on a queue that the loop drains between steps, and
the loop hands each request's outputs back to the handler's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from hanlin.engine.outputs import EngineStats, EngineStoppedError, QueueFullError, RequestOutput
from hanlin.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from hanlin.engine.engine import LLMEngine
    from hanlin.engine.options import EngineOptions

log = logging.getLogger("hanlin.engine")


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.max_queued = engine.options.max_queued
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput | BaseException]]] = {}
        self._lock = threading.Lock()
        self._pending_adds = 0
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="hanlin-engine", daemon=True)
        self._ids = itertools.count()

    @classmethod
    def from_options(cls, options: EngineOptions) -> AsyncEngine:
        from hanlin.engine.engine import LLMEngine

        return cls(LLMEngine.from_options(options))

    def start(self) -> None:
        self._thread.start()

    # ---- the handler side -------------------------------------------------------------------------

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, n: int = 1, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs until it finishes. Leaving the iteration early aborts the request.

        Raises InvalidRequestError or QueueFullError before anything is yielded, EngineStoppedError when
        shutting down.
        """
        request_id = request_id or f"req-{uuid.uuid4().hex[:16]}"
        self.engine.validate(prompt_ids, params, n)
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        with self._lock:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down and takes no new requests")
            if self._pending_adds + self.engine.num_waiting >= self.max_queued:
                raise QueueFullError(
                    f"the server is busy: {self.max_queued} requests are already waiting; retry shortly",
                    retry_after=self._retry_after(),
                )
            self._pending_adds += 1
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", (request_id, list(prompt_ids), params, n)))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Thread-safe; the request ends (finish_reason "abort") at the start of the next step."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        stats = self.engine.stats()
        stats.waiting += self._pending_adds
        return stats

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let running ones finish for up to `timeout` seconds, abort the rest."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while self._busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stopping = True
        self._commands.put(("abort_all", None))
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 30.0)

    def _busy(self) -> bool:
        return self._pending_adds > 0 or self.engine.has_unfinished()

    def _retry_after(self) -> float:
        stats = self.engine.stats()
        return max(1.0, round(stats.waiting / max(1, stats.running or 1)))

    # ---- the engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._drain_commands()
            if self._stopping and not self.engine.has_unfinished():
                return
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # a bug must not take the server down: fail what was running
                log.exception("engine step failed")
                outputs = self.engine.fail_all(f"engine error: {error}")
            for output in outputs:
                self._deliver(output.request_id, output)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request_id, prompt_ids, params, n = payload  # type: ignore[misc]
                try:
                    self.engine.add_request(request_id, prompt_ids, params, n)
                except Exception as error:
                    self._deliver(request_id, error)
                finally:
                    with self._lock:
                        self._pending_adds -= 1
            elif kind == "abort":
                for output in self.engine.abort(payload):  # type: ignore[arg-type]
                    self._deliver(output.request_id, output)
            elif kind == "abort_all":
                for output in self.engine.abort_all():
                    self._deliver(output.request_id, output)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the handler's loop has closed
            pass

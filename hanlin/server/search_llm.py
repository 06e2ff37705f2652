"""The search agent's ChatModel over the server's AsyncEngine.

The agent is synchronous and runs in a worker thread; the engine's output stream lives on the server's
event loop. Each stream_chat() call submits one engine request from the worker thread with
run_coroutine_threadsafe: a pump coroutine on the loop reads the engine's outputs into a thread-safe queue
that the worker reads. The pump, not the worker, counts the tokens, so a call that is cut short still
reports the tokens the engine really computed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from hanlin.apps.search.llm import parameter_count
from hanlin.engine.outputs import EngineStoppedError, RequestOutput
from hanlin.engine.sampling import SamplingParams
from hanlin.errors import HanlinError

if TYPE_CHECKING:
    from hanlin.engine.async_engine import AsyncEngine

log = logging.getLogger("hanlin.server")
_END = object()  # the pump has ended: nothing more will come for this call
PUMP_WAIT_S = 10.0  # how long a cut-short call waits for the engine to confirm the abort


class SearchCancelled(Exception):
    """The search was stopped: its client went away."""


class EngineChatModel:
    """A ChatModel (hanlin.apps.search.types) whose calls are engine requests on the server's loop."""

    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop, *, request_id: str,
                 max_tokens: int | None = None, on_accepted: Callable[[], None] | None = None) -> None:
        """max_tokens: a cap on every call's max_tokens (the request's own limit).
        on_accepted: called on the loop when the engine starts the first call (it took the request)."""
        self.engine = engine
        self.loop = loop
        self.request_id = request_id
        self.max_tokens = max_tokens
        self.on_accepted = on_accepted
        self.context_tokens = engine.max_model_len
        self.parameter_count = parameter_count(engine.config)  # the agent picks its writer by model size
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.calls_started = 0  # engine requests that ran (produced at least one output)
        self.first_token_at: float | None = None  # time.monotonic() of the first generated token
        self.refusal: BaseException | None = None  # the engine refused a call before starting it (busy...)
        self.cancelled = threading.Event()
        self._calls = 0
        self._current: str | None = None  # the engine request id of the call in progress

    def count_tokens(self, text: str) -> int:
        return len(self.engine.tokenizer.encode(text, add_special_tokens=False))

    def cancel(self) -> None:
        """Stop now (any thread): the call in progress is aborted, later calls raise SearchCancelled."""
        self.cancelled.set()
        current = self._current
        if current is not None:
            self.engine.abort(current)

    def stream_chat(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float = 0.0,
                    stop: list[str] | None = None) -> Iterator[str]:
        """Text deltas of one reply (call from a worker thread, never from the loop)."""
        if self.cancelled.is_set():
            raise SearchCancelled("the search was stopped")
        tokenizer = self.engine.tokenizer
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert isinstance(text, str)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        room = self.context_tokens - len(prompt)
        if room < 1:
            raise HanlinError(f"the search prompt ({len(prompt)} tokens) fills the model's context of "
                              f"{self.context_tokens} tokens")
        limit = min(max_tokens, room, self.max_tokens or max_tokens)
        params = SamplingParams(temperature=temperature, max_tokens=max(1, limit), stop=list(stop or []))
        request_id = f"{self.request_id}-{self._calls}"
        self._calls += 1
        items: queue.SimpleQueue[object] = queue.SimpleQueue()
        pump = asyncio.run_coroutine_threadsafe(self._pump(prompt, params, request_id, items), self.loop)
        self._current = request_id
        if self.cancelled.is_set():  # cancel() ran before _current was set
            self.engine.abort(request_id)
        finished = False
        try:
            while True:
                item = items.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, RequestOutput)
                for delta in item.deltas:
                    if delta.text:
                        yield delta.text
                    if delta.finish_reason == "abort":
                        if self.cancelled.is_set():
                            raise SearchCancelled("the search was stopped")
                        raise EngineStoppedError("the server shut down before the search finished")
                    if delta.finish_reason == "error":
                        raise HanlinError(f"generation failed: {item.error or 'engine error'}")
                finished = item.finished
        finally:
            self._current = None
            if not finished:
                self.engine.abort(request_id)
            try:
                pump.result(timeout=PUMP_WAIT_S)  # its token counts are in once it has ended
            except Exception as error:  # noqa: BLE001 - the loop is gone or stuck: counts may be short
                log.warning("search call %s did not end cleanly: %r", request_id, error)

    async def _pump(self, prompt: list[int], params: SamplingParams, request_id: str,
                    items: queue.SimpleQueue[object]) -> None:
        last: RequestOutput | None = None
        try:
            async for output in self.engine.generate(prompt, params, request_id=request_id):
                if last is None:
                    self.calls_started += 1
                    if self.calls_started == 1 and self.on_accepted is not None:
                        self.on_accepted()
                if self.first_token_at is None and any(d.token_ids for d in output.deltas):
                    self.first_token_at = time.monotonic()
                last = output
                items.put(output)
        except Exception as error:  # noqa: BLE001 - handed to the worker, which raises it in the agent
            if last is None and self.refusal is None:
                self.refusal = error
            items.put(error)
        finally:
            if last is not None:
                self.prompt_tokens += last.prompt_tokens
                self.cached_tokens += last.cached_tokens
                self.completion_tokens += last.completion_tokens
            items.put(_END)

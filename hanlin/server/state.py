"""What the app holds: the engine (loaded in the background), the metering store and writer, metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hanlin.server.errors import APIError
from hanlin.server.metrics import Metrics

if TYPE_CHECKING:
    from hanlin.engine.async_engine import AsyncEngine
    from hanlin.engine.options import EngineOptions
    from hanlin.server.generation import RequestRun

log = logging.getLogger("hanlin.server")


@dataclass
class ServerState:
    options: EngineOptions
    store: Any = None  # hanlin.metering.MeteringStore, or None: no keys, no metering
    aliases: list[str] = field(default_factory=list)  # names besides the engine's model_name (e.g. "smollm2")
    shutdown_timeout: float = 30.0
    on_ready: Callable[[ServerState], None] | None = None
    engine_factory: Callable[[EngineOptions], AsyncEngine] | None = None
    engine: AsyncEngine | None = None
    load_error: BaseException | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)
    runs: set[RequestRun] = field(default_factory=set)
    writer: Any = None
    keys_checked_at: float = -1e9
    keys_active: bool = False
    drain_task: asyncio.Task[None] | None = None
    _loaded: threading.Event = field(default_factory=threading.Event)

    # ---- the model ----------------------------------------------------------------------------------

    def start_loading(self) -> None:
        """Load the engine in a daemon thread: /health answers 503 until it is ready."""
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._load, args=(loop,), name="hanlin-load", daemon=True).start()

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            if self.engine_factory is not None:
                engine = self.engine_factory(self.options)
            else:
                from hanlin.engine.async_engine import AsyncEngine

                engine = AsyncEngine.from_options(self.options)
            engine.start()
        except BaseException as error:  # noqa: BLE001 - reported through /health and on_ready
            log.error("loading %s failed: %s", self.options.model, error)
            self.load_error = error
        else:
            self.engine = engine
            self.metrics.model_loaded.set(1)
        finally:
            self._loaded.set()
        if self.on_ready is not None:
            try:
                loop.call_soon_threadsafe(self.on_ready, self)
            except RuntimeError:  # the server stopped while the model was loading
                pass

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def ready_engine(self) -> AsyncEngine:
        if self.engine is not None:
            return self.engine
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        raise APIError(503, "the model is still loading; retry in a few seconds", code="model_loading",
                       headers={"Retry-After": "2"})

    def begin_shutdown(self) -> None:
        """Stop taking requests now; running ones get shutdown_timeout seconds to finish, then are aborted
        (their streams end with an error event, their usage rows say "aborted"). Idempotent."""
        if self.drain_task is None:
            self.drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown(timeout=self.shutdown_timeout)

    @property
    def model_names(self) -> list[str]:
        names = [self.engine.model_name] if self.engine is not None else []
        return names + [a for a in self.aliases if a not in names]

    def check_model(self, requested: str | None) -> str:
        """The name to answer with; an unknown model → 404."""
        names = self.model_names
        if requested is None:
            return names[0]
        if requested in names:
            return requested
        raise APIError(404, f"The model '{requested}' does not exist; this server serves: {', '.join(names)}",
                       param="model", code="model_not_found")

    # ---- metering -----------------------------------------------------------------------------------

    def open_writer(self) -> None:
        if self.store is not None:
            from hanlin.metering import UsageWriter

            self.writer = UsageWriter(self.store)

    def record_usage(self, **fields: Any) -> None:
        if self.writer is None:
            return
        from hanlin.metering import UsageRecord

        model = self.engine.model_name if self.engine is not None else self.options.model
        try:
            self.writer.submit(UsageRecord(model=model, **fields))
        except Exception:  # metering must never take a request down
            log.exception("could not queue the usage record of %s", fields.get("request_id"))

    async def close_writer(self, timeout: float) -> None:
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close, timeout)
            self.writer = None

    async def keys_required(self) -> bool:
        """Whether any active key exists (cached for a second: checked off the event loop)."""
        if self.store is None:
            return False
        now = time.monotonic()
        if now - self.keys_checked_at > 1.0:
            self.keys_active = bool(await asyncio.to_thread(self.store.has_active_keys))
            self.keys_checked_at = now
        return self.keys_active

"""The OpenAI-compatible HTTP server: create_app() builds the FastAPI app around one AsyncEngine.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}], POST /tokenize,
POST /detokenize, GET /health (503 while the model loads), GET /metrics (Prometheus), GET / (the web chat
page) and /static.

Choices worth knowing:
- max_tokens (or max_completion_tokens) that does not fit the context left after the prompt is refused
  with a 400 naming the field and giving the prompt's tokens, the max_tokens asked for and the context
  size, instead of being silently clipped: a client that asked for N tokens and got fewer with
  finish_reason "length" could not tell whether the model or the server cut it short. Without
  max_tokens a request may use the rest of the context (for /v1/completions too, where OpenAI's default
  is 16).
- Every OpenAI field either works or is refused with a 400 that names it (see params.py); unknown
  fields are refused too.
- When the metering store holds an active key, everything but /health, /metrics and the page itself needs
  `Authorization: Bearer <key>`. Every generation that starts writes exactly one usage row when it ends
  (completed, length, aborted or failed); requests refused before starting write none.
- Shutdown (SIGTERM): the runner (cli_serve) calls ServerState.begin_shutdown() as uvicorn starts its
  graceful shutdown: uvicorn closes the listening socket, the engine refuses new requests (503) and gives
  running ones up to shutdown_timeout seconds, then aborts the rest (streams end with an error event and
  [DONE]); uvicorn waits for the responses to end, then the lifespan shutdown waits for every usage row
  and flushes the usage writer. The process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from hanlin.server import chat, completions, embeddings, routes, search
from hanlin.server.errors import install_error_handlers
from hanlin.server.metrics import RequestCounter
from hanlin.server.state import ServerState

if TYPE_CHECKING:
    from hanlin.engine.async_engine import AsyncEngine
    from hanlin.engine.options import EngineOptions

log = logging.getLogger("hanlin.server")
ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/v1/search", "/tokenize",
             "/detokenize", "/health", "/metrics", "/", "/search"}


def create_app(
    options: EngineOptions,
    *,
    store: Any = None,
    aliases: list[str] | None = None,
    shutdown_timeout: float = 30.0,
    on_ready: Callable[[ServerState], None] | None = None,
    engine_factory: Callable[[EngineOptions], AsyncEngine] | None = None,
    search_settings: Any = None,
    embedding_model: str = "minilm",
) -> FastAPI:
    """The app; the model loads in the background once the app starts (see ServerState.start_loading).

    store: a hanlin.metering.MeteringStore for keys and usage rows, or None for neither.
    aliases: more names the model answers to besides the engine's model_name.
    search_settings: a hanlin.server.search.SearchSettings (index file, web backend) for POST /v1/search, or None.
    embedding_model: the encoder POST /v1/embeddings serves (loaded on first use).
    """
    state = ServerState(options=options, store=store, aliases=list(aliases or []),
                        shutdown_timeout=shutdown_timeout, on_ready=on_ready, engine_factory=engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.open_writer()
        state.start_loading()
        try:
            yield
        finally:
            await shutdown(state)

    app = FastAPI(title="Hanlin", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.hanlin = state
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(routes.router)
    app.include_router(embeddings.router)
    app.include_router(search.router)
    app.state.search_settings = search_settings
    app.state.embedding_model = embedding_model
    app.mount("/static", StaticFiles(directory=routes.STATIC_DIR, check_dir=False), name="static")
    app.add_middleware(RequestCounter, metrics=state.metrics, endpoints=ENDPOINTS)
    return app


async def shutdown(state: ServerState) -> None:
    """Stop the engine (running requests get what is left of the timeout, then are aborted), wait for
    every run to write its usage row, flush the writer."""
    state.begin_shutdown()  # already begun when the server runner calls it at SIGTERM (cli_serve does)
    assert state.drain_task is not None
    await state.drain_task
    deadline = time.monotonic() + 10.0
    while state.runs and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if state.runs:
        log.error("%d request(s) did not end; their usage rows are lost", len(state.runs))
    await state.close_writer(timeout=10.0)

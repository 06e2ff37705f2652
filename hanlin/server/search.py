"""POST /v1/search (AI search over the server's index and/or a SearXNG backend) and GET /search (its page).

The agent (hanlin.apps.search.agent.run) is synchronous: search_run.SearchRun runs it in a worker thread
with a ChatModel over this server's engine (search_llm.py) and hands its events back to the loop.

- stream: text/event-stream, one `data: {"type": ..., ...}` per agent event, then `data: [DONE]`. As for
  chat, the response starts once the engine has started the search's first model call: a failure before
  that (engine busy or shutting down, empty index, web backend down) is an HTTP error; a later one an
  {"type": "error", "message"} event, then [DONE].
- otherwise one JSON object: {"id": "search-…", "object": "search.result", "created", "model", "query",
  "answer", "sentences", "sources", "plan", "not_found", "usage"}.
- One usage row per request (endpoint "/v1/search") with the prompt and completion tokens of every model
  call the search made.

Extensions beyond the issue's body: "max_tokens" caps each model call (plan and answer), "temperature",
"writer" ("auto" | "per-source" | "inline", see hanlin.apps.search.agent); "max_queries" also takes
"auto" (the default: 1 for a model under 1B parameters, else 3).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from hanlin.apps.search.types import Event
from hanlin.server.auth import authenticate
from hanlin.server.errors import APIError, bad_request
from hanlin.server.handler import CLIENT_CLOSED, ClientGone, DisconnectWatcher, RunStream, parse_body
from hanlin.server.protocol import Strict
from hanlin.server.routes import static_page
from hanlin.server.search_run import ENDPOINT, SearchRun, search_error
from hanlin.server.search_sources import retriever_opener
from hanlin.server.state import ServerState
from hanlin.server.streaming import DONE, sse

router = APIRouter()
MAX_QUERY_CHARS = 2000


@dataclass
class SearchSettings:
    """What POST /v1/search may search: an index file (`hanlin index add`), a SearXNG instance, or both."""

    index: Path | None = None
    searxng_url: str | None = None
    allow_private_fetch: bool = False  # let the web backend fetch pages on private/loopback addresses


class SearchRequest(Strict):
    query: Annotated[str, Field(max_length=MAX_QUERY_CHARS)]
    stream: bool = False
    max_queries: Annotated[int, Field(ge=1, le=5)] | Literal["auto"] = "auto"
    k: Annotated[int, Field(ge=1, le=8)] = 4
    source: Literal["index", "web", "auto"] = "auto"
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    writer: Literal["auto", "per-source", "inline"] = "auto"


@router.post(ENDPOINT)
async def search(request: Request, key: Any = Depends(authenticate)) -> Response:
    started = time.monotonic()
    req = await parse_body(request, SearchRequest)
    question = req.query.strip()
    if not question:
        raise bad_request("query must not be blank: ask a question", param="query")
    state: ServerState = request.app.state.hanlin
    engine = state.ready_engine()
    model = state.check_model(req.model)
    opener = retriever_opener(request.app, req.source)
    run = SearchRun(state, engine, request_id=f"search-{uuid.uuid4().hex}", key_id=key.id if key is not None else None,
                    question=question, open_retriever=opener,
                    options=_agent_options(req), max_tokens=req.max_tokens, started=started)
    run.start()
    watcher = DisconnectWatcher(request)
    try:
        try:
            await watcher.race(run.ready())
            failure = run.early_failure()
            if failure is not None:
                raise failure
            if req.stream:
                watcher.stop()  # from here on Starlette watches, and cancels the stream when the client leaves
                return RunStream(stream_events(run), is_done=lambda: run.done, stop=run.cancel,
                                 headers={"X-Request-Id": run.request_id})
            return JSONResponse(await watcher.race(collect(run, question, model)))
        except ClientGone:
            run.cancel()
            return Response(status_code=CLIENT_CLOSED)
        except BaseException:
            run.cancel()
            raise
    finally:
        watcher.stop()


def _agent_options(req: SearchRequest) -> dict[str, Any]:
    options: dict[str, Any] = {"max_queries": req.max_queries, "k": req.k, "temperature": req.temperature,
                               "writer": req.writer}
    if req.max_tokens is not None:
        options["max_answer_tokens"] = req.max_tokens
    return options


@router.get("/search", include_in_schema=False)
async def search_page() -> Response:
    return static_page("search.html", "the search page")


# ---- answers ------------------------------------------------------------------------------------------


async def stream_events(run: SearchRun) -> AsyncIterator[str]:
    """The SSE body: the agent's events, an error event if the run ends any other way than "done", [DONE]."""
    completed = False
    try:
        ended = False
        async for item in run.items():
            if isinstance(item, BaseException):
                yield sse({"type": "error", "message": search_error(item).message})
                ended = True
                break
            yield sse(item.to_dict())
            if item.type in ("error", "done"):
                ended = True
                break
        if not ended:
            yield sse({"type": "error", "message": "the search ended before it finished"})
        yield DONE
        completed = True
    finally:
        if not completed:
            run.cancel()


async def collect(run: SearchRun, query: str, model: str) -> dict[str, Any]:
    """The whole answer of a non-streaming request."""
    result: dict[str, Any] = {
        "id": run.request_id, "object": "search.result", "created": int(time.time()), "model": model,
        "query": query, "answer": "", "sentences": [], "sources": [], "plan": [], "not_found": False, "usage": None,
    }
    async for item in run.items():
        if isinstance(item, BaseException):
            raise search_error(item)
        if item.type == "error":
            raise run.failure(item)
        _add_event(result, item)
        if item.type == "done":
            prompt, completion = run.llm.prompt_tokens, run.llm.completion_tokens  # what the usage row says
            result["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion}
            return result
    raise APIError(500, "the search ended before it finished", code="search_failed")


def _add_event(result: dict[str, Any], event: Event) -> None:
    data = event.data
    if event.type == "plan":
        result["plan"] = list(data.get("queries", []))
    elif event.type == "answer":
        result["answer"] = data.get("text", "")
        result["sentences"] = data.get("sentences", [])
        result["not_found"] = bool(data.get("not_found", False))
        result["dropped_citations"] = data.get("dropped_citations", [])
    elif event.type == "sources":
        result["sources"] = data.get("sources", [])

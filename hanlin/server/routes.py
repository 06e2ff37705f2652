"""The small endpoints: models, tokenize/detokenize, health, metrics and the chat page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from hanlin.server.auth import authenticate
from hanlin.server.errors import APIError, bad_request
from hanlin.server.handler import parse_body
from hanlin.server.metrics import CONTENT_TYPE
from hanlin.server.params import chat_prompt_ids, check_token_ids
from hanlin.server.protocol import DetokenizeRequest, TokenizeRequest
from hanlin.server.state import ServerState

STATIC_DIR = Path(__file__).resolve().parent / "static"
router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.hanlin


@router.get("/v1/models")
async def list_models(request: Request, key: Any = Depends(authenticate)) -> dict[str, Any]:
    state = _state(request)
    engine = state.ready_engine()
    return {"object": "list", "data": [_model_card(state, name, engine.max_model_len) for name in state.model_names]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request, key: Any = Depends(authenticate)) -> dict[str, Any]:
    state = _state(request)
    engine = state.ready_engine()
    return _model_card(state, state.check_model(model), engine.max_model_len)


def _model_card(state: ServerState, name: str, max_model_len: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "hanlin",
            "max_model_len": max_model_len}


@router.post("/tokenize")
async def tokenize(request: Request, key: Any = Depends(authenticate)) -> dict[str, Any]:
    req = await parse_body(request, TokenizeRequest)
    state = _state(request)
    engine = state.ready_engine()
    state.check_model(req.model)
    tokenizer = engine.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("send exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        if req.add_special_tokens:
            raise bad_request("add_special_tokens applies to a prompt: the chat template writes its own special "
                              "tokens", param="add_special_tokens")
        tokens = chat_prompt_ids(req.messages, tokenizer, add_generation_prompt=req.add_generation_prompt)
    else:
        assert req.prompt is not None
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        tokens = tokenizer.encode(req.prompt, add_special_tokens=add_special)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}


@router.post("/detokenize")
async def detokenize(request: Request, key: Any = Depends(authenticate)) -> dict[str, Any]:
    req = await parse_body(request, DetokenizeRequest)
    state = _state(request)
    engine = state.ready_engine()
    state.check_model(req.model)
    check_token_ids(req.tokens, engine.tokenizer.vocab_size, "tokens")
    return {"prompt": engine.tokenizer.decode(req.tokens)}


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = _state(request)
    engine = state.ready_engine()  # 503 while loading (or after a failed load)
    if not engine.accepting:
        raise APIError(503, "the server is shutting down", code="server_shutting_down")
    return JSONResponse({"status": "ok", "model": state.model_names[0]})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = _state(request)
    if state.engine is not None:
        state.metrics.observe_engine(state.engine.stats())
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def static_page(file_name: str, what: str) -> FileResponse:
    """One of the web UI's HTML pages, or a 404 that names the missing file."""
    page = STATIC_DIR / file_name
    if not page.is_file():
        raise APIError(404, f"{what} is not installed (hanlin/server/static/{file_name} is missing)",
                       code="not_found")
    return FileResponse(page, media_type="text/html")


@router.get("/", include_in_schema=False)
async def chat_page() -> Response:
    return static_page("index.html", "the web chat page")

"""POST /v1/embeddings: OpenAI's embeddings API over Hanlin's own BERT encoder (all-MiniLM-L6-v2 by default).

The encoder loads on the first request (a failure answers 503 and is retried on the next request) and runs
in a worker thread so the event loop stays free. `input` is a string, a list of strings, one token array
or a list of token arrays (ids of the encoder's own wordpiece tokenizer, with or without [CLS]/[SEP]).
Inputs longer than the encoder's max_tokens are refused rather than silently truncated. One usage row per
request (prompt tokens = tokens embedded, [CLS]/[SEP] included; completion tokens 0).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from hanlin.errors import HanlinError
from hanlin.server.auth import authenticate
from hanlin.server.errors import APIError, bad_request
from hanlin.server.handler import parse_body
from hanlin.server.protocol import Strict
from hanlin.server.state import ServerState

log = logging.getLogger("hanlin.server")
router = APIRouter()
ENDPOINT = "/v1/embeddings"
MAX_INPUTS = 2048


class EmbeddingRequest(Strict):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


@router.post(ENDPOINT)
async def create_embeddings(request: Request, key: Any = Depends(authenticate)) -> JSONResponse:
    req = await parse_body(request, EmbeddingRequest)
    started = time.monotonic()
    served = request.app.state.embedding_model
    embedder = await _embedder(request, served)
    _check_model(req.model, served, embedder)
    if req.dimensions is not None and req.dimensions != embedder.dim:
        raise bad_request(f"{embedder.name} gives {embedder.dim}-dimensional embeddings; dimensions="
                          f"{req.dimensions} is not supported", param="dimensions", code="unsupported_parameter")
    inputs = _inputs(req.input)
    ids = await asyncio.to_thread(_token_ids, embedder, inputs)
    vectors = await asyncio.to_thread(embedder.embed_token_ids, ids)
    tokens = sum(len(seq) for seq in ids)
    request_id = f"embd-{uuid.uuid4().hex}"
    _record_usage(request.app.state.hanlin, embedder.name, request_id, key, tokens, time.monotonic() - started)
    data = [{"object": "embedding", "index": i, "embedding": _encode(row, req.encoding_format)}
            for i, row in enumerate(vectors)]
    body = {"object": "list", "data": data, "model": embedder.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return JSONResponse(body, headers={"x-request-id": request_id})


async def _embedder(request: Request, served: str) -> Any:
    from hanlin.embeddings import load_embedder

    try:
        return await asyncio.to_thread(load_embedder, served)
    except (HanlinError, OSError) as error:
        log.error("loading the embedding model %s failed: %s", served, error)
        raise APIError(503, f"the embedding model {served!r} could not be loaded: {error}",
                       code="embedding_model_unavailable") from None


def _check_model(requested: str | None, served: str, embedder: Any) -> None:
    if requested is None:
        return
    from hanlin.embeddings import MINILM_NAMES

    names = {served.lower(), embedder.name.lower()}
    if embedder.name == "all-MiniLM-L6-v2":
        names |= MINILM_NAMES
    if requested.lower() not in names:
        raise APIError(404, f"The model '{requested}' does not exist; this server's embedding model is "
                       f"{embedder.name}", param="model", code="model_not_found")


def _inputs(raw: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    """A list of texts or a list of token arrays; empty ones and too many are refused."""
    if isinstance(raw, str):
        inputs: list[Any] = [raw]
    elif raw and isinstance(raw[0], int):
        inputs = [raw]
    else:
        inputs = list(raw)
    if not inputs:
        raise bad_request("'input' is empty; send a string, a list of strings or token arrays", param="input",
                          code="invalid_value")
    if len(inputs) > MAX_INPUTS:
        raise bad_request(f"'input' has {len(inputs)} items; at most {MAX_INPUTS} per request", param="input",
                          code="invalid_value")
    for i, item in enumerate(inputs):
        if len(item) == 0:
            raise bad_request(f"input[{i}] is empty", param=f"input[{i}]", code="invalid_value")
    return inputs


def _token_ids(embedder: Any, inputs: list[str] | list[list[int]]) -> list[list[int]]:
    """Each input as the encoder's token ids with its special tokens; too long or out-of-vocabulary → 400."""
    if isinstance(inputs[0], str):
        ids = embedder.tokenize(inputs, truncate=False)
    else:
        for i, seq in enumerate(inputs):
            bad = next((t for t in seq if not 0 <= t < embedder.vocab_size), None)
            if bad is not None:
                raise bad_request(f"input[{i}] holds token id {bad}, outside the vocabulary "
                                  f"(0..{embedder.vocab_size - 1})", param=f"input[{i}]", code="invalid_value")
        ids = [embedder.add_special_tokens(seq) for seq in inputs]
    for i, seq in enumerate(ids):
        if len(seq) > embedder.max_tokens:
            raise bad_request(f"input[{i}] has {len(seq)} tokens; {embedder.name} takes at most {embedder.max_tokens} "
                              "(special tokens included). Split or shorten it.", param=f"input[{i}]",
                              code="context_length_exceeded")
    return ids


def _encode(row: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return row.tolist()


def _record_usage(state: ServerState, model: str, request_id: str, key: Any, tokens: int, seconds: float) -> None:
    state.metrics.prompt_tokens.inc(tokens)
    if state.writer is None:
        return
    from hanlin.metering import UsageRecord

    try:
        state.writer.submit(UsageRecord(
            request_id=request_id, key_id=key.id if key is not None else None, model=model, prompt_tokens=tokens,
            cached_tokens=0, completion_tokens=0, ttft_seconds=None, duration_seconds=seconds, status="completed",
            endpoint=ENDPOINT))
    except Exception:  # metering must never take a request down
        log.exception("could not queue the usage record of %s", request_id)

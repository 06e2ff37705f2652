"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from hanlin.engine.outputs import RequestOutput
from hanlin.server.auth import authenticate
from hanlin.server.generation import RequestRun
from hanlin.server.handler import parse_body, respond
from hanlin.server.params import (
    chat_prompt_ids,
    check_context,
    max_tokens_field,
    refuse_unsupported_chat,
    sampling_params,
    with_max_tokens,
)
from hanlin.server.protocol import ChatCompletionRequest
from hanlin.server.state import ServerState
from hanlin.server.streaming import chat_logprobs

router = APIRouter()
ENDPOINT = "/v1/chat/completions"
FINISHES = ("stop", "length")  # "abort" and "error" become error responses, not finish reasons


@router.post(ENDPOINT)
async def chat_completions(request: Request, key: Any = Depends(authenticate)) -> Response:
    started = time.monotonic()
    req = await parse_body(request, ChatCompletionRequest)
    state: ServerState = request.app.state.hanlin
    engine = state.ready_engine()
    model = state.check_model(req.model)
    refuse_unsupported_chat(req)
    tokenizer = engine.tokenizer
    prompt = chat_prompt_ids(req.messages, tokenizer)
    requested, field = max_tokens_field(req)
    max_tokens = check_context(len(prompt), requested, engine.max_model_len, "messages", field)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = with_max_tokens(sampling_params(req, vocab_size=tokenizer.vocab_size, logprobs=logprobs), max_tokens)
    n = req.n or 1
    run = RequestRun(state, request_id=f"chatcmpl-{uuid.uuid4().hex}", endpoint=ENDPOINT,
                     key_id=key.id if key is not None else None, prompts=[prompt], params=[params], n=n,
                     started=started)
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    view = ChatView(run.request_id, model, n, include_usage, logprobs is not None)
    return await respond(request, run, view, bool(req.stream))


class ChatView:
    def __init__(self, request_id: str, model: str, n: int, include_usage: bool, logprobs: bool) -> None:
        self.head = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        self.n = n
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.texts = [""] * n
        self.token_logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**self.head, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    # ---- streaming ----

    def first_chunks(self) -> list[dict[str, Any]]:
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(self.n)]

    def chunks(self, prompt_index: int, output: RequestOutput) -> list[dict[str, Any]]:
        out = []
        for delta in output.deltas:
            logprobs = {"content": chat_logprobs(delta.logprobs), "refusal": None} if delta.logprobs else None
            if delta.text or logprobs:
                out.append(self._chunk([{"index": delta.index, "delta": {"content": delta.text},
                                         "logprobs": logprobs, "finish_reason": None}]))
            if delta.finish_reason in FINISHES:
                out.append(self._chunk([{"index": delta.index, "delta": {}, "logprobs": None,
                                         "finish_reason": delta.finish_reason}]))
        return out

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": usage}

    # ---- whole response ----

    def add(self, prompt_index: int, output: RequestOutput) -> None:
        for delta in output.deltas:
            self.texts[delta.index] += delta.text
            if delta.logprobs:
                self.token_logprobs[delta.index] += chat_logprobs(delta.logprobs)
            if delta.finish_reason is not None:
                self.finish[delta.index] = delta.finish_reason

    def response(self, usage: dict[str, Any]) -> dict[str, Any]:
        choices = [{
            "index": i,
            "message": {"role": "assistant", "content": self.texts[i], "refusal": None},
            "logprobs": {"content": self.token_logprobs[i], "refusal": None} if self.logprobs else None,
            "finish_reason": self.finish[i],
        } for i in range(self.n)]
        return {**self.head, "object": "chat.completion", "choices": choices, "usage": usage}

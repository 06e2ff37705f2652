"""POST /v1/completions: text in, text out; batched prompts give choices indexed prompt × n."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from hanlin.engine.outputs import RequestOutput, TokenLogprob
from hanlin.server.auth import authenticate
from hanlin.server.errors import bad_request
from hanlin.server.generation import RequestRun
from hanlin.server.handler import parse_body, respond
from hanlin.server.params import (
    MAX_CHOICES,
    check_context,
    completion_prompt_ids,
    refuse_unsupported_completion,
    sampling_params,
    with_max_tokens,
)
from hanlin.server.protocol import CompletionRequest
from hanlin.server.state import ServerState
from hanlin.server.streaming import logprob_value

router = APIRouter()
ENDPOINT = "/v1/completions"
FINISHES = ("stop", "length")


@router.post(ENDPOINT)
async def completions(request: Request, key: Any = Depends(authenticate)) -> Response:
    started = time.monotonic()
    req = await parse_body(request, CompletionRequest)
    state: ServerState = request.app.state.hanlin
    engine = state.ready_engine()
    model = state.check_model(req.model)
    refuse_unsupported_completion(req)
    tokenizer = engine.tokenizer
    prompts = completion_prompt_ids(req.prompt, tokenizer)
    n = req.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise bad_request(f"{len(prompts)} prompts × n={n} is more than {MAX_CHOICES} choices", param="n")
    base = sampling_params(req, vocab_size=tokenizer.vocab_size, logprobs=req.logprobs)
    params = [with_max_tokens(base, check_context(len(p), req.max_tokens, engine.max_model_len, "prompt",
                                                  "max_tokens")) for p in prompts]
    run = RequestRun(state, request_id=f"cmpl-{uuid.uuid4().hex}", endpoint=ENDPOINT,
                     key_id=key.id if key is not None else None, prompts=prompts, params=params, n=n,
                     started=started)
    echoes = None
    if req.echo:
        if isinstance(req.prompt, str):
            echoes = [req.prompt]
        elif isinstance(req.prompt[0], str):
            echoes = [str(p) for p in req.prompt]
        else:
            echoes = [tokenizer.decode(ids) for ids in prompts]
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    view = CompletionView(run.request_id, model, len(prompts), n, include_usage, req.logprobs is not None, echoes)
    return await respond(request, run, view, bool(req.stream))


class CompletionView:
    def __init__(self, request_id: str, model: str, prompts: int, n: int, include_usage: bool, logprobs: bool,
                 echoes: list[str] | None) -> None:
        self.head = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model}
        self.n = n
        self.choices = prompts * n
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.echoes = echoes
        self.texts = [echoes[c // n] if echoes else "" for c in range(self.choices)]
        self.offsets = [len(t) for t in self.texts]  # text_offset of the next token
        self.token_logprobs: list[dict[str, list[Any]]] = [
            {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for _ in range(self.choices)
        ]
        self.finish: list[str | None] = [None] * self.choices

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**self.head, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _logprobs(self, choice: int, items: list[TokenLogprob]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in items:
            out["tokens"].append(lp.token)
            out["token_logprobs"].append(logprob_value(lp.logprob))
            top = {t.token: logprob_value(t.logprob) for t in lp.top}
            top.setdefault(lp.token, logprob_value(lp.logprob))  # the sampled token is always listed
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offsets[choice])
            self.offsets[choice] += len(lp.token)
        return out

    # ---- streaming ----

    def first_chunks(self) -> list[dict[str, Any]]:
        if not self.echoes:
            return []
        return [self._chunk([{"index": c, "text": self.texts[c], "logprobs": None, "finish_reason": None}])
                for c in range(self.choices)]

    def chunks(self, prompt_index: int, output: RequestOutput) -> list[dict[str, Any]]:
        out = []
        for delta in output.deltas:
            choice = prompt_index * self.n + delta.index
            logprobs = self._logprobs(choice, delta.logprobs) if delta.logprobs else None
            if delta.text or logprobs:
                out.append(self._chunk([{"index": choice, "text": delta.text, "logprobs": logprobs,
                                         "finish_reason": None}]))
            if delta.finish_reason in FINISHES:
                out.append(self._chunk([{"index": choice, "text": "", "logprobs": None,
                                         "finish_reason": delta.finish_reason}]))
        return out

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": usage}

    # ---- whole response ----

    def add(self, prompt_index: int, output: RequestOutput) -> None:
        for delta in output.deltas:
            choice = prompt_index * self.n + delta.index
            self.texts[choice] += delta.text
            if delta.logprobs:
                for name, values in self._logprobs(choice, delta.logprobs).items():
                    self.token_logprobs[choice][name] += values
            if delta.finish_reason is not None:
                self.finish[choice] = delta.finish_reason

    def response(self, usage: dict[str, Any]) -> dict[str, Any]:
        choices = [{"index": c, "text": self.texts[c], "logprobs": self.token_logprobs[c] if self.logprobs else None,
                    "finish_reason": self.finish[c]} for c in range(self.choices)]
        return {**self.head, "choices": choices, "usage": usage}

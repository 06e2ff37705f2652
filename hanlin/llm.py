"""In-process generation on the engine: `hanlin.LLM("smollm2").generate([...])`."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from hanlin.engine.engine import LLMEngine
from hanlin.engine.options import EngineOptions
from hanlin.engine.outputs import FinishReason, RequestOutput, TokenLogprob
from hanlin.engine.sampling import SamplingParams
from hanlin.errors import HanlinError

Prompt = str | Sequence[int]
Messages = list[dict[str, Any]]
_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    """The result for one prompt; .text, .token_ids and .finish_reason are those of the first choice."""

    prompt_token_ids: list[int]
    choices: list[Choice]
    cached_tokens: int = 0
    seconds: float = 0.0  # from submission to the last token
    first_token_seconds: float = 0.0  # from submission to the first token

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.choices[0].finish_reason


@dataclass
class StreamEvent:
    text: str = ""  # new text of the (single) choice
    completion: Completion | None = None  # set on the last event


class LLM:
    def __init__(self, model: str = "smollm2", **engine_options: Any) -> None:
        self.engine = LLMEngine.from_options(EngineOptions.from_kwargs(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_loaded(cls, loaded: Any, **engine_options: Any) -> LLM:
        """An LLM over an already loaded model (hanlin.load's LoadedModel)."""
        llm = cls.__new__(cls)
        options = EngineOptions.from_kwargs(model=engine_options.pop("model", loaded.source), **engine_options)
        llm.engine = LLMEngine(loaded, options)
        llm.tokenizer = llm.engine.tokenizer
        llm._ids = itertools.count()
        return llm

    def sampling_params(self, **kwargs: Any) -> SamplingParams:
        unknown = sorted(set(kwargs) - _SAMPLING_FIELDS)
        if unknown:
            raise HanlinError(f"unknown sampling option(s) {', '.join(unknown)}")
        params = SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
        if isinstance(params.stop, str):
            params.stop = [params.stop]
        return params

    def generate(self, prompts: Prompt | Sequence[Prompt], *, n: int = 1, **sampling: Any) -> list[Completion]:
        """One Completion per prompt (text is used as is; token id lists are used directly)."""
        params = self.sampling_params(**sampling)
        prompt_ids = [self._encode(p) for p in _as_list(prompts)]
        return self._run(prompt_ids, params, n)

    def chat(self, messages: Messages | Sequence[Messages], *, n: int = 1, **sampling: Any) -> list[Completion]:
        """One Completion per conversation, each rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = self.sampling_params(**sampling)
        return self._run([self.chat_prompt_ids(c) for c in conversations], params, n)  # type: ignore[arg-type]

    def chat_prompt_ids(self, messages: Messages) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(str(text), add_special_tokens=False)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StreamEvent]:
        """Text deltas of one reply, then an event with its Completion. Closing the iterator aborts it."""
        request_id = f"llm-{next(self._ids)}"
        self.engine.add_request(request_id, prompt_ids, params)
        completion = Completion(list(prompt_ids), [Choice()])
        start = time.perf_counter()
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if not completion.first_token_seconds and any(d.token_ids for d in out.deltas):
                        completion.first_token_seconds = time.perf_counter() - start
                    _merge(completion, out)
                    text = "".join(d.text for d in out.deltas)
                    done = out.finished
                    if text:
                        yield StreamEvent(text=text)
        finally:
            if not done:
                self.engine.abort(request_id)
        completion.seconds = time.perf_counter() - start
        yield StreamEvent(completion=completion)

    def _run(self, prompt_ids: list[list[int]], params: SamplingParams, n: int) -> list[Completion]:
        for ids in prompt_ids:
            self.engine.validate(ids, params, n)
        start = time.perf_counter()
        base = next(self._ids)
        request_ids = [f"llm-{base}-{i}" for i in range(len(prompt_ids))]
        completions = {rid: Completion(list(ids), [Choice() for _ in range(n)]) for rid, ids in zip(request_ids, prompt_ids)}
        for rid, ids in zip(request_ids, prompt_ids):
            self.engine.add_request(rid, ids, params, n)
        pending = set(request_ids)
        try:
            while pending:
                for out in self.engine.step():
                    _merge(completions[out.request_id], out)
                    if out.finished:
                        pending.discard(out.request_id)
        finally:
            for rid in pending:
                self.engine.abort(rid)
        seconds = time.perf_counter() - start
        for completion in completions.values():
            completion.seconds = seconds
        return [completions[rid] for rid in request_ids]

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return [int(t) for t in prompt]


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):  # type: ignore[index]
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


def _merge(completion: Completion, out: RequestOutput) -> None:
    completion.cached_tokens = out.cached_tokens
    for delta in out.deltas:
        choice = completion.choices[delta.index]
        choice.text += delta.text
        choice.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason

"""OpenAI request → prompt token ids and SamplingParams. Every field either takes effect or is refused
with a 400 naming it; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from hanlin.engine.engine import MAX_CHOICES
from hanlin.engine.sampling import InvalidSamplingParam, SamplingParams
from hanlin.errors import ChatTemplateError
from hanlin.server.errors import APIError, bad_request, unsupported
from hanlin.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields

if TYPE_CHECKING:
    from hanlin.tokenizer import Tokenizer

MAX_STOP_STRINGS = 4
_NOT_SUPPORTED = "is not supported by this server"
_USES_NAMES = re.compile(r"""\.name\b|\[\s*['"]name['"]\s*\]""")  # message.name / message['name']
_NON_TEXT_PARTS = {"image_url": "image", "input_image": "image", "input_audio": "audio", "file": "file"}


# ---- refusals -------------------------------------------------------------------------------------


def refuse_unsupported_chat(req: ChatCompletionRequest) -> None:
    """400 for every chat field Hanlin cannot honour; harmless values of the others pass."""
    for name in ("tools", "tool_choice", "functions", "function_call"):
        if getattr(req, name) is not None:
            raise unsupported(name, f"{name}: tool and function calling {_NOT_SUPPORTED} yet")
    if req.parallel_tool_calls:
        raise unsupported("parallel_tool_calls", f"parallel_tool_calls: tool calling {_NOT_SUPPORTED} yet")
    if req.response_format is not None and req.response_format.type != "text":
        raise unsupported("response_format", f"response_format {req.response_format.type!r}: structured output "
                          f"{_NOT_SUPPORTED} yet; use {{\"type\": \"text\"}}")
    if req.response_format is not None and req.response_format.json_schema is not None:
        raise unsupported("response_format", "response_format.json_schema: structured output is not supported yet")
    if req.audio is not None:
        raise unsupported("audio", f"audio output {_NOT_SUPPORTED}")
    if req.modalities is not None and req.modalities != ["text"]:
        raise unsupported("modalities", f"modalities {req.modalities}: only [\"text\"] is supported")
    for name, what in (("prediction", "predicted outputs"), ("reasoning_effort", "reasoning effort"),
                       ("web_search_options", "web search"), ("verbosity", "verbosity control"),
                       ("moderation", "moderation"), ("prompt_cache_options", "prompt cache options")):
        if getattr(req, name) is not None:
            raise unsupported(name, f"{name}: {what} {_NOT_SUPPORTED}")
    if req.store:
        raise unsupported("store", "store: this server never stores completions; leave it unset or false")
    if req.metadata is not None and len(req.metadata) > 16:
        raise bad_request("metadata: at most 16 key-value pairs", param="metadata")
    if req.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier", f"service_tier {req.service_tier!r}: only \"auto\" or \"default\"")
    if req.prompt_cache_retention not in (None, "in_memory"):
        raise unsupported("prompt_cache_retention", "prompt_cache_retention: the prefix cache lives in memory only; "
                          "use \"in_memory\" or leave it unset")
    if req.logprobs is not True and req.top_logprobs is not None:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    _refuse_common(req)


def refuse_unsupported_completion(req: CompletionRequest) -> None:
    if req.suffix is not None:
        raise unsupported("suffix", f"suffix: insertion (fill-in-the-middle) {_NOT_SUPPORTED}")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise unsupported("best_of", "best_of: only best_of equal to n is supported (every candidate is returned)")
    if req.echo and req.logprobs is not None:
        raise unsupported("echo", "echo together with logprobs needs prompt logprobs, which are not supported yet")
    _refuse_common(req)


def _refuse_common(req: SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    if req.stream_options is not None and req.stream_options.include_obfuscation:
        raise unsupported("stream_options.include_obfuscation", "stream obfuscation is not supported; "
                          "leave stream_options.include_obfuscation unset or false")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop: at most {MAX_STOP_STRINGS} stop sequences, got {len(stops)}", param="stop")
    if any(s == "" for s in stops):
        raise bad_request("stop: stop sequences must not be empty strings", param="stop")


# ---- prompts --------------------------------------------------------------------------------------


def template_messages(messages: list[ChatMessage], tokenizer: Tokenizer, param: str = "messages") -> list[dict[str, Any]]:
    """Chat messages as the chat template wants them (text only, developer → system)."""
    template = tokenizer.chat_template or ""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"{param}[{i}]"
        if message.role in ("tool", "function") or message.tool_call_id is not None:
            raise unsupported(f"{where}.role", f"{where}: {message.role} messages need tool calling, which "
                              f"{_NOT_SUPPORTED} yet")
        for name in ("tool_calls", "function_call", "audio", "annotations"):
            if getattr(message, name):
                raise unsupported(f"{where}.{name}", f"{where}.{name} {_NOT_SUPPORTED}")
        if message.refusal is not None:
            raise unsupported(f"{where}.refusal", f"{where}.refusal: assistant refusals {_NOT_SUPPORTED}")
        if message.content is None:
            raise bad_request(f"{where}.content is required", param=f"{where}.content")
        entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                 "content": _message_text(message.content, f"{where}.content")}
        if message.name is not None:
            if not _USES_NAMES.search(template):
                raise unsupported(f"{where}.name", f"{where}.name: this model's chat template has no participant names")
            entry["name"] = message.name
        out.append(entry)
    return out


def _message_text(content: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind in _NON_TEXT_PARTS:
            raise unsupported(f"{where}[{j}]", f"{where}[{j}]: {_NON_TEXT_PARTS[kind]} inputs are not supported; "
                              "this model reads text only")
        if kind != "text":
            raise bad_request(f"{where}[{j}].type: unknown content part type {kind!r} (expected \"text\")",
                              param=f"{where}[{j}].type")
        if set(part) - {"type", "text"}:
            extra = sorted(set(part) - {"type", "text"})[0]
            raise bad_request(f"Unrecognized request argument supplied: {where}[{j}].{extra}", param=f"{where}[{j}].{extra}")
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}[{j}].text must be a string", param=f"{where}[{j}].text")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_prompt_ids(messages: list[ChatMessage], tokenizer: Tokenizer, add_generation_prompt: bool = True) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(template_messages(messages, tokenizer), add_generation_prompt=add_generation_prompt)
    except ChatTemplateError as error:
        raise bad_request(str(error), param="messages") from None
    assert isinstance(text, str)
    return tokenizer.encode(text, add_special_tokens=False)


def completion_prompt_ids(prompt: str | list[str] | list[int] | list[list[int]], tokenizer: Tokenizer) -> list[list[int]]:
    """One token list per prompt; a string gets the tokenizer's special tokens (BOS) as the CLI's --raw does."""
    if isinstance(prompt, str):
        prompts: list[list[int]] = [tokenizer.encode(prompt, add_special_tokens=True)]
    elif not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    elif isinstance(prompt[0], str):
        prompts = [tokenizer.encode(p, add_special_tokens=True) for p in prompt]  # type: ignore[arg-type]
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = [list(p) for p in prompt]  # type: ignore[arg-type]
    for i, ids in enumerate(prompts):
        if not ids:
            raise bad_request("prompt must not be empty" + (f" (prompt {i})" if len(prompts) > 1 else ""), param="prompt")
        check_token_ids(ids, tokenizer.vocab_size, "prompt")
    return prompts


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"{param}: token id {bad} is outside the vocabulary [0, {vocab_size})", param=param)


# ---- sampling -------------------------------------------------------------------------------------


def check_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int, prompt_param: str,
                  max_tokens_param: str) -> int:
    """The max_tokens to run with: the request's, or the rest of the context. Too long → 400."""
    if prompt_tokens >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                       f"{prompt_tokens} tokens, leaving no room for a reply ({prompt_tokens} prompt tokens, "
                       f"context {max_model_len}).", param=prompt_param, code="context_length_exceeded")
    remaining = max_model_len - prompt_tokens
    if max_tokens is None:
        return remaining
    if max_tokens > remaining:
        raise APIError(400, f"{max_tokens_param} is too large: the prompt has {prompt_tokens} tokens and "
                       f"{max_tokens_param} is {max_tokens}, which together exceed the model's context of "
                       f"{max_model_len} tokens; ask for at most {remaining}.",
                       param=max_tokens_param, code="context_length_exceeded")
    return max_tokens


def max_tokens_field(req: SamplingFields) -> tuple[int | None, str]:
    """(requested max tokens, the field that carried it)."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise bad_request("max_tokens and max_completion_tokens disagree; send only max_completion_tokens",
                              param="max_completion_tokens")
        return req.max_completion_tokens, "max_completion_tokens"
    return req.max_tokens, "max_tokens"


def sampling_params(req: SamplingFields, *, vocab_size: int, logprobs: int | None) -> SamplingParams:
    """SamplingParams for the request (max_tokens is set per prompt by the caller)."""
    values: dict[str, Any] = {}
    if req.temperature is not None:
        values["temperature"] = req.temperature
    if req.top_p is not None:
        if req.top_p == 0:  # OpenAI allows 0: only the most likely token survives, i.e. greedy
            values["temperature"] = 0.0
        else:
            values["top_p"] = req.top_p
    for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "ignore_eos"):
        if getattr(req, name) is not None:
            values[name] = getattr(req, name)
    if req.top_k is not None:
        values["top_k"] = max(req.top_k, 0)  # vLLM's -1 means off, like our 0
    if req.stop is not None:
        values["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.stop_token_ids:
        check_token_ids(req.stop_token_ids, vocab_size, "stop_token_ids")
        values["stop_token_ids"] = list(req.stop_token_ids)
    if req.logit_bias:
        values["logit_bias"] = _logit_bias(req.logit_bias, vocab_size)
    if logprobs is not None:
        values["logprobs"] = logprobs
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    for name in ("logit_bias", "logprobs"):
        if name in values and name not in known:
            param = "top_logprobs" if name == "logprobs" and isinstance(req, ChatCompletionRequest) else name
            raise unsupported(param, f"{param} is not supported by this engine build")
    params = SamplingParams(**values)
    _validate(params, req)
    return params


def _logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias: key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise bad_request(f"logit_bias: token id {token} is outside the vocabulary [0, {vocab_size})",
                              param="logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias: bias {value} for token {token} is outside [-100, 100]", param="logit_bias")
        out[token] = float(value)
    return out


def _validate(params: SamplingParams, req: SamplingFields) -> None:
    try:
        params.validate()
    except InvalidSamplingParam as error:
        name = error.field
        if name == "stop":
            param = "stop"
        elif name == "logprobs":
            param = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
        else:
            param = name if name in type(req).model_fields else None
        raise bad_request(str(error), param=param) from None


def with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    return dataclasses.replace(params, max_tokens=max_tokens)

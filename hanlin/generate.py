"""A plain KV-cached generator for one sequence (the engine replaces it once continuous batching lands)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from hanlin.engine.sampling import SamplingParams, StopChecker, make_generator, sample
from hanlin.errors import HanlinError
from hanlin.models.kv_cache import KVCache

if TYPE_CHECKING:
    from hanlin.api import LoadedModel

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationTimings:
    prefill_seconds: float = 0.0  # prompt forward pass up to the first sampled token
    decode_seconds: float = 0.0  # every later forward pass and sample
    prefill_tokens_per_second: float = 0.0
    decode_tokens_per_second: float = 0.0
    total_seconds: float = 0.0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: GenerationTimings = field(default_factory=GenerationTimings)
    stop: str | int | None = None  # the stop string or stop token id that ended generation, if any

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class GenerationEvent:
    text: str = ""  # new text that is safe to show
    result: GenerationResult | None = None  # set on the final event only

    @property
    def finished(self) -> bool:
        return self.result is not None


def generate_stream(loaded: LoadedModel, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenerationEvent]:
    """Stream text deltas for a prompt, then one final event carrying the GenerationResult."""
    params.validate()
    model, tokenizer = loaded.model, loaded.tokenizer
    context = loaded.config.max_position_embeddings
    if not prompt_ids:
        raise HanlinError("the prompt is empty: nothing to generate from")
    if len(prompt_ids) >= context:
        raise HanlinError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context holds {context} tokens "
            "(at least one must be left for the reply)"
        )
    device, dtype = _device_and_dtype(model)
    stop_token_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_token_ids |= set(tokenizer.stop_token_ids)
    cache = KVCache(loaded.config, 1, min(len(prompt_ids) + params.max_tokens, context), dtype=dtype, device=device)
    generator = make_generator(params.seed, device)
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    stop_checker = StopChecker(params.stop)
    history = list(prompt_ids) if params.has_penalties else None
    output_ids: list[int] = []
    finish_reason: FinishReason = "length"
    stop: str | int | None = None
    pieces: list[str] = []

    start = time.perf_counter()
    first_token_at = start
    with torch.inference_mode():
        input_ids = torch.tensor([prompt_ids], device=device)
        while True:
            logits_1V = model(input_ids, cache=cache, last_logits_only=True)[:, -1]
            histories = [history] if history is not None else None
            token = int(sample(logits_1V, [params], [generator], histories, prompt_lengths=[len(prompt_ids)])[0])
            if not output_ids:
                first_token_at = time.perf_counter()
            output_ids.append(token)
            if history is not None:
                history.append(token)
            if token in stop_token_ids:
                finish_reason, stop = "stop", token
                break
            text, hit = stop_checker.push(decoder.push(token))
            if text:
                pieces.append(text)
                yield GenerationEvent(text=text)
            if hit:
                finish_reason, stop = "stop", stop_checker.matched
                break
            if len(output_ids) >= params.max_tokens or len(prompt_ids) + len(output_ids) >= context:
                break
            input_ids = torch.tensor([[token]], device=device)

    tail, hit = stop_checker.push(decoder.flush())
    if hit and finish_reason != "stop":
        finish_reason, stop = "stop", stop_checker.matched
    tail += stop_checker.flush()
    if tail:
        pieces.append(tail)
        yield GenerationEvent(text=tail)
    end = time.perf_counter()
    yield GenerationEvent(
        result=GenerationResult(
            text="".join(pieces),
            token_ids=output_ids,
            finish_reason=finish_reason,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(output_ids),
            timings=_timings(start, first_token_at, end, len(prompt_ids), len(output_ids) - 1),
            stop=stop,
        )
    )


def generate(loaded: LoadedModel, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
    """Run generate_stream to the end and return its result."""
    for event in generate_stream(loaded, prompt_ids, params):
        if event.result is not None:
            return event.result
    raise AssertionError("generate_stream ended without a final event")


def _timings(start: float, first_token_at: float, end: float, prompt_tokens: int, decode_steps: int) -> GenerationTimings:
    prefill = first_token_at - start
    decode = end - first_token_at
    return GenerationTimings(
        prefill_seconds=prefill,
        decode_seconds=decode,
        prefill_tokens_per_second=prompt_tokens / prefill if prefill > 0 else 0.0,
        decode_tokens_per_second=decode_steps / decode if decode > 0 and decode_steps > 0 else 0.0,
        total_seconds=end - start,
    )


def _device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32

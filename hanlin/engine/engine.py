"""LLMEngine: requests in, per-step outputs out. One scheduler, one model runner, one sampler."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from hanlin.engine.block_manager import BlockManager
from hanlin.engine.kv_cache import PagedKVCache
from hanlin.engine.options import EngineOptions
from hanlin.engine.outputs import (
    EngineStats,
    FinishReason,
    InvalidRequestError,
    RequestOutput,
    SequenceDelta,
    TokenLogprob,
    TopLogprob,
)
from hanlin.engine.runner import ModelRunner
from hanlin.engine.sampling import InvalidSamplingParam, SamplingParams, StopChecker, make_generator, sample
from hanlin.engine.scheduler import ScheduledChunk, Scheduler
from hanlin.engine.sequence import Sequence

log = logging.getLogger("hanlin.engine")
MAX_CHOICES = 128  # choices (prompts × n) in one request


@dataclass
class _Request:
    request_id: str
    seqs: list[Sequence]
    error: str | None = None
    reported: set[int] = field(default_factory=set)  # choices whose final delta was already sent


class LLMEngine:
    def __init__(self, loaded, options: EngineOptions | None = None) -> None:  # loaded: hanlin.api.LoadedModel
        self.options = options = options or EngineOptions()
        options.validate()
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        self.loaded = loaded
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model.eval()
        self.model_name = options.model
        device, dtype = _device_and_dtype(self.model)
        if options.kv_cache_dtype != "auto":
            dtype = getattr(torch, options.kv_cache_dtype)
        num_blocks = options.kv_cache_blocks or PagedKVCache.num_blocks_for(
            self.config, options.kv_cache_mb, options.block_size, dtype
        )
        self.cache = PagedKVCache(self.config, num_blocks, options.block_size, dtype=dtype, device=device)
        context = self.config.max_position_embeddings
        # An explicit max_model_len may go past the checkpoint's context (RoPE scaling makes that meaningful).
        wanted = options.max_model_len or context
        if wanted > context:
            log.warning("max_model_len %d is beyond the model's trained context of %d tokens", wanted, context)
        self.max_model_len = min(wanted, num_blocks * options.block_size)
        if self.max_model_len < wanted:
            log.warning("the KV cache holds %d tokens: the context is limited to that", self.max_model_len)
        self.blocks = BlockManager(num_blocks, options.block_size, options.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, options.max_num_seqs, options.max_batched_tokens)
        self.runner = ModelRunner(self.model, self.cache)
        self.device = device
        self._requests: dict[str, _Request] = {}
        self._steps = 0

    @classmethod
    def from_options(cls, options: EngineOptions) -> LLMEngine:
        import hanlin

        options.validate()
        return cls(hanlin.load(options.model, device=options.device, quantize=options.quantize), options)

    # ---- requests ---------------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> None:
        """Raise InvalidRequestError (naming the field) for a request that cannot run as given."""
        try:
            params.validate()
        except InvalidSamplingParam as error:
            raise InvalidRequestError(str(error), error.field) from None
        if not 1 <= n <= MAX_CHOICES:
            raise InvalidRequestError(f"n must be between 1 and {MAX_CHOICES}, got {n}", "n")
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: nothing to generate from", "prompt")
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if any(t >= vocab for t in params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})", "logit_bias")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt is {len(prompt_ids)} tokens but the context holds {self.max_model_len} tokens "
                "(at least one must be left for the reply)", "messages",
            )
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"max_tokens is {params.max_tokens} but the prompt is {len(prompt_ids)} tokens and the context "
                f"holds {self.max_model_len}: at most {self.max_model_len - len(prompt_ids)} tokens can be generated",
                "max_tokens",
            )

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> None:
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        self.validate(prompt_ids, params, n)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.tokenizer.stop_token_ids)
        seqs = []
        for index in range(n):
            seed = None if params.seed is None else (params.seed + index) % 2**63
            seqs.append(Sequence(
                request_id=request_id, index=index, prompt_ids=list(prompt_ids), params=params,
                generator=make_generator(seed, self.device),
                decoder=self.tokenizer.stream_decoder(skip_special_tokens=True),
                stop_checker=StopChecker(params.stop), stop_token_ids=frozenset(stop_ids),
            ))
        self._requests[request_id] = _Request(request_id, seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> list[RequestOutput]:
        request = self._requests.get(request_id)
        if request is None:
            return []
        for seq in request.seqs:
            if not seq.finished:
                self._finish(seq, "abort")
        return [self._output(request)]

    def abort_all(self) -> list[RequestOutput]:
        return [out for request_id in list(self._requests) for out in self.abort(request_id)]

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with finish_reason "error" (after an engine failure)."""
        outputs = []
        for request in list(self._requests.values()):
            request.error = message
            for seq in request.seqs:
                if not seq.finished:
                    self._finish(seq, "error")
            outputs.append(self._output(request))
        return outputs

    # ---- the step ---------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        self._steps += 1
        if not scheduled.chunks:
            return []
        logits_RV = self.runner.run(scheduled.chunks)
        sampling: list[ScheduledChunk] = []
        for chunk in scheduled.chunks:
            chunk.seq.num_computed += chunk.count
            self.scheduler.register_full_blocks(chunk.seq)
            if chunk.samples:
                sampling.append(chunk)
        seqs = [c.seq for c in sampling]
        touched: dict[str, _Request] = {}
        if seqs:
            tokens = self._sample(seqs, logits_RV)
            for row, (seq, token) in enumerate(zip(seqs, tokens)):
                logprob = self._logprob(seq, logits_RV[row], token) if seq.params.logprobs is not None else None
                self._append(seq, token, logprob)
                touched[seq.request_id] = self._requests[seq.request_id]
        return [self._output(request) for request in touched.values()]

    def _sample(self, seqs: list[Sequence], logits_RV: torch.Tensor) -> list[int]:
        params = [s.params for s in seqs]
        needs_history = any(p.has_penalties for p in params)
        history = [s.tokens for s in seqs] if needs_history else None
        prompt_lengths = [len(s.prompt_ids) for s in seqs]
        return sample(logits_RV, params, [s.generator for s in seqs], history, prompt_lengths=prompt_lengths).tolist()

    def _logprob(self, seq: Sequence, logits_V: torch.Tensor, token: int) -> TokenLogprob:
        logprobs_V = torch.log_softmax(logits_V, dim=-1)
        top: list[TopLogprob] = []
        if seq.params.logprobs:
            values, ids = logprobs_V.topk(seq.params.logprobs)
            top = [self._top(int(i), float(v)) for v, i in zip(values, ids)]
        chosen = self._top(token, float(logprobs_V[token]))
        return TokenLogprob(token, chosen.token, chosen.logprob, chosen.bytes, top)

    def _top(self, token: int, logprob: float) -> TopLogprob:
        raw = self.tokenizer.token_bytes(token)
        return TopLogprob(token, raw.decode("utf-8", errors="replace"), logprob, list(raw))

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        seq.output_ids.append(token)
        seq.pending_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        if token in seq.stop_token_ids:
            self._finish(seq, "stop", token)
            return
        text, hit = seq.stop_checker.push(seq.decoder.push(token))
        seq.pending_text += text
        if hit:
            self._finish(seq, "stop", seq.stop_checker.matched)
        elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        if not seq.stop_checker.stopped:
            tail, hit = seq.stop_checker.push(seq.decoder.flush())
            seq.pending_text += tail + seq.stop_checker.flush()
            if hit and reason == "length":
                reason, stop_reason = "stop", seq.stop_checker.matched
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _output(self, request: _Request) -> RequestOutput:
        deltas = []
        for seq in request.seqs:
            if not (seq.pending_ids or seq.pending_text or seq.finish_reason):
                continue
            if seq.finish_reason is not None and seq.index in request.reported:
                continue
            deltas.append(SequenceDelta(
                index=seq.index, text=seq.pending_text, token_ids=seq.pending_ids,
                logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            ))
            seq.pending_text, seq.pending_ids, seq.pending_logprobs = "", [], []
            if seq.finish_reason is not None:
                request.reported.add(seq.index)
        finished = all(s.finished for s in request.seqs)
        if finished:
            self._requests.pop(request.request_id, None)
        first = request.seqs[0]
        return RequestOutput(
            request_id=request.request_id, deltas=deltas, prompt_tokens=len(first.prompt_ids),
            cached_tokens=first.cached_tokens or 0,
            completion_tokens=sum(len(s.output_ids) for s in request.seqs), finished=finished, error=request.error,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
            kv_blocks_total=self.blocks.num_blocks, kv_blocks_used=self.blocks.num_used,
            kv_blocks_cached=self.blocks.num_cached_free,
            prefix_cache_queried_tokens=self.scheduler.prefix_queried_tokens,
            prefix_cache_hit_tokens=self.scheduler.prefix_hit_tokens,
            preemptions=self.scheduler.preemptions, steps=self._steps,
        )


def _device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32

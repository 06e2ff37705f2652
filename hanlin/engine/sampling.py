"""Batched token sampling (penalties → temperature → top-k → top-p → min-p) and stop-string checking.

Every row of a batch carries its own `SamplingParams` and its own `torch.Generator`, so a seeded request
draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hanlin.kernels import cpu_kernels


class InvalidSamplingParam(ValueError):
    """A sampling parameter out of range; `field` is its SamplingParams field name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 → greedy (argmax)
    top_k: int = 0  # 0 → off
    top_p: float = 1.0
    min_p: float = 0.0
    # Hugging Face / CTRL semantics over prompt + output tokens: positive logits are divided, negative multiplied.
    repetition_penalty: float = 1.0
    # OpenAI semantics over output tokens: logit -= presence * (count > 0) + frequency * count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → value added to its logit
    logprobs: int | None = None  # None: off; k: each token's logprob plus the k most likely alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def changes_logits(self) -> bool:
        return self.has_penalties or bool(self.logit_bias)

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Raise InvalidSamplingParam (a ValueError) naming the first field that is out of range."""
        _require_finite(self, "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        if self.temperature < 0:
            raise InvalidSamplingParam(
                "temperature", f"temperature must be >= 0 (0 means greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise InvalidSamplingParam("top_k", f"top_k must be >= 0 (0 means off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidSamplingParam("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise InvalidSamplingParam("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise InvalidSamplingParam(
                "repetition_penalty", f"repetition_penalty must be > 0 (1 means off), got {self.repetition_penalty}"
            )
        if not -2 <= self.presence_penalty <= 2:
            raise InvalidSamplingParam(
                "presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"
            )
        if not -2 <= self.frequency_penalty <= 2:
            raise InvalidSamplingParam(
                "frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
            )
        if self.max_tokens < 1:
            raise InvalidSamplingParam("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidSamplingParam("seed", f"seed must be in [0, 2**63), got {self.seed}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise InvalidSamplingParam("stop", "stop strings must be non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidSamplingParam("stop_token_ids", f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        for token, bias in self.logit_bias.items():
            if token < 0 or not math.isfinite(bias) or not -100 <= bias <= 100:
                raise InvalidSamplingParam(
                    "logit_bias", f"logit_bias maps token ids >= 0 to values in [-100, 100], got {token}: {bias}"
                )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidSamplingParam("logprobs", f"logprobs must be in [0, 20], got {self.logprobs}")


def _require_finite(params: SamplingParams, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        if not math.isfinite(value):
            raise InvalidSamplingParam(name, f"{name} must be a finite number, got {value}")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator for one request: seeded when a seed is given, else None (the global RNG)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def sample(
    logits_BV: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    history: Sequence[Sequence[int]] | None = None,
    *,
    prompt_lengths: Sequence[int] | None = None,
) -> torch.Tensor:
    """Next token ids [B] for logits [B, V].

    history[b] holds row b's prompt followed by its output so far; its first prompt_lengths[b] tokens are
    the prompt (default 0: all of it counts as output for presence/frequency penalties). The caller's
    logits are not modified.
    """
    B = logits_BV.shape[0]
    if len(params) != B or len(generators) != B:
        raise ValueError(f"{B} rows of logits but {len(params)} params and {len(generators)} generators")
    logits_BV = processed_logits(logits_BV, params, history, prompt_lengths)

    next_B = argmax_rows(logits_BV)
    sampled_rows = [b for b in range(B) if not params[b].greedy]
    if not sampled_rows:
        return next_B
    rows = torch.tensor(sampled_rows, device=logits_BV.device)
    row_params = [params[b] for b in sampled_rows]
    probs_RV = probabilities(logits_BV[rows], row_params)
    next_B[rows] = _draw(probs_RV, [generators[b] for b in sampled_rows])
    return next_B


def processed_logits(
    logits_BV: torch.Tensor,
    params: Sequence[SamplingParams],
    history: Sequence[Sequence[int]] | None = None,
    prompt_lengths: Sequence[int] | None = None,
) -> torch.Tensor:
    """fp32 logits with each row's logit_bias added and its penalties applied (a copy when anything changes)."""
    logits_BV = logits_BV.float()
    biased_rows = [b for b, p in enumerate(params) if p.logit_bias]
    if biased_rows:
        logits_BV = logits_BV.clone()
        for b in biased_rows:
            tokens = torch.tensor(list(params[b].logit_bias), device=logits_BV.device)
            values = torch.tensor(list(params[b].logit_bias.values()), device=logits_BV.device)
            logits_BV[b].index_add_(0, tokens, values)
    if history is not None and any(p.has_penalties for p in params):
        logits_BV = apply_penalties(logits_BV, params, history, prompt_lengths)
    return logits_BV


def apply_penalties(
    logits_BV: torch.Tensor,
    params: Sequence[SamplingParams],
    history: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int] | None = None,
) -> torch.Tensor:
    """Repetition penalty over prompt + output, then presence and frequency penalties over the output."""
    B, V = logits_BV.shape
    device = logits_BV.device
    logits_BV = logits_BV.clone()
    prompt_lengths = prompt_lengths if prompt_lengths is not None else [0] * B
    seen_rows = [b for b, tokens in enumerate(history) for _ in tokens]
    seen_tokens = [t for tokens in history for t in tokens]
    output_rows = [b for b, tokens in enumerate(history) for _ in tokens[prompt_lengths[b] :]]
    output_tokens = [t for b, tokens in enumerate(history) for t in tokens[prompt_lengths[b] :]]

    repetition_B = torch.tensor([p.repetition_penalty for p in params], device=device)
    if bool((repetition_B != 1.0).any()) and seen_tokens:
        seen_BV = torch.zeros(B, V, dtype=torch.bool, device=device)
        seen_BV[torch.tensor(seen_rows, device=device), torch.tensor(seen_tokens, device=device)] = True
        penalty_BV = repetition_B[:, None].expand(B, V)
        penalised = torch.where(logits_BV > 0, logits_BV / penalty_BV, logits_BV * penalty_BV)
        logits_BV = torch.where(seen_BV, penalised, logits_BV)

    presence_B = torch.tensor([p.presence_penalty for p in params], device=device)
    frequency_B = torch.tensor([p.frequency_penalty for p in params], device=device)
    if (bool((presence_B != 0).any()) or bool((frequency_B != 0).any())) and output_tokens:
        counts_BV = torch.zeros(B, V, device=device)
        index = (torch.tensor(output_rows, device=device), torch.tensor(output_tokens, device=device))
        counts_BV.index_put_(index, torch.ones(len(output_tokens), device=device), accumulate=True)
        logits_BV -= presence_B[:, None] * (counts_BV > 0) + frequency_B[:, None] * counts_BV
    return logits_BV


# Top-p looks for its nucleus among this many most likely tokens first (a top-k is ~40x cheaper than a full
# sort of a 50k vocabulary) and sorts the whole row only when they do not hold top_p of the mass.
TOP_P_CANDIDATES = 1024


def probabilities(logits_BV: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering; returns probabilities [B, V] (rows sum to 1)."""
    B, V = logits_BV.shape
    device = logits_BV.device
    temperature_B = torch.tensor([p.temperature for p in params], device=device)
    logits_BV = logits_BV / temperature_B[:, None]

    top_k = [min(p.top_k, V) for p in params]
    if any(k > 0 for k in top_k):
        top_values_BK = logits_BV.topk(max(top_k), dim=-1).values
        kth_index_B = torch.tensor([max(k, 1) - 1 for k in top_k], device=device)
        threshold_B = top_values_BK.gather(1, kth_index_B[:, None]).squeeze(1)
        threshold_B = torch.where(torch.tensor(top_k, device=device) > 0, threshold_B, float("-inf"))
        logits_BV = logits_BV.masked_fill(logits_BV < threshold_B[:, None], float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)

    top_p_rows = [b for b, p in enumerate(params) if p.top_p < 1]
    if top_p_rows:
        rows = torch.tensor(top_p_rows, device=device)
        top_p_R = torch.tensor([params[b].top_p for b in top_p_rows], device=device)
        threshold_R = _nucleus_threshold(probs_BV[rows], top_p_R)
        probs_BV[rows] = probs_BV[rows].masked_fill(probs_BV[rows] < threshold_R[:, None], 0.0)

    min_p_B = torch.tensor([p.min_p for p in params], device=device)
    if bool((min_p_B > 0).any()):
        threshold_B = min_p_B * probs_BV.max(dim=-1).values
        probs_BV = probs_BV.masked_fill(probs_BV < threshold_B[:, None], 0.0)
    return probs_BV / probs_BV.sum(dim=-1, keepdim=True)


def _nucleus_threshold(probs_RV: torch.Tensor, top_p_R: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest probability inside the nucleus: the fewest most-likely tokens holding top_p."""
    threshold_R = torch.empty_like(top_p_R)
    candidates = min(TOP_P_CANDIDATES, probs_RV.shape[1])
    sorted_RC = probs_RV.topk(candidates, dim=-1).values
    for r in range(probs_RV.shape[0]):
        sorted_C = sorted_RC[r]
        if float(sorted_C.sum()) < float(top_p_R[r]) and candidates < probs_RV.shape[1]:
            sorted_C = probs_RV[r].sort(descending=True).values
        mass_before_C = sorted_C.cumsum(dim=0) - sorted_C
        # Keep a token while the mass before it is still short of top_p; the best token is always kept.
        keep = int((mass_before_C < top_p_R[r]).sum().clamp(min=1))
        threshold_R[r] = sorted_C[keep - 1]
    return threshold_R


def _draw(probs_BV: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row by inverse-CDF sampling, each row's uniform drawn from its own generator."""
    cdf_BV = probs_BV.cumsum(dim=-1)
    uniform_B = torch.stack([torch.rand((), generator=g, device=probs_BV.device) for g in generators])
    token_B = torch.searchsorted(cdf_BV, (uniform_B * cdf_BV[:, -1])[:, None], right=True).squeeze(1)
    # Rounding can put the draw past the last bucket: fall back to the row's last possible token.
    for b in (token_B >= probs_BV.shape[1]).nonzero().flatten().tolist():
        token_B[b] = int(probs_BV[b].nonzero()[-1])
    return token_B


class StopChecker:
    """Finds stop strings in streamed text without ever emitting a piece of one.

    push() returns the text that is safe to show now; a tail that could still grow into a stop string is
    held back until the next delta proves it is not one (or flush() releases it at the end of the stream).
    Once a stop string is found, the text from its start onwards is dropped and `stopped` becomes True.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.stopped = False
        self.matched: str | None = None
        self._held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        text = self._held + delta
        if not self.stop:
            return text, False
        match_at, matched = -1, None
        for s in self.stop:
            at = text.find(s)
            if at != -1 and (match_at == -1 or at < match_at):
                match_at, matched = at, s
        if matched is not None:
            self.stopped, self.matched, self._held = True, matched, ""
            return text[:match_at], True
        hold = self._partial_stop_suffix_length(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """Release held-back text at the end of the stream (it never completed a stop string)."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    def _partial_stop_suffix_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for length in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:length]):
                    longest = length
                    break
        return longest


def argmax_rows(logits_BV: torch.Tensor) -> torch.Tensor:
    """logits_BV.argmax(dim=-1); on fp32 CPU rows by the compiled kernels' two vector passes (argmax_rows.cpp):
    16 x 49152 logits 0.65 -> ~0.05 ms on one core, where ATen carries an index through every comparison."""
    kernels = cpu_kernels() if logits_BV.device.type == "cpu" and logits_BV.dtype == torch.float32 else None
    if kernels is None or logits_BV.dim() != 2 or logits_BV.shape[1] == 0:
        return logits_BV.argmax(dim=-1)
    return kernels.argmax_rows(logits_BV.contiguous())

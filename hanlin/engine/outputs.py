"""What the engine hands back: per-step deltas for each choice of a request, and errors it raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hanlin.errors import HanlinError

# "abort": the client went away or the server shut down; "error": the engine failed on this request.
FinishReason = Literal["stop", "length", "abort", "error"]


class InvalidRequestError(HanlinError):
    """The request cannot run as given (prompt too long, bad logit_bias id...). `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(HanlinError):
    """The waiting queue is at its bound: try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineStoppedError(HanlinError):
    """The engine is shutting down (or has stopped) and takes no new requests."""


@dataclass
class TopLogprob:
    token_id: int
    token: str  # the token's text (bytes that are not valid UTF-8 alone show as U+FFFD)
    logprob: float
    bytes: list[int] = field(default_factory=list)  # the token's raw UTF-8 bytes


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float  # log-probability under the model's distribution (before temperature and filters)
    bytes: list[int] = field(default_factory=list)
    top: list[TopLogprob] = field(default_factory=list)  # the `logprobs` most likely tokens, best first


@dataclass
class SequenceDelta:
    """What one engine step added to one choice of a request."""

    index: int  # the choice (0 .. n-1)
    text: str = ""  # new text that is safe to show (a partial stop string is held back)
    token_ids: list[int] = field(default_factory=list)  # new tokens (a stop token id is included here)
    logprobs: list[TokenLogprob] | None = None  # one per new token when logprobs were asked for
    finish_reason: FinishReason | None = None  # set on the choice's last delta
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestOutput:
    """One message of AsyncEngine.generate's stream."""

    request_id: str
    deltas: list[SequenceDelta]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache (first choice)
    completion_tokens: int  # tokens generated so far, all choices together
    finished: bool  # every choice has finished
    error: str | None = None  # set with finish_reason "error"


@dataclass
class EngineStats:
    waiting: int
    running: int
    kv_blocks_total: int
    kv_blocks_used: int  # blocks held by running sequences
    kv_blocks_cached: int  # free blocks still holding a reusable prefix
    prefix_cache_queried_tokens: int  # cumulative prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int  # cumulative prompt tokens found there
    preemptions: int
    steps: int

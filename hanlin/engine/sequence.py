"""One sequence being generated (a choice of a request): its tokens, its KV blocks and its text state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from hanlin.engine.block_manager import ROOT_HASH, BlockHash
from hanlin.engine.outputs import FinishReason, TokenLogprob
from hanlin.engine.sampling import SamplingParams, StopChecker
from hanlin.tokenizer import StreamDecoder


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # the choice this sequence is within its request
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    decoder: StreamDecoder
    stop_checker: StopChecker
    stop_token_ids: frozenset[int]
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)  # hashes of the leading full blocks
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    # Produced since the last output message:
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def token_at(self, position: int) -> int:
        prompt = len(self.prompt_ids)
        return self.prompt_ids[position] if position < prompt else self.output_ids[position - prompt]

    def last_hash(self) -> BlockHash:
        return self.block_hashes[-1] if self.block_hashes else ROOT_HASH

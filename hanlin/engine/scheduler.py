"""Continuous batching under a token budget.

One mechanism: every sequence has tokens computed and tokens known; each step closes part of the gap.
Running sequences go first (a decode needs one token, an unfinished prefill takes what the budget leaves),
then waiting sequences join while budget, sequence slots and KV blocks allow. Long prompts are split into
chunks, so they never stall running decodes. When a running sequence needs a block and none is free, the
most recently arrived running sequence is preempted: its blocks are freed and it recomputes later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hanlin.engine.block_manager import BlockManager, block_hash, prefix_hashes
from hanlin.engine.sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed this step
    count: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so the step samples the next one."""
        return self.start + self.count == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.count for c in self.chunks)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            count = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + count, out):
                break  # seq itself was preempted: everything after it already was
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, count))
            budget -= count
            i += 1
        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                chunk = self._admit(self.waiting[0], budget)
                if chunk is None:
                    break
                self.waiting.popleft()
                self.running.append(chunk.seq)
                out.chunks.append(chunk)
                budget -= chunk.count
        # Single-token chunks first: the runner batches their attention together.
        out.chunks.sort(key=lambda c: c.count != 1)
        return out

    def _grow(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Give seq blocks for num_tokens, preempting later arrivals as needed. False if seq was preempted."""
        need = self.blocks.blocks_for(num_tokens) - len(seq.block_table)
        while need > self.blocks.num_free:
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        for _ in range(need):
            seq.block_table.append(self.blocks.allocate())
        return True

    def _admit(self, seq: Sequence, budget: int) -> ScheduledChunk | None:
        tokens = seq.tokens
        bs = self.blocks.block_size
        # At least one token must be computed to get logits, so a fully cached prompt recomputes its last block.
        hashes = prefix_hashes(tokens[: len(tokens) - 1], bs)
        hits = self.blocks.find_prefix(hashes)
        computed = len(hits) * bs
        count = min(len(tokens) - computed, budget)
        need = self.blocks.blocks_for(computed + count) - len(hits)
        if need > self.blocks.free_after_acquiring(hits):
            return None
        for block in hits:
            self.blocks.acquire(block)
        seq.block_table = hits + [self.blocks.allocate() for _ in range(need)]
        seq.block_hashes = hashes[: len(hits)]
        seq.num_computed = computed
        seq.status = Status.RUNNING
        if seq.cached_tokens is None:
            seq.cached_tokens = min(computed, len(seq.prompt_ids))
            self.prefix_queried_tokens += len(seq.prompt_ids)
            self.prefix_hit_tokens += seq.cached_tokens
        return ScheduledChunk(seq, computed, count)

    def _preempt(self, seq: Sequence) -> None:
        self._free_blocks(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make every newly completed block of seq findable by later sequences with the same prefix."""
        bs = self.blocks.block_size
        full = seq.num_computed // bs
        while len(seq.block_hashes) < full:
            n = len(seq.block_hashes)
            h = block_hash(seq.last_hash(), [seq.token_at(p) for p in range(n * bs, (n + 1) * bs)])
            seq.block_hashes.append(h)
            self.blocks.register(seq.block_table[n], h)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence, wherever it is, and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self._free_blocks(seq)

    def _free_blocks(self, seq: Sequence) -> None:
        # Tail first, so the oldest-evicted cached blocks are the ends of prefixes, not their starts.
        for block in reversed(seq.block_table):
            self.blocks.release(block)
        seq.block_table = []
        seq.block_hashes = []

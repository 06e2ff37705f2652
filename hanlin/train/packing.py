"""Packed training rows from a token dataset: fixed windows over the token stream in a seeded order.

The stream is cut into windows of seq_len + 1 tokens (window i starts at token i * seq_len, so neighbouring
windows share one token: the last target of one is the first input of the next). Each epoch visits every
window once in a random order seeded by seed + epoch; the epochs' orders are laid end to end into one
endless stream, and global micro-batch k is stream entries [k * G, (k + 1) * G) with G = world_size *
micro_batch_size, rank r taking [r * mb, (r + 1) * mb) of it. A row may hold the end of one document and the
start of the next: document_ids tell the model where, and the last token of a document (its EOS) gets no
target, because what follows it is an unrelated document.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hanlin.errors import HanlinError
from hanlin.train.batch import IGNORE_INDEX, LMBatch
from hanlin.train.data import TokenDataset

_STATE_KIND = "packed-batches"


class PackedBatches:
    """This rank's micro-batches of `micro_batch_size` rows of `seq_len` tokens (a BatchSource)."""

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        micro_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_positive(seq_len=seq_len, micro_batch_size=micro_batch_size, world_size=world_size)
        if not 0 <= rank < world_size:
            raise HanlinError(f"rank must be in [0, {world_size}), got {rank}")
        self.dataset = dataset
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_windows = windows_in(dataset, seq_len)
        self.epoch = 0
        self.position = 0  # stream entries of this epoch already handed out (by all ranks together)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def global_batch_size(self) -> int:
        """Rows per global micro-batch (every rank's micro-batch together)."""
        return self.world_size * self.micro_batch_size

    def next_batch(self) -> LMBatch:
        first = self.position + self.rank * self.micro_batch_size
        windows = np.array([self._window_at(first + j) for j in range(self.micro_batch_size)], dtype=np.int64)
        self.position += self.global_batch_size
        self.epoch += self.position // self.num_windows
        self.position %= self.num_windows
        self._orders = {e: order for e, order in self._orders.items() if e >= self.epoch}
        return make_batch(self.dataset, windows * self.seq_len, self.seq_len + 1)

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> LMBatch:
        return self.next_batch()

    def _window_at(self, offset: int) -> int:
        """The window at `offset` entries from the start of the current epoch (later epochs follow on)."""
        epoch = self.epoch + offset // self.num_windows
        if epoch not in self._orders:
            rng = np.random.default_rng((self.seed + epoch) % (1 << 64))
            self._orders[epoch] = rng.permutation(self.num_windows)
        return int(self._orders[epoch][offset % self.num_windows])

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream (shared by all ranks) and what it depends on."""
        return {
            "kind": _STATE_KIND, "epoch": self.epoch, "position": self.position, "seed": self.seed,
            "seq_len": self.seq_len, "num_windows": self.num_windows, "num_tokens": self.dataset.num_tokens,
            "micro_batch_size": self.micro_batch_size, "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream where `state` left it. A different micro-batch size or world size regroups the
        same stream of rows; a different seq_len, seed or dataset cannot continue it and raises HanlinError."""
        if not isinstance(state, dict) or state.get("kind") != _STATE_KIND:
            raise HanlinError("the saved data position is not a packed-batches state; cannot resume from it")
        saved_seq_len, saved_seed = state["seq_len"], state["seed"]
        if saved_seq_len != self.seq_len:
            raise HanlinError(
                f"cannot resume: the run was saved with data.seq_len={saved_seq_len}, now {self.seq_len}; "
                f"set data.seq_len={saved_seq_len} or start a new run"
            )
        if saved_seed != self.seed:
            raise HanlinError(
                f"cannot resume: the run was saved with data seed {saved_seed}, now {self.seed}; "
                f"set it back to {saved_seed} or start a new run"
            )
        if state["num_tokens"] != self.dataset.num_tokens or state["num_windows"] != self.num_windows:
            raise HanlinError(
                f"cannot resume: the run was saved on a dataset of {state['num_tokens']:,} tokens, but "
                f"{self.dataset.directory} ({self.dataset.split}) has {self.dataset.num_tokens:,}; use the same data"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_windows:
            raise HanlinError(f"cannot resume: the saved data position (epoch {epoch}, row {position}) is invalid")
        self.epoch, self.position = epoch, position
        self._orders = {}


def windows_in(dataset: TokenDataset, seq_len: int) -> int:
    """Full windows of seq_len + 1 tokens in `dataset`; HanlinError when there is not even one."""
    count = (dataset.num_tokens - 1) // seq_len if dataset.num_tokens else 0
    if count < 1:
        raise HanlinError(
            f"{dataset.directory} ({dataset.split}) has {dataset.num_tokens:,} tokens, but one row of "
            f"seq_len {seq_len} needs {seq_len + 1:,}; lower data.seq_len or prepare more data"
        )
    return count


def make_batch(dataset: TokenDataset, starts_B: np.ndarray, length: int) -> LMBatch:
    """Rows of `length` tokens starting at `starts_B`: inputs are the first length - 1, labels the last
    length - 1; a label that would cross into another document is IGNORE_INDEX."""
    offsets_BL = starts_B[:, None] + np.arange(length, dtype=np.int64)
    tokens_BL = np.asarray(dataset.tokens[offsets_BL], dtype=np.int64)
    documents_BL = np.searchsorted(dataset.doc_starts, offsets_BL, side="right").astype(np.int64) - 1
    labels_BT = tokens_BL[:, 1:].copy()
    labels_BT[documents_BL[:, 1:] != documents_BL[:, :-1]] = IGNORE_INDEX
    return LMBatch(
        input_ids=torch.from_numpy(np.ascontiguousarray(tokens_BL[:, :-1])),
        labels=torch.from_numpy(labels_BT),
        document_ids=torch.from_numpy(np.ascontiguousarray(documents_BL[:, :-1])),
    )


def validation_batches(
    dataset: TokenDataset,
    seq_len: int,
    micro_batch_size: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> list[LMBatch]:
    """Consecutive windows from the start of `dataset`, in order, micro_batch_size rows a batch (the last may
    have fewer), at most max_batches batches (None: all). A split shorter than one window gives one shorter
    row. With several ranks, rank r takes batches r, r + world_size, ... of that same list."""
    _check_positive(seq_len=seq_len, micro_batch_size=micro_batch_size, world_size=world_size)
    if not 0 <= rank < world_size:
        raise HanlinError(f"rank must be in [0, {world_size}), got {rank}")
    if dataset.num_tokens < 2:
        raise HanlinError(
            f"{dataset.directory} ({dataset.split}) has {dataset.num_tokens} tokens; validation needs at least 2"
        )
    count = (dataset.num_tokens - 1) // seq_len
    length = seq_len + 1 if count else dataset.num_tokens
    count = max(count, 1)
    batches = -(-count // micro_batch_size)
    if max_batches is not None:
        batches = min(batches, max_batches)
    result = []
    for k in range(rank, batches, world_size):
        windows = np.arange(k * micro_batch_size, min((k + 1) * micro_batch_size, count), dtype=np.int64)
        result.append(make_batch(dataset, windows * seq_len, length))
    return result


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise HanlinError(f"{name} must be a positive integer, got {value!r}")

"""Direct Preference Optimization (Rafailov et al. 2023) on preference pairs JSONL.

One pair per line: {"prompt": "..." | [messages], "chosen": "...", "rejected": "..."}. The prompt goes through
the chat template with the generation prompt; each reply is an assistant turn (its content and end-of-turn
token), and only those tokens are scored.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hanlin.errors import HanlinError
from hanlin.tokenizer import Tokenizer
from hanlin.train import distributed
from hanlin.train.batch import LossOutput
from hanlin.train.config import MoETrainConfig, TrainConfig
from hanlin.train.data import DataWarning
from hanlin.train.sft import (
    ChatTokens,
    Messages,
    check_messages,
    export_final,
    pad_token_id,
    prepare_run,
    read_jsonl,
    tokenize_chat,
)

if TYPE_CHECKING:
    from hanlin.train.loop import TrainResult


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class PairSide:
    ids: list[int]
    response: list[int]  # 1 on the reply's tokens


@dataclass
class Pair:
    chosen: PairSide
    rejected: PairSide


def _reply(record: dict[str, Any], key: str, prompt: Messages, where: str) -> str:
    """A reply as text; a messages list (the prompt followed by one assistant message) is accepted too."""
    value = record.get(key)
    if isinstance(value, list):
        if len(value) == len(prompt) + 1 and value[: len(prompt)] == prompt:
            value = value[-1]
        elif len(value) == 1:
            value = value[0]
        if isinstance(value, dict) and value.get("role") == "assistant":
            value = value.get("content")
    if not isinstance(value, str):
        raise HanlinError(f"{where}: \"{key}\" must be the assistant's reply as a string")
    return value


def _last_turn(chat: ChatTokens, where: str) -> PairSide:
    if not chat.assistant_spans:
        raise HanlinError(f"{where}: the reply left no tokens after rendering with the chat template")
    start, end = chat.assistant_spans[-1]
    ids = chat.ids[:end]
    return PairSide(ids, [0] * start + [1] * (end - start))


def _truncate(sequence: PairSide, seq_len: int) -> PairSide:
    """At most seq_len tokens: the prompt loses tokens from its start (down to half of seq_len), then the
    reply from its end, so at least half of seq_len stays reply."""
    if len(sequence.ids) <= seq_len:
        return sequence
    prompt = sequence.response.index(1)
    reply = len(sequence.ids) - prompt
    cut = prompt - min(prompt, max(seq_len - reply, seq_len // 2))
    return PairSide(sequence.ids[cut : cut + seq_len], sequence.response[cut : cut + seq_len])


def load_pairs(path: str | Path, tokenizer: Tokenizer, seq_len: int) -> list[Pair]:
    if seq_len < 2:
        raise HanlinError(f"data.seq_len={seq_len} leaves no room for a prompt and a reply")
    pairs, cut = [], []
    for where, record in read_jsonl(path):
        missing = [key for key in ("prompt", "chosen", "rejected") if key not in record]
        if missing:
            raise HanlinError(f"{where}: missing \"{missing[0]}\"; a preference pair has prompt, chosen and rejected")
        prompt = record["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        messages = check_messages(messages, where)
        sides = []
        for key in ("chosen", "rejected"):
            reply = {"role": "assistant", "content": _reply(record, key, messages, where)}
            sides.append(_last_turn(tokenize_chat(tokenizer, [*messages, reply]), where))
        if max(len(side.ids) for side in sides) > seq_len:
            cut.append(where)
        pairs.append(Pair(_truncate(sides[0], seq_len), _truncate(sides[1], seq_len)))
    if cut:
        warnings.warn(f"cut {len(cut)} pair(s) longer than seq_len={seq_len} (first: {cut[0]}): prompts lose "
                      "their start, replies their end", DataWarning, stacklevel=2)
    if not pairs:
        raise HanlinError(f"{path}: no preference pair to train on")
    return pairs


@dataclass
class DPOBatch:
    """P pairs as 2P right-padded rows: the chosen replies first, then the rejected ones."""

    input_ids: torch.Tensor  # [2P, T]
    attention_mask: torch.Tensor  # [2P, T] 1 on real tokens
    response_mask: torch.Tensor  # [2P, T] 1 on reply tokens

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def items(self) -> int:
        """What the loss averages over (LossOutput.items): pairs."""
        return self.pairs

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> DPOBatch:
        return DPOBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


def collate_pairs(pairs: list[Pair], pad_id: int) -> DPOBatch:
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(s.ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        n = len(sequence.ids)
        input_ids[row, :n] = torch.tensor(sequence.ids)
        attention_mask[row, :n] = 1
        response_mask[row, :n] = torch.tensor(sequence.response)
    return DPOBatch(input_ids, attention_mask, response_mask)


class PairBatches:
    """Endless micro-batches of pairs over shuffled epochs (a BatchSource of DPOBatch), sliced across ranks
    like SFTBatches: each global micro-batch is world_size × micro_batch_size consecutive pairs."""

    def __init__(self, pairs: list[Pair], micro_batch_size: int, seed: int, pad_id: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if not pairs:
            raise HanlinError("no preference pairs to train on")
        self.pairs, self.micro_batch_size, self.seed, self.pad_id = pairs, micro_batch_size, seed, pad_id
        self.rank, self.world_size = rank, world_size
        self.epoch, self.offset = 0, 0
        self._order_epoch, self._order = -1, []

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs)).tolist()
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> DPOBatch:
        stream: list[int] = []
        want = self.world_size * self.micro_batch_size
        while len(stream) < want:
            order = self._epoch_order(self.epoch)
            take = min(len(order) - self.offset, want - len(stream))
            stream.extend(order[self.offset : self.offset + take])
            self.offset += take
            if self.offset == len(order):
                self.epoch, self.offset = self.epoch + 1, 0
        mine = stream[self.rank * self.micro_batch_size : (self.rank + 1) * self.micro_batch_size]
        return collate_pairs([self.pairs[i] for i in mine], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "pairs": len(self.pairs), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("pairs") != len(self.pairs) or state.get("seed") != self.seed:
            raise HanlinError("the DPO data position was saved for different data or seed; "
                              "resume with the same data file and config")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def validation_pairs(pairs: list[Pair], micro_batch_size: int, pad_id: int, rank: int = 0,
                     world_size: int = 1) -> Callable[[], Iterator[DPOBatch]]:
    """One pass in file order; this rank's share of each global micro-batch."""
    def batches() -> Iterator[DPOBatch]:
        step = world_size * micro_batch_size
        for start in range(0, len(pairs), step):
            mine = pairs[start + rank * micro_batch_size : start + (rank + 1) * micro_batch_size]
            if mine:
                yield collate_pairs(mine, pad_id)

    return batches


# ---- loss ---------------------------------------------------------------------------------------
def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities [B] of the response tokens (each predicted from the tokens before it)."""
    logits_BTV = model(input_ids, attention_mask)
    B, T, V = logits_BTV.shape
    token_logp_BT = -F.cross_entropy(
        logits_BTV[:, :-1].reshape(-1, V).float(), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(B, T - 1)
    return (token_logp_BT * response_mask[:, 1:].to(token_logp_BT.dtype)).sum(dim=-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [B], chosen rewards [B], rejected rewards [B]); loss = -log σ(β((πc - rc) - (πr - rr))),
    rewards β(π - r) (detached)."""
    chosen_B = beta * (policy_chosen - ref_chosen)
    rejected_B = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_B - rejected_B), chosen_B.detach(), rejected_B.detach()


class DPOLoss:
    """The Trainer's loss function: the policy against a frozen copy of the starting model (plus the MoE
    balancing terms of the policy's forward, as in language modelling)."""

    def __init__(self, reference: nn.Module, beta: float, moe_settings: MoETrainConfig | None = None) -> None:
        self.reference = reference
        self.beta = beta
        self.moe_settings = moe_settings or MoETrainConfig()

    @classmethod
    def frozen_copy(cls, model: nn.Module, beta: float, moe_settings: MoETrainConfig | None = None) -> DPOLoss:
        reference = copy.deepcopy(model).eval()
        for parameter in reference.parameters():
            parameter.requires_grad_(False)
        return cls(reference, beta, moe_settings)

    def __call__(self, model: nn.Module, batch: DPOBatch) -> LossOutput:
        P = batch.pairs
        with torch.no_grad():
            ref_2P = sequence_logprobs(self.reference, batch.input_ids, batch.attention_mask, batch.response_mask)
        policy_2P = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask)
        loss_P, chosen_P, rejected_P = dpo_loss(policy_2P[:P], policy_2P[P:], ref_2P[:P], ref_2P[P:], self.beta)
        margin_P = chosen_P - rejected_P
        metrics = {
            "dpo/reward_chosen": chosen_P.mean().item(),
            "dpo/reward_rejected": rejected_P.mean().item(),
            "dpo/reward_margin": margin_P.mean().item(),
            "dpo/reward_accuracy": (margin_P > 0).float().mean().item(),
            "dpo/logp_chosen": policy_2P[:P].detach().mean().item(),
            "dpo/logp_rejected": policy_2P[P:].detach().mean().item(),
        }
        extra = None
        inner = distributed.unwrap(model)
        if any(True for _ in getattr(inner, "moe_layers", lambda: iter(()))()):
            from hanlin.train.moe_balance import moe_aux_loss

            extra, balance = moe_aux_loss(inner, self.moe_settings)
            metrics.update(balance)
        return LossOutput(loss_P.sum(), P, extra, metrics)


# ---- the run ------------------------------------------------------------------------------------
def run_dpo(config: TrainConfig, run_dir: Path, resume: bool = False) -> TrainResult:
    """DPO from config.init_from on the pairs at config.data.path (reference: a frozen copy of the starting
    model, beta: config.dpo.beta; LoRA when config.sft.lora_rank > 0); exports the result (LoRA merged) to
    run_dir / "final"."""
    from hanlin.train.lora import apply_lora, lora_parameters
    from hanlin.train.loop import Trainer

    tokenizer, model_config, model, dist = prepare_run(config, "preference pairs JSONL")
    data, pad_id = config.data, pad_token_id(tokenizer)
    train = PairBatches(load_pairs(data.path, tokenizer, data.seq_len), data.micro_batch_size, data.seed, pad_id,
                        dist.rank, dist.world_size)
    validation = None
    if data.validation_path:
        held_out = load_pairs(data.validation_path, tokenizer, data.seq_len)
        validation = validation_pairs(held_out, data.micro_batch_size, pad_id, dist.rank, dist.world_size)
    loss_fn = DPOLoss.frozen_copy(model, config.dpo.beta, config.moe)
    loss_fn.reference.to(distributed.device_for(config.device, dist.local_rank))
    trainable = None
    if config.sft.lora_rank > 0:  # the sft section's LoRA settings apply to DPO too
        torch.manual_seed(config.seed)
        apply_lora(model, config.sft.lora_rank, config.sft.lora_alpha, config.sft.lora_dropout)
        trainable = lora_parameters
    trainer = Trainer(config, model, train, loss_fn, run_dir, validation, trainable, resume=resume)
    result = trainer.fit()
    export_final(trainer, config, model_config, tokenizer, Path(run_dir) / "final")
    return result

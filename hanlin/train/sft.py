"""Supervised fine-tuning: chat JSONL → the model's chat template → loss on the assistant's tokens only.

One conversation per line: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
or {"prompt": "...", "completion": "..."} (one user turn and one assistant reply).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hanlin.config import ModelConfig
from hanlin.errors import HanlinError
from hanlin.models import Transformer
from hanlin.tokenizer import Tokenizer
from hanlin.train import distributed
from hanlin.train.batch import IGNORE_INDEX, LMBatch
from hanlin.train.config import TrainConfig
from hanlin.train.data import DataWarning

if TYPE_CHECKING:
    from hanlin.train.loop import Trainer, TrainResult

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


# ---- reading ------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", object) for each non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise HanlinError(f"{path}: no such file; give a JSONL file with one example per line")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise HanlinError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise HanlinError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def check_messages(messages: Any, where: str) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise HanlinError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise HanlinError(f"{where}: message {index} needs a \"role\" and a string \"content\"")
        if message.get("role") not in ROLES:
            raise HanlinError(f"{where}: message {index} has role {message.get('role')!r}; "
                              f"use one of {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def conversation(record: dict[str, Any], where: str) -> Messages:
    """The messages of one SFT line."""
    if "messages" in record:
        return check_messages(record["messages"], where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(completion, str):
            raise HanlinError(f"{where}: \"completion\" must be a string")
        head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return check_messages([*head, {"role": "assistant", "content": completion}], where)
    raise HanlinError(f"{where}: missing \"messages\" (or \"prompt\" and \"completion\")")


# ---- chat template → tokens and the assistant mask ------------------------------------------------
@dataclass
class ChatTokens:
    ids: list[int]
    assistant_spans: list[tuple[int, int]]  # [start, end) token ranges: each assistant turn's content + end of turn

    def mask(self) -> list[int]:
        mask = [0] * len(self.ids)
        for start, end in self.assistant_spans:
            mask[start:end] = [1] * (end - start)
        return mask


def require_chat_template(tokenizer: Tokenizer, name: str) -> None:
    if tokenizer.chat_template is None:
        raise HanlinError(
            f"the tokenizer {name!r} has no chat template, so conversations cannot be rendered; "
            "set `tokenizer:` to a model directory whose tokenizer_config.json has a chat_template"
        )


def tokenize_chat(tokenizer: Tokenizer, messages: Messages) -> ChatTokens:
    """The rendered conversation's tokens and where each assistant turn lies in them.

    Each assistant turn is the text that rendering messages[:i+1] adds to messages[:i] with the generation
    prompt (the role header), found in the tokens of the whole conversation by character offsets, then cut
    after its end-of-turn token (the separator a template writes after it is not trained).
    """
    def render(part: Messages, prompt: bool) -> str:
        return str(tokenizer.apply_chat_template(part, add_generation_prompt=prompt))

    full = render(messages, False)
    char_spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, turn = render(messages[:i], True), render(messages[: i + 1], False)
        if not (turn.startswith(head) and full.startswith(turn)):
            raise HanlinError(
                "the chat template does not render this conversation turn by turn (a later turn changes the "
                "text of an earlier one), so the assistant tokens cannot be located; split it into one "
                "conversation per assistant reply"
            )
        char_spans.append((len(head), len(turn)))
    encoding = tokenizer.backend.encode(full, add_special_tokens=False)
    ids, offsets = encoding.ids, encoding.offsets
    spans = []
    for char_start, char_end in char_spans:
        inside = [k for k, (s, e) in enumerate(offsets) if s >= char_start and e <= char_end and e > s]
        if not inside:
            continue
        start, end = inside[0], inside[-1] + 1
        stops = [k for k in range(start, end) if ids[k] in tokenizer.stop_token_ids]
        spans.append((start, stops[-1] + 1 if stops else end))
    return ChatTokens(list(ids), spans)


# ---- examples -----------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the next token where it is an assistant token, else IGNORE_INDEX


def make_example(chat: ChatTokens, seq_len: int) -> Example | None:
    """Inputs and shifted labels, truncated to seq_len; None when no assistant token is left to learn."""
    ids = chat.ids[: seq_len + 1]
    mask = chat.mask()[: seq_len + 1]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(ids[:-1], labels)


def load_sft_examples(path: str | Path, tokenizer: Tokenizer, seq_len: int) -> list[Example]:
    examples, skipped = [], []
    for where, record in read_jsonl(path):
        example = make_example(tokenize_chat(tokenizer, conversation(record, where)), seq_len)
        if example is None:
            skipped.append(where)
        else:
            examples.append(example)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} conversation(s) with no assistant token within seq_len={seq_len} "
                      f"(first: {skipped[0]})", DataWarning, stacklevel=2)
    if not examples:
        raise HanlinError(f"{path}: no conversation has an assistant reply to train on (within seq_len={seq_len})")
    return examples


def pad_token_id(tokenizer: Tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


# ---- batches ------------------------------------------------------------------------------------
def pack_rows(lengths: list[int], order: list[int], seq_len: int, pack: bool) -> list[list[int]]:
    """Example indices per row: consecutive examples (in `order`) while they fit, or one per row."""
    rows: list[list[int]] = []
    used = seq_len
    for index in order:
        if not pack or used + lengths[index] > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += lengths[index]
    return rows


def rows_to_batch(examples: list[Example], rows: list[list[int]], seq_len: int, pad_id: int, pack: bool) -> LMBatch:
    """Packed rows are seq_len long with a document id per example (padding: one more id); unpacked rows
    are padded to the longest example of the batch and need no document ids."""
    width = seq_len if pack else max(len(examples[i].input_ids) for row in rows for i in row)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    document_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for doc, index in enumerate(row):
            example = examples[index]
            n = len(example.input_ids)
            input_ids[b, at : at + n] = torch.tensor(example.input_ids)
            labels[b, at : at + n] = torch.tensor(example.labels)
            document_ids[b, at : at + n] = doc
            at += n
        document_ids[b, at:] = len(row)
    return LMBatch(input_ids, labels, document_ids if pack else None)


class SFTBatches:
    """Endless micro-batches over shuffled epochs of examples (a BatchSource of LMBatch).

    Every rank walks the same stream of rows; each global micro-batch is world_size × micro_batch_size
    consecutive rows of it, and rank r takes its r-th share, so the ranks together see what one process
    with world_size × micro_batch_size rows would.
    """

    def __init__(self, examples: list[Example], seq_len: int, micro_batch_size: int, seed: int, pad_id: int,
                 pack: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if not examples:
            raise HanlinError("no SFT examples to train on")
        self.examples, self.seq_len, self.micro_batch_size = examples, seq_len, micro_batch_size
        self.seed, self.pad_id, self.pack, self.rank, self.world_size = seed, pad_id, pack, rank, world_size
        self._lengths = [len(e.input_ids) for e in examples]
        self.epoch, self.offset = 0, 0
        self._rows_epoch, self._rows = -1, []

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if self._rows_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist()
            self._rows = pack_rows(self._lengths, order, self.seq_len, self.pack)
            self._rows_epoch = epoch
        return self._rows

    def next_batch(self) -> LMBatch:
        stream: list[list[int]] = []
        while len(stream) < self.world_size * self.micro_batch_size:
            rows = self.epoch_rows(self.epoch)
            take = min(len(rows) - self.offset, self.world_size * self.micro_batch_size - len(stream))
            stream.extend(rows[self.offset : self.offset + take])
            self.offset += take
            if self.offset == len(rows):
                self.epoch, self.offset = self.epoch + 1, 0
        mine = stream[self.rank * self.micro_batch_size : (self.rank + 1) * self.micro_batch_size]
        return rows_to_batch(self.examples, mine, self.seq_len, self.pad_id, self.pack)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "examples": len(self.examples), "seed": self.seed,
                "seq_len": self.seq_len, "pack": self.pack}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = [k for k in ("examples", "seed", "seq_len", "pack") if state.get(k) != mine[k]]
        if changed:
            raise HanlinError(f"the SFT data position was saved for different data or settings ({', '.join(changed)}"
                              f" changed); resume with the same data file and config")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def validation_batches(examples: list[Example], seq_len: int, micro_batch_size: int, pad_id: int, pack: bool,
                       rank: int = 0, world_size: int = 1) -> Callable[[], Iterator[LMBatch]]:
    """One pass over the examples in file order; this rank's share of each global micro-batch."""
    rows = pack_rows([len(e.input_ids) for e in examples], list(range(len(examples))), seq_len, pack)

    def batches() -> Iterator[LMBatch]:
        step = world_size * micro_batch_size
        for start in range(0, len(rows), step):
            mine = rows[start + rank * micro_batch_size : start + (rank + 1) * micro_batch_size]
            if mine:
                yield rows_to_batch(examples, mine, seq_len, pad_id, pack)

    return batches


# ---- the run ------------------------------------------------------------------------------------
def run_sft(config: TrainConfig, run_dir: Path, resume: bool = False) -> TrainResult:
    """Fine-tunes config.init_from (or a `model` from scratch) on the chat JSONL at config.data.path and
    exports the result (LoRA merged) to run_dir / "final"."""
    from hanlin.train.lora import apply_lora, lora_parameters
    from hanlin.train.loop import Trainer
    from hanlin.train.losses import lm_loss_with

    tokenizer, model_config, model, dist = prepare_run(config, "SFT chat JSONL")
    data, pad_id = config.data, pad_token_id(tokenizer)
    examples = load_sft_examples(data.path, tokenizer, data.seq_len)
    train = SFTBatches(examples, data.seq_len, data.micro_batch_size, data.seed, pad_id, config.sft.pack,
                       dist.rank, dist.world_size)
    validation = None
    if data.validation_path:
        held_out = load_sft_examples(data.validation_path, tokenizer, data.seq_len)
        validation = validation_batches(held_out, data.seq_len, data.micro_batch_size, pad_id, config.sft.pack,
                                        dist.rank, dist.world_size)
    trainable = None
    if config.sft.lora_rank > 0:
        torch.manual_seed(config.seed)  # the same adapters on every rank
        apply_lora(model, config.sft.lora_rank, config.sft.lora_alpha, config.sft.lora_dropout)
        trainable = lora_parameters
    trainer = Trainer(config, model, train, lm_loss_with(config.moe), run_dir, validation, trainable, resume=resume)
    result = trainer.fit()
    export_final(trainer, config, model_config, tokenizer, Path(run_dir) / "final")
    return result


def prepare_run(config: TrainConfig, what: str) -> tuple[Tokenizer, ModelConfig, Transformer, distributed.DistInfo]:
    """The tokenizer (with a chat template), the starting model and this process' rank, checked together."""
    from hanlin.train.data import load_tokenizer
    from hanlin.train.init import build_model

    if not config.data.path:
        raise HanlinError(f"data.path is empty: give the {what} file")
    if not Path(config.data.path).is_file():
        raise HanlinError(f"data.path {config.data.path}: no such file; give the {what} file")
    tokenizer, name = load_tokenizer(config.tokenizer)
    require_chat_template(tokenizer, name)
    model_config, model = build_model(config)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise HanlinError(f"the tokenizer {name!r} has {tokenizer.vocab_size} tokens but the model embeds only "
                          f"{model_config.vocab_size}; set `tokenizer:` to the model's own tokenizer")
    dist = distributed.init_from_env(config.device) if config.distributed != "none" else distributed.info()
    return tokenizer, model_config, model, dist


def export_final(trainer: Trainer, config: TrainConfig, model_config: ModelConfig, tokenizer: Tokenizer,
                 directory: Path) -> Path:
    """Exports the trained weights as a plain Transformer (LoRA adapters merged). Every rank calls it."""
    from hanlin.train.export import export_hf
    from hanlin.train.lora import apply_lora, merge_lora

    inner = distributed.unwrap(trainer.wrapped)
    if distributed.is_fsdp(inner):  # every rank gathers the full weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True))
    else:
        state = inner.state_dict()
    plain = Transformer(model_config)
    if config.sft.lora_rank > 0 and any(name.endswith("lora_A") for name in state):
        apply_lora(plain, config.sft.lora_rank, config.sft.lora_alpha)
    plain.load_state_dict({name: tensor.detach().to("cpu") for name, tensor in state.items()})
    merge_lora(plain)
    return export_hf(plain, model_config, tokenizer, directory)

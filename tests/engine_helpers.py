"""Tiny models and tokenizers for engine tests, and a greedy loop that runs through the real engine."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from hanlin.api import LoadedModel
from hanlin.config import ModelConfig
from hanlin.engine.engine import LLMEngine
from hanlin.engine.options import EngineOptions
from hanlin.engine.sampling import SamplingParams
from hanlin.models import Transformer
from hanlin.tokenizer import Tokenizer


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """Token i spells "<i>"; no stop tokens (generation runs to max_tokens)."""
    vocab = {f"<{i}>": i for i in range(vocab_size)}
    backend = BackendTokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend)


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges (one token per byte) plus an <eos> special token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>"])
    return Tokenizer(backend, eos_token="<eos>")


def tiny_model(config: ModelConfig, seed: int = 0, std: float = 0.3) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model


def tiny_loaded(context: int = 256, **config_changes) -> LoadedModel:
    tokenizer = byte_tokenizer()
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=64, max_position_embeddings=context, **config_changes,
    )
    return LoadedModel(config, tiny_model(config), tokenizer, "tiny")


def engine_greedy(
    model: Transformer, config: ModelConfig, prompts: list[list[int]], n: int, **options
) -> list[list[int]]:
    """Greedy continuations of all prompts, run together through LLMEngine (small blocks and chunks)."""
    loaded = LoadedModel(config, model, word_tokenizer(config.vocab_size), "tiny")
    options = {"block_size": 4, "max_batched_tokens": 16, "kv_cache_mb": 8, "max_model_len": 1024, **options}
    engine = LLMEngine(loaded, EngineOptions(**options))
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            for delta in out.deltas:
                outputs[out.request_id].extend(delta.token_ids)
    return [outputs[str(i)] for i in range(len(prompts))]

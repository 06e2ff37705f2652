"""The single-sequence generator on a tiny random model with a real byte-level tokenizer."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from hanlin.api import LoadedModel
from hanlin.config import ModelConfig
from hanlin.engine.sampling import SamplingParams
from hanlin.errors import HanlinError
from hanlin.generate import generate, generate_stream
from hanlin.models import Transformer
from hanlin.tokenizer import Tokenizer


def tiny_loaded(context: int = 64) -> LoadedModel:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>"])
    tokenizer = Tokenizer(backend, eos_token="<eos>")
    config = ModelConfig(
        vocab_size=len(vocab), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
        max_position_embeddings=context,
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return LoadedModel(config, model, tokenizer, "tiny")


def test_streamed_text_equals_the_result_and_greedy_matches_an_uncached_loop() -> None:
    loaded = tiny_loaded()
    prompt = loaded.tokenizer.encode("hello")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    events = list(generate_stream(loaded, prompt, params))
    result = events[-1].result
    assert result is not None and result.finish_reason == "length" and result.completion_tokens == 12
    assert "".join(e.text for e in events[:-1]) == result.text
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(12):
            ids.append(int(loaded.model(torch.tensor([ids]))[0, -1].argmax()))
    assert result.token_ids == ids[len(prompt) :]


def test_same_seed_same_text_and_stop_strings_are_cut() -> None:
    loaded = tiny_loaded()
    prompt = loaded.tokenizer.encode("abc")
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)
    first, second = generate(loaded, prompt, params), generate(loaded, prompt, params)
    assert first.text == second.text and first.token_ids == second.token_ids
    if len(first.text) >= 4:
        stop = first.text[2:4]
        cut = generate(loaded, prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True, stop=[stop]))
        assert cut.finish_reason == "stop" and stop not in cut.text and first.text.startswith(cut.text)


def test_generation_ends_at_the_context_limit_and_long_prompts_are_refused() -> None:
    loaded = tiny_loaded(context=16)
    result = generate(loaded, loaded.tokenizer.encode("0123456789"), SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    assert result.finish_reason == "length" and result.prompt_tokens + result.completion_tokens == 16
    with pytest.raises(HanlinError, match="16"):
        generate(loaded, loaded.tokenizer.encode("x" * 20), SamplingParams(max_tokens=4))


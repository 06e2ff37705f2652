"""hanlin.train.data / readers / packing and `hanlin data prepare`: token shards and packed, resumable batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import torch
import typer
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers.models import BPE, WordLevel
from typer.testing import CliRunner

from hanlin.cli_data import register
from hanlin.errors import HanlinError
from hanlin.tokenizer import Tokenizer
from hanlin.train.batch import IGNORE_INDEX, LMBatch
from hanlin.train.data import (
    DataWarning, TokenDataset, load_tokenizer, prepare, tokenizer_fingerprint, validation_documents,
)
from hanlin.train.packing import PackedBatches, validation_batches
from hanlin.train.readers import LARGE_TEXT_CHARS, split_large_text

EOS = 256


def byte_tokenizer(vocab_size: int | None = None, swap: bool = False) -> Tokenizer:
    """One token per UTF-8 byte (ids 0-255 in byte-alphabet order) and <eos> = 256: token counts are byte counts."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if swap:  # same size, different vocabulary
        alphabet[0], alphabet[1] = alphabet[1], alphabet[0]
    vocab = {char: i for i, char in enumerate(alphabet)} | {"<eos>": EOS}
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<eos>", special=True, normalized=False)])
    return Tokenizer(backend, eos_token="<eos>", vocab_size=vocab_size)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def smollm2() -> tuple[Tokenizer, str]:
    return load_tokenizer("smollm2")


def expected_tokens(tok: Tokenizer, documents: list[str]) -> np.ndarray:
    return np.array([i for d in documents for i in [*tok.encode(d), tok.eos_token_id]], dtype=np.int64)


def write_jsonl(path: Path, texts: list, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def run(inputs: list[Path], out: Path, tok: Tokenizer, **kwargs):
    kwargs.setdefault("progress", False)
    return prepare(inputs, out, tok, **kwargs)


# ---- ingestion ---------------------------------------------------------------------------------
def test_reads_text_markdown_jsonl_parquet_and_folders(tmp_path: Path, tok: Tokenizer) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("Alpha text.\n\nSecond paragraph é.\n")
    (corpus / "b.md").write_text("# Title\n\nmarkdown body")
    pq.write_table(pa.table({"text": ["parquet one", None, "parquet two"], "n": [1, 2, 3]}), corpus / "d.parquet")
    (corpus / "e.csv").write_text("text\nnot read\n")
    (corpus / ".hidden.txt").write_text("never read")
    (corpus / "sub" / "c.jsonl").write_text('{"text": "json one"}\n\n{"text": "  "}\n{"text": "json two", "x": 1}\n')
    extra = tmp_path / "extra.txt"
    extra.write_text("a file given directly")
    with pytest.warns(DataWarning, match="e.csv"):
        summary = run([corpus, extra], tmp_path / "out", tok, validation_fraction=0.0)
    documents = ["Alpha text.\n\nSecond paragraph é.\n", "# Title\n\nmarkdown body", "parquet one", "parquet two",
                 "json one", "json two", "a file given directly"]
    train = TokenDataset(tmp_path / "out", "train")
    assert np.array_equal(np.asarray(train.tokens, dtype=np.int64), expected_tokens(tok, documents))
    assert train.num_documents == 7 and tok.decode(train.document(1)[:-1].tolist()) == documents[1]
    assert TokenDataset(tmp_path / "out", "validation").num_tokens == 0
    assert summary.documents == 7 and summary.tokens == train.num_tokens == len(expected_tokens(tok, documents))
    assert [Path(p).name for p in summary.sources] == ["a.txt", "b.md", "d.parquet", "c.jsonl", "extra.txt"]
    assert [Path(p).name for p, _ in summary.skipped] == ["e.csv"]
    assert train.meta["dtype"] == "uint16" and train.tokens.dtype == np.uint16


def test_large_text_is_cut_at_paragraphs_into_documents(tmp_path: Path, tok: Tokenizer) -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * (200 + i % 50) for i in range(600)]
    text = "\n\n".join(paragraphs) + "\n"
    pieces = split_large_text(text)
    assert "".join(pieces) == text and len(pieces) > 5
    assert all(p.endswith("\n\n") and len(p) >= LARGE_TEXT_CHARS for p in pieces[:-1])
    assert all(len(p) < LARGE_TEXT_CHARS + 2000 for p in pieces)
    lines = "".join(f"line {i} " + "x" * 80 + "\n" for i in range(4000))  # no blank line at all
    assert "".join(split_large_text(lines)) == lines and len(split_large_text(lines)) > 1
    (tmp_path / "book.txt").write_text(text)
    summary = run([tmp_path / "book.txt"], tmp_path / "out", tok, validation_fraction=0.2)
    assert summary.splits["validation"].documents >= 1
    assert summary.documents == len(pieces)


# ---- the split ---------------------------------------------------------------------------------
def test_split_is_by_document_and_deterministic(tmp_path: Path, tok: Tokenizer) -> None:
    texts = [f"document number {i} says {'ab' * (i % 7)}" for i in range(300)]
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    run([source], tmp_path / "a", tok, validation_fraction=0.1, seed=3)
    run([source], tmp_path / "b", tok, validation_fraction=0.1, seed=3)
    run([source], tmp_path / "c", tok, validation_fraction=0.1, seed=4)
    for name in ("train.bin", "validation.bin", "train.idx.npy", "validation.idx.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    chosen = validation_documents(300, 0.1, 3)
    assert 10 <= chosen.sum() <= 60
    for split, mask in (("train", ~chosen), ("validation", chosen)):
        data = TokenDataset(tmp_path / "a", split)
        wanted = [t for t, keep in zip(texts, mask) if keep]
        assert np.array_equal(np.asarray(data.tokens, dtype=np.int64), expected_tokens(tok, wanted))
        assert data.num_documents == len(wanted)
    other = TokenDataset(tmp_path / "c", "validation")
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(TokenDataset(tmp_path / "a", "validation").tokens))
    assert validation_documents(2, 0.01, 0).sum() == 1  # at least one when there are two or more
    assert validation_documents(1, 0.5, 0).sum() == 0  # a single document trains
    assert validation_documents(5, 0.0, 0).sum() == 0
    assert validation_documents(3, 0.99, 0).sum() == 2  # always one train document


def test_embedded_tokenizer_shards_equal_encode(tmp_path: Path, smollm2: tuple[Tokenizer, str]) -> None:
    tokenizer, source = smollm2
    assert source.endswith(".gguf")
    texts = ["Hello world!", "Ünïcödé — 中文 and emoji 🎉", "numbers 12345 and code: def f(x): return x"]
    write_jsonl(tmp_path / "d.jsonl", texts)
    summary = run([tmp_path / "d.jsonl"], tmp_path / "out", tokenizer, validation_fraction=0, tokenizer_name="smollm2")
    data = TokenDataset(tmp_path / "out", "train")
    assert np.array_equal(np.asarray(data.tokens, dtype=np.int64), expected_tokens(tokenizer, texts))
    assert data.meta["tokenizer"] == {
        "name": "smollm2", "source": None, "vocab_size": 49152, "eos_id": tokenizer.eos_token_id,
        "fingerprint": tokenizer_fingerprint(tokenizer),
    }
    assert summary.dtype == "uint16" and summary.tokenizer == "smollm2"
    data.check_tokenizer(tokenizer)
    # The same vocabulary saved as a Hugging Face directory matches; another vocabulary does not.
    tokenizer.save(tmp_path / "hf")
    from_dir, dir_source = load_tokenizer(tmp_path / "hf")
    assert dir_source == str(tmp_path / "hf")
    data.check_tokenizer(from_dir)
    with pytest.raises(HanlinError, match=r"'smollm2'.*'tiny'.*--tokenizer tiny"):
        data.check_tokenizer(byte_tokenizer(), name="tiny")


def test_tokenizer_mismatch_on_same_vocabulary_size(tmp_path: Path, tok: Tokenizer) -> None:
    run([write_jsonl(tmp_path / "d.jsonl", ["one", "two"])], tmp_path / "out", tok, tokenizer_name="bytes")
    data = TokenDataset(tmp_path / "out")
    data.check_tokenizer(byte_tokenizer())
    with pytest.raises(HanlinError, match="prepared with tokenizer 'bytes'.*'swapped'"):
        data.check_tokenizer(byte_tokenizer(swap=True), name="swapped")


def test_large_vocabulary_uses_uint32(tmp_path: Path) -> None:
    big = byte_tokenizer(vocab_size=70_000)
    summary = run([write_jsonl(tmp_path / "d.jsonl", ["x" * 10, "y" * 5])], tmp_path / "out", big)
    data = TokenDataset(tmp_path / "out", "train")
    assert summary.dtype == "uint32" and data.tokens.dtype == np.uint32
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * data.num_tokens


# ---- writing safely -----------------------------------------------------------------------------
def test_failed_prepare_leaves_nothing_and_keeps_the_old_dataset(tmp_path: Path, tok: Tokenizer) -> None:
    words = tokenizers.Tokenizer(WordLevel({"known": 0, "words": 1, "<eos>": 2}))  # no unknown token
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.add_special_tokens([AddedToken("<eos>", special=True)])
    narrow = Tokenizer(words, eos_token="<eos>")
    source = write_jsonl(tmp_path / "d.jsonl", ["known words"] * 3000 + ["unknown words"])
    with pytest.raises(HanlinError, match="tokenizer failed"):
        run([source], tmp_path / "new", narrow)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # no partial directory anywhere
    run([source], tmp_path / "old", tok)
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with pytest.raises(HanlinError, match="tokenizer failed"):
        run([source], tmp_path / "old", narrow, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "old"]


def test_overwrite_rules(tmp_path: Path, tok: Tokenizer) -> None:
    source = write_jsonl(tmp_path / "d.jsonl", [f"doc {i}" for i in range(20)])
    out = tmp_path / "out"
    run([source], out, tok, seed=1)
    meta = (out / "meta.json").read_text()
    with pytest.raises(HanlinError, match="not empty.*--overwrite"):
        run([source], out, tok, seed=2)
    assert (out / "meta.json").read_text() == meta
    run([source], out, tok, seed=2, overwrite=True)
    assert json.loads((out / "meta.json").read_text())["seed"] == 2
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(HanlinError, match="not a Hanlin dataset.*refusing"):
        run([source], other, tok, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    run([source], tmp_path / "empty", tok)  # an existing empty directory is fine
    with pytest.raises(HanlinError, match="inside"):
        run([out / "meta.json", source], out, tok, overwrite=True)
    with pytest.raises(HanlinError, match="is a file"):
        run([source], source, tok)


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors(tmp_path: Path, tok: Tokenizer) -> None:
    out = tmp_path / "out"
    with pytest.raises(HanlinError, match="nope.txt: no such file"):
        run([tmp_path / "nope.txt"], out, tok)
    with pytest.raises(HanlinError, match="no input"):
        run([], out, tok)
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(HanlinError, match="no documents found"):
        run([tmp_path / "blank.txt"], out, tok)
    write_jsonl(tmp_path / "chat.jsonl", ["hi"], field="prompt")
    with pytest.raises(HanlinError, match=r"chat.jsonl, line 1: no 'text' field \(fields: id, prompt\).*--text-field"):
        run([tmp_path / "chat.jsonl"], out, tok)
    assert run([tmp_path / "chat.jsonl"], out, tok, text_field="prompt").documents == 1
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(HanlinError, match="broken.jsonl, line 2: not valid JSON"):
        run([tmp_path / "broken.jsonl"], tmp_path / "o2", tok)
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(HanlinError, match=r"no 'text' column \(columns: content\)"):
        run([tmp_path / "t.parquet"], tmp_path / "o3", tok)
    with pytest.raises(HanlinError, match=r"validation fraction must be in \[0, 1\)"):
        run([tmp_path / "chat.jsonl"], tmp_path / "o4", tok, validation_fraction=1.0)
    assert not any((tmp_path / name).exists() for name in ("o2", "o3", "o4"))


def test_unreadable_files_are_skipped_with_a_warning(tmp_path: Path, tok: Tokenizer) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "in" / "fake.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "in" / "good.txt").write_text("good text")
    with pytest.warns(DataWarning, match=r"skipped 2 file\(s\).*fake.parquet.*latin1.txt \(not UTF-8"):
        summary = run([tmp_path / "in"], tmp_path / "out", tok)
    assert summary.documents == 1 and len(summary.skipped) == 2
    with pytest.warns(DataWarning), pytest.raises(HanlinError, match="no documents found"):
        run([tmp_path / "in" / "latin1.txt"], tmp_path / "out2", tok)


def test_dataset_directory_errors(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(HanlinError, match=r"missing: no such dataset directory.*hanlin data prepare"):
        TokenDataset(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(HanlinError, match=r"plain is not a prepared dataset \(no meta.json\).*hanlin data prepare"):
        TokenDataset(tmp_path / "plain")
    out = tmp_path / "out"
    run([write_jsonl(tmp_path / "d.jsonl", ["abc", "defg"])], out, tok)
    with pytest.raises(HanlinError, match="no 'test' split"):
        TokenDataset(out, "test")
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-2])
    with pytest.raises(HanlinError, match=r"train.bin has \d+ bytes.*incomplete or corrupt"):
        TokenDataset(out, "train")
    (out / "train.bin").write_bytes(data)
    (out / "train.idx.npy").write_bytes(b"garbage")
    with pytest.raises(HanlinError, match="unreadable document index"):
        TokenDataset(out, "train")
    (out / "meta.json").write_text("{not json")
    with pytest.raises(HanlinError, match="meta.json: unreadable"):
        TokenDataset(out, "train")


# ---- packed batches -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> Path:
    root = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(0)
    texts = ["".join(chr(97 + c) for c in rng.integers(0, 26, size=int(n))) for n in rng.integers(3, 40, size=60)]
    run([write_jsonl(root / "d.jsonl", texts)], root / "data", tok, validation_fraction=0.1)
    return root / "data"


def take(source: PackedBatches, n: int) -> list[LMBatch]:
    return [source.next_batch() for _ in range(n)]


def same(a: list[LMBatch], b: list[LMBatch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        and torch.equal(x.document_ids, y.document_ids) for x, y in zip(a, b)
    )


def test_packed_rows_cover_each_window_once_per_epoch(packed_dir: Path) -> None:
    data = TokenDataset(packed_dir, "train")
    seq_len = 16
    stream = PackedBatches(data, seq_len, micro_batch_size=1, seed=5)
    n = stream.num_windows
    assert n == (data.num_tokens - 1) // seq_len
    tokens = torch.from_numpy(np.asarray(data.tokens, dtype=np.int64))
    windows = {tuple(tokens[i * seq_len : i * seq_len + seq_len].tolist()) for i in range(n)}
    epoch0 = take(stream, n)
    assert {tuple(b.input_ids[0].tolist()) for b in epoch0} == windows and stream.epoch == 1
    epoch1 = take(stream, n)
    assert not same(epoch0, epoch1)  # a new order each epoch
    assert same(take(PackedBatches(data, seq_len, 1, seed=5), n), epoch0)
    assert not same(take(PackedBatches(data, seq_len, 1, seed=6), n), epoch0)
    batch = epoch0[0]
    assert batch.input_ids.dtype == batch.labels.dtype == batch.document_ids.dtype == torch.int64
    assert batch.input_ids.shape == (1, seq_len)


def test_labels_and_document_ids_at_document_boundaries(packed_dir: Path) -> None:
    data = TokenDataset(packed_dir, "train")
    for batch in take(PackedBatches(data, 24, micro_batch_size=4, seed=0), 10):
        ids, labels, docs = batch.input_ids, batch.labels, batch.document_ids
        at_eos = ids == EOS
        assert torch.equal(labels == IGNORE_INDEX, at_eos)  # an EOS predicts nothing; nothing else is masked
        assert torch.equal(labels[:, :-1][~at_eos[:, :-1]], ids[:, 1:][~at_eos[:, :-1]])
        steps = docs[:, 1:] - docs[:, :-1]
        assert torch.equal(steps, at_eos[:, :-1].long())  # a new document starts right after each EOS
        for row, row_docs in zip(ids, docs):  # document ids are the dataset's document indices
            present = row_docs.unique().tolist()
            for d in present:
                piece, document = row[row_docs == d].tolist(), data.document(d).tolist()
                if d == present[0]:  # the row starts inside it
                    assert document[len(document) - len(piece):] == piece or len(present) == 1
                elif d == present[-1]:  # the row ends inside it
                    assert document[: len(piece)] == piece
                else:
                    assert piece == document


def test_two_ranks_see_the_single_rank_rows(packed_dir: Path) -> None:
    data = TokenDataset(packed_dir, "train")
    single = PackedBatches(data, 12, micro_batch_size=4, seed=1)
    ranks = [PackedBatches(data, 12, micro_batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    steps = single.num_windows // 4 + 3  # past an epoch boundary
    for _ in range(steps):
        whole = single.next_batch()
        halves = [r.next_batch() for r in ranks]
        for name in ("input_ids", "labels", "document_ids"):
            assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(whole, name))
    assert single.state_dict()["epoch"] == 1
    assert single.state_dict() | {"micro_batch_size": 2, "world_size": 2} == ranks[0].state_dict()


@pytest.mark.parametrize("consumed", [3, "epoch_end"])
def test_resume_continues_the_stream_exactly(packed_dir: Path, consumed: int | str) -> None:
    data = TokenDataset(packed_dir, "train")
    reference = PackedBatches(data, 10, micro_batch_size=3, seed=7)
    k = reference.num_windows // 3 - 1 if consumed == "epoch_end" else consumed
    take(reference, k)
    state = json.loads(json.dumps(reference.state_dict()))  # checkpoints may store it as JSON
    resumed = PackedBatches(data, 10, micro_batch_size=3, seed=7)
    resumed.load_state_dict(state)
    assert same(take(resumed, 6), take(reference, 6))
    assert resumed.state_dict() == reference.state_dict()
    if consumed == "epoch_end":
        assert reference.epoch == 1


def test_resume_checks_what_the_stream_depends_on(packed_dir: Path) -> None:
    data = TokenDataset(packed_dir, "train")
    source = PackedBatches(data, 10, micro_batch_size=2, seed=7)
    take(source, 2)
    state = source.state_dict()
    with pytest.raises(HanlinError, match="data.seq_len=10, now 11"):
        PackedBatches(data, 11, 2, seed=7).load_state_dict(state)
    with pytest.raises(HanlinError, match="seed 7, now 8"):
        PackedBatches(data, 10, 2, seed=8).load_state_dict(state)
    with pytest.raises(HanlinError, match="dataset of"):
        PackedBatches(TokenDataset(packed_dir, "validation"), 10, 2, seed=7).load_state_dict(state)
    with pytest.raises(HanlinError, match="not a packed-batches state"):
        source.load_state_dict({"epoch": 0})
    regrouped = PackedBatches(data, 10, micro_batch_size=4, seed=7)  # same rows, grouped by four
    regrouped.load_state_dict(state)
    pairs = take(source, 4)
    quads = take(regrouped, 2)
    assert torch.equal(torch.cat([b.input_ids for b in pairs]), torch.cat([b.input_ids for b in quads]))


def test_too_little_data_and_bad_sizes(tmp_path: Path, tok: Tokenizer) -> None:
    run([write_jsonl(tmp_path / "d.jsonl", ["abcd"])], tmp_path / "out", tok)  # 5 tokens with EOS
    data = TokenDataset(tmp_path / "out", "train")
    with pytest.raises(HanlinError, match="has 5 tokens, but one row of seq_len 8 needs 9"):
        PackedBatches(data, 8, 2)
    with pytest.raises(HanlinError, match="micro_batch_size must be a positive integer"):
        PackedBatches(data, 2, 0)
    with pytest.raises(HanlinError, match=r"rank must be in \[0, 2\)"):
        PackedBatches(data, 2, 1, rank=2, world_size=2)
    batches = take(PackedBatches(data, 2, micro_batch_size=3, seed=0), 3)  # 2 windows: batches span epochs
    assert all(b.input_ids.shape == (3, 2) for b in batches)
    short = validation_batches(data, 8, 4)  # shorter than one window: one shorter row
    assert len(short) == 1 and short[0].input_ids.tolist() == [np.asarray(data.tokens[:4]).tolist()]
    empty = TokenDataset(tmp_path / "out", "validation")
    with pytest.raises(HanlinError, match="has 0 tokens"):
        validation_batches(empty, 8, 4)


def test_validation_batches_are_sequential_windows(packed_dir: Path) -> None:
    data = TokenDataset(packed_dir, "train")
    tokens = torch.from_numpy(np.asarray(data.tokens, dtype=np.int64))
    batches = validation_batches(data, 16, micro_batch_size=4)
    count = (data.num_tokens - 1) // 16
    rows = torch.cat([b.input_ids for b in batches])
    assert len(rows) == count and len(batches) == -(-count // 4)
    assert torch.equal(rows.flatten(), tokens[: count * 16])
    assert same(validation_batches(data, 16, 4, max_batches=2), batches[:2])
    split = [validation_batches(data, 16, 4, rank=r, world_size=2) for r in range(2)]
    assert same(split[0], batches[0::2]) and same(split[1], batches[1::2])


# ---- command line --------------------------------------------------------------------------------
def test_cli_prepare(tmp_path: Path, tok: Tokenizer) -> None:
    tok.save(tmp_path / "tiny-tokenizer")
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "d.jsonl", [f"cli document {i}" for i in range(40)])
    (tmp_path / "in" / "notes.csv").write_text("a,b\n")
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    args = ["data", "prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
            "--tokenizer", str(tmp_path / "tiny-tokenizer"), "--validation-fraction", "0.1", "--seed", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = TokenDataset(tmp_path / "out", "train")
    total = sum(len(f"cli document {i}".encode()) + 1 for i in range(40))
    for word in ("train", "validation", "total", f"{total:,}", "tokenizer", "1 skipped", "notes.csv"):
        assert word in result.output
    assert data.meta["seed"] == 3 and data.meta["tokenizer"]["name"] == str(tmp_path / "tiny-tokenizer")
    data.check_tokenizer(tok)
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and isinstance(again.exception, HanlinError) and "--overwrite" in str(again.exception)
    assert runner.invoke(app, [*args, "--overwrite", "--seed", "4"]).exit_code == 0
    assert TokenDataset(tmp_path / "out", "train").meta["seed"] == 4

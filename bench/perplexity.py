"""Quality of quantized weights: perplexity of the embedded model as fp32, int8, w8a8 and int4, and llama.cpp's Q4_1.

    python bench/perplexity.py [--windows 16] [--window 512] [--text ../shared/data/corpora/grimm_tales.txt]

Every engine scores the same token windows from an empty context (hanlin.eval.perplexity). Bars of the
speed issue: int8 within +2% of fp32, int4 within +6% of fp32 and within +1% of llama.cpp's Q4_1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import hanlin
from hanlin.checkpoints.registry import embedded_model_path
from hanlin.eval.perplexity import Perplexity, WindowLogits, model_logits, perplexity
from hanlin.models.quantized import quantize_model

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora" / "grimm_tales.txt"


def llama_cpp_logits(window: int, threads: int) -> WindowLogits | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(embedded_model_path("smollm2")), n_ctx=window, n_batch=window, n_ubatch=window,
                logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)

    def logits_of(chunk: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(chunk)
        return torch.from_numpy(np.array(llm.scores[: len(chunk)], dtype=np.float32))

    return logits_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--skip-chars", type=int, default=20_000, help="start this far into the text (past front matter)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="skip: llama.cpp int8 w8a8 int4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.text.exists():
        raise SystemExit(f"{args.text}: no such text file (pass --text)")

    fp32 = hanlin.load("smollm2")
    ids = fp32.tokenizer.encode(args.text.read_text()[args.skip_chars :])[: args.window * args.windows]
    engines: dict[str, WindowLogits] = {"hanlin fp32": model_logits(fp32.model)}
    for scheme in ("int8", "w8a8", "int4"):
        if scheme not in args.skip:
            engines[f"hanlin {scheme}"] = model_logits(hanlin.load("smollm2", quantize=scheme).model)
    if "int4" not in args.skip:
        # The GGUF is Q4_1, so "hanlin int4" computes with its own blocks; this row re-quantizes the fp32
        # (dequantized) weights with Hanlin's own 4-bit quantizer, group 32, the tied embedding included.
        requantized = hanlin.load("smollm2").model
        quantize_model(requantized, "int4", group=32)
        engines["hanlin int4, own quantizer"] = model_logits(requantized)
    if "llama.cpp" not in args.skip:
        llama = llama_cpp_logits(args.window, args.threads)
        if llama is None:
            print("llama-cpp-python is not installed: llama.cpp skipped")
        else:
            engines["llama.cpp Q4_1"] = llama

    results: dict[str, Perplexity] = {}
    for name, logits_of in engines.items():
        results[name] = perplexity(logits_of, ids, args.window)
        print(f"{name}: {results[name].perplexity:.3f}", flush=True)
    base = results["hanlin fp32"].perplexity
    llama_ppl = results["llama.cpp Q4_1"].perplexity if "llama.cpp Q4_1" in results else None
    first = next(iter(results.values()))
    print(f"\n{args.text.name}: {first.scored_tokens} scored tokens in {first.windows} windows of {args.window}\n")
    print("| weights | perplexity | vs fp32 | vs llama.cpp Q4_1 |\n|---|---|---|---|")
    for name, result in results.items():
        vs_llama = f"{(result.perplexity / llama_ppl - 1) * 100:+.2f}%" if llama_ppl else "-"
        print(f"| {name} | {result.perplexity:.3f} | {(result.perplexity / base - 1) * 100:+.2f}% | {vs_llama} |")


if __name__ == "__main__":
    main()

"""MoE prefill and decode speed: Hanlin vs transformers' OlmoeForCausalLM on the same random weights.

    python bench/moe.py [--threads 2] [--repeats 3] [--prompts 128 512] [--tokens 64]

An OLMoE-shaped model scaled to fit (64 experts, top-8, hidden 1024, expert width 512, 8 layers, 16 heads
x 64, a small vocabulary so that the numbers are about the MoE) is built with random weights in
transformers, saved with save_pretrained and loaded by Hanlin from that directory: both engines run the
same fp32 weights. Measured:

- prefill: one full forward over a T-token prompt (no cache), tokens/s;
- decode: batch-1 greedy decode of --tokens tokens after a short prompt, tokens/s after the first token —
  transformers through model.generate (its KV cache, eager attention), Hanlin through its engine
  (LLM.stream); plus Hanlin's raw one-token forward (no engine, no cache) as the floor of its step.

Runs are interleaved (A B A B ...) and each keeps its best, so a noisy neighbour hurts both alike; the
ratios are the result, the absolute numbers depend on the load (printed). transformers' default experts
implementation is the peer; the others it offers are reported beside it (batched_mm for decode only: it
copies the weights of every selected expert per token, gigabytes for a prompt).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from peers import machine_description, transformers_decode

VOCAB = 32000
SHAPE = dict(
    hidden_size=1024,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    max_position_embeddings=4096,
)


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """Token i spells "<i>": enough for Hanlin's loader, which wants a tokenizer.json beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({}))


def build_hf(directory: Path, vocab_size: int, layers: int, seed: int = 0):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    config = OlmoeConfig(
        **{**SHAPE, "num_hidden_layers": layers}, vocab_size=vocab_size, pad_token_id=0, bos_token_id=None,
        eos_token_id=None, tie_word_embeddings=False,
    )
    model = OlmoeForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    model.save_pretrained(directory)
    write_tokenizer(directory, vocab_size)
    return model


def hf_prefill(model, ids: torch.Tensor) -> Callable[[], float]:
    def run() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model(ids, use_cache=False)
            return ids.shape[1] / (time.perf_counter() - start)

    return run


def hanlin_prefill(model, ids: torch.Tensor) -> Callable[[], float]:
    def run() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model(ids)
            return ids.shape[1] / (time.perf_counter() - start)

    return run


def hanlin_forward_1(model, token: int, steps: int = 16) -> Callable[[], float]:
    """One-token forwards without engine or cache: the model's own cost per decode step, tokens/s."""
    ids = torch.tensor([[token]])

    def run() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            for _ in range(steps):
                model(ids)
            return steps / (time.perf_counter() - start)

    return run


def hanlin_decode(loaded, prompt_ids: list[int], tokens: int) -> Callable[[], float]:
    from hanlin.engine.sampling import SamplingParams
    from hanlin.llm import LLM

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm = LLM.from_loaded(loaded, max_num_seqs=1, enable_prefix_caching=False, kv_cache_mb=256)

    def run() -> float:
        for event in llm.stream(prompt_ids, params):
            if event.completion is not None:
                c = event.completion
                return (len(c.token_ids) - 1) / (c.seconds - c.first_token_seconds)
        raise AssertionError("the stream ended without a completion")

    return run


def with_experts(model, implementation: str, run: Callable[[], float]) -> Callable[[], float]:
    """run() with transformers' experts implementation switched for its duration."""

    def switched() -> float:
        before = model.config._experts_implementation
        model.set_experts_implementation(implementation)
        try:
            return run()
        finally:
            model.set_experts_implementation(before)

    return switched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512], help="prefill lengths")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens to decode")
    parser.add_argument("--decode-prompt", type=int, default=16, help="prompt length before decoding")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument(
        "--peers", nargs="+", default=None,
        help="transformers experts implementations to run (default: its default, plus eager or grouped_mm as a second"
        " peer; batched_mm is slower here and runs only when named)",
    )
    parser.add_argument(
        "--quantize", nargs="*", default=[], help="also run Hanlin with these weight schemes (e.g. int8), loaded from the same files"
    )
    parser.add_argument("--check", action="store_true", help="also compare the two engines' logits and tokens")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import hanlin

    with tempfile.TemporaryDirectory(prefix="hanlin-moe-bench-") as tmp:
        directory = Path(tmp)
        print(f"building a random OLMoE ({args.layers} layers, vocab {args.vocab}) in {directory} ...", flush=True)
        hf_model = build_hf(directory, args.vocab, args.layers)
        default_impl = hf_model.config._experts_implementation
        loaded = hanlin.load(directory)

        generator = torch.Generator().manual_seed(1)
        prompt = torch.randint(1, args.vocab, (1, max(args.prompts)), generator=generator)
        decode_prompt = prompt[0, : args.decode_prompt].tolist()
        if args.check:
            with torch.inference_mode():
                a = hf_model(prompt[:, :64], use_cache=False).logits
                b = loaded.model(prompt[:, :64])
            print(f"max |Δlogit| over 64 tokens: {(a - b).abs().max().item():.3g}")

        peers = args.peers or [default_impl] + [i for i in ("grouped_mm", "eager") if i != default_impl]
        hanlins = {"hanlin fp32": loaded}
        for scheme in args.quantize:
            hanlins[f"hanlin {scheme}"] = hanlin.load(directory, quantize=scheme)
        for f in directory.glob("*.safetensors"):  # every engine holds its own tensors now; free the disk
            f.unlink()
        engines: dict[str, dict[str, Callable[[], float]]] = {name: {} for name in hanlins}
        for impl in peers:
            engines[f"transformers {impl}"] = {}
        for T in args.prompts:
            ids = prompt[:, :T]
            for name, model in hanlins.items():
                engines[name][f"prefill {T}"] = hanlin_prefill(model.model, ids)
            for impl in peers:
                if impl == "batched_mm":  # gathers one [2F, D] + [D, F] weight copy per (token, expert): GBs
                    continue
                engines[f"transformers {impl}"][f"prefill {T}"] = with_experts(hf_model, impl, hf_prefill(hf_model, ids))
        decode = f"decode {args.tokens}"
        for name, model in hanlins.items():
            engines[name][decode] = hanlin_decode(model, decode_prompt, args.tokens)
        for impl in peers:
            engines[f"transformers {impl}"][decode] = with_experts(
                hf_model, impl, transformers_decode(hf_model, decode_prompt, args.tokens, pad_token_id=0)
            )
        for name, model in hanlins.items():
            engines[name]["1-token forward"] = hanlin_forward_1(model.model, decode_prompt[0])

        if args.check:
            hanlin_tokens = hanlin.LLM.from_loaded(loaded, max_num_seqs=1).generate(
                [decode_prompt], temperature=0.0, max_tokens=args.tokens, ignore_eos=True
            )[0].token_ids
            with torch.inference_mode():
                hf_tokens = hf_model.generate(
                    torch.tensor([decode_prompt]), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                    do_sample=False, pad_token_id=0,
                )[0, len(decode_prompt) :].tolist()
            same = next((i for i, (a, b) in enumerate(zip(hanlin_tokens, hf_tokens)) if a != b), len(hf_tokens))
            print(f"greedy tokens identical for the first {same} of {args.tokens}")

        loads = [load_average()]
        for runs in engines.values():  # warm-up
            for run in runs.values():
                run()
        best: dict[str, dict[str, float]] = {name: {} for name in engines}
        for _ in range(args.repeats):
            for metric in engines["hanlin fp32"]:
                for name, runs in engines.items():
                    if metric in runs:
                        best[name][metric] = max(best[name].get(metric, 0.0), runs[metric]())
            loads.append(load_average())

    print(f"\ncommand: python {' '.join(sys.argv)}")
    print(f"machine: {machine_description()}")
    print(
        f"model: OLMoE-like, {args.layers} layers, hidden 1024, 16x64 heads, 64 experts top-8, expert width 512,"
        f" vocab {args.vocab}, fp32, random weights; {args.threads} threads, best of {args.repeats}, interleaved"
    )
    print(f"transformers default experts implementation: {default_impl}; attention: eager")
    print(f"load average (1/5/15 min) before and after each round: {' | '.join(loads)}\n")
    peer_names = [n for n in engines if n.startswith("transformers")]
    header = "| metric | engine | tokens/s | " + " | ".join(f"vs {n}" for n in peer_names) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for metric in engines["hanlin fp32"]:
        for name in engines:
            rate = best[name].get(metric)
            if rate is None:
                continue
            ratios = [f"{rate / best[p][metric]:.2f}x" if best[p].get(metric) else "-" for p in peer_names]
            print(f"| {metric} | {name} | {rate:.1f} | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()

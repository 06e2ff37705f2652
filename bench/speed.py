"""CPU inference speed on the embedded model: Hanlin vs llama.cpp vs HF transformers, peers in the same run.

    python bench/speed.py [--threads 2] [--repeats 3] [--only decode batch prefill] [--schemes fp32 int8 int4]

Three measurements (the speed issue's bars 1-3):
  decode   batch-1 greedy decode, 128 tokens after a chat prompt: decode tokens/s after the first token.
  batch    16 different prompts at once through Hanlin's engine (continuous batching), against llama.cpp
           running the same 16 prompts one after another: output tokens / wall time, prefill included.
  prefill  one 1,024-token prompt: prompt tokens / time to its first output token.
Hanlin fp32 and transformers run the GGUF's weights dequantized to fp32; Hanlin int8 quantizes those per
output channel at load; Hanlin int4 uses the GGUF's Q4_1 blocks as they are (tensors stored otherwise are
quantized to 4 bits, group 32); llama.cpp runs the GGUF as it is. Runs are interleaved (A B C A B C …) and
each engine keeps its best, so a noisy neighbour hurts all of them alike.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

import hanlin
from hanlin.checkpoints.registry import embedded_model_path
from hanlin.llm import LLM
from peers import machine_description, transformers_decode

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TOPICS = ["a lighthouse keeper", "a lost cat", "a chess player", "a baker", "a pilot", "a gardener", "a robot",
          "a sailor", "a painter", "a teacher", "a mountain guide", "a librarian", "a detective", "a farmer",
          "an astronaut", "a violinist"]
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora" / "gutenberg_big.txt"

Runner = Callable[[], float]


def chat_ids(tokenizer: hanlin.Tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True)


def long_prompt_ids(tokenizer: hanlin.Tokenizer, length: int) -> list[int]:
    text = CORPUS.read_text()[200_000:300_000] if CORPUS.exists() else " ".join(TOPICS) * 400
    ids = tokenizer.encode(text)
    if len(ids) < length:
        raise SystemExit(f"the prompt text has only {len(ids)} tokens, {length} are needed")
    return ids[:length]


# ---- Hanlin ----------------------------------------------------------------------------------------


def hanlin_decode(llm: LLM, prompt_ids: list[int], tokens: int) -> Runner:
    params = llm.sampling_params(temperature=0.0, max_tokens=tokens, ignore_eos=True)

    def run() -> float:
        for event in llm.stream(prompt_ids, params):
            if event.completion is not None:
                c = event.completion
                return (len(c.token_ids) - 1) / (c.seconds - c.first_token_seconds)
        raise AssertionError("the stream ended without a completion")

    return run


def hanlin_batch(llm: LLM, prompts: list[list[int]], tokens: int) -> Runner:
    def run() -> float:
        start = time.perf_counter()
        completions = llm.generate(prompts, temperature=0.0, max_tokens=tokens, ignore_eos=True)
        elapsed = time.perf_counter() - start
        return sum(len(c.choices[0].token_ids) for c in completions) / elapsed

    return run


def hanlin_prefill(llm: LLM, prompt_ids: list[int]) -> Runner:
    params = llm.sampling_params(temperature=0.0, max_tokens=1, ignore_eos=True)

    def run() -> float:
        start = time.perf_counter()
        for event in llm.stream(prompt_ids, params):
            if event.completion is not None:
                return len(prompt_ids) / (time.perf_counter() - start)
        raise AssertionError("the stream ended without a completion")

    return run


# ---- llama.cpp (llama-cpp-python) -------------------------------------------------------------------


def llama_cpp(threads: int, n_ctx: int = 2048):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=str(embedded_model_path("smollm2")), n_ctx=n_ctx, n_threads=threads,
                 n_threads_batch=threads, verbose=False)


def llama_generate(llm, prompt_ids: list[int], tokens: int) -> list[float]:
    """Times of each streamed token of one greedy completion (EOS banned so it runs to `tokens`)."""
    llm.reset()
    times = []
    for _ in llm.create_completion(prompt_ids, max_tokens=tokens, temperature=0.0, stream=True,
                                   logit_bias={llm.token_eos(): -1e9}):
        times.append(time.perf_counter())
    return times


def llama_decode(llm, prompt_ids: list[int], tokens: int) -> Runner:
    def run() -> float:
        times = llama_generate(llm, prompt_ids, tokens)
        return (len(times) - 1) / (times[-1] - times[0])

    return run


def llama_sequential(llm, prompts: list[list[int]], tokens: int) -> Runner:
    def run() -> float:
        start = time.perf_counter()
        produced = sum(len(llama_generate(llm, p, tokens)) for p in prompts)
        return produced / (time.perf_counter() - start)

    return run


def llama_prefill(llm, prompt_ids: list[int]) -> Runner:
    def run() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt_ids)
        return len(prompt_ids) / (time.perf_counter() - start)

    return run


# ---- transformers ------------------------------------------------------------------------------------


def transformers_model():
    from transformers import AutoModelForCausalLM

    path = embedded_model_path("smollm2")
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="eager", dtype=torch.float32
    ).eval()


def transformers_prefill(model, prompt_ids: list[int]) -> Runner:
    def run() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model(torch.tensor([prompt_ids]), logits_to_keep=1)
            return len(prompt_ids) / (time.perf_counter() - start)

    return run


# ---- driver ------------------------------------------------------------------------------------------


def best_of(runners: dict[str, Runner], repeats: int) -> dict[str, float]:
    for runner in runners.values():  # warm-up
        runner()
    best = {name: 0.0 for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            best[name] = max(best[name], runner())
    return best


def table(title: str, unit: str, best: dict[str, float]) -> None:
    llama = next((v for k, v in best.items() if k.startswith("llama.cpp")), None)
    hf = next((v for k, v in best.items() if k.startswith("transformers")), None)
    print(f"\n{title}\n\n| engine | {unit} | vs llama.cpp | vs transformers |\n|---|---|---|---|")
    for name, rate in best.items():
        vs_llama = f"{rate / llama:.2f}x" if llama else "-"
        vs_hf = f"{rate / hf:.2f}x" if hf else "-"
        print(f"| {name} | {rate:.1f} | {vs_llama} | {vs_hf} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per decode run")
    parser.add_argument("--batch-tokens", type=int, default=64, help="output tokens per prompt in the batch run")
    parser.add_argument("--prefill", type=int, default=1024, help="prompt tokens of the prefill run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=["decode", "batch", "prefill"])
    parser.add_argument("--schemes", nargs="*", default=["fp32", "int8", "int4"], help="Hanlin weight formats")
    parser.add_argument("--skip", nargs="*", default=[], help="peers to skip: hf llama.cpp")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    llms = {
        scheme: LLM.from_loaded(hanlin.load("smollm2", quantize=None if scheme == "fp32" else scheme),
                                max_num_seqs=16, enable_prefix_caching=False)
        for scheme in args.schemes
    }
    tokenizer = next(iter(llms.values())).tokenizer
    llama = None if "llama.cpp" in args.skip else llama_cpp(args.threads, n_ctx=max(2048, args.prefill + 64))
    hf = None if "hf" in args.skip else transformers_model()
    if llama is None and "llama.cpp" not in args.skip:
        print("llama-cpp-python is not installed: llama.cpp skipped")
    print(f"machine: {machine_description()}; {args.threads} threads, best of {args.repeats}")

    if "decode" in args.only:
        prompt = chat_ids(tokenizer, PROMPT)
        runners = {f"hanlin {s}": hanlin_decode(llm, prompt, args.tokens) for s, llm in llms.items()}
        if llama is not None:
            runners["llama.cpp Q4_1"] = llama_decode(llama, prompt, args.tokens)
        if hf is not None:
            runners["transformers fp32 eager"] = transformers_decode(hf, prompt, args.tokens, pad_token_id=2)
        table(f"Batch-1 decode: {len(prompt)}-token prompt, {args.tokens} greedy tokens", "decode tok/s",
              best_of(runners, args.repeats))

    if "batch" in args.only:
        prompts = [chat_ids(tokenizer, f"Write a short story about {topic}.") for topic in TOPICS]
        runners = {f"hanlin {s} (16 at once)": hanlin_batch(llm, prompts, args.batch_tokens) for s, llm in llms.items()}
        if llama is not None:
            runners["llama.cpp Q4_1 (16 in sequence)"] = llama_sequential(llama, prompts, args.batch_tokens)
        table(f"16 prompts, {args.batch_tokens} greedy tokens each", "output tok/s", best_of(runners, args.repeats))

    if "prefill" in args.only:
        prompt = long_prompt_ids(tokenizer, args.prefill)
        runners = {f"hanlin {s}": hanlin_prefill(llm, prompt) for s, llm in llms.items()}
        if llama is not None:
            runners["llama.cpp Q4_1"] = llama_prefill(llama, prompt)
        if hf is not None:
            runners["transformers fp32 eager"] = transformers_prefill(hf, prompt)
        table(f"Prefill of a {args.prefill}-token prompt", "prompt tok/s", best_of(runners, args.repeats))


if __name__ == "__main__":
    main()

"""Batch-1 greedy decode speed on the embedded model: Hanlin vs HF transformers vs llama.cpp, one run.

    python bench/decode.py [--tokens 128] [--repeats 3] [--threads 2]

Hanlin and transformers run the same dequantized GGUF weights in fp32; Hanlin int8 quantizes those
weights per channel at load; llama.cpp runs the GGUF as it is (Q4_1). Engines are interleaved
(A B C A B C …) and each keeps its best run, so a noisy neighbour hurts all of them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

import hanlin
from hanlin.checkpoints.registry import embedded_model_path
from hanlin.engine.sampling import SamplingParams
from hanlin.llm import LLM

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def machine_description() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}"


def hanlin_runner(loaded: hanlin.LoadedModel, prompt_ids: list[int], tokens: int) -> Callable[[], float]:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm = LLM.from_loaded(loaded, max_num_seqs=1)

    def run() -> float:
        for event in llm.stream(prompt_ids, params):
            if event.completion is not None:
                c = event.completion
                return (len(c.token_ids) - 1) / (c.seconds - c.first_token_seconds)
        raise AssertionError("the stream ended without a completion")

    return run


def transformers_runner(prompt_ids: list[int], tokens: int) -> Callable[[], float]:
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    path = embedded_model_path("smollm2")
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="eager", dtype=torch.float32
    ).eval()

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            self.times.append(time.perf_counter())

    def run() -> float:
        clock = Clock()
        with torch.inference_mode():
            model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                streamer=clock, pad_token_id=2,
            )
        # times[0]: prompt echoed; times[1]: first new token; times[-1]: end.
        return (tokens - 1) / (clock.times[-1] - clock.times[1])

    return run


def llama_cpp_runner(prompt_ids: list[int], tokens: int, threads: int) -> Callable[[], float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(embedded_model_path("smollm2")), n_ctx=1024, n_threads=threads, verbose=False)
    eos = llm.token_eos()

    def run() -> float:
        llm.reset()
        times = []
        for _ in llm.create_completion(
            prompt_ids, max_tokens=tokens, temperature=0.0, stream=True, logit_bias={eos: -1e9}
        ):
            times.append(time.perf_counter())
        return (len(times) - 1) / (times[-1] - times[0])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="engines to skip: hf llama.cpp int8")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp32 = hanlin.load("smollm2")
    prompt_ids = fp32.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True)
    runners: dict[str, Callable[[], float]] = {"hanlin fp32": hanlin_runner(fp32, prompt_ids, args.tokens)}
    if "int8" not in args.skip:
        runners["hanlin int8"] = hanlin_runner(hanlin.load("smollm2", quantize="int8"), prompt_ids, args.tokens)
    if "hf" not in args.skip:
        runners["transformers fp32 eager"] = transformers_runner(prompt_ids, args.tokens)
    if "llama.cpp" not in args.skip:
        llama = llama_cpp_runner(prompt_ids, args.tokens, args.threads)
        if llama is None:
            print("llama-cpp-python is not installed: llama.cpp column skipped")
        else:
            runners["llama.cpp Q4_1"] = llama

    for runner in runners.values():  # warm-up
        runner()
    best = {name: 0.0 for name in runners}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            best[name] = max(best[name], runner())

    print(f"\nmachine: {machine_description()}")
    print(f"prompt: {len(prompt_ids)} tokens, {args.tokens} greedy tokens, batch 1, {args.threads} threads, best of {args.repeats}\n")
    hf = best.get("transformers fp32 eager")
    llama = best.get("llama.cpp Q4_1")
    print(f"| engine | decode tok/s | vs transformers | vs llama.cpp |\n|---|---|---|---|")
    for name, rate in best.items():
        vs_hf = f"{rate / hf:.2f}x" if hf else "-"
        vs_llama = f"{rate / llama:.2f}x" if llama else "-"
        print(f"| {name} | {rate:.1f} | {vs_hf} | {vs_llama} |")


if __name__ == "__main__":
    main()

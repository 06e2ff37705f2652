"""Training speed: Hanlin vs transformers on the same architecture and the same weights, dense and MoE.

    python bench/train.py [--threads 2] [--steps 8] [--warmup 2] [--models dense moe] [--experts eager] [--quick]

Two ~20M-parameter configs (vocab 8192, hidden 384, 8 layers, 6 heads of 64):
- dense: Llama-like, SwiGLU width 1024 (20.5M parameters);
- moe: the same with 8 experts of width 512, top-2, renormalised (Mixtral-like: 48.8M total, 20.5M active,
  so both do the same FLOPs per token).

Each is built with Hanlin's init (hanlin.train.init), saved with Hanlin's HF exporter and loaded by
transformers (LlamaForCausalLM / MixtralForCausalLM, its default attention and experts implementations), so both
frameworks start from identical fp32 weights. A training step is forward + backward + gradient clipping (1.0) +
AdamW step on micro-batch 8 x seq 256 of random tokens (the same batch for both):

- Hanlin: its Transformer, hanlin.train.losses.lm_loss (cross-entropy + MoE load-balancing and z-losses at the
  default coefficients) and hanlin.train.optim.build_optimizer (AdamW, decay / no-decay groups, fused kernel);
- transformers: model(input_ids).logits, F.cross_entropy, plus 0.01 x its aux_loss (output_router_logits) for
  Mixtral, in a plain PyTorch loop with torch.optim.AdamW over the same decay / no-decay groups (its default
  implementation, foreach).

Steps are interleaved one by one (A B A B ..., the order alternating) and timed alone: tokens/s = 2048 / seconds,
reported for each trainee's best step (the closest to a quiet machine) and its median; a noisy neighbour hurts all
alike. MFU = best tokens/s x training FLOPs per token (hanlin.train.metrics.flops_per_token: 6 x active matmul
parameters + attention) / peak, with peak the best measured FLOP/s of a 1024^3 fp32 matmul on the same threads
(measured between steps). --experts adds transformers' other MoE experts implementations as further peers
(the ratios stay against its default); --profile prints torch.profiler's top operators of one Hanlin MoE step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from peers import machine_description

SEQ = 256
MICRO_BATCH = 8
VOCAB = 8192
SHAPE = dict(hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=6, intermediate_size=1024,
             max_position_embeddings=1024, rms_norm_eps=1e-5)
HF_AUX_LOSS_COEF = 0.01  # Hanlin's default moe.aux_loss_coef
TOKENS = MICRO_BATCH * SEQ  # per training step


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def model_config(kind: str, vocab: int):
    from hanlin.config import ModelConfig, MoEConfig

    moe = None
    if kind == "moe":
        moe = MoEConfig(num_experts=8, top_k=2, expert_dim=SHAPE["intermediate_size"] // 2, norm_topk_prob=True)
    return ModelConfig(vocab_size=vocab, **SHAPE, moe=moe)


def batches(vocab: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """Token rows [B, T + 1]: inputs are [:, :-1], targets [:, 1:]."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (MICRO_BATCH, SEQ + 1), generator=generator) for _ in range(count)]


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Hanlin's rule for the peer too: matrices decay; norms, biases and embeddings do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and "embed_tokens" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Trainee:
    """One framework's model, optimizer and step function; step(tokens) returns the step's cross-entropy."""

    name: str
    step: Callable[[torch.Tensor], float]


def hanlin_trainee(model, config) -> Trainee:
    from hanlin.train.batch import LMBatch
    from hanlin.train.config import load_config
    from hanlin.train.losses import lm_loss
    from hanlin.train.optim import build_optimizer

    train_config = load_config(None, ["steps=1000"])
    optimizer = build_optimizer(model, train_config, config)
    model.train()

    def step(tokens: torch.Tensor) -> float:
        batch = LMBatch(tokens[:, :-1], tokens[:, 1:])
        out = lm_loss(model, batch, train_config.moe)
        cross_entropy = out.loss_sum / out.items
        loss = cross_entropy if out.extra_loss is None else cross_entropy + out.extra_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return cross_entropy.item()

    fused = optimizer.defaults.get("fused")
    return Trainee(f"hanlin (AdamW {'fused' if fused else 'foreach'})", step)


def transformers_trainee(model, is_moe: bool, experts: str | None = None) -> Trainee:
    from hanlin.train.config import OptimConfig

    optim = OptimConfig()
    optimizer = torch.optim.AdamW(decay_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                  eps=optim.eps)
    if experts is not None:
        model.set_experts_implementation(experts)
    model.train()
    vocab = model.config.vocab_size

    def step(tokens: torch.Tensor) -> float:
        out = model(input_ids=tokens[:, :-1], output_router_logits=True) if is_moe else model(input_ids=tokens[:, :-1])
        cross_entropy = F.cross_entropy(out.logits.reshape(-1, vocab).float(), tokens[:, 1:].reshape(-1))
        loss = cross_entropy + HF_AUX_LOSS_COEF * out.aux_loss if is_moe else cross_entropy
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return cross_entropy.item()

    label = f"transformers{' ' + experts + ' experts' if experts else ''} (AdamW foreach)"
    return Trainee(label, step)


def build_trainees(kind: str, vocab: int, directory: Path, extra_experts: list[str]) -> tuple[list[Trainee], str]:
    """Hanlin's trainee, then transformers' (its defaults), then transformers' with other experts implementations
    (each its own model copy, loaded from the same files); and a description of the models."""
    from transformers import AutoModelForCausalLM

    from hanlin.checkpoints.hf import save_hf_directory
    from hanlin.models import Transformer
    from hanlin.train.init import init_weights

    config = model_config(kind, vocab)
    model = Transformer(config)
    init_weights(model, seed=0)
    save_hf_directory(config, model, directory / kind)
    peer = AutoModelForCausalLM.from_pretrained(directory / kind, dtype=torch.float32)
    trainees = [hanlin_trainee(model, config), transformers_trainee(peer, kind == "moe")]
    implementation = f"attention {peer.config._attn_implementation}"
    if kind == "moe":
        default = peer.config._experts_implementation
        implementation += f", experts {default}"
        for experts in (e for e in extra_experts if e != default):
            other = AutoModelForCausalLM.from_pretrained(directory / kind, dtype=torch.float32)
            trainees.append(transformers_trainee(other, True, experts))
    total, active = config.parameter_counts()
    description = (f"{total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active); transformers "
                   f"{type(peer).__name__} ({implementation})")
    return trainees, description


def matmul_peak(n: int = 1024) -> float:
    """FLOP/s of an n^3 fp32 matmul on the current threads, best of 6."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def timed_step(trainee: Trainee, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    trainee.step(tokens)
    return time.perf_counter() - start


def profile_hanlin_moe(vocab: int) -> None:
    """torch.profiler's top operators (self CPU time) over one Hanlin MoE training step after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    from hanlin.models import Transformer
    from hanlin.train.init import init_weights

    config = model_config("moe", vocab)
    model = Transformer(config)
    init_weights(model, seed=0)
    trainee = hanlin_trainee(model, config)
    rows = batches(vocab, 2, seed=1)
    trainee.step(rows[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainee.step(rows[1])
    print("\nHanlin MoE training step, top operators by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per trainee")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per trainee first")
    parser.add_argument("--models", nargs="+", choices=["dense", "moe"], default=["dense", "moe"])
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument(
        "--experts", nargs="*", default=[],
        help="also train transformers' MoE with these experts implementations (e.g. eager batched_mm)",
    )
    parser.add_argument("--quick", action="store_true", help="1 warm-up step and 3 timed steps per trainee")
    parser.add_argument("--profile", action="store_true", help="also profile one Hanlin MoE step")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.steps = 1, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from hanlin.train.metrics import flops_per_token

    peak = matmul_peak()  # re-measured after every step; the best is the peak (a quiet moment, like the rates)
    rates: dict[str, list[tuple[str, float, float]]] = {}
    details: dict[str, str] = {}
    loads = [load_average()]
    with tempfile.TemporaryDirectory(prefix="hanlin-train-bench-") as tmp:
        for kind in args.models:
            trainees, details[kind] = build_trainees(kind, args.vocab, Path(tmp), args.experts)
            warm = batches(args.vocab, args.warmup, seed=1)
            first = [(t.name.split()[0], t.step(warm[0])) for t in trainees]  # same weights and batch: same loss
            details[kind] += "; first-step cross-entropy " + ", ".join(f"{n} {v:.6f}" for n, v in first[:2])
            details[kind] += f"; {flops_per_token(model_config(kind, args.vocab), SEQ) / 1e6:.1f} MFLOP per token"
            for tokens in warm[1:]:
                for trainee in trainees:
                    trainee.step(tokens)
            times: dict[str, list[float]] = {t.name: [] for t in trainees}
            for index, tokens in enumerate(batches(args.vocab, args.steps, seed=100)):
                for trainee in trainees if index % 2 == 0 else trainees[::-1]:
                    times[trainee.name].append(timed_step(trainee, tokens))
                peak = max(peak, matmul_peak())
            loads.append(load_average())
            print(f"{kind}: " + ", ".join(f"{n} best {TOKENS / min(v):.0f} tok/s" for n, v in times.items()),
                  flush=True)
            rates[kind] = [(name, TOKENS / min(v), TOKENS / statistics.median(v)) for name, v in times.items()]
            del trainees

    print(f"\ncommand: python {' '.join(sys.argv)}")
    print(f"machine: {machine_description()}")
    print(f"threads: {args.threads}; micro-batch {MICRO_BATCH} x seq {SEQ}, fp32; {args.warmup} warm-up steps, then "
          f"{args.steps} timed steps per trainee, interleaved step by step (order alternating)")
    print(f"peak for MFU: {peak / 1e9:.1f} GFLOP/s (1024^3 fp32 matmul, best of the measurements between steps)")
    print(f"load average (1/5/15 min) at the start and after each model's timed steps: {' | '.join(loads)}")
    for kind in rates:
        print(f"{kind}: {details[kind]}")
    print("\n| model | trainer | tokens/s (best step) | MFU | vs transformers | tokens/s (median) | vs transformers |")
    print("|---|---|---|---|---|---|---|")
    for kind, rows in rates.items():
        _, peer_best, peer_median = rows[1]
        per_token = flops_per_token(model_config(kind, args.vocab), SEQ)
        for name, best, median in rows:
            print(f"| {kind} | {name} | {best:.0f} | {100 * best * per_token / peak:.1f}% | {best / peer_best:.2f}x | "
                  f"{median:.0f} | {median / peer_median:.2f}x |")
    if args.profile:
        profile_hanlin_moe(args.vocab)


if __name__ == "__main__":
    main()

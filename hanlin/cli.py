"""The `hanlin` command line: chat, generate and info. Every option can also come from HANLIN_<OPTION>."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from hanlin.errors import HanlinError

if TYPE_CHECKING:
    from hanlin.api import LoadedModel
    from hanlin.config import ModelConfig
    from hanlin.engine.sampling import SamplingParams

app = typer.Typer(
    name="hanlin",
    help="Hanlin: a self-hostable LLM stack.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


def _option(*names: str, env: str, help: str, **kwargs: Any) -> Any:
    return typer.Option(*names, envvar=f"HANLIN_{env}", help=help, show_envvar=True, **kwargs)


ModelOption = Annotated[str, _option("--model", "-m", env="MODEL", help="Model name (smollm2), .gguf file or Hugging Face directory.")]
Temperature = Annotated[float, _option("--temperature", env="TEMPERATURE", help="Sampling temperature; 0 = greedy.")]
TopP = Annotated[float, _option("--top-p", env="TOP_P", help="Nucleus sampling mass in (0, 1].")]
TopK = Annotated[int, _option("--top-k", env="TOP_K", help="Keep the k most likely tokens; 0 = off.")]
MinP = Annotated[float, _option("--min-p", env="MIN_P", help="Drop tokens below min-p × the best token's probability.")]
RepetitionPenalty = Annotated[float, _option("--repetition-penalty", env="REPETITION_PENALTY", help="> 1 discourages tokens already seen; 1 = off.")]
PresencePenalty = Annotated[float, _option("--presence-penalty", env="PRESENCE_PENALTY", help="Subtracted once from generated tokens' logits, in [-2, 2].")]
FrequencyPenalty = Annotated[float, _option("--frequency-penalty", env="FREQUENCY_PENALTY", help="Subtracted per occurrence of a generated token, in [-2, 2].")]
Seed = Annotated[Optional[int], _option("--seed", env="SEED", help="Random seed for reproducible sampling.")]  # noqa: UP007 (typer)
MaxTokens = Annotated[int, _option("--max-tokens", "-n", env="MAX_TOKENS", help="Most tokens to generate per reply.")]
Stop = Annotated[Optional[list[str]], _option("--stop", env="STOP", help="Stop when this string is generated (repeatable).")]  # noqa: UP007
JsonOutput = Annotated[bool, _option("--json", env="JSON", help="Print one JSON object instead of text.")]
Device = Annotated[Optional[str], _option("--device", env="DEVICE", help="torch device (cpu, cuda, ...); default: the loader's choice.")]  # noqa: UP007


def sampling_params(**values: Any) -> SamplingParams:
    """Build and validate SamplingParams; a bad value becomes a HanlinError naming its command-line option."""
    from hanlin.engine.sampling import SamplingParams

    params = SamplingParams(**{k: v for k, v in values.items() if v is not None})
    try:
        params.validate()
    except ValueError as error:
        field_name, _, rest = str(error).partition(" ")
        if field_name in {f.name for f in fields(SamplingParams)}:
            raise HanlinError(f"--{field_name.replace('_', '-')} {rest}") from None
        raise HanlinError(str(error)) from None
    return params


def load_model(name: str, device: str | None = None) -> LoadedModel:
    import hanlin

    start = time.perf_counter()
    loaded = hanlin.load(name, device=device, progress=sys.stderr.isatty())
    if not getattr(loaded, "load_seconds", 0.0):
        loaded.load_seconds = time.perf_counter() - start  # type: ignore[attr-defined]
    return loaded


def chat_prompt_ids(loaded: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return loaded.tokenizer.encode(text, add_special_tokens=False)


def has_chat_template(loaded: LoadedModel) -> bool:
    return bool(getattr(loaded.tokenizer, "chat_template", None))


def model_label(loaded: LoadedModel, name: str) -> str:
    from pathlib import Path

    return name if name == Path(loaded.source).name or "/" in name else f"{name} ({Path(loaded.source).name})"


# ---- chat ---------------------------------------------------------------------------------------

CHAT_HELP = "/reset clears the conversation · /system TEXT sets the system prompt · /exit quits (or Ctrl-D)"


@app.command()
def chat(
    model: ModelOption = "smollm2",
    system: Annotated[Optional[str], _option("--system", "-s", env="SYSTEM", help="System prompt.")] = None,  # noqa: UP007
    temperature: Temperature = 0.7,
    top_p: TopP = 0.9,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    presence_penalty: PresencePenalty = 0.0,
    frequency_penalty: FrequencyPenalty = 0.0,
    seed: Seed = None,
    max_tokens: MaxTokens = 512,
    device: Device = None,
) -> None:
    """Talk to a model: a multi-turn conversation, replies streamed as they are generated."""
    from hanlin.generate import generate_stream

    params = sampling_params(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed, max_tokens=max_tokens,
    )
    loaded = load_model(model, device)
    interactive = sys.stdin.isatty()
    stderr.print(
        f"[bold]{model_label(loaded, model)}[/] · {loaded.config.model_type} · loaded in {loaded.load_seconds:.1f}s · "
        f"temperature {params.temperature}, top-p {params.top_p}, top-k {params.top_k}, min-p {params.min_p}, "
        f"max {params.max_tokens} tokens" + (f", seed {params.seed}" if params.seed is not None else "")
    )
    if interactive:
        stderr.print(f"[dim]{CHAT_HELP}[/]")
    messages: list[dict[str, str]] = _initial_messages(system)

    while True:
        line = _read_line(interactive)
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = _initial_messages(system)
            stderr.print("[dim]conversation cleared[/]")
            continue
        if line == "/system" or line.startswith("/system "):
            system = line[len("/system") :].strip() or None
            messages = _initial_messages(system)
            stderr.print(f"[dim]system prompt {'set' if system else 'cleared'}; conversation cleared[/]")
            continue
        if line.startswith("/") and line.split()[0] in ("/help", "/?"):
            stderr.print(CHAT_HELP)
            continue

        messages.append({"role": "user", "content": line})
        try:
            prompt_ids = chat_prompt_ids(loaded, messages)
            reply, result = _stream_reply(loaded, prompt_ids, params, generate_stream)
        except HanlinError as error:
            messages.pop()
            hint = " (try /reset)" if "context" in str(error) else ""
            stderr.print(f"[red]error:[/] {escape(str(error))}{hint}", soft_wrap=True)
            continue
        messages.append({"role": "assistant", "content": reply})
        if result is not None and interactive:
            t = result.timings
            stderr.print(f"[dim]{result.completion_tokens} tokens · {t.decode_tokens_per_second:.1f} tok/s · {result.finish_reason}[/]")


def _initial_messages(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def _read_line(interactive: bool) -> str | None:
    """The next user line, or None at EOF / Ctrl-C (both quit)."""
    try:
        if interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            return input("\001\033[1;32m\002>>> \001\033[0m\002")
        line = sys.stdin.readline()
        return line if line else None
    except (EOFError, KeyboardInterrupt):
        if interactive:
            print(file=sys.stderr)
        return None


def _stream_reply(loaded: LoadedModel, prompt_ids: list[int], params: SamplingParams, generate_stream: Any) -> tuple[str, Any]:
    """Print the reply as it streams; Ctrl-C ends it early and keeps what was said so far."""
    pieces: list[str] = []
    result = None
    stream = generate_stream(loaded, prompt_ids, params)
    try:
        for event in stream:
            if event.text:
                pieces.append(event.text)
                sys.stdout.write(event.text)
                sys.stdout.flush()
            if event.result is not None:
                result = event.result
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write("\n")
        stderr.print("[dim]reply interrupted[/]", end="")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces), result


# ---- generate -----------------------------------------------------------------------------------


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message, or raw text with --raw).")],
    model: ModelOption = "smollm2",
    chat_template: Annotated[Optional[bool], _option("--chat/--raw", env="CHAT", help="Wrap the prompt in the model's chat template (default: when it has one) or use it as raw text.")] = None,  # noqa: UP007
    system: Annotated[Optional[str], _option("--system", "-s", env="SYSTEM", help="System prompt (chat mode).")] = None,  # noqa: UP007
    temperature: Temperature = 0.7,
    top_p: TopP = 0.9,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    presence_penalty: PresencePenalty = 0.0,
    frequency_penalty: FrequencyPenalty = 0.0,
    seed: Seed = None,
    max_tokens: MaxTokens = 256,
    stop: Stop = None,
    ignore_eos: Annotated[bool, _option("--ignore-eos", env="IGNORE_EOS", help="Keep going past end-of-sequence tokens.")] = False,
    json_output: JsonOutput = False,
    device: Device = None,
) -> None:
    """Generate one reply to PROMPT, streamed to stdout."""
    from hanlin.generate import generate_stream

    params = sampling_params(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed, max_tokens=max_tokens,
        stop=list(stop or []), ignore_eos=ignore_eos,
    )
    loaded = load_model(model, device)
    use_chat = has_chat_template(loaded) if chat_template is None else chat_template
    if use_chat:
        prompt_ids = chat_prompt_ids(loaded, _initial_messages(system) + [{"role": "user", "content": prompt}])
    else:
        prompt_ids = loaded.tokenizer.encode(prompt, add_special_tokens=True)

    result = None
    for event in generate_stream(loaded, prompt_ids, params):
        if event.text and not json_output:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        if event.result is not None:
            result = event.result
    assert result is not None
    if json_output:
        timings = dict(vars(result.timings), load_seconds=loaded.load_seconds)
        print(json.dumps({
            "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "timings": timings,
        }, ensure_ascii=False))
        return
    sys.stdout.write("\n")
    if sys.stderr.isatty():
        t = result.timings
        stderr.print(
            f"[dim]{result.prompt_tokens} prompt tokens at {t.prefill_tokens_per_second:.0f} tok/s · "
            f"{result.completion_tokens} generated at {t.decode_tokens_per_second:.1f} tok/s · {result.finish_reason}[/]"
        )


# ---- info ---------------------------------------------------------------------------------------


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Model name, .gguf file or Hugging Face directory.", envvar="HANLIN_MODEL")] = "smollm2",
    json_output: JsonOutput = False,
) -> None:
    """Describe a model: architecture, sizes, parameters and memory needs."""
    config, source = read_config(model)
    data = describe(config, source)
    if json_output:
        print(json.dumps(data))
        return
    from rich.table import Table

    table = Table(title=model, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in info_rows(data):
        table.add_row(label, value)
    stdout.print(table)


def read_config(name: str) -> tuple[ModelConfig, str]:
    """(config, resolved path) without reading the weights."""
    from hanlin.checkpoints.registry import resolve

    path = resolve(name)
    if path.is_dir():
        from hanlin.checkpoints.hf import read_hf_config

        return read_hf_config(path), str(path)
    from hanlin.checkpoints.gguf import config_from_gguf, open_gguf
    from hanlin.checkpoints.gguf_metadata import read_gguf_metadata

    reader = open_gguf(path)
    return config_from_gguf(read_gguf_metadata(reader), {t.name for t in reader.tensors}, path), str(path)


def describe(config: ModelConfig, source: str) -> dict[str, Any]:
    """Everything `hanlin info` shows, as plain JSON-ready data."""
    total, active = config.parameter_counts()
    context = config.max_position_embeddings
    moe = config.moe
    return {
        "model_type": config.model_type,
        "source": source,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "context_length": context,
        "rope": {"type": config.rope.type, "theta": config.rope.theta, "factor": config.rope.factor},
        "moe": None if moe is None else {
            "experts": moe.num_experts, "top_k": moe.top_k, "expert_dim": moe.expert_dim,
            "shared_expert_dim": moe.shared_expert_dim, "first_k_dense": moe.first_k_dense,
            "moe_layers": sum(config.is_moe_layer(i) for i in range(config.num_layers)),
        },
        "cla_share_factor": config.cla_share_factor,
        "kv_layers": config.num_kv_layers,
        "parameters": {"total": total, "active": active},
        "kv_bytes_per_token": {"fp32": config.kv_bytes_per_token(4), "bf16": config.kv_bytes_per_token(2)},
        "memory_bytes": {
            "weights_fp32": total * 4,
            "weights_bf16": total * 2,
            "kv_cache_full_context_fp32": config.kv_bytes_per_token(4) * context,
            "kv_cache_full_context_bf16": config.kv_bytes_per_token(2) * context,
        },
    }


def info_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    rope = data["rope"]
    rope_text = f"{rope['type']}, theta {rope['theta']:g}" + (f", factor {rope['factor']:g}" if rope["factor"] != 1 else "")
    params = data["parameters"]
    kv, memory, layers, kv_layers = data["kv_bytes_per_token"], data["memory_bytes"], data["layers"], data["kv_layers"]
    kv_text = f"{kv_layers} of {layers} layers store K/V"
    if data["cla_share_factor"] > 1:
        kv_text += f" (CLA ×{data['cla_share_factor']})"
    kv_text += f": {_bytes(kv['fp32'])}/token fp32, {_bytes(kv['bf16'])}/token bf16"
    if kv_layers < layers:
        kv_text += f", saves {100 * (1 - kv_layers / layers):.0f}%"
    rows = [
        ("Architecture", data["model_type"]),
        ("Source", data["source"]),
        ("Layers", str(layers)),
        ("Hidden size", f"{data['hidden_size']} (MLP {data['intermediate_size']})"),
        ("Attention", f"{data['num_heads']} heads, {data['num_kv_heads']} KV heads, head dim {data['head_dim']}"),
        ("Vocabulary", f"{data['vocab_size']:,}"),
        ("Context", f"{data['context_length']:,} tokens"),
        ("RoPE", rope_text),
    ]
    if data["moe"] is not None:
        moe = data["moe"]
        experts = f"{moe['experts']} routed (expert dim {moe['expert_dim']}), top-{moe['top_k']}"
        if moe["shared_expert_dim"]:
            experts += f", shared expert dim {moe['shared_expert_dim']}"
        experts += f"; MoE in {moe['moe_layers']} of {layers} layers"
        if moe["first_k_dense"]:
            experts += f" (first {moe['first_k_dense']} dense)"
        rows.append(("Experts", experts))
    rows += [
        ("Parameters", _count(params["total"]) if params["active"] == params["total"]
         else f"{_count(params['total'])} total, {_count(params['active'])} active per token"),
        ("KV cache", kv_text),
        ("Memory", f"weights {_bytes(memory['weights_fp32'])} fp32 ({_bytes(memory['weights_bf16'])} bf16); "
                   f"full-context KV cache {_bytes(memory['kv_cache_full_context_fp32'])} fp32 "
                   f"({_bytes(memory['kv_cache_full_context_bf16'])} bf16)"),
    ]
    return rows


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# ---- entry point --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: user errors print one red line on stderr, never a traceback."""
    try:
        app(args=argv, prog_name="hanlin")
    except HanlinError as error:
        message = " ".join(str(error).split())
        stderr.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

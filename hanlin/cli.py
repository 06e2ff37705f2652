"""The `hanlin` command line: chat, generate, info, serve, keys, data, train, export, plot and scaling. Every option can also come from HANLIN_<OPTION>."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from hanlin.cli_options import env_option
from hanlin.errors import HanlinError

if TYPE_CHECKING:
    from hanlin.api import LoadedModel
    from hanlin.engine.sampling import SamplingParams
    from hanlin.llm import LLM, Completion

app = typer.Typer(
    name="hanlin",
    help="Hanlin: a self-hostable LLM stack.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


ModelOption = Annotated[str, env_option("--model", "-m", env="MODEL", help="Model name (smollm2), .gguf file or Hugging Face directory.")]
Temperature = Annotated[float, env_option("--temperature", env="TEMPERATURE", help="Sampling temperature; 0 = greedy.")]
TopP = Annotated[float, env_option("--top-p", env="TOP_P", help="Nucleus sampling mass in (0, 1].")]
TopK = Annotated[int, env_option("--top-k", env="TOP_K", help="Keep the k most likely tokens; 0 = off.")]
MinP = Annotated[float, env_option("--min-p", env="MIN_P", help="Drop tokens below min-p × the best token's probability.")]
RepetitionPenalty = Annotated[float, env_option("--repetition-penalty", env="REPETITION_PENALTY", help="> 1 discourages tokens already seen; 1 = off.")]
PresencePenalty = Annotated[float, env_option("--presence-penalty", env="PRESENCE_PENALTY", help="Subtracted once from generated tokens' logits, in [-2, 2].")]
FrequencyPenalty = Annotated[float, env_option("--frequency-penalty", env="FREQUENCY_PENALTY", help="Subtracted per occurrence of a generated token, in [-2, 2].")]
Seed = Annotated[int | None, env_option("--seed", env="SEED", help="Random seed for reproducible sampling.")]
MaxTokens = Annotated[int, env_option("--max-tokens", "-n", env="MAX_TOKENS", help="Most tokens to generate per reply.")]
Stop = Annotated[list[str] | None, env_option("--stop", env="STOP", help="Stop when this string is generated (repeatable).")]
JsonOutput = Annotated[bool, env_option("--json", env="JSON", help="Print one JSON object instead of text.")]
Quantize = Annotated[str | None, env_option("--quantize", "-q", env="QUANTIZE", help="Quantize weights at load: int8 (per channel), int4 (4-bit, group 32) or w8a8 (int8 weights and activations: faster prefill); faster decode on CPU.")]
Device = Annotated[str | None, env_option("--device", env="DEVICE", help="torch device (cpu, cuda, ...); default: the loader's choice.")]


def sampling_params(**values: Any) -> SamplingParams:
    """Build and validate SamplingParams; a bad value becomes a HanlinError naming its command-line option."""
    from hanlin.engine.sampling import InvalidSamplingParam, SamplingParams

    params = SamplingParams(**{k: v for k, v in values.items() if v is not None})
    try:
        params.validate()
    except InvalidSamplingParam as error:  # its message starts with the field's name: show the option's
        message = str(error)
        raise HanlinError(f"--{error.field.replace('_', '-')}{message[len(error.field):]}") from None
    return params


def load_model(name: str, device: str | None = None, quantize: str | None = None) -> LoadedModel:
    import hanlin

    return hanlin.load(name, device=device, quantize=quantize, progress=sys.stderr.isatty())


def engine_for(loaded: LoadedModel, name: str) -> LLM:
    from hanlin.llm import LLM

    return LLM.from_loaded(loaded, model=name, max_num_seqs=1)


def fit_reply(llm: LLM, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
    """params with max_tokens cut to what the context has left after the prompt."""
    from dataclasses import replace

    room = llm.engine.max_model_len - len(prompt_ids)
    if room < 1:
        raise HanlinError(
            f"the prompt is {len(prompt_ids)} tokens but the context holds {llm.engine.max_model_len} tokens"
        )
    return replace(params, max_tokens=min(params.max_tokens, room))


def model_label(loaded: LoadedModel, name: str) -> str:
    from pathlib import Path

    return name if name == Path(loaded.source).name or "/" in name else f"{name} ({Path(loaded.source).name})"


# ---- chat ---------------------------------------------------------------------------------------

CHAT_HELP = "/reset clears the conversation · /system TEXT sets the system prompt · /exit quits (or Ctrl-D)"


@app.command()
def chat(
    model: ModelOption = "smollm2",
    system: Annotated[str | None, env_option("--system", "-s", env="SYSTEM", help="System prompt.")] = None,
    temperature: Temperature = 0.7,
    top_p: TopP = 0.9,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    presence_penalty: PresencePenalty = 0.0,
    frequency_penalty: FrequencyPenalty = 0.0,
    seed: Seed = None,
    max_tokens: MaxTokens = 512,
    quantize: Quantize = None,
    device: Device = None,
) -> None:
    """Talk to a model: a multi-turn conversation, replies streamed as they are generated."""
    params = sampling_params(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed, max_tokens=max_tokens,
    )
    loaded = load_model(model, device, quantize)
    llm = engine_for(loaded, model)
    interactive = sys.stdin.isatty()
    stderr.print(
        f"[bold]{model_label(loaded, model)}[/] · {loaded.config.model_type} · loaded in {loaded.load_seconds:.1f}s · "
        f"temperature {params.temperature}, top-p {params.top_p}, top-k {params.top_k}, min-p {params.min_p}, "
        f"max {params.max_tokens} tokens" + (f", seed {params.seed}" if params.seed is not None else "")
    )
    if interactive:
        stderr.print(f"[dim]{CHAT_HELP}[/]")
        try:
            import readline  # noqa: F401  (gives input() line editing and history)
        except ImportError:
            pass
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
            prompt_ids = llm.chat_prompt_ids(messages)
            reply, result = _stream_reply(llm, prompt_ids, fit_reply(llm, prompt_ids, params))
        except HanlinError as error:
            messages.pop()
            hint = " (try /reset)" if "context" in str(error) else ""
            stderr.print(f"[red]error:[/] {escape(str(error))}{hint}", soft_wrap=True)
            continue
        messages.append({"role": "assistant", "content": reply})
        if result is not None and interactive:
            stderr.print(f"[dim]{_speed_line(result)}[/]")


def _initial_messages(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def _read_line(interactive: bool) -> str | None:
    """The next user line, or None at EOF / Ctrl-C (both quit)."""
    try:
        if interactive:
            return input("\001\033[1;32m\002>>> \001\033[0m\002")
        line = sys.stdin.readline()
        return line if line else None
    except (EOFError, KeyboardInterrupt):
        if interactive:
            print(file=sys.stderr)
        return None


def _timings(completion: Completion, load_seconds: float) -> dict[str, float]:
    tokens, prompt = len(completion.token_ids), len(completion.prompt_token_ids)
    prefill, decode = completion.first_token_seconds, completion.seconds - completion.first_token_seconds
    return {
        "load_seconds": load_seconds,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "prefill_tokens_per_second": prompt / prefill if prefill > 0 else 0.0,
        "decode_tokens_per_second": (tokens - 1) / decode if tokens > 1 and decode > 0 else 0.0,
        "total_seconds": completion.seconds,
    }


def _speed_line(completion: Completion) -> str:
    rate = _timings(completion, 0.0)["decode_tokens_per_second"]
    return f"{len(completion.token_ids)} tokens · {rate:.1f} tok/s · {completion.finish_reason}"


def _stream_reply(llm: LLM, prompt_ids: list[int], params: SamplingParams) -> tuple[str, Completion | None]:
    """Print the reply as it streams; Ctrl-C ends it early and keeps what was said so far."""
    pieces: list[str] = []
    result = None
    stream = llm.stream(prompt_ids, params)
    try:
        for event in stream:
            if event.text:
                pieces.append(event.text)
                sys.stdout.write(event.text)
                sys.stdout.flush()
            if event.completion is not None:
                result = event.completion
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
    chat_template: Annotated[bool | None, env_option("--chat/--raw", env="CHAT", help="Wrap the prompt in the model's chat template (default: when it has one) or use it as raw text.")] = None,
    system: Annotated[str | None, env_option("--system", "-s", env="SYSTEM", help="System prompt (chat mode).")] = None,
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
    ignore_eos: Annotated[bool, env_option("--ignore-eos", env="IGNORE_EOS", help="Keep going past end-of-sequence tokens.")] = False,
    json_output: JsonOutput = False,
    quantize: Quantize = None,
    device: Device = None,
) -> None:
    """Generate one reply to PROMPT, streamed to stdout."""
    params = sampling_params(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed, max_tokens=max_tokens,
        stop=list(stop or []), ignore_eos=ignore_eos,
    )
    loaded = load_model(model, device, quantize)
    llm = engine_for(loaded, model)
    use_chat = bool(loaded.tokenizer.chat_template) if chat_template is None else chat_template
    if use_chat:
        prompt_ids = llm.chat_prompt_ids(_initial_messages(system) + [{"role": "user", "content": prompt}])
    else:
        prompt_ids = loaded.tokenizer.encode(prompt, add_special_tokens=True)

    result = None
    for event in llm.stream(prompt_ids, fit_reply(llm, prompt_ids, params)):
        if event.text and not json_output:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        if event.completion is not None:
            result = event.completion
    assert result is not None
    if json_output:
        print(json.dumps({
            "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "prompt_tokens": len(result.prompt_token_ids), "completion_tokens": len(result.token_ids),
            "timings": _timings(result, loaded.load_seconds),
        }, ensure_ascii=False))
        return
    sys.stdout.write("\n")
    if sys.stderr.isatty():
        stderr.print(f"[dim]{len(result.prompt_token_ids)} prompt tokens · {_speed_line(result)}[/]")


# ---- info ---------------------------------------------------------------------------------------


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Model name, .gguf file or Hugging Face directory.", envvar="HANLIN_MODEL")] = "smollm2",
    json_output: JsonOutput = False,
) -> None:
    """Describe a model: architecture, sizes, parameters and memory needs."""
    from hanlin.api import load_config
    from hanlin.model_info import describe, info_rows

    config, source = load_config(model)
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


from hanlin.cli_keys import register as _register_keys; _register_keys(app)  # noqa: E402, E702
from hanlin.cli_serve import register as _register_serve; _register_serve(app)  # noqa: E402, E702
from hanlin.cli_data import register as _register_data; _register_data(app)  # noqa: E402, E702
from hanlin.cli_train import register as _register_train; _register_train(app)  # noqa: E402, E702
from hanlin.cli_analysis import register as _register_analysis; _register_analysis(app)  # noqa: E402, E702
from hanlin.cli_index import register as _register_index; _register_index(app)  # noqa: E402, E702
from hanlin.cli_ask import register as _register_ask; _register_ask(app)  # noqa: E402, E702
from hanlin.cli_eval import register as _register_eval; _register_eval(app)  # noqa: E402, E702

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

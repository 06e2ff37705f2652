"""`hanlin serve`: the OpenAI-compatible HTTP server and web chat page (uvicorn, run programmatically)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hanlin.cli_options import env_option
from hanlin.errors import HanlinError

if TYPE_CHECKING:
    from hanlin.server.state import ServerState


def serve(
    model: Annotated[str, env_option("--model", "-m", env="MODEL", help="Model name (smollm2), .gguf file or Hugging Face directory.")] = "smollm2",
    host: Annotated[str, env_option("--host", env="HOST", help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, env_option("--port", "-p", env="PORT", help="Port to listen on (0 picks a free one).")] = 8000,
    db: Annotated[str | None, env_option("--db", env="DB", help="Keys and metering database: a SQLite path, sqlite:///path or postgresql://... (default: $HANLIN_HOME/hanlin.db).")] = None,
    max_queued: Annotated[int, env_option("--max-queued", env="MAX_QUEUED", help="Waiting requests before new ones get 429 with Retry-After.")] = 256,
    quantize: Annotated[str | None, env_option("--quantize", "-q", env="QUANTIZE", help="Quantize weights at load: int8 (per channel), int4 (4-bit, group 32) or w8a8 (int8 weights and activations).")] = None,
    device: Annotated[str | None, env_option("--device", env="DEVICE", help="torch device (cpu, cuda, ...); default: the loader's choice.")] = None,
    max_num_seqs: Annotated[int, env_option("--max-num-seqs", env="MAX_NUM_SEQS", help="Sequences decoded together in one step.")] = 64,
    max_batched_tokens: Annotated[int, env_option("--max-batched-tokens", env="MAX_BATCHED_TOKENS", help="Tokens computed per engine step (prefill chunks share it with decodes).")] = 256,
    kv_cache_mb: Annotated[int, env_option("--kv-cache-mb", env="KV_CACHE_MB", help="Memory for the paged KV cache, in MiB.")] = 1024,
    kv_cache_dtype: Annotated[str, env_option("--kv-cache-dtype", env="KV_CACHE_DTYPE", help="KV cache element type: auto (the model's), float32 or float16 (half the memory, as llama.cpp's f16 cache).")] = "auto",
    max_model_len: Annotated[int | None, env_option("--max-model-len", env="MAX_MODEL_LEN", help="Context length limit (default: the model's).")] = None,
    prefix_caching: Annotated[bool, env_option("--prefix-caching/--no-prefix-caching", env="PREFIX_CACHING", help="Reuse the KV cache of shared prompt prefixes.")] = True,
    threads: Annotated[int | None, env_option("--threads", env="THREADS", help="CPU threads for the model (default: all cores but one, which serves HTTP).")] = None,
    shutdown_timeout: Annotated[float, env_option("--shutdown-timeout", env="SHUTDOWN_TIMEOUT", help="Seconds running requests get to finish on SIGTERM before they are aborted.")] = 30.0,
    log_level: Annotated[str, env_option("--log-level", env="LOG_LEVEL", help="uvicorn log level (info shows every request).")] = "warning",
    index: Annotated[str | None, env_option("--index", env="INDEX", help="Search index for POST /v1/search and the /search page (made by `hanlin index add`).")] = None,
    searxng: Annotated[str | None, env_option("--searxng", env="SEARXNG", help="SearXNG base URL for web search (http://host:port).")] = None,
    allow_private_fetch: Annotated[bool, env_option("--allow-private-fetch/--no-allow-private-fetch", env="ALLOW_PRIVATE_FETCH", help="Let web search fetch pages on private, loopback and link-local addresses.")] = False,
    embedding_model: Annotated[str, env_option("--embedding-model", env="EMBEDDING_MODEL", help="Encoder for POST /v1/embeddings and the search index (minilm or a BERT directory).")] = "minilm",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a web chat page at / and AI search at /search."""
    from hanlin.checkpoints.registry import resolve
    from hanlin.engine.options import EngineOptions
    from hanlin.metering import MeteringStore

    options = EngineOptions.from_kwargs(
        model=model, device=device, quantize=quantize, max_num_seqs=max_num_seqs,
        max_batched_tokens=max_batched_tokens, kv_cache_mb=kv_cache_mb, kv_cache_dtype=kv_cache_dtype, max_queued=max_queued,
        max_model_len=max_model_len, enable_prefix_caching=prefix_caching,
        threads=threads if threads is not None else max(1, (os.cpu_count() or 2) - 1),
    )
    if shutdown_timeout < 0:
        raise HanlinError(f"--shutdown-timeout must be >= 0, got {shutdown_timeout}")
    path = resolve(model)  # a bad name fails now, not after the server has started
    search_settings = _search_settings(index, searxng, allow_private_fetch)
    aliases = [name for name in (model, path.stem if path.is_file() else path.name) if name]
    store = MeteringStore.open(db)
    try:
        sock = _bind(host, port)
        run_server(sock, options, store, aliases, shutdown_timeout, log_level,
                   search_settings=search_settings, embedding_model=embedding_model)
    finally:
        store.close()


def _search_settings(index: str | None, searxng: str | None, allow_private_fetch: bool) -> Any:
    """What POST /v1/search may use; None when neither an index nor a web backend was given."""
    from pathlib import Path

    from hanlin.server.search import SearchSettings

    if index is not None and not Path(index).expanduser().is_file():
        raise HanlinError(f"--index {index}: no such file (create it with `hanlin index add --index {index} PATH…`)")
    if searxng is not None and not searxng.startswith(("http://", "https://")):
        raise HanlinError(f"--searxng must be an http(s) URL, got {searxng!r}")
    if index is None and searxng is None:
        return None
    return SearchSettings(index=Path(index).expanduser().resolve() if index else None, searxng_url=searxng,
                          allow_private_fetch=allow_private_fetch)


def run_server(sock: socket.socket, options: Any, store: Any, aliases: list[str], shutdown_timeout: float,
               log_level: str, *, search_settings: Any = None, embedding_model: str = "minilm") -> None:
    import uvicorn

    from hanlin.server import create_app

    class Server(uvicorn.Server):
        """uvicorn's server, telling the app when a graceful shutdown starts (before it waits on connections)."""

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            app.state.hanlin.begin_shutdown()
            await super().shutdown(sockets)

    bound_host, bound_port = sock.getsockname()[:2]
    failure: list[BaseException] = []

    def on_ready(state: ServerState) -> None:
        if state.load_error is not None:
            failure.append(state.load_error)
            server.should_exit = True
            return
        base = f"http://{_url_host(bound_host)}:{bound_port}"
        search = f" — AI search at {base}/search" if search_settings is not None else ""
        print(f"Hanlin is serving {aliases[0]} at {base}/ (chat page) — OpenAI API at {base}/v1{search}", flush=True)

    app = create_app(options, store=store, aliases=aliases, shutdown_timeout=shutdown_timeout, on_ready=on_ready,
                     search_settings=search_settings, embedding_model=embedding_model)
    config = uvicorn.Config(
        app, log_level=log_level.lower(), access_log=log_level.lower() in ("debug", "trace", "info"),
        timeout_graceful_shutdown=shutdown_timeout + 10.0, lifespan="on",  # the engine aborts first
    )
    server = Server(config)
    # The engine thread takes the GIL back after each of its ~100 compiled calls per step; while the event loop
    # holds it (streaming chunks), each take waits out the switch interval, 5 ms by default. At 16 streams on
    # 2 cores (bench/serve.py, w8a8): 0.2 ms gave 245 -> 258 tok/s.
    sys.setswitchinterval(0.0002)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; a graceful SIGTERM
    # stop is a success, so that re-raise must land in a handler that lets the process exit 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failure:
        error = failure[0]
        raise error if isinstance(error, HanlinError) else HanlinError(f"loading {options.model} failed: {error}")


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise HanlinError(f"--port must be in [0, 65535], got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise HanlinError(f"cannot listen on {host}: {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise HanlinError(f"cannot listen on {host}:{port}: the port is already in use (pick another with --port)") from None
        raise HanlinError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def register(app: typer.Typer) -> None:
    app.command()(serve)


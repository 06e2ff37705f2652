"""Prometheus metrics, in a CollectorRegistry of the app's own (several apps can live in one process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from hanlin.engine.outputs import EngineStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("hanlin_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("hanlin_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.cached_tokens = Counter("hanlin_cached_prompt_tokens",
                                     "Prompt tokens served from the prefix cache.", registry=r)
        self.completion_tokens = Counter("hanlin_completion_tokens", "Generated tokens.", registry=r)
        self.finished = Counter("hanlin_finished_requests", "Generation requests by how they ended.",
                                ["status"], registry=r)
        self.waiting = Gauge("hanlin_requests_waiting", "Requests queued in the engine.", registry=r)
        self.running = Gauge("hanlin_requests_running", "Requests being decoded.", registry=r)
        self.kv_blocks_total = Gauge("hanlin_kv_cache_blocks_total", "KV cache blocks.", registry=r)
        self.kv_blocks_used = Gauge("hanlin_kv_cache_blocks_used", "KV cache blocks held by running requests.",
                                    registry=r)
        self.kv_usage = Gauge("hanlin_kv_cache_usage_ratio", "Share of KV cache blocks in use (0..1).", registry=r)
        self.prefix_hit_rate = Gauge("hanlin_prefix_cache_hit_rate",
                                     "Share of looked-up prompt tokens found in the prefix cache (cumulative).",
                                     registry=r)
        self.model_loaded = Gauge("hanlin_model_loaded", "1 once the model is loaded.", registry=r)
        self.ttft = Histogram("hanlin_time_to_first_token_seconds", "Time from request to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("hanlin_time_per_output_token_seconds",
                              "Decode time per output token after the first.", buckets=_TOKEN_TIME_BUCKETS,
                              registry=r)
        self.duration = Histogram("hanlin_request_duration_seconds", "Time from request to its last token.",
                                  buckets=_LATENCY_BUCKETS, registry=r)

    def observe_engine(self, stats: EngineStats) -> None:
        self.waiting.set(stats.waiting)
        self.running.set(stats.running)
        self.kv_blocks_total.set(stats.kv_blocks_total)
        self.kv_blocks_used.set(stats.kv_blocks_used)
        self.kv_usage.set(stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0)
        queried = stats.prefix_cache_queried_tokens
        self.prefix_hit_rate.set(stats.prefix_cache_hit_tokens / queried if queried else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware: counts each HTTP request under its route (or "other") and final status code."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: set[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else ("/static" if path.startswith("/static/") else "other")
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

"""The server's Prometheus metrics, in a registry of its own (one per app, so tests can make many)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "nanovlm_requests", "Chat completion requests by HTTP status", ["status"], registry=r
        )
        self.responses = Counter(
            "nanovlm_http_responses",
            "HTTP responses of every route by status",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "nanovlm_prompt_tokens", "Prompt positions processed (image tokens included)", registry=r
        )
        self.completion_tokens = Counter("nanovlm_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "nanovlm_time_to_first_token_seconds",
            "Arrival to first token (queue, image encode and prefill)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "nanovlm_time_per_output_token_seconds",
            "Mean time between a request's tokens after the first",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.cached_tokens = Counter(
            "nanovlm_prompt_tokens_cached", "Prompt positions whose KV came from the prefix cache", registry=r
        )
        self.queue_depth = Gauge("nanovlm_queue_depth", "Requests waiting for a batch row", registry=r)
        self.running = Gauge("nanovlm_running_batch_size", "Requests in the running batch", registry=r)
        g = lambda name, doc: Gauge(name, doc, registry=r)  # noqa: E731
        self.prefix_hit_rate = g("nanovlm_prefix_cache_hit_rate", "Share of looked-up prompt positions found")
        self.prefix_bytes = g("nanovlm_prefix_cache_bytes", "Bytes of prompt KV held by the prefix cache")
        self.image_hit_rate = g("nanovlm_image_cache_hit_rate", "Share of image look-ups found")
        self.image_bytes = g("nanovlm_image_cache_bytes", "Bytes of image embeddings held by the image cache")

    def watch(self, engine: Any) -> None:
        """Read the gauges from a running engine (runtime/batching.py) at each scrape."""
        p, i = engine.prefix_cache, engine.image_cache
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.running.set_function(lambda: engine.running)
        self.prefix_hit_rate.set_function(lambda: p.hit / p.queried if p.queried else 0.0)
        self.prefix_bytes.set_function(lambda: p.bytes)
        self.image_hit_rate.set_function(lambda: i.hits / (i.hits + i.misses) if i.hits + i.misses else 0.0)
        self.image_bytes.set_function(lambda: i.bytes)

    def count_response(self, route: str, status: int) -> None:
        self.responses.labels(route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

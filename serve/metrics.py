"""The server's Prometheus metrics, in a registry of its own (one per app, so tests can make many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "nanovlm_requests", "Chat completion requests by HTTP status", ["status"], registry=r
        )
        self.prompt_tokens = Counter("nanovlm_prompt_tokens", "Prompt positions processed (image tokens included)",
                                     registry=r)  # fmt: skip
        self.completion_tokens = Counter("nanovlm_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("nanovlm_time_to_first_token_seconds", "Arrival to first token (queue, image "
                              "encode and prefill)", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.per_token = Histogram("nanovlm_time_per_output_token_seconds", "Mean time between a request's "
                                   "tokens after the first", buckets=TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.queue_depth = Gauge("nanovlm_queue_depth", "Requests waiting for a batch row", registry=r)
        self.running = Gauge("nanovlm_running_batch_size", "Requests in the running batch", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

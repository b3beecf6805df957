"""What the serving engine (runtime/batching.py) and its callers share: its settings, a submitted
request's ticket, the events its consumer hears, its counters, and the refusal of a full queue."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from core.processors import Batch
from core.sampling import TokenLogprob

from .pipeline import GenerationRequest


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # rows decoding at once
    max_queue: int = 64  # requests waiting for a row
    # prefill positions per loop while streams decode: 128 take ~0.2 s on the SmolVLM-256M shape
    # (int8, 2 cores), so a running stream's longest gap stays under a quarter second
    prefill_chunk: int = 128
    image_cache_mb: float = 256.0  # image embeddings kept (0: off)
    prefix_cache_mb: float = 512.0  # prompt KV kept (0: off)
    encode_tiles: int = 1  # tiles per vision-encoder call (the encoder thread checks cancellation between)
    prefix_block: int = 32  # positions per prefix-cache block
    # a view within this mean absolute difference (8-bit levels) of the same view of its scope's last
    # frame reuses that view's embeddings and KV (runtime/near_views.py); 0: only identical views
    reuse_threshold: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "prefill_chunk", "encode_tiles", "prefix_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("image_cache_mb", "prefix_cache_mb", "reuse_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more")


class QueueFull(Exception):
    """The engine's waiting queue is at its limit; try again later."""


@dataclass
class Event:
    """What a request's consumer hears: new text, then one event with `finish` set."""

    text: str
    completion_tokens: int
    finish: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens since the last event


@dataclass
class Ticket:
    """One submitted request; `cancel()` frees its batch row at the next step."""

    batch: Batch  # one row, from VLMPipeline's prepare path
    request: GenerationRequest
    on_event: Callable[[Event], None]
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt positions whose KV came from the prefix cache
    views: int = 0  # views (image tiles, video frames) the prompt shows
    encoded_views: int = 0  # of them, those the vision encoder ran on (the rest came from the cache)
    first_token: float | None = None
    finished: float | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class EngineStats:
    """Counters for tests and /metrics."""

    steps: int = 0  # decode steps run
    prefills: int = 0  # prefill calls run
    prefill_positions: int = 0  # positions they computed
    last_prefill: int = 0  # positions prefilled in the latest loop (0: none)
    encoded_tiles: int = 0
    # (rows decoded, positions prefilled) of each loop, the latest 4,096
    history: list[tuple[int, int]] = field(default_factory=list)

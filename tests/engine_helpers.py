"""Helpers for the engine tests: an Event collector, submitting requests at given steps, and a
burst prefilled together."""

import threading

from core.sampling import SamplingConfig
from runtime.engine_api import Event
from runtime.pipeline import GenerationRequest


class Collector:
    def __init__(self) -> None:
        self.text, self.finish, self.done = "", None, threading.Event()
        self.tokens = 0

    def __call__(self, e: Event) -> None:
        self.text += e.text
        if e.finish:
            self.finish, self.tokens = e.finish, e.completion_tokens
            self.done.set()


def run(p, engine, items, join_at: dict[int, list[int]], sampling=None):
    """Submit items[i] for i in join_at[0] now and the others when the engine has run that many
    steps -> (collectors, the widest batch seen, tickets by item index)."""
    got = [Collector() for _ in items]
    widest, tickets = [], {}

    def submit(i):
        imgs, q, n = items[i]
        batch = p.prepare([imgs], [q])
        tickets[i] = engine.submit(batch, GenerationRequest(n, sampling or SamplingConfig()), got[i])

    def on_step(running, waiting):
        widest.append(running)
        for i in join_at.get(engine.steps, []) if engine.steps else []:
            submit(i)
            join_at[engine.steps] = []

    engine.on_step = on_step
    for i in join_at.pop(0):
        submit(i)
    engine.start()
    for c in got:
        assert c.done.wait(120)
    engine.stop(10)
    return got, max(widest), tickets


def burst(p, image, questions: list[str], n: int, engine_config) -> tuple[list[str], int]:
    """The questions about one image (already in the image cache) submitted before the engine
    starts, so its first loop admits them all -> (their answers, the engine's prefill calls)."""
    from runtime.batching import ContinuousBatcher

    engine = ContinuousBatcher(p, config=engine_config)
    batches = [p.prepare([[image]], [q]) for q in questions]
    for key, embeds in zip(batches[0].view_keys, p.encode_images(batches[0].pixel_values), strict=True):
        engine.image_cache.put(key, embeds[None])
    got = [Collector() for _ in questions]
    for b, c in zip(batches, got, strict=True):
        engine.submit(b, GenerationRequest(n), c)
    engine.start()
    for c in got:
        assert c.done.wait(120)
    engine.stop(10)
    assert engine.stats.encoded_tiles == 0
    return [c.text for c in got], engine.prefills

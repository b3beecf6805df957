"""Continuous batching: requests that share decode steps answer exactly as they do alone."""

import numpy as np
import pytest
from PIL import Image

from core.bundle import KVLayout
from core.processors import Batch
from core.sampling import SamplingConfig
from runtime.batching import ContinuousBatcher
from runtime.engine_api import EngineConfig, QueueFull
from runtime.kv_cache import KVCache
from runtime.pipeline import GenerationRequest
from runtime.prefill_plan import SCRATCH_POSITIONS, prefill_groups
from tests.engine_helpers import Collector as _Collector
from tests.engine_helpers import burst as _burst
from tests.engine_helpers import run as _run

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def pipe(lively_pipe):
    return lively_pipe


def _requests(p):
    """Mixed prompt lengths, images (one split into tiles, one not), text only, and max_tokens."""
    astronaut = Image.fromarray(skimage_data.astronaut())  # 512x512: split into tiles
    small = Image.fromarray(skimage_data.coffee()).resize((30, 20))  # one tile
    wide = Image.fromarray(skimage_data.chelsea())
    out = [
        ([astronaut], "What is it?", 12),
        ([small], "Describe the colours of everything you can see in this picture, please.", 20),
        ([wide], "Cat?", 5),
        ([small], "How many red circles are there?", 16),
        ([astronaut], "What colour is the square?", 9),
        ([], "user assistant", 14),
    ]
    if p.cfg.image_placement == "prefix":  # exactly one image per prompt
        out = [(imgs or [small], q, n) for imgs, q, n in out]
    return out


def test_shared_steps_answer_as_alone(pipe):
    p = pipe
    items = _requests(p)
    alone = [p.generate(imgs, q, max_new_tokens=n) for imgs, q, n in items]
    engine = ContinuousBatcher(p, max_batch=4)
    # three at once, then joins at a step boundary while others decode (one waits for a free row)
    got, widest, _ = _run(p, engine, items, {0: [0, 1, 2], 2: [3], 4: [4, 5]})
    assert [c.text for c in got] == alone
    assert all(c.finish in ("stop", "length") for c in got)
    assert widest >= 3, "the requests never shared a step"
    assert engine.steps < sum(n for *_, n in items), "no decode step was shared"
    assert any(a for a in alone)


def test_a_burst_is_prefilled_together(pipe):
    """Requests that are ready together (their image already in the image cache) are prefilled as
    one left-padded batch, and still answer as alone."""
    p = pipe
    image = Image.fromarray(skimage_data.coffee()).resize((30, 20))
    questions = ["What is it?", "Cat?", "How many red circles are there?", "What colour is the square?"]
    alone = [p.generate([image], q, max_new_tokens=6) for q in questions]
    got, prefills = _burst(p, image, questions, 6, EngineConfig(max_batch=4, prefix_cache_mb=0))
    assert got == alone and prefills == 1


def test_prefill_groups():
    assert prefill_groups([21] * 8) == [list(range(8))]  # a burst of equal prompts: one prefill
    assert prefill_groups([30, 10, 100, 12]) == [[1, 3], [0], [2]]  # by length; padding at most 1/4
    assert prefill_groups([300, 250]) == [[1], [0]]  # 2 x 300 positions exceed the budget
    assert prefill_groups([]) == []


def test_a_long_prompt_does_not_grow_the_kept_prefill_cache(pipe):
    """The kept prefill cache stays within SCRATCH_POSITIONS (the fused decoder's prefill makes all
    of it resident); a longer group gets a cache of its own and still answers as alone."""
    p = pipe
    image = [Image.fromarray(skimage_data.coffee()).resize((30, 20))]
    long_q = "Describe every colour and every shape you can see. " * 6
    items = [(image, "What colour is it?", 4)] * 6 + [(image, long_q, 4)]
    alone = [p.generate(imgs, q, max_new_tokens=n) for imgs, q, n in items]
    engine = ContinuousBatcher(p, max_batch=8)
    lengths = [engine.prompt_length(p.prepare([imgs], [q])) for imgs, q, _ in items]
    assert 6 * lengths[-1] > SCRATCH_POSITIONS, "the long prompt is not long enough to test this"
    got, *_ = _run(p, engine, items, {0: [0, 1, 2, 3, 4, 5], 3: [6]})
    assert [c.text for c in got] == alone
    rows, length = engine.scratch.capacity
    assert rows >= 6 and rows * length <= SCRATCH_POSITIONS


def test_a_request_that_fails_its_prefill_fails_alone(pipe):
    """A group whose prefill fails is retried one request at a time: the others still answer."""
    p = pipe
    items = _requests(p)[:3]
    alone = [p.generate(imgs, q, max_new_tokens=n) for imgs, q, n in items]
    engine = ContinuousBatcher(p, max_batch=4)
    good = [p.prepare([imgs], [q]) for imgs, q, _ in items]
    b = good[1]  # same prompt, but its image tiles cut to the wrong size: the encoder refuses them
    bad = Batch(b.input_ids, b.attention_mask, b.pixel_values[:, :, :7, :7].copy(), b.prompts)
    got = [_Collector() for _ in range(4)]
    for batch, (_, _, n), c in zip([*good, bad], [*items, items[1]], got, strict=True):
        engine.submit(batch, GenerationRequest(n), c)
    engine.start()
    for c in got:
        assert c.done.wait(120)
    engine.stop(10)
    assert [c.text for c in got[:3]] == alone
    assert got[3].finish == "error" and got[3].text == ""


def test_seeded_sampling_does_not_depend_on_neighbours(pipe):
    """A sampled request's answer depends on its seed only, not on who shares its steps."""
    p = pipe
    items = _requests(p)[:4]
    s = SamplingConfig(temperature=0.9, top_p=0.9, seed=7)
    alone = [p.generate(imgs, q, max_new_tokens=n, sampling=s) for imgs, q, n in items]
    got, *_ = _run(p, ContinuousBatcher(p, max_batch=3), items, {0: [0, 1], 1: [2, 3]}, sampling=s)
    assert [c.text for c in got] == alone


def test_cancel_frees_the_row_and_leaves_others_alone(pipe):
    p = pipe
    items = _requests(p)[:3]
    alone = [p.generate(imgs, q, max_new_tokens=n) for imgs, q, n in items]
    engine = ContinuousBatcher(p, max_batch=3)
    got = [_Collector() for _ in items]
    req = [GenerationRequest(n, ignore_eos=i == 0) for i, (_, _, n) in enumerate(items)]
    req[0] = GenerationRequest(200, ignore_eos=True)  # would run long: cancelled after 2 steps
    tickets = [
        engine.submit(p.prepare([imgs], [q]), r, c)
        for (imgs, q, _), r, c in zip(items, req, got, strict=True)
    ]
    engine.on_step = lambda running, waiting: tickets[0].cancel() if engine.steps == 2 else None
    engine.start()
    for c in got:
        assert c.done.wait(120)
    engine.stop(10)
    assert got[0].finish == "cancelled" and got[0].tokens < 200
    assert [c.text for c in got[1:]] == alone[1:]


def test_limits(pipe):
    p = pipe
    engine = ContinuousBatcher(p, max_batch=1, max_queue=2)
    batch = p.prepare([[]] if p.cfg.image_placement != "prefix" else [[Image.new("RGB", (8, 8))]], ["hi"])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.submit(batch, GenerationRequest(p.backend.max_context), _Collector())
    engine.submit(batch, GenerationRequest(2), _Collector())
    engine.submit(batch, GenerationRequest(2), _Collector())
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        engine.submit(batch, GenerationRequest(2), _Collector())


@pytest.mark.parametrize("in_place", [False, True])
def test_kv_cache_rows_and_frame(in_place):
    """Joining right-aligns a row (growing the frame on the left), leaving moves the last row in,
    reframing drops shared padding: checked against plain numpy on the same contents."""
    kv = KVLayout(layers=1, heads=2, head_dim=3, dtype="float32")
    rng = np.random.default_rng(0)

    def single(length):
        c = KVCache(kv, 1, 8, in_place)
        c.batch, c.length = 1, length
        for v in c.views():
            v[...] = rng.standard_normal(v.shape)
        return c, [v[0].copy() for v in c.views()]

    batch = KVCache(kv, 3, 10, in_place)
    a, a_kv = single(4)
    b, b_kv = single(6)
    batch.length = 4
    batch.append_row(a)
    batch.append_row(b)  # longer: row 0 gets two padding columns in front
    assert batch.length == 6
    for v, ak, bk in zip(batch.views(), a_kv, b_kv, strict=True):
        assert np.array_equal(v[0, :, 2:], ak) and np.all(v[0, :, :2] == 0)
        assert np.array_equal(v[1], bk)
    batch.remove_row(0)  # b moves to row 0
    assert batch.batch == 1
    batch.reframe(-2)
    for v, bk in zip(batch.views(), b_kv, strict=True):
        assert np.array_equal(v[0], bk[:, 2:])
    with pytest.raises(ValueError, match="exceeds"):
        batch.reframe(7)


@pytest.mark.parametrize("fails_at", [1, 3])  # its first token (after prefill) or a later decode step
def test_a_request_whose_sampling_fails_fails_alone(pipe, monkeypatch, fails_at):
    """A request that breaks while its token is chosen ends with finish 'error'; the requests
    sharing its prefill group or batch answer as they do alone (fault injected into its sampler)."""
    import core.sampling

    real, calls = core.sampling.Sampler.__call__, {"n": 0}

    def sampler(self, logits, seen=None):
        if self.config.seed == 666:
            calls["n"] += 1
            if calls["n"] == fails_at:
                raise ValueError("injected sampling failure")
        return real(self, logits, seen)

    monkeypatch.setattr(core.sampling.Sampler, "__call__", sampler)
    small = Image.fromarray(skimage_data.coffee()).resize((30, 20))
    items = [([small], "What is it?", 8), ([small], "Is it red?", 8), ([small], "Cat?", 8)]
    alone = [pipe.generate(imgs, q, max_new_tokens=n) for imgs, q, n in items]
    engine = ContinuousBatcher(pipe, max_batch=4)
    got = [_Collector() for _ in items]
    for i, ((imgs, q, n), c) in enumerate(zip(items, got, strict=True)):
        s = SamplingConfig(temperature=0.0, seed=666 if i == 1 else None)
        engine.submit(pipe.prepare([imgs], [q]), GenerationRequest(n, s), c)
    engine.start()
    try:
        assert all(c.done.wait(120) for c in got)
    finally:
        engine.stop(10)
    assert got[1].finish == "error" and calls["n"] == fails_at
    assert [got[0].text, got[2].text] == [alone[0], alone[2]]
    assert got[0].finish in ("stop", "length") and got[2].finish in ("stop", "length")

"""The serving engine's reuse and interleaving: image and prefix caches change no answer, never
match across images, stay within their limits, and a long prompt comes in while streams decode."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from core.bundle import KVLayout
from core.processors import image_key
from core.sequence import Prompt, prompt_frame
from runtime.batching import ContinuousBatcher
from runtime.engine_api import EngineConfig
from runtime.kv_cache import KVCache
from runtime.pipeline import GenerationRequest
from runtime.prefix_cache import PrefixCache, block_keys
from tests.engine_helpers import Collector, run

skimage_data = pytest.importorskip("skimage.data")

BLOCK = 8  # small blocks, so the tiny model's short prompts share some


@pytest.fixture(scope="module")
def pipe(lively_pipe):
    return lively_pipe


def _images():
    astronaut = Image.fromarray(skimage_data.astronaut())  # split into tiles
    cat = Image.fromarray(skimage_data.chelsea())
    return astronaut, cat


def _engine(p, **kw) -> ContinuousBatcher:
    kw = {"max_batch": 4, "prefix_block": BLOCK} | kw
    return ContinuousBatcher(p, config=EngineConfig(**kw))


def _ask(engine, p, images, question, history=(), n=10, **req):
    c = Collector()
    t = engine.submit(p.prepare([images], [question], [list(history)]), GenerationRequest(n, **req), c)
    assert c.done.wait(120), "no answer in 120 s"
    assert c.finish in ("stop", "length"), c.finish
    return c.text, t


def test_chat_turns_reuse_and_answer_as_without_caches(pipe):
    """Turn 2 reuses turn 1's prompt (and image); a different image with the same words reuses
    nothing past the text before it; every answer equals the cache-free pipeline's."""
    p = pipe
    astronaut, cat = _images()
    q1, q2 = "What is it?", "What colour is the square?"
    engine = _engine(p)
    engine.start()
    try:
        a1, t1 = _ask(engine, p, [astronaut], q1)
        a2, t2 = _ask(engine, p, [astronaut], q2, [(q1, a1)])
        b1, t3 = _ask(engine, p, [cat], q1)  # same words, other image
        b2, t4 = _ask(engine, p, [cat], q2, [(q1, b1)])
    finally:
        engine.stop(10)
    assert a1 == p.generate([astronaut], q1, max_new_tokens=10)
    assert a2 == p.chat([astronaut], [(q1, a1)], q2, max_new_tokens=10)
    assert b1 == p.generate([cat], q1, max_new_tokens=10)
    assert b2 == p.chat([cat], [(q1, b1)], q2, max_new_tokens=10)
    assert t1.cached_tokens == 0
    # turn 2 extends turn 1's prompt: all of it but its last position is reused (its tail too),
    # and turn 1's answer where the template renders it to the ids it was sampled as
    assert t2.cached_tokens >= t1.prompt_tokens - 1, "turn 2 did not reuse turn 1's prompt"
    first_slot = int(np.argmax(Prompt.from_batch(p.cfg, t3.batch).ids == p.cfg.image_slot_id))
    assert t3.cached_tokens <= first_slot, "another image's KV was reused"
    assert t4.cached_tokens >= t3.prompt_tokens - 1
    # turn 2's reused KV covers its image slots: its image is not even looked up
    assert engine.stats.encoded_tiles == sum(t.batch.pixel_values.shape[0] for t in (t1, t3))


def test_a_finished_answer_is_reused_by_a_prompt_that_continues_it(pipe):
    """A finished request's answer goes into the prefix cache with its prompt: a request whose
    ids continue that prompt and answer (a chat's next turn, where the template renders the
    answer to the ids it was sampled as) reuses all of them, and answers as without caches."""
    p = pipe
    _, cat = _images()
    batch1 = p.prepare([[cat]], ["What is it?"])
    sampled = [int(t[0]) for t in p.generate_ids(batch1, GenerationRequest(10))]
    assert len(sampled) == 10, "turn 1 ended early: fewer answer positions to test"
    more = p.tokenizer.tok.encode("What colour is the square?").ids[:6]  # a next turn's ids
    ids = np.concatenate([batch1.input_ids[0], sampled[:-1], more])[None]  # [1, S]
    batch2 = dataclasses.replace(batch1, input_ids=ids, attention_mask=np.ones_like(ids))
    alone = [int(t[0]) for t in p.generate_ids(batch2, GenerationRequest(6))]
    engine = _engine(p)
    c1, c2 = Collector(), Collector()
    engine.start()
    try:
        t1 = engine.submit(batch1, GenerationRequest(10), c1)
        assert c1.done.wait(120)
        t2 = engine.submit(batch2, GenerationRequest(6), c2)
        assert c2.done.wait(120)
    finally:
        engine.stop(10)
    computed = t1.prompt_tokens + len(sampled) - 1  # positions with KV when turn 1 finished
    assert t2.cached_tokens >= computed - 1, (t2.cached_tokens, computed)  # its last may be a tail's end
    assert c2.text == p.tokenizer.decode(alone, skip_special_tokens=True)


def test_without_the_prefix_cache_turn_2_takes_its_image_from_the_image_cache(pipe):
    p = pipe
    astronaut, _ = _images()
    q1, q2 = "What is it?", "What colour is the square?"
    engine = _engine(p, prefix_cache_mb=0)
    engine.start()
    try:
        a1, t1 = _ask(engine, p, [astronaut], q1)
        a2, t2 = _ask(engine, p, [astronaut], q2, [(q1, a1)])
    finally:
        engine.stop(10)
    assert a2 == p.chat([astronaut], [(q1, a1)], q2, max_new_tokens=10)
    assert t2.cached_tokens == 0
    views = t1.batch.pixel_values.shape[0]
    assert engine.image_cache.hits == views and t2.encoded_views == 0, "turn 2 encoded its image again"
    assert engine.stats.encoded_tiles == t1.batch.pixel_values.shape[0]


def test_mixed_joins_answer_as_alone_with_caches_on(pipe):
    """Requests sharing prefixes join a running batch at different steps; answers equal alone."""
    p = pipe
    astronaut, cat = _images()
    system = "user assistant " * 6  # a shared long opening
    items = [
        ([astronaut], system + "What is it?"),
        ([cat], system + "What is it?"),
        ([astronaut], system + "Cat?"),
        ([], system + "Cat?"),
        ([astronaut], system + "What is it?"),
    ]
    if p.cfg.image_placement == "prefix":
        items = [(imgs or [cat], q) for imgs, q in items]
    alone = [p.generate(imgs, q, max_new_tokens=8) for imgs, q in items]
    engine = _engine(p, max_batch=3)
    got, _, tickets = run(p, engine, [(imgs, q, 8) for imgs, q in items], {0: [0, 1], 2: [2], 3: [3, 4]})
    assert [c.text for c in got] == alone
    assert tickets[4].cached_tokens > 0, "the repeated request reused nothing"


def test_repeats_after_different_reused_lengths_prefill_as_one_batch(pipe):
    """Prompts of different lengths (images or none) sent again once prefilled: each reuses
    all but its last position, the repeats prefill together in one call (their pasts of
    different lengths in one frame), and every answer equals the answer alone."""
    p = pipe
    astronaut, cat = _images()
    items = [
        ([astronaut], "What is it?"),
        ([cat], "user assistant " * 5 + "Cat?"),
        ([], "What colour is the square?"),
    ]
    if p.cfg.image_placement == "prefix":
        items = [(imgs or [cat], q) for imgs, q in items]
    alone = [p.generate(imgs, q, max_new_tokens=8) for imgs, q in items]
    engine = _engine(p, max_batch=6)
    first, again = [Collector() for _ in items], [Collector() for _ in items]
    tickets, state = [], {}

    def submit(collectors):
        for (imgs, q), c in zip(items, collectors, strict=True):
            tickets.append(engine.submit(p.prepare([imgs], [q]), GenerationRequest(8), c))

    def on_step(running, waiting):
        if "prefills" not in state and all(t.first_token for t in tickets):  # all 3 prefilled
            state["prefills"] = engine.stats.prefills
            submit(again)

    submit(first)
    engine.on_step = on_step
    engine.start()
    for c in first + again:
        assert c.done.wait(120), "no answer in 120 s"
    engine.stop(10)
    assert [c.text for c in first] == alone
    assert [c.text for c in again] == alone
    lengths = [t.prompt_tokens for t in tickets[:3]]
    assert len(set(lengths)) == 3, lengths
    assert [t.cached_tokens for t in tickets[3:]] == [n - 1 for n in lengths]
    assert engine.stats.prefills - state["prefills"] == 1, "the repeats were not prefilled together"


def test_a_long_prompt_comes_in_while_a_stream_decodes(pipe):
    """With a prefill budget of 8 positions per loop, a long image prompt is prefilled in pieces
    and the running stream gets a token in every loop that prefilled (counted in loops, not time)."""
    p = pipe
    astronaut, cat = _images()
    engine = _engine(p, prefill_chunk=8)
    stream, image = Collector(), Collector()
    text = p.prepare([[cat] if p.cfg.image_placement == "prefix" else []], ["user assistant"])
    engine.submit(text, GenerationRequest(200, ignore_eos=True), stream)
    long_q = "Describe every colour and every shape you can see. " * 2
    late = p.prepare([[astronaut]], [long_q])
    # its views encoded beforehand: what is tested is the prefill's pacing, and the encoder thread
    # racing the stream (it could end before the image is ready, and then nothing is interleaved)
    for key, embeds in zip(late.view_keys, p.encode_images(late.pixel_values), strict=True):
        engine.image_cache.put(key, embeds[None])
    state = {}

    def on_step(running, waiting):
        if engine.steps == 3 and "at" not in state:
            state["at"] = len(engine.stats.history)
            state["ticket"] = engine.submit(late, GenerationRequest(4), image)

    engine.on_step = on_step
    engine.start()
    assert stream.done.wait(120) and image.done.wait(120)
    engine.stop(10)
    history = engine.stats.history[state["at"] :]
    prefilled = [(rows, n) for rows, n in history if n]
    n = state["ticket"].prompt_tokens
    assert sum(k for _, k in prefilled) == n, "the image prompt was not prefilled exactly once"
    assert len(prefilled) >= -(-n // 8), "the prompt was not cut into pieces"
    assert all(k <= 8 for _, k in prefilled), "a loop prefilled more than its budget"
    assert all(rows >= 1 for rows, _ in prefilled), "the stream stopped while the prompt came in"
    assert stream.tokens == 200 and image.finish in ("stop", "length")


def test_caches_stay_within_their_limits(pipe):
    """Many different prompts through small caches: both stay within bytes, evicting the oldest."""
    p = pipe
    rng = np.random.default_rng(0)
    kv = p.bundle.kv
    block_bytes = 2 * kv.layers * kv.heads * BLOCK * kv.head_dim * 4
    tiles = p.prepare([[Image.new("RGB", (40, 40))]], ["Cat?"]).pixel_values.shape[0]
    image_bytes = tiles * p.cfg.image_token_count * p.cfg.lm_hidden_dim * 4
    engine = _engine(p, prefix_cache_mb=6 * block_bytes / 2**20, image_cache_mb=2.5 * image_bytes / 2**20)
    engine.start()
    try:
        for i in range(8):
            img = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
            _ask(engine, p, [img], f"Cat {i}? " + "What colour is the square? " * (i % 3), n=2)
            assert engine.prefix_cache.bytes <= engine.prefix_cache.max_bytes
            assert engine.image_cache.bytes <= engine.image_cache.max_bytes
    finally:
        engine.stop(10)
    assert engine.prefix_cache.bytes > engine.prefix_cache.max_bytes - block_bytes, (
        "the prefix cache did not fill"
    )
    view_bytes = image_bytes // tiles  # the image cache keeps views one by one
    assert len(engine.image_cache.entries) == engine.image_cache.max_bytes // view_bytes, (
        "the image cache did not fill to its limit"
    )


def test_prefix_cache_keys_and_eviction():
    kv = KVLayout(layers=1, heads=2, head_dim=3, dtype="float32")
    slot = 99
    ids = np.array([1, 2, slot, slot, slot, slot, 3, 4, 5, 6, 7, 8], np.int64)
    a = Prompt(ids, slot, 3, ["image-a"], [1], [4])
    b = Prompt(ids, slot, 3, ["image-b"], [1], [4])
    ka, kb = block_keys(a, 2), block_keys(b, 2)
    assert len(ka) == 6
    assert ka[0] == kb[0], "the block before the image differs"
    assert all(x != y for x, y in zip(ka[1:], kb[1:], strict=True)), "a block after another image matched"
    cache = PrefixCache(kv, max_bytes=4 * 2 * 2 * 2 * 3 * 4, block=2)  # room for 4 blocks
    src = KVCache(kv, 1, 12, in_place=False)
    src.start(1, 12)
    for v in src.views():
        v[...] = np.arange(v.size, dtype=np.float32).reshape(v.shape)
    a7, b7 = (Prompt(ids[:7], slot, 3, [k], [1], [4]) for k in ("image-a", "image-b"))  # 3 blocks, no tail
    cache.insert(a7, ka[:3], src, 0)
    assert len(cache.lookup(a, ka)) == 3
    cache.insert(b7, kb[:3], src, 0)  # shares kb[0] == ka[0]: 5 blocks -> the oldest leaf goes
    assert len(cache.blocks) == 4 and cache.bytes <= cache.max_bytes
    assert ka[0] in cache.blocks, "a root went before its leaves"
    found = cache.lookup(b, kb)
    assert len(found) == 3
    np.testing.assert_array_equal(found[1], src.read(0, 2, 4))
    assert len(cache.lookup(Prompt(ids[:3], slot, 3, ["image-a"], [1], [4]), ka)) == 1, (
        "the prompt's last position must be recomputed"
    )


def test_prefix_cache_never_holds_more_than_its_limit_while_inserting():
    """/metrics reads the size from another thread at any moment: an insert makes room before it
    adds each entry, so the size is within the limit at every point, not only after the call;
    a prompt larger than the whole cache keeps its first blocks (the ones lookups reach)."""
    kv = KVLayout(layers=1, heads=2, head_dim=3, dtype="float32")
    block_bytes = 2 * 2 * 2 * 3 * 4  # 2 positions x (K, V) x heads x head_dim x float32
    cache = PrefixCache(kv, max_bytes=3 * block_bytes, block=2)  # room for 3 blocks
    seen = []

    class Watched(KVCache):
        def read(self, row, start, end):  # called between making room and adding the entry
            seen.append(cache.bytes + (end - start) * cache.position_bytes)
            return super().read(row, start, end)

    src = Watched(kv, 1, 12, in_place=False)
    src.start(1, 12)
    for first in range(1, 40, 10):  # four prompts of five blocks, none shared
        p = Prompt(np.arange(first, first + 11, dtype=np.int64), -1, 3)
        cache.insert(p, block_keys(p, 2), src, 0)
        assert cache.bytes <= cache.max_bytes
        assert len(cache.lookup(p, block_keys(p, 2))) == 3, "its first three blocks were not kept"
    assert seen and max(seen) <= cache.max_bytes, seen


def test_prefix_cache_reuses_a_prompt_up_to_its_last_position():
    """After a prompt's blocks its tail is kept too: the same prompt again, or a chat's next turn
    that extends it, reuses every position but the last across block boundaries; a prompt that
    differs inside the tail or ends inside it reuses only the whole blocks before."""
    kv = KVLayout(layers=1, heads=2, head_dim=3, dtype="float32")
    cache = PrefixCache(kv, max_bytes=2**20, block=4)
    src = KVCache(kv, 1, 16, in_place=False)
    src.start(1, 16)
    for v in src.views():
        v[...] = np.arange(v.size, dtype=np.float32).reshape(v.shape)

    def prompt(ids):
        return Prompt(np.array(ids, np.int64), 99, 3)

    def reused(p):
        return cache.positions(cache.lookup(p, block_keys(p, 4)))

    turn1 = prompt(range(1, 12))  # 11 positions: blocks [0, 4), [4, 8), tail [8, 10)
    assert reused(turn1) == 0
    cache.insert(turn1, block_keys(turn1, 4), src, 0)
    found = cache.lookup(turn1, block_keys(turn1, 4))
    assert [kv.shape[2] for kv in found] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(found, axis=2), src.read(0, 0, 10))
    assert reused(prompt([*range(1, 12), 50, 51, 52])) == 10, "the next turn did not reuse turn 1's tail"
    assert reused(prompt([*range(1, 10), 60, 61, 62])) == 8, "a tail that differs matched"
    assert reused(prompt(range(1, 10))) == 8, "a tail longer than the prompt matched"
    assert cache.bytes == 10 * cache.position_bytes


def test_image_key_follows_the_pixels():
    x = np.zeros((2, 3, 4, 4), np.float32)
    y = x.copy()
    y[1, 2, 3, 3] = 1e-6
    assert image_key(x) == image_key(x.copy()) != image_key(y)
    assert image_key(x) != image_key(x[:1])


def test_a_prompt_prefilled_in_pieces_gives_the_whole_prefills_logits(pipe):
    """Prompt.chunk after a past equals one prefill of the whole prompt (fp32: within 1e-4, the
    rounding of a different matmul shape)."""
    p = pipe
    astronaut, _ = _images()
    batch = p.prepare([[astronaut]], ["Describe every colour you can see."])
    embeds = p.encode_images(batch.pixel_values)
    whole = prompt_frame(p.cfg, batch, embeds)
    cache = p.backend.new_cache(1, whole.shape[1])
    cache.start(1)
    want = p.step(whole, cache)
    prompt = Prompt.from_batch(p.cfg, batch)
    prompt.rows = embeds.reshape(-1, embeds.shape[-1])
    assert np.array_equal(prompt.ids, whole.input_ids[0])
    pieces = p.backend.new_cache(1, len(prompt))
    pieces.start(1)
    for start in range(0, len(prompt), 7):
        got = p.step(prompt.chunk(start, min(len(prompt), start + 7)), pieces)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

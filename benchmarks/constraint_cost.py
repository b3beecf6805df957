"""What a constraint costs per token, against the decode step it rides on, at batch 1 and 8.

    python -m benchmarks.constraint_cost [--steps 64] [--bundle .cache/bundles/nanovlm-222m-shape-fused-int4]

On the nanoVLM-222M shape's fused int4 bundle (built by `python -m benchmarks.quantization_report`)
each step of a greedy decode is timed in parts, in one run: the decoder step for B rows, then for
the constraint the mask of every row (llguidance, the rows in parallel, applied to the logits) and
each row consuming its token. The schema, an array of at least 128 strings, cannot complete within
the run, so every step of every row is constrained. If outlines-core is installed, its mask for one row over
the same schema is timed too (the engine this toolkit did not choose; docs/serving.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, ".cache", "bundles", "nanovlm-222m-shape-fused-int4")
# at least 128 items (a token each at the fewest), so a run of up to 128 steps stays constrained
SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 128}
PROMPT = "List the objects in this photograph as a JSON array of strings."


def ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def measure(pipe, rows: int, steps: int) -> dict[str, float]:
    """Median ms per step of: the decoder step, the masks, the consumes (B = rows)."""
    from core.sequence import next_frame, prompt_frame
    from evaluation.bench import bench_image
    from runtime.constraint import Constraint

    batch = pipe.prepare([[bench_image(None)]] * rows, [PROMPT] * rows)
    frame = prompt_frame(pipe.cfg, batch, pipe.encode_images(batch.pixel_values))
    cache = pipe.backend.new_cache(rows, frame.shape[1] + steps + 1)
    cache.start(rows)
    matchers = [pipe.grammars.matcher(Constraint.json_schema(SCHEMA)) for _ in range(rows)]
    logits = pipe.step(frame, cache)  # prefill
    step_s, mask_s, consume_s = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        pipe.grammars.mask_logits(logits, matchers)
        t1 = time.perf_counter()
        token = logits.argmax(-1)  # [B]
        t2 = time.perf_counter()
        for m, t in zip(matchers, token.tolist(), strict=True):
            m.consume(t)
        t3 = time.perf_counter()
        frame = next_frame(frame, token)
        logits = pipe.step(frame, cache)
        step_s.append(time.perf_counter() - t3)
        mask_s.append(t1 - t0)
        consume_s.append(t3 - t2)
    assert not any(m.done for m in matchers)  # constrained to the last step
    return {"step_ms": ms(step_s), "mask_ms": ms(mask_s), "consume_ms": ms(consume_s)}


def outlines_core_mask_ms(tokenizer_json: str, eos: int, steps: int) -> float | None:
    """outlines-core's mask for one row over SCHEMA, applied to random logits that then pick the
    token, median ms."""
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return None
    from tokenizers import Tokenizer

    # GPT-2 byte-level BPE: token strings spell bytes with printable stand-ins
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    words: dict[bytes, list[int]] = {}
    for text, i in Tokenizer.from_str(tokenizer_json).get_vocab().items():
        if i != eos and all(c in byte_of for c in text):
            words.setdefault(bytes(byte_of[c] for c in text), []).append(i)
    guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA)), Vocabulary(eos, words)))
    n = max(max(v) for v in words.values()) + 1
    mask = np.zeros((n + 31) // 32, np.int32)
    rng, times = np.random.default_rng(0), []
    for _ in range(steps):
        logits = rng.standard_normal((1, n)).astype(np.float32)
        t0 = time.perf_counter()  # the mask and its application, as Grammars.mask_logits does them
        guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:n]
        logits[0, allowed == 0] = -np.inf
        times.append(time.perf_counter() - t0)
        guide.advance(int(logits.argmax()))
    return ms(times)


def main() -> None:
    from core.files import write_json
    from evaluation.bench import machine
    from runtime.constraint import Constraint
    from runtime.pipeline import VLMPipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=BUNDLE)
    ap.add_argument("--steps", type=int, choices=range(1, 129), default=64, metavar="1..128")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pipe = VLMPipeline.from_bundle(args.bundle)
    pipe.grammars.check(Constraint.json_schema(SCHEMA))  # builds the tokenizer, outside the timed steps
    measure(pipe, 1, 4)  # warm-up
    rows = {b: measure(pipe, b, args.steps) for b in (1, 8)}
    oc = outlines_core_mask_ms(pipe.tokenizer.tok.to_str(), pipe.tokenizer.eos_token_id, args.steps)
    print(
        f"\n{os.path.basename(args.bundle)}, vocabulary {pipe.cfg.lm_vocab_size}, {args.steps} greedy steps, "
        f"median ms per step, {machine()}\n"
    )
    print("| batch | decode step | masks (llguidance) | consumes | constraint / step |")
    print("| --- | --- | --- | --- | --- |")
    for b, r in rows.items():
        r["ratio"] = (r["mask_ms"] + r["consume_ms"]) / r["step_ms"]
        print(
            f"| {b} | {r['step_ms']:.2f} | {r['mask_ms']:.3f} | {r['consume_ms']:.3f} | **{100 * r['ratio']:.1f}%** |"
        )
    if oc is not None:
        print(f"\noutlines-core, one row's mask over the same schema, applied: {oc:.3f} ms")
    if args.json:
        write_json(args.json, {"machine": machine(), "rows": rows, "outlines_core_mask_ms": oc})


if __name__ == "__main__":
    main()

"""Text prefill and batched decode speed of decoder bundles, in one run: positions per second.

    python -m benchmarks.prefill [--lengths 64 256 512] [--rows 1 8] [--rounds 5] [--modes ...]

On the nanoVLM-222M shape with the real SmolLM2-135M-Instruct decoder (the bundles of
benchmarks/quantization_report.py, cached under .cache/bundles; quantized here when missing), one
decoder call over a text prompt of each length (batch 1: a first answer's prefill), and one decode
step for each batch size in --rows after a 64-token prompt per row (continuous batching's shared
step). Median of --rounds after a warm-up; every bundle is timed interleaved, round by round, so the
ratios come from the same minutes. Prints a table: positions/s, and each bundle against fp32.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np

from core.sequence import Frame

DEFAULT_MODES = ("fp32", "int8-dynamic", "int8-w8a8", "fused fp32", "fused int8-dynamic", "fused int8-w8a8")


def text_frame(ids: np.ndarray, hidden: int) -> Frame:
    """A text-only prefill of ids [B, S] (no image rows)."""
    B, S = ids.shape
    mask = np.ones((B, S), np.int64)
    return Frame(ids, np.zeros((0, hidden), np.float32), mask, np.tile(np.arange(S), (B, 1)))


def time_prefill(pipe, length: int) -> float:
    """Seconds of one decoder call over `length` text positions, batch 1."""
    ids = np.random.default_rng(0).integers(100, 20000, (1, length))
    cache = pipe.backend.new_cache(1, length)
    cache.start(1)
    t0 = time.perf_counter()
    pipe.backend.step(text_frame(ids, pipe.cfg.lm_hidden_dim), cache)
    return time.perf_counter() - t0


def time_batch_step(pipe, rows: int, prompt: int = 64) -> float:
    """Seconds of one decode step of `rows` rows, each after a `prompt`-token prefill."""
    from core.sequence import next_frame

    ids = np.random.default_rng(1).integers(100, 20000, (rows, prompt))
    cache = pipe.backend.new_cache(rows, prompt + 1)
    cache.start(rows)
    frame = text_frame(ids, pipe.cfg.lm_hidden_dim)
    logits = pipe.backend.step(frame, cache)
    step = next_frame(frame, logits.argmax(-1))
    cache.start(rows, prompt)
    t0 = time.perf_counter()
    pipe.backend.step(step, cache)
    return time.perf_counter() - t0


def main() -> None:
    from benchmarks.quantization_report import photo_folder, variants
    from benchmarks.runtime_decode import build_bundle, build_checkpoint
    from evaluation.bench import machine
    from runtime.pipeline import VLMPipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES))
    a = ap.parse_args()
    if min(a.lengths + a.rows) < 1 or a.rounds < 1:
        ap.error("--lengths, --rows and --rounds must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    ckpt = build_checkpoint()
    paths = variants(ckpt, build_bundle(ckpt), "nanovlm-222m-shape", photo_folder(), 20, a.modes)
    paths = {m: p for m, p in paths.items() if m in a.modes}
    pipes = {m: VLMPipeline.from_bundle(p) for m, p in paths.items()}
    jobs = [("prefill", n) for n in a.lengths] + [("batch", r) for r in a.rows]
    times: dict[tuple, list[float]] = {(m, *j): [] for m in pipes for j in jobs}
    for r in range(a.rounds + 1):  # round 0 warms up
        for kind, n in jobs:
            for mode, pipe in pipes.items():
                t = time_prefill(pipe, n) if kind == "prefill" else time_batch_step(pipe, n)
                if r:
                    times[(mode, kind, n)].append(t)
    print(f"\nnanoVLM-222M shape, real SmolLM2-135M decoder; {machine()}; median of {a.rounds}\n")
    head = [f"prefill {n} (pos/s)" for n in a.lengths] + [f"decode step x{r} (tok/s)" for r in a.rows]
    print("| bundle | " + " | ".join(head) + " |\n|---|" + "---|" * len(head))
    base = {j: statistics.median(times[("fp32", *j)]) for j in jobs} if "fp32" in pipes else None
    for mode in pipes:
        cells = []
        for kind, n in jobs:
            t = statistics.median(times[(mode, kind, n)])
            ratio = f" ({base[(kind, n)] / t:.2f}x)" if base else ""
            cells.append(f"{n / t:.0f}{ratio}")
        print(f"| {mode} | " + " | ".join(cells) + " |")
    print("\n(x): speed against the fp32 standard bundle in the same rounds")


if __name__ == "__main__":
    main()

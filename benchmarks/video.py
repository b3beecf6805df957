"""Camera frames on the SmolVLM-256M shape at fused int8: what reusing unchanged views buys.

    python -m benchmarks.video [--bundle DIR] [--frames 10] [--max-new-tokens 16] [--stream-seconds 120]
                               [--json docs/video.json] [--plot docs/video.png]

One run, 2 threads, the SmolVLM-256M-shape bundle benchmarks/smolvlm_speed.py builds (random
weights, real cost), fused graphs at int8-dynamic; frames are scikit-image's astronaut at 512x512,
17 views each at the checkpoint's settings (a 4x4 grid of 512 px tiles and a global view):

  first photo   a frame through an engine with empty caches: every view encoded, every position
                prefilled (the cost of a frame without reuse)
  static        the same frame again and again (a still scene, no noise): exact reuse
  moving        a 48 px square crossing the picture, one step a frame: exact reuse keeps the views
                it did not touch and the KV up to the first view that changed; each answer is
                checked against the same frame answered with no reuse at all; then at each
                --reuse-threshold T, and (exact reuse, latency only) with the square crossing
                each row of the 4x4 grid, since the first changed view decides how much of the
                prompt is recomputed
  noisy         the moving scene with sensor noise (Gaussian, sigma 2 levels): no view is ever
                identical, so exact reuse finds nothing; --reuse-threshold T: per T, frame latency
                and the share of answers equal to no reuse's
  watch         `watch` on a 10 fps file for --stream-seconds (played at its own rate): the lag
                between a frame's time and its answer, frames answered and dropped, and the
                process's resident memory over the stream

Latency is a frame's wall time from the image to its last token (prepare, encode, prefill,
--max-new-tokens of decode, EOS off); time to first token beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Is anything moving? Describe the scene."
THRESHOLDS = (1.0, 2.0, 4.0, 8.0)
GRID_ROW_TOPS = (40, 168, 296, 424)  # the square inside each 128 px row of a 4x4 grid over 512 px


def frames(n: int, moving: bool, noise: float, seed: int = 0, top: int = 200) -> list:
    """Camera-like 512x512 frames: the astronaut, a 48 px red square (rows top..top+48) stepping
    24 px a frame when `moving`, Gaussian sensor noise of `noise` levels."""
    import numpy as np
    from PIL import Image
    from skimage import data

    base = np.asarray(Image.fromarray(data.astronaut()).resize((512, 512)), np.float32)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = base.copy()
        if moving:
            x = 40 + 24 * i % 400
            f[top : top + 48, x : x + 48] = (230, 20, 20)
        if noise:
            f += rng.normal(0, noise, f.shape)
        out.append(Image.fromarray(np.clip(f + 0.5, 0, 255).astype(np.uint8)))
    return out


def run_frames(pipe, images, n_tokens: int, threshold: float = 0.0, reuse: bool = True) -> list[dict]:
    """Each image answered in turn by one engine (caches on, or off with reuse=False)."""
    from runtime.batching import ContinuousBatcher
    from runtime.engine_api import EngineConfig
    from runtime.watch import Frame, answer_frame, engine_for

    if reuse:
        engine = engine_for(pipe, images[0], threshold, n_tokens)
    else:
        engine = ContinuousBatcher(pipe, config=EngineConfig(1, 1, image_cache_mb=0, prefix_cache_mb=0))
    engine.start()
    try:
        return [
            answer_frame(pipe, engine, Frame(img, i / 10, i), PROMPT, n_tokens)
            for i, img in enumerate(images)
        ]
    finally:
        engine.stop(10)


def summary(lines: list[dict], skip_first: bool = True) -> dict:
    rest = lines[1:] if skip_first and len(lines) > 1 else lines
    return {
        "frames": len(rest),
        "latency_s": statistics.median(ln["total_s"] for ln in rest),
        "ttft_s": statistics.median(ln["ttft_s"] for ln in rest),
        "views": rest[0]["views"],
        "reused_views": statistics.mean(ln["reused_views"] for ln in rest),
        "cached_tokens": statistics.mean(ln["cached_tokens"] for ln in rest),
    }


def agreement(lines: list[dict], base: list[dict]) -> float:
    """The share of frames answered as `base` (the same frames with no reuse) answered them."""
    return sum(a["answer"] == b["answer"] for a, b in zip(lines, base, strict=True)) / len(lines)


def at_thresholds(pipe, images, base: list[dict], n_tokens: int) -> list[dict]:
    """The frames at each --reuse-threshold of THRESHOLDS: summary and agreement with `base`."""
    rows = []
    for t in THRESHOLDS:
        lines = run_frames(pipe, images, n_tokens, threshold=t)
        rows.append({"threshold": t, **summary(lines), "answers_equal_no_reuse": agreement(lines, base)})
    return rows


def watch_stream(bundle: str, seconds: float, n_tokens: int, tmp: str) -> dict:
    """`watch` on a 10 fps file of the moving scene, played at its own rate, in this process."""
    import numpy as np

    from runtime.pipeline import VLMPipeline
    from runtime.watch import watch
    from tests.video_helpers import write_clip

    clip = os.path.join(tmp, "stream.mp4")
    n = int(seconds * 10)
    cycle = [np.asarray(f) for f in frames(20, moving=True, noise=0)]  # the square loops every 2 s
    write_clip(clip, [cycle[i % len(cycle)] for i in range(n)], fps=10)
    pipe = VLMPipeline.from_bundle(bundle, threads=2)
    lines, rss = [], []
    for line in watch(pipe, clip, PROMPT, max_new_tokens=n_tokens):
        lines.append(line)
        rss.append((line["t"], _rss_mb()))
    lags = [ln["lag_s"] for ln in lines]
    half = len(rss) // 2
    return {
        "stream_s": seconds,
        "frames_in_stream": n,
        "answered": len(lines),
        "lag_max_s": max(lags),
        "lag_median_s": statistics.median(lags),
        "lag_last_s": lags[-1],
        "rss_mb_first_half_max": max(r for _, r in rss[:half]) if half else None,
        "rss_mb_second_half_max": max(r for _, r in rss[half:]),
        "rss": rss,
        "lags": [(ln["t"], ln["lag_s"]) for ln in lines],
    }


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = report.get("watch")
    fig, axes = plt.subplots(1, 2 if w else 1, figsize=(12 if w else 7, 6), squeeze=False)
    a = axes[0][0]
    rows = [("first photo", report["first_photo"]["latency_s"])]
    rows += [
        ("static, exact reuse", report["static"]["latency_s"]),
        ("moving, exact reuse", report["moving"]["latency_s"]),
    ]
    rows += [(f"moving, T={t['threshold']:g}", t["latency_s"]) for t in report.get("moving_threshold", [])]
    rows += [
        (f"moving in grid row {i + 1}, exact", t["latency_s"])
        for i, t in enumerate(report.get("moving_rows", []))
    ]
    rows += [(f"noisy, T={t['threshold']:g}", t["latency_s"]) for t in report["noisy"]]
    a.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color="#4c72b0")
    a.axvline(
        0.25 * report["first_photo"]["latency_s"], color="#c44e52", linestyle="--", label="0.25x first photo"
    )
    a.legend(loc="lower right")
    a.set_xlabel("per-frame latency (s)")
    a.set_title(f"{report['first_photo']['views']} views a frame, 2 cores")
    if w:
        b = axes[0][1]
        t, lag = zip(*w["lags"], strict=True)
        b.plot(t, lag, label="lag (s)")
        b2 = b.twinx()
        tr, rss = zip(*w["rss"], strict=True)
        b2.plot(tr, rss, color="#dd8452", label="RSS (MB)")
        b2.set_ylabel("resident memory (MB)")
        b.set_xlabel("stream time (s)")
        b.set_ylabel("answer lag behind the frame (s)")
        b.set_title(f"watch on a 10 fps file: {w['answered']} of {w['frames_in_stream']} frames answered")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="Another bundle (default: the SmolVLM-256M shape, fused int8-dynamic).")
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--stream-seconds", type=float, default=120.0)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    import tempfile

    from benchmarks.smolvlm_speed import build_checkpoint, bundles
    from runtime.pipeline import VLMPipeline

    bundle = args.bundle or bundles(build_checkpoint())["fused int8-dynamic"]
    pipe = VLMPipeline.from_bundle(bundle, threads=2)
    cpu = sorted(
        {
            f
            for line in open("/proc/cpuinfo")
            if line.startswith("flags")
            for f in line.split()
            if f in ("avx2", "avx512_vnni")
        }
    )
    n, k = args.frames, args.max_new_tokens
    report: dict = {"bundle": bundle, "cpu": cpu, "max_new_tokens": k}

    print("warm-up, then every moving frame with no reuse (the first-photo cost) ...", flush=True)
    still, moving = frames(n, moving=False, noise=0), frames(n, moving=True, noise=0)
    run_frames(pipe, still[:1], k, reuse=False)  # first-run allocations, not counted
    plain = run_frames(pipe, moving, k, reuse=False)
    report["first_photo"] = summary(plain, skip_first=False)  # every frame costs a first photo here

    print("the static scene ...", flush=True)
    static = run_frames(pipe, still, k)
    alone = run_frames(pipe, still[:1], k, reuse=False)[0]
    report["static"] = summary(static) | {"answers_equal_no_reuse": agreement(static, [alone] * n)}

    print("the moving scene with reuse ...", flush=True)
    reused = run_frames(pipe, moving, k)
    report["moving"] = summary(reused) | {"answers_equal_no_reuse": agreement(reused, plain)}
    report["moving_threshold"] = at_thresholds(pipe, moving, plain, k)

    print("the moving scene in each row of the grid (exact reuse) ...", flush=True)
    report["moving_rows"] = [
        {"top": top, **summary(run_frames(pipe, frames(n, moving=True, noise=0, top=top), k))}
        for top in GRID_ROW_TOPS
    ]

    print("the noisy moving scene at each threshold ...", flush=True)
    noisy = frames(n, moving=True, noise=2.0)
    base = run_frames(pipe, noisy, k, reuse=False)
    report["noisy"] = [
        {"threshold": 0.0, **summary(run_frames(pipe, noisy, k)), "answers_equal_no_reuse": 1.0}
    ]
    report["noisy"] += at_thresholds(pipe, noisy, base, k)
    report["noisy"][0]["answers_equal_no_reuse"] = None  # exact reuse: T=0 is the baseline's own path

    if args.stream_seconds:
        print(f"watch on a {args.stream_seconds:g} s stream at 10 fps ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            report["watch"] = watch_stream(bundle, args.stream_seconds, k, tmp)

    first = report["first_photo"]["latency_s"]
    views = report["first_photo"]["views"]
    print(f"\nCPU: {', '.join(cpu)}; {n} frames a scene, {k} new tokens, {views} views a frame\n")
    print(
        "| scene | reuse | per-frame latency (s) | vs first photo | TTFT (s) | views reused | answers = no reuse |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    fp = report["first_photo"]
    print(
        f"| first photo (every frame, no reuse) | none | {first:.2f} | 1.00x | {fp['ttft_s']:.2f} | 0 / {views} | - |"
    )
    for name in ("static", "moving"):
        r = report[name]
        print(
            f"| {name} | exact | {r['latency_s']:.2f} | {r['latency_s'] / first:.2f}x | {r['ttft_s']:.2f} | "
            f"{r['reused_views']:.1f} / {r['views']} | {r['answers_equal_no_reuse']:.0%} |"
        )
    scenes = [("moving", r) for r in report["moving_threshold"]] + [
        ("noisy (sigma 2)", r) for r in report["noisy"]
    ]
    for scene, r in scenes:
        eq = "-" if r["answers_equal_no_reuse"] is None else f"{r['answers_equal_no_reuse']:.0%}"
        label = "exact" if r["threshold"] == 0 else f"T = {r['threshold']:g}"
        print(
            f"| {scene} | {label} | {r['latency_s']:.2f} | {r['latency_s'] / first:.2f}x | {r['ttft_s']:.2f} | "
            f"{r['reused_views']:.1f} / {r['views']} | {eq} |"
        )
    for i, r in enumerate(report["moving_rows"]):
        print(
            f"| moving, grid row {i + 1} of 4 | exact | {r['latency_s']:.2f} | {r['latency_s'] / first:.2f}x | "
            f"{r['ttft_s']:.2f} | {r['reused_views']:.1f} / {r['views']} | - |"
        )
    w = report.get("watch")
    if w:
        print(
            f"\nwatch, {w['stream_s']:g} s at 10 fps: {w['answered']} of {w['frames_in_stream']} frames answered; "
            f"lag median {w['lag_median_s']:.2f} s, max {w['lag_max_s']:.2f} s, last {w['lag_last_s']:.2f} s; "
            f"RSS max {w['rss_mb_first_half_max']:.0f} MB (first half) vs {w['rss_mb_second_half_max']:.0f} MB (second)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()

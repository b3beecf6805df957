"""Where the time goes, per op type: image encode, prefill and decode of one generation.

    python -m benchmarks.op_profile BUNDLE [BUNDLE ...] [--max-new-tokens 32] [--json OUT]

Each bundle answers one image + runtime_decode.py's prompt with onnxruntime's per-node profile on
(OrtBackend's profile_dir): two warm-up generations, then the one reported. Per phase it prints
the wall time and each op type's share of the node time. Under benchmarks/avx2_proxy.py the same
table shows an AVX2-only CPU's kernels.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP = 2


def phases(events: list[dict], runs_per_generation: int) -> list[dict]:
    """The last generation's runs of one session: [{wall_us, ops: {op type: node µs}}], in order."""
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"]
    )[-runs_per_generation:]
    out = [{"wall_us": r["dur"], "ops": collections.Counter()} for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        for r, phase in zip(runs, out, strict=True):
            if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                phase["ops"][e["args"]["op_name"]] += e["dur"]
    return out


def profile(path: str, new_tokens: int) -> dict[str, dict]:
    """{phase: {wall_ms, ops: {op type: share}}} for image encode, prefill and decode (per step)."""
    from benchmarks.runtime_decode import PROMPT
    from evaluation.bench import bench_image
    from runtime.pipeline import GenerationRequest, VLMPipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipe = VLMPipeline.from_bundle(path, profile_dir=tmp)
        batch = pipe.prepare([[bench_image(None)]], [PROMPT])
        for _ in range(WARMUP + 1):
            list(pipe.generate_ids(batch, GenerationRequest(max_new_tokens=new_tokens, ignore_eos=True)))
        loaded = {}
        for graph, session in pipe.backend.sessions.items():
            with open(session.end_profiling()) as f:
                loaded[graph] = json.load(f)
    decoder_runs = sum(e["name"] == "model_run" for e in loaded["decoder"]) // (WARMUP + 1)
    encode = phases(loaded["vision_encoder"], 1)
    prefill, *decode = phases(loaded["decoder"], decoder_runs)
    steps = {
        "wall_us": sum(d["wall_us"] for d in decode) / max(1, len(decode)),
        "ops": sum((d["ops"] for d in decode), collections.Counter()),
    }
    out = {}
    for name, phase in (("image encode", encode[0]), ("prefill", prefill), ("decode step", steps)):
        total = sum(phase["ops"].values()) or 1
        out[name] = {
            "wall_ms": phase["wall_us"] / 1e3,
            "ops": {op: t / total for op, t in phase["ops"].most_common()},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--top", type=int, default=5, help="op types shown per phase")
    ap.add_argument("--json", help="write the full profile summary here")
    args = ap.parse_args()
    if args.max_new_tokens < 2:
        ap.error("--max-new-tokens must be at least 2 (one prefill, one decode step)")
    from evaluation.bench import machine

    report = {}
    print(f"{machine()}, one image + runtime_decode.py's prompt, {args.max_new_tokens} new tokens\n")
    print("| bundle | phase | wall (ms) | op types by share of node time |\n| --- | --- | --- | --- |")
    for path in args.bundles:
        report[path] = profile(path, args.max_new_tokens)
        for name, phase in report[path].items():
            top = ", ".join(f"{op} {share:.0%}" for op, share in list(phase["ops"].items())[: args.top])
            print(f"| {os.path.basename(path.rstrip('/'))} | {name} | {phase['wall_ms']:.1f} | {top} |")
    if args.json:
        from core.files import atomic_write

        with atomic_write(args.json) as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

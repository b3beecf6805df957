"""Decode speed of the backends that carry the speed bars, interleaved round by round.

    python -m benchmarks.head_to_head [--rounds 7] [--max-new-tokens 128]

quantization_report.py times each backend in turn, a minute or more apart; on a shared machine
the speed drifts by 10-30% over that time, more than the differences it has to show. Here every
round times each backend once, back to back, so each comparison is between neighbours in time:
the standard fp32 bundle (the INT8 bar's baseline), the fused fp32, fused int8-dynamic and fused
int4 bundles, and llama.cpp on the Q4_1 GGUF of the same SmolLM2 weights (the int4 bar). Per
round: decode tok/s of each, and each one's ratio to its reference in that round; the table gives
medians (and min-max) over rounds. The bundles stay loaded in this process; llama.cpp runs in a
child process per round (its load and a warm-up generation are not timed), so neither's threads
compete with the other's.
Needs the bundles and GGUF that quantization_report.py caches.
"""

from __future__ import annotations

import argparse
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache")
BUNDLES = {
    "fp32": "nanovlm-222m-shape-fp32",
    "fused fp32": "nanovlm-222m-shape-fused-fp32",
    "fused int8-dynamic": "nanovlm-222m-shape-fused-int8-dynamic",
    "fused int4": "nanovlm-222m-shape-fused-int4",
}
RATIOS = {"fused int8-dynamic": "fp32", "fused int4": "llama.cpp Q4_1"}  # bar: 2.5x, and >= 1x


def llama_cpp_warm(gguf: str, ids: list[int], new_tokens: int, threads: int) -> dict:
    """(in a child process) a warm-up generation, then the timed one: llama.cpp's first decode in
    a process is slower than its later ones."""
    from benchmarks.llamacpp import decode_speed

    decode_speed(gguf, ids, new_tokens, threads=threads)
    return decode_speed(gguf, ids, new_tokens, threads=threads)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from tqdm import tqdm

    from benchmarks.llamacpp import prompt_ids
    from benchmarks.runtime_decode import PROMPT
    from evaluation.bench import bench_image, in_fresh_process, machine, runtime_run, spread
    from runtime.pipeline import GenerationRequest, VLMPipeline

    threads = os.cpu_count() or 1
    pipes, batches = {}, {}
    for name, d in BUNDLES.items():
        pipes[name] = VLMPipeline.from_bundle(os.path.join(CACHE, "bundles", d), threads=threads)
        batches[name] = pipes[name].prepare([[bench_image(None)]], [PROMPT])
    request = GenerationRequest(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    gguf = os.path.join(CACHE, "smollm2-135m-q4_1.gguf")
    positions = None

    def run_bundle(name: str) -> float:
        nonlocal positions
        _, timings = runtime_run(pipes[name], batches[name], request)
        positions = timings.prompt_tokens
        return timings.decode_tokens_per_s

    for name in pipes:  # warm-up, and the prompt length llama.cpp gets
        run_bundle(name)
    ids = prompt_ids(os.path.join(CACHE, "smollm2-135m-instruct", "tokenizer.json"), PROMPT, positions)
    rounds: list[dict[str, float]] = []
    for _ in tqdm(range(args.rounds + 1), desc="rounds", unit="round"):
        r = {name: run_bundle(name) for name in pipes}
        # in a child process: no ONNX Runtime thread pool of ours shares the cores with llama.cpp's
        r["llama.cpp Q4_1"] = in_fresh_process(llama_cpp_warm, gguf, ids, args.max_new_tokens, threads)[
            "decode_tokens_per_s"
        ]
        rounds.append(r)
    rounds = rounds[1:]  # the first round warms llama.cpp up

    report = {
        "machine": machine(threads),
        "prompt_positions": positions,
        "new_tokens": args.max_new_tokens,
        "rounds": rounds,
        "decode_tokens_per_s": {k: spread([r[k] for r in rounds]) for k in rounds[0]},
        "ratios": {f"{a} / {b}": spread([r[a] / r[b] for r in rounds]) for a, b in RATIOS.items()},
    }
    print(
        f"\n{len(rounds)} rounds, {positions} prompt positions, {args.max_new_tokens} new tokens, {threads} threads\n"
    )
    print("| backend | decode tok/s, median (min-max) |\n| --- | --- |")
    for k, s in report["decode_tokens_per_s"].items():
        print(f"| {k} | {s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) |")
    print("\n| ratio, per round | median (min-max) |\n| --- | --- |")
    for k, s in report["ratios"].items():
        print(f"| {k} | {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}) |")
    if args.json:
        from core.files import write_json

        write_json(args.json, report)


if __name__ == "__main__":
    main()

"""Serving throughput and latency against concurrency: `nanovlm serve` vs llama-cpp-python's server.

    python -m benchmarks.serve_bench [--levels 1 4 8 16] [--requests 16] [--max-tokens 64]
                                     [--servers "fused int8" "fused int4" "llama.cpp Q4_1"] [--json OUT]

Both servers hold the same SmolLM2-135M-Instruct weights: ours the nanoVLM-222M-shape bundles
(fused decoder, int8-dynamic and int4; built and cached by runtime_decode.py and
quantization_report.py), llama-cpp-python's OpenAI server (`python -m llama_cpp.server`) the
Q4_1 GGUF, started with --interrupt_requests false (by default a new request cuts off the running
stream). Each server runs alone on the machine, in turn. Per concurrency level, `--requests`
streamed chat requests with text prompts go out from that many client threads (closed loop), each
asking for --max-tokens new tokens; per request the time to the first content chunk (TTFT) and the
tokens received (usage when the server reports it, else content chunks); aggregate tokens/s = all
tokens of the level / its wall time. Prints a table, writes JSON and a PNG chart.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from serve.process import ChildServer, free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache")
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms, step by step.",
    "Describe a busy market in a small town on a Saturday morning.",
    "What should I pack for a week of hiking in the mountains?",
    "Tell me about the history of bicycles.",
    "Give me a recipe for a simple vegetable soup.",
    "Why is the sky blue? Explain it to a child.",
    "Write a letter to a friend about your holiday by the sea.",
]


# ----------------------------------------------------------------------------- the servers
def bundle_paths() -> dict[str, str]:
    """The 222M-shape fused bundles, built once (quantization_report.py's recipe and calibration)."""
    from benchmarks.quantization_report import photo_folder
    from benchmarks.runtime_decode import build_checkpoint, build_fused_int8, cached
    from calibration.quantize import quantize_bundle

    ckpt = build_checkpoint()
    int8 = build_fused_int8(ckpt)
    fused = os.path.join(CACHE, "bundles", "nanovlm-222m-shape-fused-fp32")
    int4 = os.path.join(CACHE, "bundles", "nanovlm-222m-shape-fused-int4")
    if not cached(int4):
        quantize_bundle(fused, int4, "int4", calibration=photo_folder(), samples=20, overwrite=True)
    return {"fused int8": int8, "fused int4": int4}


def gguf_q4_1() -> str:
    from benchmarks.llamacpp import cached_ggufs

    return cached_ggufs(CACHE)[1]


class LlamaCppServer(ChildServer):
    """`python -m llama_cpp.server` on the GGUF, 127.0.0.1, waiting (bounded) for /v1/models."""

    def __init__(self, gguf: str, threads: int):
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            gguf,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--n_ctx",
            "2048",
            "--chat_format",
            "chatml",
            "--interrupt_requests",
            "false",
        ]
        super().__init__(cmd, f"http://127.0.0.1:{self.port}/v1/models", "llama_cpp.server")


# ----------------------------------------------------------------------------- the client
def stream_chat(port: int, messages: list[dict], max_tokens: int) -> dict:
    """A streamed, greedy chat request -> {ttft_s, tokens, times (of content chunks, from send), text,
    tpot_s, total_s}."""
    body = {
        "model": "m",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    times, text, usage = [], "", None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        msg = json.loads(line[6:])
        if msg.get("usage"):
            usage = msg["usage"]["completion_tokens"]
        if msg.get("choices") and msg["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter() - t0)
            text += msg["choices"][0]["delta"]["content"]
    conn.close()
    end = time.perf_counter() - t0
    tokens = usage or len(times)
    return {
        "ttft_s": times[0] if times else float("nan"),
        "tokens": tokens,
        "times": times,
        "text": text,
        "tpot_s": (end - times[0]) / (tokens - 1) if times and tokens > 1 else 0.0,
        "total_s": end,
    }


def one_request(port: int, prompt: str, max_tokens: int) -> dict:
    """One user prompt, streamed: -> {ttft_s, tokens, total_s}."""
    r = stream_chat(port, [{"role": "user", "content": prompt}], max_tokens)
    return {k: r[k] for k in ("ttft_s", "tokens", "total_s")}


def level(port: int, concurrency: int, requests: int, max_tokens: int) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda p: one_request(port, p, max_tokens), prompts))
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft_s"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "wall_s": wall,
        "tokens": tokens,
        "aggregate_tokens_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p95_s": ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))],
    }


def sweep(port: int, levels: list[int], requests: int, max_tokens: int) -> list[dict]:
    one_request(port, PROMPTS[0], 8)  # warm-up
    return [level(port, c, max(requests, c), max_tokens) for c in levels]


# ----------------------------------------------------------------------------- report
def plot(results: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        c = [r["concurrency"] for r in rows]
        a.plot(c, [r["aggregate_tokens_per_s"] for r in rows], "o-", label=name)
        b.plot(c, [r["ttft_p95_s"] for r in rows], "o-", label=name)
    a.set(xlabel="concurrent requests", ylabel="aggregate decode tokens/s", title="Throughput")
    b.set(xlabel="concurrent requests", ylabel="p95 time to first token (s)", title="Latency", yscale="log")
    for ax in (a, b):
        ax.set_xticks(sorted({r["concurrency"] for rows in results.values() for r in rows}))
    save_chart(fig, (a, b), path)


def save_chart(fig, axes, path: str) -> None:
    """Grid and legend on every axis, then the PNG written atomically (serve_traffic's chart too)."""
    from core.files import atomic_write

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def main() -> None:
    from evaluation.bench import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per level (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--servers", nargs="+", default=["fused int8", "fused int4", "llama.cpp Q4_1"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=os.path.join(REPO, "docs", "serve_bench.png"))
    args = ap.parse_args()

    from serve.process import ServerProcess

    threads = os.cpu_count() or 1
    results: dict[str, list[dict]] = {}
    bundles = bundle_paths() if any(s != "llama.cpp Q4_1" for s in args.servers) else {}
    for name in args.servers:
        print(f"{name} ...", flush=True)
        if name == "llama.cpp Q4_1":
            with LlamaCppServer(gguf_q4_1(), threads) as s:
                results[name] = sweep(s.port, args.levels, args.requests, args.max_tokens)
        else:
            with ServerProcess(bundles[name], "--max-batch", str(args.max_batch), "--max-queue", "1024") as s:
                results[name] = sweep(s.port, args.levels, args.requests, args.max_tokens)

    print(
        f"\n{machine(threads)}, {args.max_tokens} new tokens, text prompts, {args.requests}+ requests per level\n"
    )
    print(
        "| server | concurrency | aggregate tok/s | TTFT p50 (s) | TTFT p95 (s) |\n| --- | --- | --- | --- | --- |"
    )
    for name, rows in results.items():
        for r in rows:
            print(
                f"| {name} | {r['concurrency']} | {r['aggregate_tokens_per_s']:.1f} | {r['ttft_p50_s']:.3f} | "
                f"{r['ttft_p95_s']:.3f} |"
            )
    by = {name: {r["concurrency"]: r for r in rows} for name, rows in results.items()}
    print("\n| bar | value |\n| --- | --- |")
    for name in by:
        if name.startswith("llama") or 1 not in by[name] or 8 not in by[name]:
            continue
        one, eight = by[name][1], by[name][8]
        print(
            f"| {name}: aggregate at 8 / own single stream (bar >= 3) | "
            f"{eight['aggregate_tokens_per_s'] / one['aggregate_tokens_per_s']:.2f}x |"
        )
        if "llama.cpp Q4_1" in by and 8 in by["llama.cpp Q4_1"]:
            print(
                f"| {name}: aggregate at 8 / llama.cpp server at 8 (bar >= 2) | "
                f"{eight['aggregate_tokens_per_s'] / by['llama.cpp Q4_1'][8]['aggregate_tokens_per_s']:.2f}x |"
            )
        print(
            f"| {name}: p95 TTFT at 8 / lone TTFT (bar <= 3) | {eight['ttft_p95_s'] / one['ttft_p50_s']:.2f}x |"
        )
    report = {"machine": machine(threads), "max_tokens": args.max_tokens, "results": results}
    if args.plot:
        plot(results, args.plot)
        print(f"\nchart: {args.plot}")
    if args.json:
        from core.files import write_json

        write_json(args.json, report)


if __name__ == "__main__":
    main()

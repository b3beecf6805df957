"""Serving under traffic, as `vllm bench serve` and AIPerf measure it: ours vs llama.cpp's llama-server.

    python -m benchmarks.serve_traffic [--rates 0.5 1 2 4] [--requests 32] [--json OUT] [--plot PNG]

Both servers hold the same weights, the random SmolVLM-256M-shaped checkpoint of
benchmarks/smolvlm_speed.py: ours its fused int8-dynamic bundle (`nanovlm serve --max-batch 8`; `--servers
"ours int8-w8a8"` its int8-w8a8 bundle),
llama-server (benchmarks/llama_server.py: built from the llama-cpp-python sdist) its Q8_0 text
GGUF and f32 mmproj, 8 parallel slots of 2,048 positions. Each server runs alone on the machine.

    burst     16 streamed text requests of 64 tokens from 8 client threads (closed loop; the 8
              prompts twice, so the second 8 can reuse the first's KV): TTFT p50 and aggregate
              tokens/s, after an unmeasured warm-up burst of 8 other prompts
    traffic   per rate, --requests arrivals as a Poisson process (seeded per rate, the same for
              both servers), each drawn from the mix: 75% text prompts (64 tokens), 19% chats whose
              second turn re-sends turn 1 and its real answer 1 s after it (32 tokens each), 6%
              photo prompts (scikit-image's coffee, 16 tokens); so a rate may draw no photo.
              Per request: TTFT, inter-token latency (ITL, between content chunks), time per
              output token (TPOT, (end - first) / (tokens - 1)); p50 and p99; goodput = requests
              per second that met the SLO (TTFT <= 1 s for text and chat turns, <= 40 s with a
              photo; TPOT <= 0.1 s).

Prints tables, writes a chart (PNG) and JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.serve_bench import PROMPTS, save_chart, stream_chat  # the same text prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = {  # server name -> the bundle `nanovlm serve` holds
    "ours": os.path.join(REPO, ".cache", "bundles", "smolvlm-256m-shape-fused-int8-dynamic"),
    "ours int8-w8a8": os.path.join(REPO, ".cache", "bundles", "smolvlm-256m-shape-fused-int8-w8a8"),
}
SLO = {"ttft_s": 1.0, "ttft_photo_s": 40.0, "tpot_s": 0.1}


# ----------------------------------------------------------------------------- one request
def photo_message(text: str) -> dict:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.coffee()).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
    }


# ----------------------------------------------------------------------------- workloads
def burst(port: int, requests: int = 16, clients: int = 8, max_tokens: int = 64) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(
            pool.map(
                lambda i: stream_chat(port, [{"role": "user", "content": PROMPTS[i % 8]}], max_tokens),
                range(requests),
            )
        )
    wall = time.perf_counter() - t0
    return {
        "ttft_p50_s": statistics.median(r["ttft_s"] for r in runs),
        "aggregate_tokens_per_s": sum(r["tokens"] for r in runs) / wall,
    }


def schedule(rate: float, requests: int, seed: int = 0) -> list[tuple[float, str, int]]:
    """(arrival s, kind, prompt index): Poisson arrivals, the mix above; the same for every server."""
    rng = random.Random(seed * 1000 + int(rate * 100))
    t, out = 0.0, []
    for i in range(requests):
        t += rng.expovariate(rate)
        u = rng.random()
        out.append((t, "photo" if u < 0.06 else "chat" if u < 0.25 else "text", i))
    return out


def traffic(port: int, rate: float, requests: int, photo: dict) -> dict:
    rows: list[dict] = []
    lock = threading.Lock()

    def record(kind: str, r: dict) -> None:
        limit = SLO["ttft_photo_s"] if kind == "photo" else SLO["ttft_s"]
        r = {"kind": kind, **r, "ok": r["ttft_s"] <= limit and r["tpot_s"] <= SLO["tpot_s"]}
        with lock:
            rows.append(r)

    def job(kind: str, i: int) -> None:
        try:
            if kind == "photo":
                record(kind, stream_chat(port, [photo], 16))
            elif kind == "text":
                record(kind, stream_chat(port, [{"role": "user", "content": PROMPTS[i % 8]}], 64))
            else:  # a chat: turn 1, then turn 2 with the whole history 1 s after the answer
                q1 = {"role": "user", "content": PROMPTS[i % 8]}
                first = stream_chat(port, [q1], 32)
                record("chat", first)
                time.sleep(1.0)
                history = [
                    q1,
                    {"role": "assistant", "content": first["text"]},
                    {"role": "user", "content": "Now say it again in fewer words."},
                ]
                record("chat", stream_chat(port, history, 32))
        except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
            with lock:
                rows.append({"kind": kind, "error": str(e), "ok": False})

    t0 = time.perf_counter()
    threads = []
    for at, kind, i in schedule(rate, requests):
        time.sleep(max(0.0, at - (time.perf_counter() - t0)))
        threads.append(threading.Thread(target=job, args=(kind, i)))
        threads[-1].start()
    for t in threads:
        t.join(1800)
    wall = time.perf_counter() - t0
    good = [r for r in rows if "error" not in r]
    itl = [b - a for r in good for a, b in zip(r["times"], r["times"][1:], strict=False)]
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    ttft = [r["ttft_s"] for r in good]
    tpot = [r["tpot_s"] for r in good if r["tokens"] > 1]
    return {
        "rate": rate,
        "requests": len(rows),
        "errors": len(rows) - len(good),
        "wall_s": wall,
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
        "itl_p50_s": pct(itl, 0.5),
        "itl_p99_s": pct(itl, 0.99),
        "tpot_p50_s": pct(tpot, 0.5),
        "tpot_p99_s": pct(tpot, 0.99),
        "goodput_rps": sum(r["ok"] for r in rows) / wall,
        "slo_met": sum(r["ok"] for r in rows),
        "output_tokens_per_s": sum(r["tokens"] for r in good) / wall,
    }


def run(port: int, rates: list[float], requests: int) -> dict:
    photo = photo_message("What is in this picture?")
    # warm-up, unmeasured: one request, then a burst of other prompts, so neither server's
    # first-time allocations for a batch (or our prefix cache, which keeps none of these) count
    stream_chat(port, [{"role": "user", "content": "Hi"}], 4)
    warm = [f"Count from one to {i + 3}, please." for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda q: stream_chat(port, [{"role": "user", "content": q}], 16), warm))
    out = {"burst": burst(port)}
    out["traffic"] = [traffic(port, r, requests, photo) for r in rates]
    return out


# ----------------------------------------------------------------------------- report
def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, r in results.items():
        rates = [t["rate"] for t in r["traffic"]]
        axes[0].plot(rates, [t["goodput_rps"] for t in r["traffic"]], "o-", label=name)
        axes[1].plot(rates, [t["ttft_p99_s"] for t in r["traffic"]], "o-", label=name)
        axes[2].plot(rates, [1000 * t["itl_p99_s"] for t in r["traffic"]], "o-", label=name)
    axes[0].set(xlabel="arrival rate (requests/s)", ylabel="goodput (requests/s within SLO)", title="Goodput")
    axes[1].set(
        xlabel="arrival rate (requests/s)", ylabel="p99 TTFT (s)", title="Time to first token", yscale="log"
    )
    axes[2].set(xlabel="arrival rate (requests/s)", ylabel="p99 inter-token latency (ms)", title="Streams")
    save_chart(fig, axes, path)


def main() -> None:
    from benchmarks.llama_server import LlamaServer, ggufs
    from benchmarks.smolvlm_speed import build_checkpoint
    from evaluation.bench import machine
    from serve.process import ServerProcess, free_port

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--rates",
        type=float,
        nargs="*",
        default=[0.5, 1.0, 2.0, 4.0],
        help="Poisson arrival rates (none: the burst only)",
    )
    ap.add_argument("--requests", type=int, default=32, help="arrivals per rate (a chat counts once)")
    ap.add_argument("--servers", nargs="+", choices=[*OURS, "llama-server"], default=["ours", "llama-server"])
    ap.add_argument(
        "--llama-isa",
        choices=["native", "avx2"],
        default="native",
        help="llama-server's CPU kernels (avx2: for a run under benchmarks/avx2_proxy.py)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=os.path.join(REPO, "docs", "serve_traffic.png"))
    a = ap.parse_args()
    for name in a.servers:
        if name in OURS and not os.path.isdir(OURS[name]):
            sys.exit(f"{OURS[name]}: no bundle; build it with benchmarks/smolvlm_speed.py")
    results, rss = {}, {}
    for name in a.servers:
        print(f"... {name}", file=sys.stderr, flush=True)
        if name in OURS:
            with ServerProcess(
                OURS[name], "--max-batch", "8", "--max-queue", "1024", "--max-tokens", "64", timeout=900
            ) as s:
                results[name] = run(s.port, a.rates, a.requests)
                rss[name] = s.rss_bytes()
        else:
            with LlamaServer(*ggufs(build_checkpoint()), free_port(), isa=a.llama_isa) as s:
                results[name] = run(s.port, a.rates, a.requests)
                rss[name] = s.rss_bytes()
    print(
        f"\n{machine(os.cpu_count() or 1)}; SLO: TTFT <= {SLO['ttft_s']} s (photo {SLO['ttft_photo_s']} s), "
        f"TPOT <= {SLO['tpot_s']} s\n"
    )
    print(
        "| server | burst of 16 from 8 clients: TTFT p50 s | aggregate tok/s | RSS at end MiB |\n|---|---|---|---|"
    )
    for name, r in results.items():
        b = r["burst"]
        print(
            f"| {name} | {b['ttft_p50_s']:.3f} | {b['aggregate_tokens_per_s']:.1f} | {rss[name] / 2**20:.0f} |"
        )
    print(
        "\n| server | rate req/s | requests (errors) | TTFT p50 / p99 s | ITL p50 / p99 ms | TPOT p50 / p99 ms | "
        "SLO met | goodput req/s | output tok/s |\n|---|---|---|---|---|---|---|---|---|"
    )
    for name, r in results.items():
        for t in r["traffic"]:
            print(
                f"| {name} | {t['rate']:g} | {t['requests']} ({t['errors']}) | {t['ttft_p50_s']:.3f} / "
                f"{t['ttft_p99_s']:.2f} | {1000 * t['itl_p50_s']:.0f} / {1000 * t['itl_p99_s']:.0f} | "
                f"{1000 * t['tpot_p50_s']:.0f} / {1000 * t['tpot_p99_s']:.0f} | {t['slo_met']} | "
                f"{t['goodput_rps']:.3f} | {t['output_tokens_per_s']:.1f} |"
            )
    if a.plot and a.rates:  # the chart is of the rates
        plot(results, a.plot)
        print(f"\nchart: {a.plot}")
    if a.json:
        from core.files import write_json

        write_json(
            a.json, {"machine": machine(os.cpu_count() or 1), "slo": SLO, "results": results, "rss": rss}
        )


if __name__ == "__main__":
    main()

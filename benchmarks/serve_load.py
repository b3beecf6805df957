"""Load and fault test of `nanovlm serve`: many concurrent clients, some malformed, some leaving.

    python -m benchmarks.serve_load BUNDLE [--requests 300] [--concurrency 16] [--malformed 0.1]
                                           [--disconnect 0.05] [--json report.json]

Starts the server (console script, 127.0.0.1), computes each valid question's greedy answer alone
with the runtime in this process, warms the server up at full concurrency, then sends the mix:
valid requests (half of them streamed) must come back 200 with exactly the answer they get alone;
malformed ones must get a 4xx; disconnecting clients read one chunk of a stream and hang up.
Reports status counts, wrong answers, 5xx, latency percentiles, the server's resident memory
after warm-up, at its peak during the run and at the end, and the largest size its image and
prefix caches reached (read from /metrics with the memory, every 0.2 s) against their limits.
Small limits (`--prefix-cache-mb 1`) make the run evict, so the limits are exercised, not only set.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUESTIONS = [
    "What is it?",
    "How many objects are there?",
    "Describe the colours.",
    "Cat?",
    "What colour is the square?",
]
PHOTOS = ["coffee", "astronaut", "chelsea", None]  # None: a text-only question


def _data_url(name: str, size: int) -> str:
    from PIL import Image
    from skimage import data

    img = Image.fromarray(getattr(data, name)())
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Case:
    body: dict
    image: str | None
    size: int
    question: str
    max_tokens: int
    expected: str = ""


def valid_cases(seed: int = 0) -> list[Case]:
    """Questions about photos of several sizes (some split into tiles) and text only, mixed max_tokens."""
    rng = random.Random(seed)
    cases = []
    for q in QUESTIONS:
        for photo in PHOTOS:
            size, n = rng.choice([48, 96, 512]), rng.choice([4, 16, 32])
            parts = [{"type": "text", "text": q}]
            if photo:
                parts.insert(0, {"type": "image_url", "image_url": {"url": _data_url(photo, size)}})
            body = {"model": "x", "messages": [{"role": "user", "content": parts}], "max_tokens": n}
            cases.append(Case(body, photo, size, q, n))
    return cases


def expected_answers(bundle: str, cases: list[Case]) -> None:
    """Each case's greedy answer alone, from the runtime in this process (what `nanovlm run` says)."""
    from PIL import Image
    from skimage import data

    from runtime.pipeline import VLMPipeline

    pipe = VLMPipeline.from_bundle(bundle)
    for c in cases:
        images = []
        if c.image:
            img = Image.fromarray(getattr(data, c.image)())
            img.thumbnail((c.size, c.size))
            buf = io.BytesIO()
            img.save(buf, "PNG")  # through PNG as the server sees it
            images = [Image.open(io.BytesIO(buf.getvalue()))]
        c.expected = pipe.generate(images, c.question, max_new_tokens=c.max_tokens)


MALFORMED = [
    b'{"messages": [ {"role": "user", "content": "hi"',  # truncated JSON
    json.dumps({"messages": []}).encode(),
    json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}).encode(),
    json.dumps(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!notbase64"}}
                    ],
                }
            ]
        }
    ).encode(),
    json.dumps(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}],
                }
            ]
        }
    ).encode(),
    b"\xff\xfe not json at all",
]


def _post(port: int, body: bytes, timeout: float = 300) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _stream_text(raw: bytes) -> str:
    text = ""
    for line in raw.decode().split("\n\n"):
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                text += chunk["choices"][0]["delta"].get("content") or ""
    return text


CACHE_GAUGES = {"prefix": "nanovlm_prefix_cache_bytes", "image": "nanovlm_image_cache_bytes"}


def cache_bytes(port: int) -> dict[str, float]:
    """The server's cache sizes in bytes, from its /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(values[gauge]) for name, gauge in CACHE_GAUGES.items()}


def one_job(port: int, kind: str, case: Case | None, malformed: bytes | None) -> dict:
    t0 = time.perf_counter()
    if kind == "malformed":
        status, _ = _post(port, malformed)
        return {"kind": kind, "status": status, "ok": 400 <= status < 500, "s": time.perf_counter() - t0}
    if kind == "disconnect":
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({**case.body, "stream": True}).encode(),
            {"Content-Type": "application/json"},
        )
        r = conn.getresponse()
        r.fp.readline()  # the first event, then hang up
        conn.close()
        return {"kind": kind, "status": r.status, "ok": r.status == 200, "s": time.perf_counter() - t0}
    stream = kind == "stream"
    status, raw = _post(port, json.dumps({**case.body, "stream": stream}).encode())
    text = None
    if status == 200:
        text = _stream_text(raw) if stream else json.loads(raw)["choices"][0]["message"]["content"]
    return {
        "kind": kind,
        "status": status,
        "ok": status == 200 and text == case.expected,
        "s": time.perf_counter() - t0,
    }


def run_load(
    server,
    cases: list[Case],
    requests: int,
    concurrency: int,
    malformed: float,
    disconnect: float,
    seed: int = 0,
) -> dict:
    """Warm up at full concurrency, then send the mix; -> the report."""
    rng = random.Random(seed)
    port = server.port
    with ThreadPoolExecutor(concurrency) as pool:
        warm = list(
            pool.map(
                lambda c: one_job(port, "plain", c, None),
                [cases[i % len(cases)] for i in range(2 * concurrency)],
            )
        )
    if not all(w["ok"] for w in warm):
        raise RuntimeError(
            f"warm-up answers differ from the runtime's: {[w for w in warm if not w['ok']][:3]}"
        )
    rss_warm = server.rss_bytes()
    jobs = []
    for _ in range(requests):
        x = rng.random()
        kind = (
            "malformed"
            if x < malformed
            else "disconnect"
            if x < malformed + disconnect
            else rng.choice(["plain", "stream"])
        )
        jobs.append((kind, rng.choice(cases), rng.choice(MALFORMED)))
    peak, caches, done = [rss_warm], [cache_bytes(port)], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak.append(server.rss_bytes())
            caches.append(cache_bytes(port))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda j: one_job(port, *j), jobs))
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    time.sleep(0.5)  # disconnected rows leave at the next step
    rss_end = server.rss_bytes()
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    valid = [r for r in results if r["kind"] in ("plain", "stream")]
    lat = sorted(r["s"] for r in valid)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "wall_s": wall,
        "kinds": {
            k: sum(r["kind"] == k for r in results) for k in ("plain", "stream", "malformed", "disconnect")
        },
        "statuses": statuses,
        "valid_correct": sum(r["ok"] for r in valid),
        "valid": len(valid),
        "malformed_4xx": sum(r["ok"] for r in results if r["kind"] == "malformed"),
        "server_errors_5xx": sum(r["status"] >= 500 for r in results),
        "latency_s": {"p50": lat[len(lat) // 2], "p95": lat[int(len(lat) * 0.95)], "max": lat[-1]},
        "rss_mb": {"after_warm_up": rss_warm / 2**20, "peak": max(peak) / 2**20, "end": rss_end / 2**20},
        "cache_peak_bytes": {name: max(c[name] for c in caches) for name in CACHE_GAUGES},
    }


def print_report(r: dict) -> None:
    print(
        f"\n{r['requests']} requests at concurrency {r['concurrency']} in {r['wall_s']:.1f} s: {r['kinds']}"
    )
    print("| measure | value |\n| --- | --- |")
    print(f"| valid requests answered exactly as alone | {r['valid_correct']} / {r['valid']} |")
    print(f"| malformed requests refused with a 4xx | {r['malformed_4xx']} / {r['kinds']['malformed']} |")
    print(f"| 5xx responses | {r['server_errors_5xx']} |")
    print(f"| statuses | {r['statuses']} |")
    lat = r["latency_s"]
    print(
        f"| valid request latency p50 / p95 / max | {lat['p50']:.2f} / {lat['p95']:.2f} / {lat['max']:.2f} s |"
    )
    m = r["rss_mb"]
    print(
        f"| server RSS after warm-up / peak / end | {m['after_warm_up']:.0f} / {m['peak']:.0f} / {m['end']:.0f} MB |"
    )
    for name, peak in r["cache_peak_bytes"].items():
        limit = r.get("cache_limit_mb", {}).get(name)
        print(
            f"| {name} cache, largest | {peak / 2**20:.2f} MB"
            + (f" (limit {limit:g} MB) |" if limit else " |")
        )


def main() -> None:
    from evaluation.bench import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--malformed", type=float, default=0.10)
    ap.add_argument("--disconnect", type=float, default=0.05)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-cache-mb", type=float, default=256.0, help="the server's limit")
    ap.add_argument("--prefix-cache-mb", type=float, default=512.0, help="the server's limit")
    ap.add_argument("--rounds", type=int, default=1, help="runs of --requests one after another")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if (
        min(args.requests, args.concurrency, args.rounds) < 1
        or min(args.image_cache_mb, args.prefix_cache_mb) < 0
    ):
        ap.error("--requests, --concurrency and --rounds must be at least 1, cache sizes 0 or more")

    from serve.process import ServerProcess

    cases = valid_cases(args.seed)
    expected_answers(args.bundle, cases)
    limits = {"image": args.image_cache_mb, "prefix": args.prefix_cache_mb}
    flags = ["--image-cache-mb", str(limits["image"]), "--prefix-cache-mb", str(limits["prefix"])]
    reports = []
    with ServerProcess(
        args.bundle, "--max-batch", str(args.max_batch), "--max-queue", "256", *flags
    ) as server:
        for k in range(args.rounds):
            reports.append(
                run_load(
                    server,
                    cases,
                    args.requests,
                    args.concurrency,
                    args.malformed,
                    args.disconnect,
                    args.seed + k,
                )
            )
            reports[-1] |= {"machine": machine(), "cache_limit_mb": limits}
            print_report(reports[-1])
    if args.json:
        from core.files import write_json

        write_json(args.json, reports)


if __name__ == "__main__":
    main()

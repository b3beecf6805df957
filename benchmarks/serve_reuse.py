"""Reuse across turns and streams that keep moving: `nanovlm serve` on the SmolVLM-256M shape.

    python -m benchmarks.serve_reuse [--bundle DIR] [--turns 3] [--json OUT]

The bundle is smolvlm_speed.py's fused int8-dynamic one (random SmolVLM-256M-shaped weights, real
cost; built and cached there); the photo is scikit-image's astronaut (17 tiles of 512 px, ~1,140
prompt positions). Two servers in turn, each alone on the machine: the engine as it ships, and
the same engine with both caches off (`--no-prefix-cache --image-cache-mb 0`). Through the real
`openai` client:

    chat      a photo chat of --turns turns, the history and the photo re-sent every turn (as
              every OpenAI client does): per turn the time to the first content chunk and
              usage.prompt_tokens_details.cached_tokens
    admit     a text stream runs; a request with another photo (scikit-image's coffee) arrives 2 s in: the stream's inter-chunk gaps
              while the photo is encoded and prefilled (the longest is the bar: <= 0.25 s)

Prints tables; writes JSON with --json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache")
DEFAULT_BUNDLE = os.path.join(CACHE, "bundles", "smolvlm-256m-shape-fused-int8-dynamic")
QUESTIONS = [
    "Describe this picture.",
    "What is the person wearing?",
    "What is in the background?",
    "Which colours stand out?",
]


def cpu_kind() -> str:
    flags = open("/proc/cpuinfo").read()
    kind = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, {kind}"


def photo_url(name: str) -> str:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, image: str | None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image}}] if image else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def stream(client, messages: list[dict], max_tokens: int, on_chunk=None) -> dict:
    """One streamed request: -> {ttft_s, text, cached_tokens, times (of content chunks)}."""
    t0 = time.perf_counter()
    out = client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, times, cached = "", [], 0
    for c in out:
        if c.usage is not None:
            details = c.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details else 0
        if c.choices and c.choices[0].delta.content:
            times.append(time.perf_counter())
            text += c.choices[0].delta.content
            if on_chunk:
                on_chunk()
    return {
        "ttft_s": times[0] - t0 if times else float("nan"),
        "text": text,
        "cached_tokens": cached,
        "times": times,
    }


def chat(client, image: str, turns: int) -> list[dict]:
    """A photo chat: every turn re-sends the photo and the history."""
    messages, rows = [], []
    for i in range(turns):
        q = QUESTIONS[i % len(QUESTIONS)]
        messages.append(user(q, image if i == 0 else None))
        r = stream(client, messages, 24)
        messages.append({"role": "assistant", "content": r["text"]})
        rows.append({"turn": i + 1, "ttft_s": r["ttft_s"], "cached_tokens": r["cached_tokens"]})
    return rows


def admit(client, image: str, after_s: float = 2.0) -> dict:
    """The gaps of a running text stream while a photo request comes in."""
    photo: dict = {}

    def send_photo() -> None:
        time.sleep(after_s)
        photo["sent"] = time.perf_counter()
        photo.update(stream(client, [user("What is in this picture?", image)], 4))

    t = threading.Thread(target=send_photo)
    t.start()
    text = stream(
        client,
        [user("Tell me a very long story about a lighthouse keeper.", None)],
        600,
        on_chunk=lambda: None,
    )
    t.join()
    times = text["times"]
    first = photo["sent"] + photo["ttft_s"]
    during = [b - a for a, b in zip(times, times[1:], strict=False) if b > photo["sent"] and a < first]
    before = [b - a for a, b in zip(times, times[1:], strict=False) if b < photo["sent"]]
    if not during:
        raise RuntimeError("the text stream ended before the photo was admitted: ask for more tokens")
    return {
        "photo_ttft_s": photo["ttft_s"],
        "gaps_during": len(during),
        "longest_gap_s": max(during),
        "median_gap_during_s": statistics.median(during),
        "median_gap_before_s": statistics.median(before),
    }


def run(bundle: str, args: list[str], turns: int) -> dict:
    from openai import OpenAI

    from serve.process import ServerProcess

    with ServerProcess(bundle, "--max-tokens", "600", *args, timeout=900) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", timeout=900, max_retries=0)
        stream(client, [user("Hi", None)], 2)  # warm-up
        # the admitted photo is another one, so nothing of it is cached
        out = {
            "chat": chat(client, photo_url("astronaut"), turns),
            "admit": admit(client, photo_url("coffee")),
        }
        out["rss_mb"] = server.rss_bytes() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=DEFAULT_BUNDLE)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not os.path.isdir(a.bundle):
        sys.exit(f"{a.bundle}: no bundle; build it with benchmarks/smolvlm_speed.py")
    report = {"machine": cpu_kind(), "bundle": a.bundle, "systems": {}}
    for name, flags in (("caches on", []), ("caches off", ["--no-prefix-cache", "--image-cache-mb", "0"])):
        print(f"... {name}", file=sys.stderr)
        report["systems"][name] = run(a.bundle, flags, a.turns)
    print(f"machine: {report['machine']}; bundle: {os.path.basename(a.bundle)}\n")
    print(
        "| engine | "
        + " | ".join(f"turn {i + 1} TTFT s (cached positions)" for i in range(a.turns))
        + " | turn 2 / turn 1 |"
    )
    print("|---" * (a.turns + 2) + "|")
    for name, r in report["systems"].items():
        cells = [f"{t['ttft_s']:.3f} ({t['cached_tokens']})" for t in r["chat"]]
        print(
            f"| {name} | " + " | ".join(cells) + f" | {r['chat'][1]['ttft_s'] / r['chat'][0]['ttft_s']:.3f} |"
        )
    print(
        "\n| engine | photo TTFT s | stream gaps during admission | longest gap s | median gap during / before, ms |"
    )
    print("|---|---|---|---|---|")
    for name, r in report["systems"].items():
        d = r["admit"]
        print(
            f"| {name} | {d['photo_ttft_s']:.2f} | {d['gaps_during']} | {d['longest_gap_s']:.3f} | "
            f"{1000 * d['median_gap_during_s']:.1f} / {1000 * d['median_gap_before_s']:.1f} |"
        )
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()

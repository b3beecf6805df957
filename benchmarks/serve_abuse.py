"""Probe `nanovlm serve` as a hostile client and an unlucky operator would (docs/security.md).

    python -m benchmarks.serve_abuse BUNDLE [--json report.json]

Starts the server on 127.0.0.1 with an API key, sends each probe of issue #38's list and prints its
HTTP status, wall time and the server's resident-memory growth (peak, VmHWM, and now, VmRSS); then
asks a question and checks the greedy answer against the runtime's own in this process. A second
server takes the slow-body clients and a SIGTERM, and reports how long it took to exit. Last, the
cost of a key: the same requests, interleaved, against the keyed server and one without keys.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-abuse-0123456789"


def _png(side: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    h = dict(headers or {})
    conn.putrequest(method, path, skip_host="Host" in h, skip_accept_encoding=True)
    if body is not None:
        h.setdefault("Content-Type", "application/json")
        h["Content-Length"] = str(len(body))
    for k, v in h.items():
        conn.putheader(k, v)
    conn.endheaders(body)
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def _mem(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS")}


def _chat(text: str, images: list[str] = (), **extra) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
        "max_tokens": 4,
        **extra,
    }


def probes(port: int) -> list[tuple[str, str, dict]]:
    """(name, what held, request) for each probe; a request is method, path, body bytes, headers."""
    key = {"Authorization": f"Bearer {KEY}"}
    j = lambda obj: json.dumps(obj).encode()  # noqa: E731
    big = _png(4096)
    turns = []
    for _ in range(20):
        turns += [_chat("Hi", [big, big])["messages"][0], {"role": "assistant", "content": "ok"}]
    bomb = {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}} for i in range(2000)]}
    cycle = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    rf = lambda schema: {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}  # noqa: E731
    post = "/v1/chat/completions"
    return [
        ("no key", "401", ("POST", post, j(_chat("Cat?")), {})),
        ("wrong key", "401", ("POST", post, j(_chat("Cat?")), {"Authorization": "Bearer sk-guess"})),
        ("/metrics without a key", "401", ("GET", "/metrics", None, {})),
        (
            "Host: evil.example (DNS rebinding)",
            "400",
            ("GET", "/v1/models", None, {**key, "Host": "evil.example"}),
        ),
        (
            "text/plain POST (no preflight)",
            "415",
            ("POST", post, j(_chat("Cat?")), {**key, "Content-Type": "text/plain"}),
        ),
        ("foreign Origin", "403", ("POST", post, j(_chat("Cat?")), {**key, "Origin": "http://evil.example"})),
        ("40 images of 4096² over 20 turns", "400", ("POST", post, j({"messages": turns[:-1]}), key)),
        ("4 images of 4096² (pixel budget)", "400", ("POST", post, j(_chat("Hi", [big] * 4)), key)),
        (
            "JSON nested 50,000 deep",
            "400",
            ("POST", post, b'{"messages":' + b"[" * 50_000 + b"]" * 50_000 + b"}", key),
        ),
        (
            "NUL byte in a file:// URL",
            "400",
            ("POST", post, j(_chat("x", ["file:///etc/passwd\x00.png"])), key),
        ),
        ("2,000-branch anyOf schema", "400", ("POST", post, j(_chat("x", response_format=rf(bomb))), key)),
        ("$ref cycle schema", "400", ("POST", post, j(_chat("x", response_format=rf(cycle))), key)),
        ("unknown route", "404", ("GET", "/nope", None, key)),
        ("wrong method", "405", ("DELETE", "/health", None, {})),
    ]


def run_probes(server, bundle: str) -> list[dict]:
    rows = []
    for name, expect, (method, path, body, headers) in probes(server.port):
        before = _mem(server.proc.pid)
        t0 = time.perf_counter()
        status, reply = _call(server.port, method, path, body, headers)
        took = time.perf_counter() - t0
        after = _mem(server.proc.pid)
        json_body = reply[:1] == b"{"
        rows.append(
            dict(
                probe=name,
                status=status,
                expected=expect,
                ok=str(status) == expect and json_body,
                seconds=round(took, 3),
                peak_growth_mb=round((after["VmHWM"] - before["VmHWM"]) / 2**20, 1),
                rss_growth_mb=round((after["VmRSS"] - before["VmRSS"]) / 2**20, 1),
            )
        )
    return rows


def pin_oracle(port: int) -> dict:
    """A victim's prompt holds a PIN; another key guesses right and wrong: the same cached_tokens."""
    secret = "Remember this: the door code is 4 8 1 5 9 2 and never tell anyone about it. Cat?"

    def cached(key: str, text: str) -> int:
        status, reply = _call(
            port,
            "POST",
            "/v1/chat/completions",
            json.dumps(_chat(text)).encode(),
            {"Authorization": f"Bearer {key}"},
        )
        assert status == 200, reply
        return json.loads(reply)["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached(KEY, secret)
    right = cached(KEY + "-other", secret)
    wrong = cached(KEY + "-other", secret.replace("4 8 1 5 9 2", "7 7 7 7 7 7"))
    return {
        "right_guess_cached": right,
        "wrong_guess_cached": wrong,
        "owner_repeat_cached": cached(KEY, secret),
    }


def half_open(port: int, n: int = 1100) -> dict:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 200)), hard))
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        t0 = time.perf_counter()
        status, _ = _call(port, "GET", "/health")
        return {
            "half_open": len(socks),
            "health_status": status,
            "health_seconds": round(time.perf_counter() - t0, 3),
        }
    finally:
        for s in socks:
            s.close()


def slow_bodies_then_sigterm(bundle: str, clients: int = 20) -> dict:
    from serve.process import ServerProcess, SlowBodies

    s = ServerProcess(bundle)
    with SlowBodies(s.port, clients):
        time.sleep(1.0)
        t0 = time.perf_counter()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(180)
        took = time.perf_counter() - t0
    s.stop()
    return {"slow_body_clients": clients, "exit_after_sigterm_s": round(took, 2)}


def key_cost(keyed_port: int, open_port: int, rounds: int = 10, per_round: int = 20) -> dict:
    """Requests per second with and without a key, rounds interleaved (same machine, same load)."""
    body = json.dumps(_chat("Describe the colours.", max_tokens=8)).encode()

    def rate(port: int, headers: dict) -> float:
        t0 = time.perf_counter()
        for _ in range(per_round):
            status, reply = _call(port, "POST", "/v1/chat/completions", body, headers)
            assert status == 200, reply
        return per_round / (time.perf_counter() - t0)

    keyed, plain = [], []
    for i in range(rounds):  # the order alternates, so neither side always runs first
        for side in (0, 1) if i % 2 else (1, 0):
            if side:
                keyed.append(rate(keyed_port, {"Authorization": f"Bearer {KEY}"}))
            else:
                plain.append(rate(open_port, {}))
    k, p = statistics.median(keyed), statistics.median(plain)
    from serve.security import KeyRing

    ring, header, n = KeyRing([KEY, KEY + "-other"]), f"Bearer {KEY}", 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        ring.tenant(header)
    check_us = (time.perf_counter() - t0) / n * 1e6
    return {
        "with_key_req_s": round(k, 2),
        "without_req_s": round(p, 2),
        "loss_pct": round(100 * (1 - k / p), 2),
        "key_check_us": round(check_us, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--json", help="Write the report here too.")
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    from runtime.pipeline import VLMPipeline
    from serve.process import ServerProcess

    cpu = sorted(
        {
            f
            for line in open("/proc/cpuinfo")
            if line.startswith("flags")
            for f in line.split()
            if f in ("avx2", "avx512_vnni")
        }
    )
    report: dict = {"bundle": args.bundle, "cpu": cpu}
    with ServerProcess(args.bundle, "--api-key", KEY, "--api-key", KEY + "-other") as s:
        report["probes"] = run_probes(s, args.bundle)
        report["pin_oracle"] = pin_oracle(s.port)
        report["half_open"] = half_open(s.port)
        status, reply = _call(
            s.port,
            "POST",
            "/v1/chat/completions",
            json.dumps(_chat("Cat?", max_tokens=8)).encode(),
            {"Authorization": f"Bearer {KEY}"},
        )
        answer = json.loads(reply)["choices"][0]["message"]["content"]
        expected = VLMPipeline.from_bundle(args.bundle).generate([], "Cat?", max_new_tokens=8)
        report["answer_after"] = {"status": status, "equals_runtime": answer == expected}
        with ServerProcess(args.bundle) as plain:
            report["key_cost"] = key_cost(s.port, plain.port)
    report["shutdown"] = slow_bodies_then_sigterm(args.bundle)

    print("| probe | status | expected | held | time (s) | peak RSS growth (MB) | RSS growth (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in report["probes"]:
        held = "yes" if r["ok"] else "NO"
        print(
            f"| {r['probe']} | {r['status']} | {r['expected']} | {held} | {r['seconds']} | {r['peak_growth_mb']} | {r['rss_growth_mb']} |"
        )
    o, h, sd, a, k = (
        report["pin_oracle"],
        report["half_open"],
        report["shutdown"],
        report["answer_after"],
        report["key_cost"],
    )
    print(
        f"\nPIN oracle: right guess cached {o['right_guess_cached']}, wrong guess {o['wrong_guess_cached']} "
        f"(the owner's repeat: {o['owner_repeat_cached']})"
    )
    print(f"{h['half_open']} half-open connections: /health {h['health_status']} in {h['health_seconds']} s")
    print(f"{sd['slow_body_clients']} slow-body clients, SIGTERM: exited in {sd['exit_after_sigterm_s']} s")
    print(f"after every probe: a greedy answer {a['status']}, equal to the runtime's: {a['equals_runtime']}")
    print(
        f"a key's cost: {k['with_key_req_s']} vs {k['without_req_s']} requests/s ({k['loss_pct']}% lost); "
        f"the key check itself {k['key_check_us']} µs a request"
    )
    print(f"CPU: {', '.join(cpu) or 'neither avx2 nor avx512_vnni'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

"""`nanovlm serve` against a hostile client and an unlucky operator (docs/security.md): keys, browsers,
budgets checked before work, deadlines, tenants, error shapes. Every server listens on 127.0.0.1."""

import base64
import http.client
import io
import json
import os
import resource
import signal
import socket
import sys
import time

import openai
import pytest
from PIL import Image

from serve.process import ChildServer, SlowBodies, free_port
from serve.process import ServerProcess as Server
from tests.conftest import export_lively
from tests.serve_helpers import user

BIN = os.path.dirname(sys.executable)
KEY, OTHER = "sk-first-0123456789", "sk-second-9876543210"


@pytest.fixture(scope="module")
def bundle(tiny_tokenizer_dir, tmp_path_factory):
    return export_lively("replace", tiny_tokenizer_dir, tmp_path_factory.mktemp("sec"))[1]


@pytest.fixture(scope="module")
def keyed(bundle, tmp_path_factory):
    """A server with two keys: one from the flag, one from a key file."""
    f = tmp_path_factory.mktemp("keys") / "keys.txt"
    f.write_text(f"# the second tenant\n{OTHER}\n\n")
    with Server(bundle, "--api-key", KEY, "--api-key-file", str(f), "--cors-origin", "http://kiosk.lan") as s:
        yield s


def request(server, method, path, body=None, headers=None, raw=None):
    """-> (status, lower-cased headers, body bytes); headers as given (Host included)."""
    host, port = "127.0.0.1", server.port
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    conn.putrequest(method, path, skip_host="Host" in h, skip_accept_encoding=True)
    for k, v in h.items():
        conn.putheader(k, v)
    if data is not None:
        conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    r = conn.getresponse()
    out = (r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    conn.close()
    return out


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def ask(text="Cat?", **extra):
    return {"messages": [user(text)], "max_tokens": 3, **extra}


def openai_error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


# ----------------------------------------------------------------------------- keys


def test_keys_are_required_on_the_api_and_metrics_not_on_health(keyed):
    for method, path, body in [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", ask()),
        ("GET", "/metrics", None),
    ]:
        for headers in ({}, bearer("sk-wrong"), {"Authorization": KEY}):  # none, wrong, not Bearer
            status, h, reply = request(keyed, method, path, body, headers)
            assert status == 401, (path, headers, status)
            assert openai_error(reply)["code"] == "invalid_api_key"
            assert h["www-authenticate"].startswith("Bearer")
    assert request(keyed, "GET", "/health")[0] == 200
    assert request(keyed, "GET", "/")[0] == 200
    for key in (KEY, OTHER):  # the flag's key and the file's, through the real client
        c = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0, timeout=60)
        assert c.chat.completions.create(model="x", messages=[user("Cat?")], max_tokens=3).choices[0].message
        assert request(keyed, "GET", "/metrics", headers=bearer(key))[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-nope", max_retries=0).models.list()


def test_key_from_the_environment_and_open_metrics(bundle, monkeypatch):
    monkeypatch.setenv("NANOVLM_API_KEY", KEY)
    with Server(bundle, "--open-metrics") as s:
        assert request(s, "GET", "/v1/models")[0] == 401
        assert request(s, "GET", "/v1/models", headers=bearer(KEY))[0] == 200
        assert request(s, "GET", "/metrics")[0] == 200


# ----------------------------------------------------------------------------- browsers


def test_foreign_host_and_origin_and_text_plain_are_refused(keyed):
    ok = bearer(KEY)
    status, _, reply = request(keyed, "GET", "/v1/models", headers={**ok, "Host": "evil.example"})
    assert status == 400 and openai_error(reply)["code"] == "bad_host"
    assert request(keyed, "GET", "/health", headers={"Host": "evil.example:8000"})[0] == 400
    for host in (f"127.0.0.1:{keyed.port}", f"localhost:{keyed.port}", f"[::1]:{keyed.port}", "192.0.2.7"):
        assert request(keyed, "GET", "/v1/models", headers={**ok, "Host": host})[0] == 200, host
    # a page elsewhere posting without a preflight: text/plain is refused, whatever the body
    status, _, reply = request(
        keyed,
        "POST",
        "/v1/chat/completions",
        raw=json.dumps(ask()).encode(),
        headers={**ok, "Content-Type": "text/plain"},
    )
    assert status == 415 and openai_error(reply)["code"] == "unsupported_media_type"
    status, h, reply = request(
        keyed, "POST", "/v1/chat/completions", ask(), headers={**ok, "Origin": "http://evil.example"}
    )
    assert status == 403 and "access-control-allow-origin" not in h
    # the page's own origin, and the origin the operator named (CORS, preflight included)
    own = request(
        keyed, "POST", "/v1/chat/completions", ask(), {**ok, "Origin": f"http://127.0.0.1:{keyed.port}"}
    )
    assert own[0] == 200
    pre = request(
        keyed,
        "OPTIONS",
        "/v1/chat/completions",
        headers={"Origin": "http://kiosk.lan", "Access-Control-Request-Method": "POST"},
    )
    assert pre[0] == 204 and pre[1]["access-control-allow-origin"] == "http://kiosk.lan"
    assert "authorization" in pre[1]["access-control-allow-headers"]
    named = request(keyed, "POST", "/v1/chat/completions", ask(), {**ok, "Origin": "http://kiosk.lan"})
    assert named[0] == 200 and named[1]["access-control-allow-origin"] == "http://kiosk.lan"


def test_the_page_and_every_response_carry_security_headers(keyed):
    status, h, html = request(keyed, "GET", "/")
    csp = h["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "'unsafe-inline'" not in csp
    assert "sha256-" in csp.split("script-src")[1].split(";")[0]  # its inline script, by hash
    assert b"api-key" in html  # the key field
    for path in ("/", "/health", "/v1/models"):
        h = request(keyed, "GET", path)[1]
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY", path


# ----------------------------------------------------------------------------- budgets before work


def _png(side: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _peak_rss(server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_images_are_counted_and_sized_before_any_is_decoded(keyed):
    """40 images of 4096² over 20 user turns: refused at once, nothing decoded (peak RSS flat); four
    that each fit but together exceed the request's pixel budget: refused before decoding too."""
    big = _png(4096)
    turns = []
    for _ in range(20):
        turns += [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": big}}] * 2
                + [{"type": "text", "text": "Hi"}],
            },
            {"role": "assistant", "content": "ok"},
        ]
    turns[-1:] = []
    before = _peak_rss(keyed)
    t0 = time.perf_counter()
    status, _, reply = request(
        keyed, "POST", "/v1/chat/completions", {"messages": turns, "max_tokens": 2}, bearer(KEY)
    )
    took = time.perf_counter() - t0
    assert status == 400 and "images in one request" in openai_error(reply)["message"]
    four = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": big}}] * 4
                + [{"type": "text", "text": "Hi"}],
            }
        ]
    }
    status, _, reply = request(keyed, "POST", "/v1/chat/completions", four, bearer(KEY))
    assert status == 400 and "per request" in openai_error(reply)["message"]
    growth = _peak_rss(keyed) - before
    assert took < 2.0, took
    assert growth < 300 * 2**20, growth / 2**20


@pytest.mark.parametrize(
    "body, words",
    [
        ('{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested deeper"),
        (
            json.dumps(
                ask(
                    response_format={
                        "type": "json_schema",
                        "json_schema": {
                            "name": "cyc",
                            "schema": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
                        },
                    }
                )
            ),
            "admits no answer",
        ),
        (
            json.dumps(
                ask(
                    response_format={
                        "type": "json_schema",
                        "json_schema": {
                            "name": "bomb",
                            "schema": {
                                "anyOf": [
                                    {
                                        "type": "object",
                                        "properties": {f"k{i}": {"type": "integer"}},
                                        "required": [f"k{i}"],
                                    }
                                    for i in range(2000)
                                ]
                            },
                        },
                    }
                )
            ),
            "over the limit",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": "file:///etc/passwd\x00.png"}},
                                {"type": "text", "text": "x"},
                            ],
                        }
                    ]
                }
            ),
            "control characters",
        ),
    ],
    ids=["deep-json", "ref-cycle", "schema-bomb", "nul-in-url"],
)
def test_bombs_and_bad_bytes_are_4xx_and_counted(keyed, body, words):
    status, _, reply = request(keyed, "POST", "/v1/chat/completions", raw=body.encode(), headers=bearer(KEY))
    assert 400 <= status < 500 and words in openai_error(reply)["message"], (status, reply[:300])
    metrics = request(keyed, "GET", "/metrics", headers=bearer(KEY))[2].decode()
    assert f'nanovlm_http_responses_total{{route="/v1/chat/completions",status="{status}"}}' in metrics


def test_errors_are_json_and_carry_no_addresses(keyed):
    for method, path, status in [("GET", "/nope", 404), ("DELETE", "/health", 405)]:
        code, h, reply = request(keyed, method, path, headers=bearer(KEY))
        assert code == status and h["content-type"] == "application/json"
        openai_error(reply)
    junk = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": junk}}, {"type": "text", "text": "x"}],
            }
        ]
    }
    status, _, reply = request(keyed, "POST", "/v1/chat/completions", body, bearer(KEY))
    message = openai_error(reply)["message"]
    assert status == 400 and "not a readable image" in message and "0x" not in message


# ----------------------------------------------------------------------------- tenants


def test_no_cached_tokens_across_keys_or_salts(keyed):
    """The prefix cache is no oracle: a right and a wrong guess of another tenant's prompt report
    the same (nothing), while the same tenant's repeat reuses it."""
    secret = "Remember this: the door code is 4 8 1 5 9 2 and never tell anyone about it. Cat?"
    guess_right, guess_wrong = secret, secret.replace("4 8 1 5 9 2", "7 7 7 7 7 7")

    def cached(key, text, **extra):
        status, _, reply = request(keyed, "POST", "/v1/chat/completions", ask(text, **extra), bearer(key))
        assert status == 200, reply
        return json.loads(reply)["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached(KEY, secret)
    assert cached(OTHER, guess_right) == cached(OTHER, guess_wrong.replace("Cat", "Dog")) == 0
    assert cached(KEY, secret) >= 32  # the owner's repeat does reuse it
    cached(KEY, secret, cache_salt="alice")
    assert cached(KEY, secret, cache_salt="bob") == 0  # one key, two salts: two scopes
    assert cached(KEY, secret, cache_salt="alice") >= 32


# ----------------------------------------------------------------------------- deadlines and connections


def test_sigterm_with_slow_body_clients_exits_within_15s(bundle):
    s = Server(bundle)
    try:
        with SlowBodies(s.port, 20):
            time.sleep(1.0)
            t0 = time.perf_counter()
            s.proc.send_signal(signal.SIGTERM)
            s.proc.wait(60)
            assert time.perf_counter() - t0 < 15
    finally:
        s.stop()


def test_half_open_connections_do_not_lock_out_health(bundle):
    """1,100 sockets that never send a byte, against a server whose open-files limit is 1024 and
    cannot be raised: /health still answers (the longest-idle connections make room)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"this test needs 1,200 open files for its own sockets (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    port = free_port()
    cmd = [
        "prlimit",
        "--nofile=1024:1024",
        os.path.join(BIN, "nanovlm"),
        "serve",
        bundle,
        "--port",
        str(port),
    ]
    socks = []
    with ChildServer(cmd, f"http://127.0.0.1:{port}/health", "server") as s:
        try:
            for _ in range(1100):
                try:
                    socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError:
                    break
            assert len(socks) == 1100
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
            assert time.perf_counter() - t0 < 5
            assert "Traceback" not in s.output()
        finally:
            for c in socks:
                c.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_request_head_that_never_ends_is_closed(bundle):
    """Slowloris: a header byte every 0.2 s never completes the head; the server closes the
    connection at its header deadline (1 s here) instead of waiting for ever."""
    import select

    with Server(bundle, "--header-timeout", "1") as s:
        c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        c.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0, closed = time.perf_counter(), False
        while time.perf_counter() - t0 < 10 and not closed:
            try:
                c.sendall(b"X-Slow: 1\r\n")
                if select.select([c], [], [], 0.2)[0]:
                    closed = c.recv(1) == b""
            except OSError:
                closed = True
        assert closed and time.perf_counter() - t0 < 5, time.perf_counter() - t0
        c.close()


def test_shutdown_cuts_a_live_stream_with_an_error_chunk(endless):
    s = Server(endless, "--shutdown-timeout", "2")
    try:
        stream = openai.OpenAI(
            base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60
        ).chat.completions.create(model="x", messages=[user("Cat?")], max_tokens=3000, stream=True)
        it = iter(stream)
        next(it)
        t0 = time.perf_counter()
        s.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in it:
                pass
        assert time.perf_counter() - t0 < 5
        s.proc.wait(30)
    finally:
        s.stop()


def test_unhandled_errors_are_json_500s_logged_once(caplog):
    """The Guard turns any exception below it into OpenAI's 500 shape and one log line."""
    import asyncio

    from serve.security import Guard, SecurityPolicy

    async def broken(scope, receive, send):
        raise KeyError("boom <_io.BytesIO object at 0x7f00deadbeef>")

    sent, counted = [], []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    guard = Guard(
        broken, SecurityPolicy(), count=lambda route, status: counted.append((route, status)), routes=["/x"]
    )
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [(b"host", b"127.0.0.1")]}
    with caplog.at_level("INFO"):
        asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 500 and json.loads(sent[1]["body"])["error"]["type"] == "server_error"
    lines = [r for r in caplog.records if "boom" in r.getMessage()]
    assert len(lines) == 1 and "0x7f00deadbeef" not in lines[0].getMessage() and not lines[0].exc_info
    assert counted == [("/x", 500)]


def test_log_lines_are_capped():
    import logging

    from serve.security import LogCap

    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "grammar: %s", ("a" * 300_000,), None)
    assert LogCap(2000).filter(record) and len(record.getMessage()) < 2100


def test_the_openai_client_with_a_key_streams(keyed):
    c = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    img = Image.new("RGB", (40, 30), (10, 200, 10))
    chunks = list(
        c.chat.completions.create(model="x", messages=[user("Cat?", img)], max_tokens=4, stream=True)
    )
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks)

"""`nanovlm serve` as users call it: the real openai client against a server on 127.0.0.1."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from PIL import Image

from runtime.pipeline import VLMPipeline
from serve.process import ServerProcess as Server
from tests.conftest import export_lively
from tests.serve_helpers import user

skimage_data = pytest.importorskip("skimage.data")
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module", params=["standard", "fused"])
def bundle(request, tiny_tokenizer_dir, tmp_path_factory):
    return export_lively("replace", tiny_tokenizer_dir, tmp_path_factory.mktemp("srv"), request.param)[1]


@pytest.fixture(scope="module")
def server(bundle):
    with Server(bundle, "--max-batch", "4") as s:
        yield s


@pytest.fixture(scope="module")
def pipe(bundle):
    return VLMPipeline.from_bundle(bundle)


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def photos():
    return {
        "astronaut": Image.fromarray(skimage_data.astronaut()),  # split into tiles
        "coffee": Image.fromarray(skimage_data.coffee()).resize((40, 30)),  # one tile
    }


def post(server, body, raw: bytes | None = None, headers=None):
    """POST to /v1/chat/completions -> (status, headers, parsed JSON body)."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


# ----------------------------------------------------------------------------- answers


def test_openai_client_answers_like_the_runtime(server, pipe):
    img = photos()["astronaut"]
    c = client(server)
    r = c.chat.completions.create(model="x", messages=[user("What is it?", img)], max_tokens=12)
    assert r.choices[0].message.content == pipe.generate(img, "What is it?", max_new_tokens=12)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == pipe.prepare([[img]], ["What is it?"]).input_ids.shape[1]
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in c.models.list().data] == [os.path.basename(pipe.bundle.path)]


def test_a_chats_second_turn_reuses_the_first_and_says_so(server, pipe):
    """The client re-sends the photo and the history; turn 2 reuses turn 1's prompt KV, reports it in
    usage.prompt_tokens_details.cached_tokens (streamed too) and still answers like the runtime."""
    img = photos()["astronaut"]
    c = client(server)
    q1, q2 = "What is it?", "What colour is the square?"
    first = c.chat.completions.create(model="x", messages=[user(q1, img)], max_tokens=8)
    a1 = first.choices[0].message.content
    history = [user(q1, img), {"role": "assistant", "content": a1}, user(q2)]
    second = c.chat.completions.create(model="x", messages=history, max_tokens=8)
    assert second.choices[0].message.content == pipe.chat([img], [(q1, a1)], q2, max_new_tokens=8)
    assert second.usage.prompt_tokens_details.cached_tokens >= 32, "turn 2 reused nothing"
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    chunks = list(
        c.chat.completions.create(
            model="x", messages=history, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 32
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        metrics = dict(
            line.rsplit(" ", 1) for line in r.read().decode().splitlines() if line.startswith("nanovlm_")
        )
    assert float(metrics["nanovlm_prefix_cache_hit_rate"]) > 0
    assert float(metrics["nanovlm_prefix_cache_bytes"]) > 0
    assert float(metrics["nanovlm_image_cache_bytes"]) > 0
    assert float(metrics["nanovlm_prompt_tokens_cached_total"]) >= 64


def test_no_prefix_cache_reuses_nothing(bundle, pipe):
    img = photos()["coffee"]
    q1, q2 = "What is it?", "Describe the colours of everything you can see in this picture, please."
    with Server(bundle, "--no-prefix-cache") as s:
        c = client(s)
        a1 = (
            c.chat.completions.create(model="x", messages=[user(q1, img)], max_tokens=8)
            .choices[0]
            .message.content
        )
        history = [user(q1, img), {"role": "assistant", "content": a1}, user(q2)]
        second = c.chat.completions.create(model="x", messages=history, max_tokens=8)
    assert second.usage.prompt_tokens_details.cached_tokens == 0
    assert second.choices[0].message.content == pipe.chat([img], [(q1, a1)], q2, max_new_tokens=8)


def test_streaming_equals_non_streaming(server):
    img = photos()["coffee"]
    c = client(server)
    full = c.chat.completions.create(model="x", messages=[user("Describe the colours.", img)], max_tokens=20)
    chunks = list(
        c.chat.completions.create(
            model="x",
            messages=[user("Describe the colours.", img)],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_equals_nanovlm_run(server, tmp_path, bundle):
    """The same question through the server and through `nanovlm run`, greedy: the same answer."""
    path = tmp_path / "img.png"
    photos()["astronaut"].save(path)
    run = subprocess.run(
        [
            os.path.join(BIN, "nanovlm"),
            "run",
            bundle,
            "--image",
            str(path),
            "--prompt",
            "Cat?",
            "--max-new-tokens",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    r = client(server).chat.completions.create(
        model="x", messages=[user("Cat?", Image.open(path))], max_tokens=10
    )
    assert r.choices[0].message.content == run.stdout[:-1]  # click.echo adds one newline


def test_concurrent_requests_answer_as_alone(server, pipe):
    """Mixed images, prompt lengths, max_tokens and a multi-turn chat at once: each as alone."""
    p = photos()
    cases = [
        ([user("What is it?", p["astronaut"])], [p["astronaut"]], "What is it?", [], 12),
        (
            [user("How many red circles are there in this picture, please?", p["coffee"])],
            [p["coffee"]],
            "How many red circles are there in this picture, please?",
            [],
            20,
        ),
        ([user("Cat?")], [], "Cat?", [], 7),
        (
            [
                user("What colour is the square?", p["coffee"]),
                {"role": "assistant", "content": "blue"},
                {"role": "user", "content": "And the circle?"},
            ],
            [p["coffee"]],
            "And the circle?",
            [("What colour is the square?", "blue")],
            15,
        ),
        ([user("Describe it.", p["astronaut"])], [p["astronaut"]], "Describe it.", [], 3),
        ([user("user assistant", p["coffee"])], [p["coffee"]], "user assistant", [], 16),
    ]
    alone = [pipe.chat(imgs, hist, q, n) for _, imgs, q, hist, n in cases]
    c = client(server)

    def ask(case):
        messages, *_, n = case
        return (
            c.chat.completions.create(model="x", messages=messages, max_tokens=n).choices[0].message.content
        )

    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(ask, cases))
    assert got == alone
    metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
    assert 'nanovlm_requests_total{status="200"}' in metrics
    assert "nanovlm_time_to_first_token_seconds_bucket" in metrics
    assert "nanovlm_running_batch_size" in metrics and "nanovlm_queue_depth" in metrics


def test_seeded_sampling_is_reproducible(server):
    c = client(server)
    kw = dict(
        model="x",
        messages=[user("Describe it.", photos()["coffee"])],
        max_tokens=16,
        temperature=1.0,
        top_p=0.95,
    )
    a = [c.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 1, 2, 3, 4)]
    assert a[0] == a[1]
    assert len(set(a[1:])) > 1, "different seeds all gave the same sample"


def test_stop_strings(server, pipe):
    img = photos()["astronaut"]
    full = pipe.generate(img, "What is it?", max_new_tokens=24)
    cut = next((k for k in range(2, len(full)) if full[k] != full[0]), None)
    assert cut is not None and full[cut:].strip(), f"answer too uniform for a stop-string test: {full!r}"
    stop = full[cut : cut + 2]
    r = client(server).chat.completions.create(
        model="x", messages=[user("What is it?", img)], max_tokens=24, stop=[stop]
    )
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------- limits and bad input


def _png_bomb(side: int) -> bytes:
    """A 1-bit PNG of side x side pixels: millions of pixels from a few kilobytes."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "case,status,words",
    [
        ("malformed json", 400, "not valid JSON"),
        ("not an object", 400, "JSON object"),
        ("no messages", 400, "'messages'"),
        ("bad role", 400, "role 'robot'"),
        ("assistant last", 400, "last message must be a user"),
        ("bad part", 400, "type 'text'"),
        ("max_tokens zero", 400, "max_tokens=0"),
        ("max_tokens string", 400, "max_tokens='5'"),
        ("temperature", 400, "temperature=7"),
        ("n=2", 400, "only one choice"),
        ("context", 400, "exceeds the model's context"),
        ("remote url", 400, "fetches nothing"),
        ("file url off", 400, "--image-dir"),
        ("not base64", 400, "not valid base64"),
        ("not an image", 400, "not a readable image"),
        ("bomb", 400, "pixels, above the limit"),
        ("giant bomb", 400, "decompression bomb"),
        ("too many images", 400, "the limit is 4"),
        ("image bytes", 413, "bytes"),
        ("body size", 413, "limit of"),
    ],
)
def test_bad_requests_get_openai_errors(server, case, status, words):
    tiny = photos()["coffee"]
    body = {"model": "x", "messages": [user("What is it?", tiny)], "max_tokens": 4}
    raw = None
    if case == "malformed json":
        raw = b'{"messages": [ {"role": "user", "content": "hi"'
    elif case == "not an object":
        body = [1, 2]
    elif case == "no messages":
        body = {"model": "x"}
    elif case == "bad role":
        body["messages"] = [{"role": "robot", "content": "hi"}]
    elif case == "assistant last":
        body["messages"].append({"role": "assistant", "content": "hi"})
    elif case == "bad part":
        body["messages"] = [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]
    elif case == "max_tokens zero":
        body["max_tokens"] = 0
    elif case == "max_tokens string":
        body["max_tokens"] = "5"
    elif case == "temperature":
        body["temperature"] = 7
    elif case == "n=2":
        body["n"] = 2
    elif case == "context":
        body["max_tokens"] = 10_000
    elif case in ("remote url", "file url off", "not base64", "not an image"):
        url = {
            "remote url": "https://example.com/cat.png",
            "file url off": "file:///etc/hostname",
            "not base64": "data:image/png;base64,@@@@",
            "not an image": "data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode(),
        }[case]
        body["messages"] = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}],
            }
        ]
    elif case in ("bomb", "giant bomb"):  # over the server's 4096^2 limit; over Pillow's own
        url = (
            "data:image/png;base64," + base64.b64encode(_png_bomb(6000 if case == "bomb" else 20000)).decode()
        )
        body["messages"] = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}],
            }
        ]
    elif case == "too many images":
        body["messages"] = [user("hi", *[tiny] * 5)]
    elif case == "image bytes":  # 9 MB of (valid) base64 in one image, over the 8 MB default
        url = "data:image/png;base64," + base64.b64encode(os.urandom(9 * 1024 * 1024)).decode()
        body["messages"] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    elif case == "body size":
        body["padding"] = "x" * (17 * 1024 * 1024)
    code, _, reply = post(server, body, raw)
    assert code == status, reply
    assert words in reply["error"]["message"]
    assert reply["error"]["type"] in ("invalid_request_error",)
    # and the server still answers correctly afterwards
    ok, _, good = post(server, {"messages": [user("Cat?")], "max_tokens": 3})
    assert ok == 200 and good["choices"][0]["message"]["role"] == "assistant"


def test_file_urls_only_under_the_allowed_directory(bundle, tmp_path, pipe):
    allowed = tmp_path / "images"
    allowed.mkdir()
    photos()["coffee"].save(allowed / "coffee.png")
    (tmp_path / "secret.png").write_bytes((allowed / "coffee.png").read_bytes())
    with Server(bundle, "--image-dir", str(allowed)) as s:

        def ask(path):
            return post(
                s,
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": f"file://{path}"}},
                                {"type": "text", "text": "Cat?"},
                            ],
                        }
                    ],
                    "max_tokens": 6,
                },
            )

        code, _, reply = ask(allowed / "coffee.png")
        assert code == 200
        assert reply["choices"][0]["message"]["content"] == pipe.generate(
            str(allowed / "coffee.png"), "Cat?", 6
        )
        for outside in (tmp_path / "secret.png", allowed / ".." / "secret.png"):
            code, _, reply = ask(outside)
            assert code == 400 and "outside the allowed image directory" in reply["error"]["message"]


def _running(server) -> float:
    for line in urllib.request.urlopen(server.url + "/metrics").read().decode().splitlines():
        if line.startswith("nanovlm_running_batch_size "):
            return float(line.split()[1])
    raise AssertionError("no nanovlm_running_batch_size in /metrics")


def _until_running(server, stream) -> None:
    """Read a stream's first two chunks, then wait until its row is in the running batch."""
    it = iter(stream)
    next(it), next(it)
    deadline = time.monotonic() + 10  # the first token is sent just before its row joins the batch
    while _running(server) != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _running(server) == 1


def test_full_queue_gets_429_with_retry_after(endless):
    """One running, one queued: of five simultaneous requests sent while a first is running, one
    waits its turn and the other four get 429 at once."""
    with Server(endless, "--max-batch", "1", "--max-queue", "1") as s:
        stream = client(s).chat.completions.create(
            model="x", messages=[user("Cat?")], max_tokens=3000, stream=True
        )
        _until_running(s, stream)
        body = {"messages": [user("Cat?")], "max_tokens": 5}
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(post, s, body) for _ in range(5)]
            deadline = time.monotonic() + 60  # the four refusals come back while the first still runs
            while sum(f.done() for f in futures) < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _running(s) == 1 and sum(f.done() for f in futures) == 4
            stream.close()  # frees the row for the queued request
            replies = [f.result() for f in futures]
        codes = sorted(code for code, _, _ in replies)
        assert codes == [200, 429, 429, 429, 429], codes
        for code, headers, reply in replies:
            if code == 429:
                assert headers.get("retry-after") == "1" and reply["error"]["type"] == "rate_limit_error"


def test_starts_with_a_queue_shorter_than_the_batch(bundle):
    """The warm-up burst fits the queue: --max-queue below --max-batch still comes up and answers."""
    with Server(bundle, "--max-batch", "4", "--max-queue", "1") as s:
        code, _, reply = post(s, {"messages": [user("Cat?")], "max_tokens": 3})
        assert code == 200 and reply["choices"][0]["message"]["content"]


def test_a_client_that_disconnects_mid_stream_frees_its_row(endless):
    n = 3000
    with Server(endless) as s:
        t0 = time.perf_counter()
        post(s, {"messages": [user("Cat?")], "max_tokens": 200})
        per_token = (time.perf_counter() - t0) / 200  # this server's pace, measured in this run
        stream = client(s).chat.completions.create(
            model="x", messages=[user("Cat?")], max_tokens=n, stream=True
        )
        _until_running(s, stream)
        stream.close()
        closed = time.perf_counter()
        while _running(s) and time.perf_counter() - closed < 60:
            time.sleep(0.01)
        freed = time.perf_counter() - closed
        # freed long before the answer would have ended on its own (n tokens at this pace)
        assert _running(s) == 0 and freed < 0.25 * n * per_token, (freed, n * per_token)
        counted = 'nanovlm_requests_total{status="499"} 1.0'
        deadline = time.monotonic() + 10  # counted on the event loop once the engine's event arrives
        while counted not in urllib.request.urlopen(s.url + "/metrics").read().decode():
            assert time.monotonic() < deadline, "the disconnect was never counted as a 499"
            time.sleep(0.02)
        ok, _, good = post(s, {"messages": [user("Cat?")], "max_tokens": 3})
        assert ok == 200


def test_sigterm_drains_running_requests(endless):
    n = 1500
    alone = VLMPipeline.from_bundle(endless).generate([], "Cat?", max_new_tokens=n)
    s = Server(endless)
    try:
        stream = client(s).chat.completions.create(
            model="x", messages=[user("Cat?")], max_tokens=n, stream=True
        )
        it = iter(stream)
        text = next(it).choices[0].delta.content or ""
        s.proc.send_signal(signal.SIGTERM)
        text += "".join(ch.choices[0].delta.content or "" for ch in it if ch.choices)
        # uvicorn re-raises the signal once drained, so the exit status says "ended by SIGTERM"
        # (what systemd and Kubernetes expect of a clean stop); the whole answer arrived first
        assert s.proc.wait(60) == -signal.SIGTERM
        assert text == alone
        assert "Finished server process" in s.output()
    finally:
        s.stop()


def test_health_page_and_models(server):
    with urllib.request.urlopen(server.url + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"
    with urllib.request.urlopen(server.url + "/") as r:
        page = r.read().decode()
    assert "/v1/chat/completions" in page and 'type="file"' in page


def test_serve_refuses_a_bad_bundle_in_one_line(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    r = subprocess.run(
        [os.path.join(BIN, "nanovlm"), "serve", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_health_is_503_until_loaded(tiny_tokenizer_dir, tmp_path):
    """Before the warm-up request has run, /health says loading (tested in-process with a gate)."""
    from starlette.testclient import TestClient

    from serve.app import ServeConfig, create_app

    bundle = export_lively("replace", tiny_tokenizer_dir, tmp_path)[1]
    app = create_app(ServeConfig(bundle))
    service = app.state.service
    gate = threading.Event()
    original = service._warm_up
    service._warm_up = lambda: (gate.wait(60), original())
    with TestClient(app, base_url="http://127.0.0.1") as tc:  # the Host a local client sends
        r = tc.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert tc.post("/v1/chat/completions", json={"messages": [user("hi")]}).status_code == 503
        gate.set()
        deadline = time.monotonic() + 60
        while tc.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tc.get("/health").status_code == 200


def test_consecutive_messages_of_one_role_are_joined(server, pipe):
    """OpenAI accepts two user messages in a row; they read as one, joined with a newline."""
    img = photos()["coffee"]
    messages = [user("What is it?", img), {"role": "user", "content": "Cat?"}]
    r = client(server).chat.completions.create(model="x", messages=messages, max_tokens=8)
    assert r.choices[0].message.content == pipe.generate(img, "What is it?\nCat?", max_new_tokens=8)

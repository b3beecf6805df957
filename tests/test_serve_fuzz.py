"""Property-based fuzzing of POST /v1/chat/completions (hypothesis): bodies drawn from the whole
request schema — messages, sampling, stop, stream, response_format and more — right, wrong and
odd, against a real server on 127.0.0.1. Every one is answered 2xx or 4xx, never 5xx, with a body
in OpenAI's shape; afterwards the server still answers like the runtime."""

import base64
import http.client
import io
import json
import os
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.pipeline import VLMPipeline
from serve.process import ServerProcess
from tests.conftest import export_lively

EXAMPLES = int(os.environ.get("NANOVLM_FUZZ_EXAMPLES", "2000"))


def _png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (w * 7 % 256, h * 13 % 256, 90)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
IMAGE_URLS = st.sampled_from(
    [
        _png(8, 8),
        _png(40, 30),
        "data:image/png;base64,!!!",
        "data:image/png;base64,aGVsbG8=",
        "http://x/y.png",
        "file:///etc/passwd",
        "",
        "data:,",
    ]
)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": IMAGE_URLS})}
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "audio", "text"]), "text": ANY_JSON}),
    ANY_JSON,
)
CONTENT = st.one_of(st.text(max_size=40), st.lists(PART, max_size=3), ANY_JSON)
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "x"]),
            "content": CONTENT,
        }
    ),
    ANY_JSON,
)
SCHEMAS = st.sampled_from(
    [
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        {"type": "string", "maxLength": 5},
        {"type": "no-such-type"},
        {"$ref": "#/nope"},
        {"type": "integer", "minimum": 5, "maximum": 1},
        {},
    ]
)
RESPONSE_FORMAT = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "grammar"])}),
    st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries(
                {"name": st.text(max_size=5), "schema": SCHEMAS | ANY_JSON},
                optional={"strict": st.booleans() | ANY_JSON},
            ),
        }
    ),
    ANY_JSON,
)
ASK = st.fixed_dictionaries(
    {
        "role": st.just("user"),
        "content": st.text(min_size=1, max_size=30) | st.lists(PART, min_size=1, max_size=2),
    }
)
VALID_SCHEMAS = st.sampled_from(
    [
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        {"type": "string", "maxLength": 5},
    ]
)
VALID_BODY = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.just("user"),
                    "content": st.text(min_size=1, max_size=30).filter(str.strip)
                    | st.tuples(
                        IMAGE_URLS.filter(lambda u: u.startswith("data:image/png;base64,iVBOR")),
                        st.text("abc ?", min_size=1, max_size=10).filter(str.strip),
                    ).map(
                        lambda t: [
                            {"type": "image_url", "image_url": {"url": t[0]}},
                            {"type": "text", "text": t[1]},
                        ]
                    ),
                }
            ),
            min_size=1,
            max_size=1,
        )
    },
    optional={
        "max_tokens": st.integers(1, 6),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "seed": st.integers(0, 2**31),
        "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "n": st.just(1),
        "logprobs": st.booleans(),
        "response_format": st.just({"type": "json_object"})
        | st.just({"type": "text"})
        | VALID_SCHEMAS.map(lambda x: {"type": "json_schema", "json_schema": {"name": "a", "schema": x}}),
    },
)
FUZZ_BODY = st.fixed_dictionaries(
    {"messages": st.lists(ASK, min_size=1, max_size=1) | st.lists(MESSAGE, max_size=4) | ANY_JSON},
    optional={
        "model": st.text(max_size=5) | ANY_JSON,
        "max_tokens": st.integers(-2, 6) | st.integers(-(2**40), 2**40) | ANY_JSON,
        "max_completion_tokens": st.integers(0, 6) | ANY_JSON,
        "temperature": st.floats(-1, 3, allow_nan=False) | ANY_JSON,
        "top_p": st.floats(-0.5, 1.5, allow_nan=False) | ANY_JSON,
        "seed": st.integers(-5, 2**70) | ANY_JSON,
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | ANY_JSON,
        "stream": st.booleans() | ANY_JSON,
        "stream_options": st.fixed_dictionaries({"include_usage": ANY_JSON}) | ANY_JSON,
        "n": st.integers(0, 3) | ANY_JSON,
        "frequency_penalty": st.floats(-2, 2, allow_nan=False) | ANY_JSON,
        "presence_penalty": st.just(0) | ANY_JSON,
        "response_format": RESPONSE_FORMAT,
        "logprobs": st.booleans() | ANY_JSON,
        "top_logprobs": st.integers(-1, 25) | ANY_JSON,
        "user": ANY_JSON,
        "tools": ANY_JSON,
    },
)


@pytest.fixture(scope="module")
def served(tiny_tokenizer_dir, tmp_path_factory):
    bundle = export_lively("replace", tiny_tokenizer_dir, tmp_path_factory.mktemp("fuzz"), "fused")[1]
    # small answers by default: a fuzzed body without max_tokens stays quick
    with ServerProcess(bundle, "--max-batch", "4", "--max-tokens", "8") as server:
        yield Client(server.url), bundle


class Client:
    """POST a body -> (status, body text); a connection each, so one failure stays with its body."""

    def __init__(self, url: str):
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port

    def post(self, body: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("POST", "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read().decode()
        except OSError as e:
            raise AssertionError(f"no answer ({e}) to {body[:1000]}") from None
        finally:
            conn.close()


def test_fuzzed_request_bodies_get_2xx_or_4xx_never_5xx(served):
    client, bundle = served
    seen = {"tried": 0, "2xx": 0, "4xx": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same bodies every run: a failure is reproducible
        suppress_health_check=list(HealthCheck),
    )
    @given(VALID_BODY | FUZZ_BODY)
    def one(body):
        # bounded work per request: a valid body asks for at most 6 tokens
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > 6:
                body[key] = 6
        raw = json.dumps(body, allow_nan=False)
        status, text = client.post(raw)
        seen["tried"] += 1
        assert status < 500, (status, raw[:500], text[:500])
        if status >= 400:
            seen["4xx"] += 1
            error = json.loads(text)["error"]
            assert isinstance(error["message"], str) and error["message"], text
            return
        seen["2xx"] += 1
        if body.get("stream") is True:
            assert text.rstrip().endswith("data: [DONE]"), text[-300:]
            chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
            assert all("error" not in c for c in chunks), text[-500:]
        else:
            answer = json.loads(text)
            assert answer["choices"][0]["finish_reason"] in ("stop", "length"), text[:500]

    one()
    print(f"fuzzed bodies: {seen}")
    assert seen["tried"] == EXAMPLES and seen["2xx"] > EXAMPLES // 20 and seen["4xx"] > EXAMPLES // 20, seen
    # and the server still answers like the runtime
    pipe = VLMPipeline.from_bundle(bundle)
    status, text = client.post(
        json.dumps({"messages": [{"role": "user", "content": "What is it?"}], "max_tokens": 6})
    )
    assert status == 200 and json.loads(text)["choices"][0]["message"]["content"] == pipe.generate(
        [], "What is it?", max_new_tokens=6
    )

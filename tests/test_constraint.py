"""Constrained decoding (runtime/constraint.py) on random-weight models, where only the constraint
can make an answer parse: alone, sampled, streamed, 8 at once in the engine, through the server
with the real openai client, and from `nanovlm run`."""

import json
import re
import subprocess
import sys

import jsonschema
import openai
import pytest
from PIL import Image

from core.sampling import SamplingConfig
from runtime.batching import ContinuousBatcher
from runtime.constraint import Constraint
from runtime.pipeline import GenerationRequest
from serve.process import ServerProcess
from tests.conftest import REPO, export_lively
from tests.engine_helpers import Collector
from tests.serve_helpers import user

# bounded (short strings, few items), so an answer always completes within MAX_TOKENS
SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "sure": {"type": "boolean"},
    },
    "required": ["count", "colour", "tags", "sure"],
    "additionalProperties": False,
}
LIST_SCHEMA = {"type": "array", "items": {"enum": ["cat", "dog", 3, None]}, "minItems": 1, "maxItems": 4}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
PHOTO = Image.new("RGB", (40, 30), (200, 30, 30))  # prefix-placement models need one image
MAX_TOKENS = 120  # a byte-level BPE: at most one token per character of the longest answer


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def test_without_the_constraint_the_random_model_writes_no_json(lively_pipe):
    """The premise of every test below: these models' own answers do not parse."""
    answer = lively_pipe.generate(PHOTO, "Count the objects as JSON.", max_new_tokens=40)
    assert not valid(answer), answer


def test_greedy_sampled_and_streamed_answers_match_the_schema(lively_pipe):
    p = lively_pipe
    greedy = p.generate(PHOTO, "Count the objects as JSON.", max_new_tokens=MAX_TOKENS, json_schema=SCHEMA)
    assert valid(greedy), greedy
    assert "".join(p.stream(PHOTO, "Count the objects as JSON.", MAX_TOKENS, json_schema=SCHEMA)) == greedy
    answers = set()
    for seed in range(4):
        s = SamplingConfig(temperature=1.0, seed=seed)
        answer = p.generate(PHOTO, "Count them.", max_new_tokens=MAX_TOKENS, sampling=s, json_schema=SCHEMA)
        assert valid(answer), answer
        answers.add(answer)
    assert len(answers) > 1  # sampling still chooses, within the grammar
    assert re.fullmatch(REGEX, p.generate(PHOTO, "A code?", max_new_tokens=20, regex=REGEX))


def test_a_batch_gives_each_row_its_own_matcher(lively_pipe):
    answers = lively_pipe.generate_batch(
        [(PHOTO, "First?"), (PHOTO, "Second, longer question?"), (PHOTO, "Third.")],
        MAX_TOKENS,
        json_schema=SCHEMA,
    )
    assert all(valid(a) for a in answers), answers


def test_eight_requests_at_once_each_match_their_own_constraint(lively_pipe):
    p = lively_pipe
    engine = ContinuousBatcher(p, max_batch=8)
    kinds = [
        Constraint.json_schema(SCHEMA),
        Constraint.regex(REGEX),
        None,
        Constraint.json_schema(LIST_SCHEMA),
    ] * 2
    got = [Collector() for _ in kinds]
    for i, (constraint, c) in enumerate(zip(kinds, got, strict=True)):
        s = SamplingConfig(temperature=1.0, seed=i) if i >= 4 else SamplingConfig()
        req = GenerationRequest(MAX_TOKENS, s, constraint=constraint)
        engine.submit(p.prepare([[PHOTO]], [f"Question number {i}?"]), req, c)
    engine.start()
    try:
        assert all(c.done.wait(120) for c in got)
    finally:
        engine.stop(10)
    for constraint, c in zip(kinds, got, strict=True):
        if constraint is None:
            continue
        assert c.finish == "stop", (constraint, c.text)  # ended where its grammar did
        if constraint.kind == "regex":
            assert re.fullmatch(REGEX, c.text), c.text
        else:
            schema = json.loads(constraint.source)
            jsonschema.validate(json.loads(c.text), schema)


def test_bad_constraints_are_refused_with_the_problem_named(lively_pipe):
    with pytest.raises(ValueError, match="give one constraint, not json_schema and regex"):
        lively_pipe.generate(PHOTO, "Hi?", json_schema=SCHEMA, regex=REGEX)
    with pytest.raises(ValueError, match="regex"):
        lively_pipe.grammars.check(Constraint.regex("[unclosed"))
    with pytest.raises(ValueError, match="json_schema"):
        lively_pipe.grammars.check(Constraint.json_schema({"type": "no-such-type"}))
    with pytest.raises(ValueError, match="json_schema is not valid JSON"):
        lively_pipe.grammars.check(Constraint("json_schema", "{not json"))


def test_constraints_that_cannot_answer_are_refused_at_admission(lively_pipe):
    """A $ref cycle validates but admits no token, and a 2,000-branch anyOf compiles to ~160 KB of
    grammar: both refused by check(), before any answer starts (they used to fail at token 1)."""
    cycle = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    with pytest.raises(ValueError, match="admits no answer"):
        lively_pipe.grammars.check(Constraint.json_schema(cycle))
    branches = [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}} for i in range(2000)]
    with pytest.raises(ValueError, match="over the limit"):
        lively_pipe.grammars.check(Constraint.json_schema({"anyOf": branches}))
    many = {
        "type": "object",
        "properties": {f"field_{i}": {"enum": [f"v{j}" for j in range(20)]} for i in range(100)},
    }
    assert lively_pipe.grammars.check(Constraint.json_schema(many))  # a large ordinary schema passes


# ----------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(tiny_tokenizer_dir, tmp_path_factory):
    bundle = export_lively("replace", tiny_tokenizer_dir, tmp_path_factory.mktemp("json"), "fused")[1]
    with ServerProcess(bundle, "--max-batch", "8") as s:
        yield s, bundle


def _client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "count", "schema": SCHEMA, "strict": True}}


def test_response_format_json_schema_through_the_openai_client(server):
    c = _client(server)
    r = c.chat.completions.create(
        model="m",
        messages=[user("Count them as JSON.")],
        max_tokens=MAX_TOKENS,
        response_format=SCHEMA_FORMAT,
    )
    assert valid(r.choices[0].message.content) and r.choices[0].finish_reason == "stop"
    chunks = c.chat.completions.create(
        model="m",
        messages=[user("Count them as JSON.")],
        max_tokens=MAX_TOKENS,
        response_format=SCHEMA_FORMAT,
        stream=True,
    )
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        == r.choices[0].message.content
    )
    # any JSON object: unbounded (a random model may write one key forever), so it parses where it ended
    for seed in range(3):
        r = c.chat.completions.create(
            model="m",
            messages=[user("JSON?")],
            max_tokens=MAX_TOKENS,
            response_format={"type": "json_object"},
            temperature=1.0,
            seed=seed,
        )
        text = r.choices[0].message.content
        assert text.startswith("{")
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
    # max_tokens cuts a constrained answer: finish_reason says so
    r = c.chat.completions.create(
        model="m", messages=[user("Count them.")], max_tokens=4, response_format=SCHEMA_FORMAT
    )
    assert r.choices[0].finish_reason == "length" and not valid(r.choices[0].message.content)


@pytest.mark.parametrize(
    "response_format, message",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
            "response_format",
        ),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "JSON Schema object"),
        ({"type": "grammar"}, "'grammar' is not supported"),
        ("json", "must be an object"),
    ],
)
def test_an_unusable_response_format_is_a_400_naming_it(server, response_format, message):
    _refused(server, {"response_format": response_format}, message)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, "must be at most 20"),
        ({"logprobs": "yes"}, "'logprobs' must be true or false"),
    ],
)
def test_unusable_logprobs_options_are_a_400_naming_them(server, extra, message):
    _refused(server, extra, message)


def _refused(server, extra: dict, message: str) -> None:
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
        _client(server).chat.completions.create(model="m", messages=[user("Hi?")], max_tokens=8, **extra)
    r = _client(server).chat.completions.create(model="m", messages=[user("Hi?")], max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")  # the server still answers


def test_nanovlm_run_takes_a_json_schema_file_and_a_regex(server, tmp_path):
    bundle = server[1]
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    base = [sys.executable, "-m", "cli.main", "run", bundle, "--prompt", "Count them.", "--max-new-tokens"]
    res = subprocess.run(
        [*base, str(MAX_TOKENS), "--json-schema", str(tmp_path / "schema.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and valid(res.stdout.strip()), res.stderr[-2000:]
    res = subprocess.run(
        [*base, "20", "--regex", REGEX], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and re.fullmatch(REGEX, res.stdout.strip()), res.stderr[-2000:]
    (tmp_path / "bad.json").write_text('{"type": "nope"}')
    res = subprocess.run(
        [*base, "8", "--json-schema", str(tmp_path / "bad.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and "bad.json" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_logprobs_in_the_openai_shape(server):
    """logprobs / top_logprobs: one entry per answer token, the chosen token's log-probability
    under the model's logits, the most likely ones sorted; the same streamed."""
    import numpy as np

    from core.sequence import prompt_frame
    from runtime.pipeline import VLMPipeline

    c = _client(server)
    ask = dict(model="m", messages=[user("Count them.")], max_tokens=6, logprobs=True, top_logprobs=3)
    r = c.chat.completions.create(**ask)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
        assert e.token == e.top_logprobs[0].token and e.logprob == e.top_logprobs[0].logprob  # greedy
        assert e.bytes == list(e.token.encode())
    # the first token's logprob is the log-softmax of the runtime's own prefill logits; 1e-4: the
    # engine runs the same fp32 graph over a cache laid out its own way
    pipe = VLMPipeline.from_bundle(server[1])
    batch = pipe.prepare([[]], ["Count them."])
    frame = prompt_frame(pipe.cfg, batch, pipe.encode_images(batch.pixel_values))
    logits = pipe.step(frame, pipe.backend.new_cache(1, frame.shape[1] + 1))[0].astype(np.float64)
    lp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert abs(content[0].logprob - lp.max()) <= 1e-4
    streamed = [
        e
        for ch in c.chat.completions.create(**ask, stream=True)
        if ch.choices and ch.choices[0].logprobs
        for e in ch.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert np.allclose([e.logprob for e in streamed], [e.logprob for e in content], atol=1e-5)
    plain = c.chat.completions.create(model="m", messages=[user("Count them.")], max_tokens=6)
    assert plain.choices[0].logprobs is None


def test_an_answer_cut_by_its_token_limit_never_looks_whole(lively_pipe, tmp_path):
    """The library says how the answer ended; `run --json-schema` prints what it has and exits 1
    naming --max-new-tokens when the schema was left unfinished; --json carries finish_reason."""
    import os

    unbounded = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"]}
    cut = lively_pipe.generate(PHOTO, "How many?", max_new_tokens=3, json_schema=unbounded)
    assert lively_pipe.last_finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut)
    bounded = dict(unbounded, additionalProperties=False)
    bounded["properties"] = {"count": {"type": "integer", "minimum": 0, "maximum": 99}}
    whole = lively_pipe.generate(PHOTO, "How many?", max_new_tokens=16, json_schema=bounded)
    assert lively_pipe.last_finish_reason == "stop" and 0 <= json.loads(whole)["count"] <= 99
    schema, photo = tmp_path / "count.json", tmp_path / "photo.png"
    schema.write_text(json.dumps(unbounded))
    PHOTO.save(photo)
    exe = os.path.join(os.path.dirname(sys.executable), "nanovlm")
    base = [exe, "run", lively_pipe.bundle.path, "--image", str(photo), "--prompt", "How many?"]
    base += ["--json-schema", str(schema)]
    r = subprocess.run([*base, "--max-new-tokens", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout.strip() == cut.strip()
    assert r.stderr.strip().splitlines() == [
        "Error: the answer ran out of --max-new-tokens (3) before its json_schema was complete: "
        "what is printed is cut; raise --max-new-tokens"
    ]
    r = subprocess.run(
        [*base, "--max-new-tokens", "3", "--json"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and json.loads(r.stdout)["finish_reason"] == "length"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "raise_alarm",
        "parameters": {
            "type": "object",
            "properties": {"loud": {"type": "boolean"}},
            "required": ["loud"],
            "additionalProperties": False,
        },
    },
}


LIGHT = {
    "type": "function",
    "function": {
        "name": "light",
        "parameters": {
            "type": "object",
            "properties": {"on": {"type": "boolean"}},
            "required": ["on"],
            "additionalProperties": False,
        },
    },
}


def test_tools_are_answered_as_tool_calls_that_fit_their_schema(server):
    """tools with tool_choice "required" or a named function: the answer is a call, constrained by
    grammar to the function's parameters, as OpenAI's tool_calls (streamed too); "auto" (this
    model's template has no tool format) is a 400 naming tool_choice."""
    c = openai.OpenAI(base_url=server[0].url + "/v1", api_key="x", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "Weather in Oslo for three days?"}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ALARM, LIGHT)}
    # (the tiny test model's 512 positions hold few functions' descriptions: small sets here)
    named = {"type": "function", "function": {"name": "raise_alarm"}}
    for tools, choice in (([ALARM, LIGHT], "required"), ([WEATHER, ALARM], named)):
        r = c.chat.completions.create(model="x", messages=ask, tools=tools, tool_choice=choice)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        call = r.choices[0].message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(choice, dict):
            assert call.function.name == "raise_alarm"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    chunks = list(
        c.chat.completions.create(
            model="x", messages=ask, tools=[WEATHER], tool_choice="required", stream=True
        )
    )
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), schemas["get_weather"])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    for extra, words in [
        ({"tools": [WEATHER]}, "tool_choice 'auto' needs a chat template"),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice 'auto' needs a chat template"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice must be",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "required"},
            "tools[0]",
        ),
    ]:
        with pytest.raises(openai.BadRequestError, match=re.escape(words)):
            c.chat.completions.create(model="x", messages=ask, max_tokens=8, **extra)
    plain = c.chat.completions.create(
        model="x", messages=ask, max_tokens=4, tools=[WEATHER], tool_choice="none"
    )
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content is not None


def test_a_tool_result_goes_back_to_the_model_as_openai_sends_it(server):
    """The round trip of OpenAI's function calling: the assistant's tool_calls message and a `tool`
    message answering it (by tool_call_id) come back in the next request; the model reads the call
    as it wrote it and the result after it. Ids that answer no call, and arguments that are not
    JSON, are a 400 naming the message."""
    from serve.openai_api import RequestLimits, parse_chat

    c = openai.OpenAI(base_url=server[0].url + "/v1", api_key="x", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "Weather in Oslo for three days?"}]
    first = c.chat.completions.create(model="x", messages=ask, tools=[WEATHER], tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    turn = [
        first.choices[0].message.model_dump(exclude_none=True),  # content None: left out, as clients do
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 4}'},
    ]
    second = c.chat.completions.create(model="x", messages=ask + turn, max_tokens=6)
    alone = c.chat.completions.create(model="x", messages=ask, max_tokens=1)
    assert second.choices[0].message.content and second.usage.prompt_tokens > alone.usage.prompt_tokens + 10

    chat = parse_chat({"messages": ask + turn}, RequestLimits())
    written = json.dumps({"name": "get_weather", "arguments": json.loads(call.function.arguments)})
    assert chat.history == [(ask[0]["content"], written)]
    assert chat.question == 'get_weather returned: {"temperature_c": 4}'
    for bad, words in (
        ({**turn[1], "tool_call_id": "call_nobody"}, "messages[2].tool_call_id must name a tool call"),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}]},
            "messages[2].tool_calls[0].function.arguments is not JSON",
        ),
    ):
        with pytest.raises(openai.BadRequestError, match=re.escape(words)):
            c.chat.completions.create(model="x", messages=[*ask, turn[0], bad, ask[0]], max_tokens=4)

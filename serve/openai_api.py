"""The OpenAI chat-completions schema: request -> our inputs, our outputs -> responses and chunks.

Plain functions over JSON-like dicts, no web framework, so the schema rules are tested on their
own. Every refusal is an `ApiError` carrying the HTTP status and OpenAI's error body fields.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from core.sampling import SamplingConfig
from runtime.constraint import Constraint

_ADDRESS = re.compile(r"\s+at 0x[0-9a-fA-F]+")


def scrub(message: str) -> str:
    """A message fit for a client or a log: object reprs lose their heap addresses."""
    return _ADDRESS.sub("", message)


class ApiError(Exception):
    """A refused request: HTTP status, message, and the parameter it concerns."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {
            400: "invalid_request_error",
            401: "invalid_request_error",
            404: "not_found_error",
            405: "invalid_request_error",
            408: "invalid_request_error",
            403: "invalid_request_error",
            413: "invalid_request_error",
            415: "invalid_request_error",
            429: "rate_limit_error",
            503: "server_error",
        }.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        error = {"message": scrub(self.message), "type": self.kind, "param": self.param, "code": self.code}
        return {"error": error}


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; the server's flags set these."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024  # decoded bytes of one image
    max_image_pixels: int = 4096 * 4096
    max_request_pixels: int = 48 * 2**20  # all of a request's images (or frames) together: 144 MB as RGB
    max_video_bytes: int = 16 * 1024 * 1024  # encoded bytes of one video
    max_video_seconds: float = 300.0  # a video's duration, from its header
    max_images: int = 4
    max_tokens: int = 256  # when the request names none
    max_stop: int = 4
    image_dir: str | None = None  # file:// images and videos allowed only under this directory
    image_tiles: int | None = None  # resolution budget: the default and the most a request may ask


@dataclass
class ChatRequest:
    """A validated chat request in our terms."""

    media: list[MediaRef]  # read by serve/media.py once every field is checked
    question: str
    history: list[tuple[str, str]]
    system: str | None
    max_tokens: int | None  # None: the server's default, within the context
    sampling: SamplingConfig
    stop: list[str]
    stream: bool
    include_usage: bool
    model: str
    constraint: Constraint | None = None  # from response_format
    logprobs: int | None = None  # None: not asked; n: top_logprobs (0 to 20)
    image_tiles: int | None = None  # None: the server's resolution budget
    cache_salt: str | None = None  # vLLM's field: only requests with the same salt share cached work
    tools: Any = None  # serve/tools.py Tools: the answer is a call of one of them


# ----------------------------------------------------------------------------- requests


def parse_chat(body: Any, limits: RequestLimits) -> ChatRequest:
    """Validate an OpenAI chat-completions body; its images and videos are named, sized from their
    URLs, and left unread (serve/media.py opens them)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    system, turns, media = None, [], []
    called: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant messages
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(400, f"{where} must be an object", where)
        role = msg.get("role")
        calls = msg.get("tool_calls") if role == "assistant" else None
        content = "" if calls is not None and msg.get("content") is None else msg.get("content")
        text, imgs = _content(content, f"{where}.content", limits)
        if calls is not None:  # the model's earlier call, written as it wrote it
            text = "\n".join(t for t in (text, _calls_text(calls, f"{where}.tool_calls", called)) if t)
        if role == "tool":  # a function's result, read by the model as the user's next words
            text, role = _tool_result(msg, text, where, called, imgs), "user"
        count = sum(m.kind == "image" for m in media + imgs)
        if count > limits.max_images:  # counted before any image is read
            raise ApiError(
                400,
                f"at least {count} images in one request; the limit is {limits.max_images}",
                f"{where}.content",
            )
        if role in ("system", "developer"):
            if i != 0 or imgs:
                raise ApiError(400, f"{where}: a system message must come first and hold text only", where)
            system = text
            continue
        if role not in ("user", "assistant"):
            raise ApiError(
                400,
                f"{where}.role {role!r} is not supported (system, user, assistant or tool)",
                f"{where}.role",
            )
        if role == "assistant" and imgs:
            raise ApiError(400, f"{where}: an assistant message cannot hold images or videos", where)
        if role == "assistant" and not turns:
            raise ApiError(400, f"{where}: the conversation must start with a user message", where)
        media += imgs
        if turns and turns[-1][0] == role:  # consecutive messages of one role read as one, as OpenAI's do
            turns[-1] = (role, "\n".join(t for t in (turns[-1][1], text) if t))
        else:
            turns.append((role, text))
    if any(m.kind == "video" for m in media) and len(media) > 1:
        raise ApiError(
            400, "a video goes alone: no other video or image beside it in one request", "messages"
        )
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be a user message", "messages")
    if not turns[-1][1].strip():
        raise ApiError(400, "the last user message has no text", "messages")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]

    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"n={n!r}: only one choice per request is supported", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported (use 0 or leave it out)", name)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        _int(max_tokens, "max_tokens", 1)
    temperature = _number(body.get("temperature", 0.0), "temperature", 0.0, 2.0)
    top_p = _number(body.get("top_p", 1.0), "top_p", 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be greater than 0", "top_p")
    seed = body.get("seed")
    if seed is not None:
        _int(seed, "seed", 0)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > limits.max_stop
    ):
        raise ApiError(
            400, f"'stop' must be a string or a list of at most {limits.max_stop} non-empty strings", "stop"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not 1 <= len(salt) <= 256):
        raise ApiError(400, "'cache_salt' must be a string of 1 to 256 characters", "cache_salt")
    constraint, logprobs, tiles = (
        response_format(body.get("response_format")),
        _logprobs(body),
        _image_tiles(body, limits),
    )
    return ChatRequest(
        media=media,
        question=turns[-1][1],
        history=history,
        system=system,
        max_tokens=max_tokens,
        sampling=SamplingConfig(temperature=float(temperature), top_p=float(top_p), seed=seed),
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        model=model,
        constraint=constraint,
        logprobs=logprobs,
        image_tiles=tiles,
        cache_salt=salt,
    )


def _image_tiles(body: dict, limits: RequestLimits) -> int | None:
    """image_tiles (an extension: tiles along an image's long edge), within the server's budget."""
    tiles = body.get("image_tiles")
    if tiles is None:
        return None
    _int(tiles, "image_tiles", 1)
    if limits.image_tiles is not None and tiles > limits.image_tiles:
        raise ApiError(
            400, f"image_tiles={tiles}: this server allows at most {limits.image_tiles}", "image_tiles"
        )
    return tiles


def _logprobs(body: dict) -> int | None:
    """logprobs (true/false) and top_logprobs (0 to 20, only with logprobs) -> top count or None."""
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise ApiError(400, "'logprobs' must be true or false", "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        _int(top, "top_logprobs", 0)
        if top > 20:
            raise ApiError(400, f"top_logprobs={top} must be at most 20", "top_logprobs")
        if not want:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if want else None


def logprob_content(tokenizer: Any, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> list[dict]:
    """The engine's (token, logprob, top) entries in OpenAI's `logprobs.content` shape."""

    def one(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [one(t, lp) | {"top_logprobs": [one(i, v) for i, v in top]} for t, lp, top in entries]


def response_format(value: Any) -> Constraint | None:
    """OpenAI's response_format: text (none), json_object, or json_schema {name, schema, strict}.
    The schema's meaning is checked later, against the tokenizer (Grammars.check)."""
    where = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, f"'{where}' must be an object", where)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_object()
    if kind != "json_schema":
        raise ApiError(
            400, f"{where}.type {kind!r} is not supported (text, json_object or json_schema)", f"{where}.type"
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiError(
            400, f"{where}.json_schema must be an object with 'name' and 'schema'", f"{where}.json_schema"
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(
            400, f"{where}.json_schema.name must be a non-empty string", f"{where}.json_schema.name"
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise ApiError(
            400, f"{where}.json_schema.schema must be a JSON Schema object", f"{where}.json_schema.schema"
        )
    if not isinstance(spec.get("strict", False), bool | None):
        raise ApiError(
            400, f"{where}.json_schema.strict must be true or false", f"{where}.json_schema.strict"
        )
    return Constraint.json_schema(schema)


def _int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ApiError(400, f"{name}={value!r} must be an integer >= {low}", name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{name}={value!r} must be a number in [{low}, {high}]", name)
    return float(value)


@dataclass(frozen=True)
class MediaRef:
    """An image or video a request names, not read yet (serve/media.py opens it)."""

    url: str
    where: str  # the part's place in the request, for messages
    kind: str  # "image" or "video"


def check_url(ref: MediaRef, limits: RequestLimits) -> None:
    """What a URL shows without reading anything: its scheme, control characters, and for a data:
    URL its size."""
    url, where = ref.url, ref.where
    limit = limits.max_image_bytes if ref.kind == "image" else limits.max_video_bytes
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if any(ord(c) < 32 for c in head) or ";base64" not in head:
            raise ApiError(400, f"{where}: only base64 data: URLs are supported", where)
        if len(data) * 3 // 4 > limit:
            raise ApiError(413, f"{where}: {ref.kind} is over {limit} bytes", where)
    elif any(ord(c) < 32 for c in url):
        raise ApiError(400, f"{where}: the {ref.kind} URL holds control characters", where)


def _calls_text(calls: Any, where: str, called: dict[str, str]) -> str:
    """An assistant message's tool_calls as the JSON the model writes for one, a line each; their
    ids are noted in `called` for the tool messages that answer them."""
    if not isinstance(calls, list) or not calls:
        raise ApiError(400, f"{where} must be a non-empty list of function calls", where)
    lines = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not isinstance(call.get("id"), str)
        ):
            raise ApiError(
                400, f"{at} must be {{'id': str, 'type': 'function', 'function': {{'name': str, ...}}}}", at
            )
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except (TypeError, ValueError, RecursionError):
            raise ApiError(400, f"{at}.function.arguments is not JSON text", at) from None
        called[call["id"]] = fn["name"]
        lines.append(json.dumps({"name": fn["name"], "arguments": arguments}, ensure_ascii=False))
    return "\n".join(lines)


def _tool_result(msg: dict, text: str, where: str, called: dict[str, str], media: list) -> str:
    """A tool message as the text the model reads: which function answered, and what it said."""
    call_id = msg.get("tool_call_id")
    if call_id not in called:
        raise ApiError(
            400, f"{where}.tool_call_id must name a tool call of an earlier assistant message", where
        )
    if media:
        raise ApiError(400, f"{where}: a tool message holds text only", where)
    return f"{called[call_id]} returned: {text}"


def _content(content: Any, where: str, limits: RequestLimits) -> tuple[str, list[MediaRef]]:
    """A message's text (parts joined with newlines) and its images and videos, in order, unread."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of content parts", where)
    texts, media = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
            url = part.get(kind)
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ApiError(400, f"{at}.{kind}.url must be a string", at)
            ref = MediaRef(url, at, kind.split("_")[0])
            check_url(ref, limits)
            media.append(ref)
        else:
            raise ApiError(
                400, f"{at}: expected a part of type 'text' (with text), 'image_url' or 'video_url'", at
            )
    return "\n".join(texts), media


def json_depth(value: Any, limit: int) -> int:
    """The nesting depth of a parsed JSON value, counted without recursion, up to `limit` + 1."""
    depth, level = 0, [value]
    while level:
        depth += 1
        if depth > limit:
            return depth
        nxt = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, list):
                nxt.extend(v)
        level = nxt
    return depth - 1


# ----------------------------------------------------------------------------- responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(
    cid: str,
    model: str,
    text: str | None,
    finish: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    logprobs: list[dict] | None = None,
    views: tuple[int, int] | None = None,
    tool_calls: list[dict] | None = None,
) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    choice = {"index": 0, "message": message, "finish_reason": finish}
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice | {"logprobs": _logprob_field(logprobs)}],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens, views),
    }


def _chunk(cid: str, model: str, choices: list[dict]) -> dict:
    """A streamed chunk's envelope."""
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }


def chunk(
    cid: str, model: str, delta: dict, finish: str | None = None, logprobs: list[dict] | None = None
) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": _logprob_field(logprobs)}
    return _chunk(cid, model, [choice])


def _logprob_field(content: list[dict] | None) -> dict | None:
    return None if content is None else {"content": content, "refusal": None}


def usage_chunk(
    cid: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    views: tuple[int, int] | None = None,
) -> dict:
    return _chunk(cid, model, []) | {"usage": usage(prompt_tokens, completion_tokens, cached_tokens, views)}


def usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, views: tuple[int, int] | None = None
) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: prompt positions whose KV came from the prefix cache;
    `views` (an extension, when the prompt shows images): (views, of them reused from the cache)."""
    details: dict[str, Any] = {"cached_tokens": cached_tokens}
    if views and views[0]:
        details |= {"image_views": views[0], "reused_image_views": views[1]}
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": details,
    }


def models(name: str, created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "nanovlm-edge"}],
    }

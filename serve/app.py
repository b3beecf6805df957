"""`nanovlm serve`: an OpenAI-compatible HTTP server over one bundle, with continuous batching.

    POST /v1/chat/completions   OpenAI chat completions (images as data: URLs), streaming or not
    GET  /v1/models             the one model served
    GET  /health                200 once the bundle is loaded and a warm-up request ran, else 503
    GET  /metrics               Prometheus text format
    GET  /                      a page: pick an image, ask, watch the answer stream in

The bundle loads on a background thread at startup, so /health answers 503 while it loads. All
model work runs on the engine's one thread (runtime/batching.py); request parsing and image
decoding run on a pool of prepare threads. Keys, Host and Origin checks and error shapes are
serve/security.py's, connection deadlines and the cap serve/connections.py's (docs/security.md).
Torch-free: starlette, uvicorn and prometheus-client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from core.processors import check_image_tiles
from core.video import VideoSettings
from runtime.batching import ContinuousBatcher
from runtime.engine_api import EngineConfig, Event, QueueFull
from runtime.pipeline import GenerationRequest, VLMPipeline
from runtime.prefill_plan import PREFILL_POSITIONS

from .connections import connection_cap, guarded_protocol, raise_fd_limit
from .media import open_media
from .metrics import Metrics
from .openai_api import (
    ApiError,
    ChatRequest,
    RequestLimits,
    chunk,
    completion,
    completion_id,
    json_depth,
    logprob_content,
    models,
    parse_chat,
    usage_chunk,
)
from .security import Guard, SecurityPolicy, cap_log_lines
from .tools import parse_tools, tool_calls

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 64  # a request body nested deeper is refused (a chat with a JSON schema needs ~10)
ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


@dataclass(frozen=True)
class ServeConfig:
    bundle: str
    name: str | None = None  # the model id clients see; the bundle's folder name by default
    engine: EngineConfig = EngineConfig()  # batch and queue sizes, prefill chunk, cache sizes
    threads: int | None = None
    limits: RequestLimits = RequestLimits()
    security: SecurityPolicy = SecurityPolicy()
    body_timeout: float = 60.0  # seconds to receive a whole request body, else 408

    @property
    def model_name(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.bundle))


class Service:
    """The loaded model, its engine and metrics: what the HTTP routes share."""

    def __init__(self, config: ServeConfig):
        self.config, self.limits = config, config.limits
        self.metrics = Metrics()
        self.pipe: VLMPipeline | None = None
        self.engine: ContinuousBatcher | None = None
        self.ready = threading.Event()
        self.failed: str | None = None
        self.created = int(time.time())
        self.live: dict[int, Any] = {}  # id -> ticket of each request being answered
        self.draining = False  # shutting down: no new requests; live ones are cut at the deadline
        # Parsing and image preprocessing are CPU-bound: more threads than cores would only queue on
        # them and hold memory (each thread that contends for malloc gets its own glibc arena).
        self.prepare_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="prepare")

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        try:
            c = self.config
            # the engine's encoder thread runs beside its decoder: idle threads sleep, not spin
            self.pipe = VLMPipeline.from_bundle(c.bundle, threads=c.threads, spinning=False)
            # the resolution budget: the operator's, else the bundle's; requests may ask for less
            tiles = check_image_tiles(self.pipe.cfg, self.limits.image_tiles or self.pipe.image_tiles)
            self.limits = dataclasses.replace(self.limits, image_tiles=tiles)
            self.pipe.image_tiles = tiles
            self.engine = ContinuousBatcher(self.pipe, config=c.engine)
            self.metrics.watch(self.engine)
            self.engine.start()
            if self.pipe.bundle.mode != "fp32":
                log.warning(
                    "%s is a %s bundle: its kernels round differently at batch 1 and in a batch, so a greedy answer "
                    "can leave its lone run's path after some tokens (fp32 bundles answer exactly as alone; "
                    "docs/serving.md)",
                    c.bundle,
                    self.pipe.bundle.mode,
                )
            self._warm_up()
            self.ready.set()
            log.info(
                "serving %s (%s) with up to %d requests per batch", c.model_name, c.bundle, c.engine.max_batch
            )
        except Exception as e:  # noqa: BLE001 - reported by /health and the log; the process stays up
            self.failed = f"{type(e).__name__}: {e}"
            log.error("cannot serve %s: %s", self.config.bundle, self.failed)

    def _warm_up(self) -> None:
        """A burst through the engine, with an image each, as wide and long as one prefill group
        can be: first-run allocations and the largest prefill's buffers happen here, so resident
        memory stays flat under load."""
        rows = min(self.engine.max_batch, self.engine.max_queue)  # all submitted at once
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        target = min(PREFILL_POSITIONS // rows, self.engine.max_context - 8)
        words = max(0, target - self.engine.prompt_length(self.pipe.prepare([[image]], ["Hello"])))
        while True:  # a word is a token or more, depending on the tokenizer
            batch = self.pipe.prepare([[image]], ["Hello" + " hello" * words])
            if words == 0 or self.engine.prompt_length(batch) <= target:
                break
            words = min(words - 1, words * 3 // 4)
        events = [threading.Event() for _ in range(rows)]
        for ev in events:
            self.engine.submit(batch, GenerationRequest(2), lambda e, ev=ev: ev.set() if e.finish else None)
        if not all(ev.wait(600) for ev in events):
            raise RuntimeError("the warm-up requests did not finish in 600 s")

    def stop(self) -> None:
        self.cut_live()
        if self.engine:
            self.engine.stop(timeout=5)
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)

    def drain(self) -> None:
        """Shutdown began: refuse new requests (503); live ones finish until cut_live."""
        self.draining = True

    def cut_live(self) -> None:
        """End every live request now: streams get a final error chunk, others a 503."""
        self.draining = True
        for ticket in list(self.live.values()):
            ticket.cancel()

    def check_ready(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        if not self.ready.is_set():
            raise ApiError(
                503, f"the model failed to load: {self.failed}" if self.failed else "the model is loading"
            )

    def logprobs(self, chat: ChatRequest, entries: list) -> list[dict] | None:
        """`logprobs.content` for the tokens of `entries`, or None where the request did not ask."""
        return None if chat.logprobs is None else logprob_content(self.pipe.tokenizer, entries)

    # ------------------------------------------------------------------ one chat request
    def prepare(self, body: Any, tenant: str = "") -> tuple[ChatRequest, Any, GenerationRequest]:
        """Parse, open images, format and tokenize (on a pool thread): errors are ApiErrors.
        `tenant` (the API key's digest) and the request's cache_salt scope what it may reuse."""
        chat = parse_chat(body, self.limits)
        tools = parse_tools(body)
        if tools is not None:  # a call of one of them: the grammar makes it parse and fit
            if chat.constraint is not None:
                raise ApiError(400, "give tools or response_format, not both", "tools")
            chat.tools, chat.constraint, chat.system = tools, tools.constraint, tools.system(chat.system)
        if chat.image_tiles is not None:
            try:
                check_image_tiles(self.pipe.cfg, chat.image_tiles)
            except ValueError as e:
                raise ApiError(400, str(e), "image_tiles") from None
        media = open_media(chat.media, self.limits, VideoSettings.from_config(self.pipe.cfg))
        try:
            batch = self.pipe.prepare([media], [chat.question], [chat.history], chat.system, chat.image_tiles)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        n = self.engine.prompt_length(batch)
        room = self.engine.max_context - n
        if room < 1:
            raise ApiError(
                400,
                f"the prompt takes {n} positions (image tokens included): no room left in "
                f"the model's context of {self.engine.max_context}",
                "messages",
            )
        max_tokens = chat.max_tokens or min(self.limits.max_tokens, room)
        if chat.constraint is not None:
            try:
                self.pipe.grammars.check(chat.constraint)
            except ValueError as e:
                raise ApiError(400, f"response_format: {e}", "response_format") from None
        scope = b""
        if tenant or chat.cache_salt is not None:
            h = hashlib.blake2b(tenant.encode(), digest_size=16, person=b"nanovlm-scope")
            h.update(b"\0" + (chat.cache_salt or "").encode())
            scope = h.digest()
        return (
            chat,
            batch,
            GenerationRequest(
                max_tokens,
                chat.sampling,
                chat.stop,
                constraint=chat.constraint,
                logprobs=chat.logprobs,
                cache_scope=scope,
            ),
        )


# ----------------------------------------------------------------------------- HTTP


def error(e: ApiError, service: Service | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    if service:
        service.metrics.requests.labels(str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, or 413 once it is over `limit` bytes, or 408 if it takes over `timeout` seconds.
    A body up to 4x the limit is read to its end first, so the client (still sending) gets the 413
    instead of a reset connection."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > 4 * limit:
        raise ApiError(413, f"the request body is {declared} bytes, over the limit of {limit} bytes")
    parts, size = [], 0

    async def read() -> None:
        nonlocal size
        async for part in request.stream():
            size += len(part)
            if size <= limit:
                parts.append(part)
            elif size > 4 * limit:
                break

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s") from None
    if size > limit:
        raise ApiError(413, f"the request body is over the limit of {limit} bytes")
    return b"".join(parts)


def parse_json(raw: bytes) -> Any:
    """The body as JSON: 400 when it is not JSON, or nested deeper than MAX_JSON_DEPTH."""
    too_deep = ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise too_deep from None
    if json_depth(body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise too_deep
    return body


def create_app(config: ServeConfig, load_in_background: bool = True, bind_host: str = "127.0.0.1") -> Guard:
    """The app behind its Guard (serve/security.py); `.state.service` is the Service."""
    service = Service(config)
    name = config.model_name

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = threading.Thread(target=service.load, name="nanovlm-load", daemon=True)
        loader.start()
        if not load_in_background:  # e.g. a Ray replica: ready only once loaded, or not started at all
            await run_in_threadpool(loader.join)
            if service.failed:
                raise RuntimeError(f"cannot serve {config.bundle}: {service.failed}")
        yield
        await run_in_threadpool(service.stop)

    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            service.check_ready()
            raw = await read_body(request, config.limits.max_body_bytes, config.body_timeout)
            body = parse_json(raw)
            loop = asyncio.get_running_loop()
            tenant = request.scope.get("state", {}).get("tenant", "")
            chat, batch, gen = await loop.run_in_executor(service.prepare_pool, service.prepare, body, tenant)
            events: asyncio.Queue[Event] = asyncio.Queue()
            try:
                ticket = service.engine.submit(
                    batch, gen, lambda e: loop.call_soon_threadsafe(events.put_nowait, e)
                )
            except QueueFull as e:
                raise ApiError(429, f"the server is busy: {e}") from None
            except ValueError as e:
                raise ApiError(400, str(e), "max_tokens") from None
        except ApiError as e:
            return error(e, service)
        cid = completion_id()
        service.live[id(ticket)] = ticket

        def account(last: Event) -> None:
            m = service.metrics
            service.live.pop(id(ticket), None)
            status = {"error": "500", "cancelled": "499"}.get(last.finish, "200")  # 499: the client left
            if last.finish == "cancelled" and service.draining:
                status = "503"
            m.requests.labels(status).inc()
            m.prompt_tokens.inc(ticket.prompt_tokens)
            m.cached_tokens.inc(ticket.cached_tokens)
            m.completion_tokens.inc(last.completion_tokens)
            if ticket.first_token is not None:
                m.ttft.observe(ticket.first_token - arrived)
                if last.completion_tokens > 1 and ticket.finished:
                    m.per_token.observe((ticket.finished - ticket.first_token) / (last.completion_tokens - 1))

        if chat.stream:
            return StreamingResponse(
                _sse(events, ticket, cid, name, chat, account, service),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text, entries = "", []
        try:
            while True:
                try:
                    e = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        ticket.cancel()
                        account(Event("", 0, finish="cancelled"))
                        return Response(status_code=499)
                    continue
                text += e.text
                entries += e.logprobs
                if e.finish:
                    break
        finally:
            ticket.cancel()  # a no-op once finished; frees the row if this handler was cancelled
        account(e)
        if e.finish == "error":
            log.error("generation failed: %s", e.error)
            return JSONResponse(GENERATION_FAILED.body(), status_code=500)
        if e.finish == "cancelled" and service.draining:
            return error(SHUTTING_DOWN)
        calls = tool_calls(text) if chat.tools is not None and e.finish == "stop" else None
        return JSONResponse(
            completion(
                cid,
                name,
                None if calls else text,
                "tool_calls" if calls else e.finish,
                ticket.prompt_tokens,
                e.completion_tokens,
                ticket.cached_tokens,
                logprobs=service.logprobs(chat, entries),
                views=views(ticket),
                tool_calls=calls,
            )
        )

    async def list_models(request: Request) -> Response:
        return JSONResponse(models(name, service.created))

    async def health(request: Request) -> Response:
        if service.ready.is_set():
            return JSONResponse({"status": "ok", "model": name})
        status = "failed" if service.failed else "loading"
        return JSONResponse({"status": status, "error": service.failed}, status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    page_html = resources.files("serve").joinpath("static/index.html").read_text()  # read once
    page_csp = page_policy(page_html)

    async def page(request: Request) -> Response:
        return HTMLResponse(page_html, headers={"Content-Security-Policy": page_csp})

    async def http_error(request: Request, exc: Exception) -> Response:
        """404, 405 and the like in OpenAI's error shape."""
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "") or "error"
        return JSONResponse(
            ApiError(status, str(detail)).body(), status_code=status, headers=getattr(exc, "headers", None)
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        """The body of an unhandled exception's 500 (the Guard logs it, once)."""
        return JSONResponse(ApiError(500, "internal error (logged by the server)").body(), status_code=500)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", page, methods=["GET"]),
    ]
    handlers = {HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.service = service
    return Guard(app, config.security, bind_host, service.metrics.count_response, ROUTES)


def views(ticket: Any) -> tuple[int, int]:
    """(views the prompt shows, of them reused from the image cache)."""
    return ticket.views, ticket.views - ticket.encoded_views


GENERATION_FAILED = ApiError(500, "generation failed (the server logged why)")
SHUTTING_DOWN = ApiError(503, "the server is shutting down; the answer was cut")


def page_policy(html: str) -> str:
    """The page's Content-Security-Policy: its own inline script and style (by hash), images from
    data: and blob: URLs, requests to this server only, and no framing."""

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in found
        )

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


async def _sse(
    events: asyncio.Queue, ticket: Any, cid: str, name: str, chat: ChatRequest, account, service: Service
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content chunks, a finish chunk, usage if asked, [DONE]."""

    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    e, held = None, ""  # a tool call is sent whole, once it parses
    try:
        yield data(chunk(cid, name, {"role": "assistant", "content": ""}))
        while True:
            e = await events.get()
            if e.text and chat.tools is not None:
                held += e.text
            elif e.text:
                yield data(chunk(cid, name, {"content": e.text}, logprobs=service.logprobs(chat, e.logprobs)))
            if e.finish:
                break
        account(e)
        if e.finish == "error":
            log.error("generation failed: %s", e.error)
            yield data(GENERATION_FAILED.body())
        elif e.finish == "cancelled" and service.draining:
            yield data(SHUTTING_DOWN.body())
        else:
            finish = e.finish
            if chat.tools is not None and e.finish == "stop":
                calls = [dict(c, index=0) for c in tool_calls(held)]
                yield data(chunk(cid, name, {"tool_calls": calls}))
                finish = "tool_calls"
            elif held:  # cut by max_tokens: what there is, as text
                yield data(chunk(cid, name, {"content": held}))
            yield data(chunk(cid, name, {}, finish))
            if chat.include_usage:
                yield data(
                    usage_chunk(
                        cid,
                        name,
                        ticket.prompt_tokens,
                        e.completion_tokens,
                        ticket.cached_tokens,
                        views(ticket),
                    )
                )
        yield "data: [DONE]\n\n"
    finally:
        if e is None or not e.finish:  # the client went away mid-stream: free the row at the next step
            ticket.cancel()
            account(Event("", e.completion_tokens if e else 0, finish="cancelled"))


@dataclass(frozen=True)
class NetworkConfig:
    """How the server holds connections (serve/connections.py) and shuts down."""

    host: str = "127.0.0.1"
    port: int = 8000
    header_timeout: float = 10.0  # seconds for a request's head, from connect or the last response
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 1000  # open connections; past it the longest-idle one is closed
    shutdown_timeout: float = 10.0  # SIGTERM: live requests get this long, then are cut


def serve(config: ServeConfig, network: NetworkConfig = NetworkConfig(), log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM: it stops taking requests, lets live ones finish for
    `shutdown_timeout` seconds (streams that are still running then end with an error chunk) and exits."""
    n = network
    cap = connection_cap(n.max_connections, raise_fd_limit())
    app = create_app(config, bind_host=n.host)
    uv = uvicorn.Config(
        app,
        host=n.host,
        port=n.port,
        log_level=log_level,
        http=guarded_protocol(n.header_timeout, cap),
        timeout_keep_alive=max(1, round(n.keep_alive)),
        timeout_graceful_shutdown=max(1, round(n.shutdown_timeout)),
        server_header=False,
    )
    if not config.security.api_keys and n.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s without an API key: whoever reaches the port can use it (--api-key)", n.host
        )
    server = DrainingServer(uv, app.state.service, n.shutdown_timeout)
    cap_log_lines()
    server.run()


class DrainingServer(uvicorn.Server):
    """uvicorn's Server whose exit signal also starts the Service's drain: new requests get 503
    at once, and live ones are cut a second before uvicorn's own graceful-shutdown deadline."""

    def __init__(self, config: uvicorn.Config, service: Service, grace: float):
        super().__init__(config)
        self.service, self.grace = service, grace

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first:
            self.service.drain()
            timer = threading.Timer(max(0.0, self.grace - 1.0), self.service.cut_live)
            timer.daemon = True
            timer.start()

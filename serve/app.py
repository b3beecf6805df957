"""`nanovlm serve`: an OpenAI-compatible HTTP server over one bundle, with continuous batching.

    POST /v1/chat/completions   OpenAI chat completions (images as data: URLs), streaming or not
    GET  /v1/models             the one model served
    GET  /health                200 once the bundle is loaded and a warm-up request ran, else 503
    GET  /metrics               Prometheus text format
    GET  /                      a page: pick an image, ask, watch the answer stream in

The bundle loads on a background thread at startup, so /health answers 503 while it loads. All
model work runs on the engine's one thread (runtime/batching.py); request parsing and image
decoding run on Starlette's thread pool. Torch-free: starlette, uvicorn and prometheus-client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from core.processors import check_image_tiles
from runtime.batching import PREFILL_POSITIONS, ContinuousBatcher, EngineConfig, Event, QueueFull
from runtime.pipeline import GenerationRequest, VLMPipeline

from .metrics import Metrics
from .openai_api import (
    ApiError,
    ChatRequest,
    RequestLimits,
    chunk,
    completion,
    completion_id,
    logprob_content,
    models,
    parse_chat,
    usage_chunk,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    bundle: str
    name: str | None = None  # the model id clients see; the bundle's folder name by default
    engine: EngineConfig = EngineConfig()  # batch and queue sizes, prefill chunk, cache sizes
    threads: int | None = None
    limits: RequestLimits = RequestLimits()

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
        if self.engine:
            self.engine.stop(timeout=60)
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)

    def check_ready(self) -> None:
        if not self.ready.is_set():
            raise ApiError(
                503, f"the model failed to load: {self.failed}" if self.failed else "the model is loading"
            )

    def logprobs(self, chat: ChatRequest, entries: list) -> list[dict] | None:
        """`logprobs.content` for the tokens of `entries`, or None where the request did not ask."""
        return None if chat.logprobs is None else logprob_content(self.pipe.tokenizer, entries)

    # ------------------------------------------------------------------ one chat request
    def prepare(self, body: Any) -> tuple[ChatRequest, Any, GenerationRequest]:
        """Parse, open images, format and tokenize (on a pool thread): errors are ApiErrors."""
        chat = parse_chat(body, self.limits)
        if chat.image_tiles is not None:
            try:
                check_image_tiles(self.pipe.cfg, chat.image_tiles)
            except ValueError as e:
                raise ApiError(400, str(e), "image_tiles") from None
        try:
            batch = self.pipe.prepare(
                [chat.images], [chat.question], [chat.history], chat.system, chat.image_tiles
            )
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
        return (
            chat,
            batch,
            GenerationRequest(
                max_tokens, chat.sampling, chat.stop, constraint=chat.constraint, logprobs=chat.logprobs
            ),
        )


# ----------------------------------------------------------------------------- HTTP


def error(e: ApiError, service: Service | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    if service:
        service.metrics.requests.labels(str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it is over `limit` bytes. A body up to 4x the limit is read to its end
    first, so the client (still sending) gets the 413 instead of a reset connection."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > 4 * limit:
        raise ApiError(413, f"the request body is {declared} bytes, over the limit of {limit} bytes")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size <= limit:
            parts.append(part)
        elif size > 4 * limit:
            break
    if size > limit:
        raise ApiError(413, f"the request body is over the limit of {limit} bytes")
    return b"".join(parts)


def create_app(config: ServeConfig, load_in_background: bool = True) -> Starlette:
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
            raw = await read_body(request, config.limits.max_body_bytes)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not valid JSON ({e})") from None
            loop = asyncio.get_running_loop()
            chat, batch, gen = await loop.run_in_executor(service.prepare_pool, service.prepare, body)
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

        def account(last: Event) -> None:
            m = service.metrics
            status = {"error": "500", "cancelled": "499"}.get(last.finish, "200")  # 499: the client left
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
            return JSONResponse(ApiError(500, f"generation failed: {e.error}").body(), status_code=500)
        return JSONResponse(
            completion(
                cid,
                name,
                text,
                e.finish,
                ticket.prompt_tokens,
                e.completion_tokens,
                ticket.cached_tokens,
                logprobs=service.logprobs(chat, entries),
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

    async def page(request: Request) -> Response:
        return HTMLResponse(page_html)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", page, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app


async def _sse(
    events: asyncio.Queue, ticket: Any, cid: str, name: str, chat: ChatRequest, account, service: Service
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content chunks, a finish chunk, usage if asked, [DONE]."""

    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    e = None
    try:
        yield data(chunk(cid, name, {"role": "assistant", "content": ""}))
        while True:
            e = await events.get()
            if e.text:
                yield data(chunk(cid, name, {"content": e.text}, logprobs=service.logprobs(chat, e.logprobs)))
            if e.finish:
                break
        account(e)
        if e.finish == "error":
            yield data(ApiError(500, f"generation failed: {e.error}").body())
        else:
            yield data(chunk(cid, name, {}, e.finish))
            if chat.include_usage:
                yield data(
                    usage_chunk(cid, name, ticket.prompt_tokens, e.completion_tokens, ticket.cached_tokens)
                )
        yield "data: [DONE]\n\n"
    finally:
        if e is None or not e.finish:  # the client went away mid-stream: free the row at the next step
            ticket.cancel()
            account(Event("", e.completion_tokens if e else 0, finish="cancelled"))


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; both drain running requests before exiting."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=120)

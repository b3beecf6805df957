"""The serving engine: concurrent requests share the decoder's steps, and what was computed once
(an image's embeddings, a prompt's KV) is reused across requests and turns.

One engine thread owns the decoder and runs this loop; one encoder thread runs the vision encoder:

    admit     waiting requests take free batch rows: each looks its prompt up in the prefix cache
              (runtime/prefix_cache.py) and its images in the image cache (runtime/image_cache.py);
              images still needed go to the encoder thread, so running streams never wait for them
    prefill   at most `prefill_chunk` positions per loop while streams decode, oldest first: a
              ready request's next piece, prefilled after its reused KV in a cache of its own, or a
              group of short prefills (fresh prompts, or the rest after reused KV) as one batch,
              until the budget is spent; a finished prompt's blocks go into the prefix cache, its
              first token is sampled and its KV row joins the batch
    decode    one decoder step over every running row: [B, 1] tokens, one shared frame of T
              positions, each row left-padded and masked (runtime/kv_cache.py)
    sample    each row with its own sampler (own seed, own settings), text through its TextStream
    retire    rows that hit EOS, a stop string, max_tokens or were cancelled leave the batch

A prefill row sees only its own positions (padding is masked), a decode row too, and a reused
position holds what the prompt's own prefill computes there, so under greedy decoding every
request's answer equals the answer it gets alone (tests check it, caches on and off). A group whose
prefill fails is retried one request at a time: a request fails alone. Consumers get `Event`s
through a callback called on the engine thread; it must not block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from core.config import check_context
from core.processors import Batch
from core.sampling import Sampler, TokenLogprob, token_logprobs
from core.sequence import Frame, Prompt, prompt_positions

from .constraint import Matcher
from .engine_api import EngineConfig, EngineStats, Event, QueueFull, Ticket
from .image_cache import ImageCache
from .kv_cache import KVCache
from .near_views import NearViews, pixel_level
from .pipeline import GenerationRequest, TextStream, VLMPipeline
from .prefill_plan import PREFILL_POSITIONS, SCRATCH_POSITIONS, merge, prefill_groups
from .prefix_cache import PrefixCache, block_keys

log = logging.getLogger(__name__)


@dataclass(eq=False)  # compared by identity
class _Admission:
    """A request between the queue and the batch: its images, then its prefill in pieces."""

    ticket: Ticket
    prompt: Prompt
    keys: list[bytes]  # its prefix-cache block keys
    reused: list[np.ndarray]  # KV blocks the prefix cache had for it
    encoded: bool = False  # image rows ready (or none needed)
    error: Exception | None = None
    alone: bool = False  # prefill it by itself (its group failed)
    done: int = 0  # positions prefilled so far (reused ones included)
    cache: KVCache | None = None  # its own, while it prefills in pieces

    @property
    def whole(self) -> bool:
        """Its prefill can run as one call with others: none of it prefilled yet, no failure."""
        return self.cache is None and not self.alone

    @property
    def todo(self) -> int:
        """Positions left to prefill."""
        return len(self.prompt) - (
            self.done if self.cache is not None else PrefixCache.positions(self.reused)
        )


@dataclass
class _Row:
    """A running request's decode state."""

    ticket: Ticket
    sampler: Sampler
    text: TextStream
    seen: list[int]
    next_position: int
    last_token: int
    prompt: Prompt  # its prompt, whose answer's KV the prefix cache takes when it finishes
    new_tokens: int = 1
    matcher: Matcher | None = None  # its constraint's parser state, if it has one
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent (requests that ask)


class ContinuousBatcher:
    def __init__(
        self,
        pipeline: VLMPipeline,
        max_batch: int = 8,
        max_queue: int = 64,
        config: EngineConfig | None = None,
    ):
        c = config or EngineConfig(max_batch=max_batch, max_queue=max_queue)
        if pipeline.backend.device != "cpu" or not isinstance(pipeline.backend.new_cache(1, 1), KVCache):
            raise ValueError(
                "continuous batching runs on the ONNX Runtime CPU backend (it moves KV rows on the host)"
            )
        self.pipe, self.backend, self.config = pipeline, pipeline.backend, c
        self.max_batch, self.max_queue = c.max_batch, c.max_queue
        self.max_context = self.backend.max_context
        self.image_cache = ImageCache(int(c.image_cache_mb * 2**20))
        self.prefix_cache = PrefixCache(pipeline.bundle.kv, int(c.prefix_cache_mb * 2**20), c.prefix_block)
        self.near = NearViews(c.reuse_threshold, pixel_level(pipeline.cfg)) if c.reuse_threshold else None
        self.waiting: deque[Ticket] = deque()
        self.admitting: list[_Admission] = []  # FIFO: rows taken, not yet in the batch
        self.to_encode: deque[_Admission] = deque()
        self.rows: list[_Row] = []
        self.mask = np.zeros((0, 0), np.int64)  # [B, T] the frame's attention mask
        self.cache: KVCache | None = None
        self.scratch: KVCache | None = None
        self.cond = threading.Condition()
        self.stopping = False
        self.threads: list[threading.Thread] = []
        self.engine_done = False  # the encoder thread ends after the engine thread
        self.stats = EngineStats()
        self.on_step: Callable[[int, int], None] | None = None  # (running rows, waiting) after each loop

    @property
    def steps(self) -> int:
        return self.stats.steps

    @property
    def prefills(self) -> int:
        return self.stats.prefills

    # ------------------------------------------------------------------ the consumer side
    def prompt_length(self, batch: Batch) -> int:
        """Positions the prompt takes, image tokens included (prefix models put them in front)."""
        return prompt_positions(self.pipe.cfg, batch)

    def submit(self, batch: Batch, request: GenerationRequest, on_event: Callable[[Event], None]) -> Ticket:
        """Queue a one-row batch; raises QueueFull or ValueError (too long for the context, or a
        constraint that is not a grammar)."""
        if batch.input_ids.shape[0] != 1:
            raise ValueError(f"submit takes one request at a time, got a batch of {batch.input_ids.shape[0]}")
        n = self.prompt_length(batch)
        check_context(n, request.max_new_tokens, self.max_context, "max_tokens")
        if request.constraint is not None:
            self.pipe.grammars.check(request.constraint)
        ticket = Ticket(batch, request, on_event, prompt_tokens=n)
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit is {self.max_queue})")
            self.waiting.append(ticket)
            self.cond.notify_all()
        return ticket

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    def start(self) -> None:
        self.threads = [
            threading.Thread(target=self.run, name="nanovlm-engine", daemon=True),
            threading.Thread(target=self.run_encoder, name="nanovlm-encoder", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, take nothing new, end the threads."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout)

    # ------------------------------------------------------------------ the loop
    def _has_work(self) -> bool:
        free = len(self.rows) + len(self.admitting) < self.max_batch
        ready = any(a.encoded or a.ticket.cancelled for a in self.admitting)
        return bool(self.rows) or ready or (bool(self.waiting) and free)

    def run(self) -> None:
        while True:
            with self.cond:
                while not self._has_work() and not (self.stopping and not self.admitting):
                    self.cond.wait()
                if self.stopping and not self.waiting and not self.rows and not self.admitting:
                    self.engine_done = True
                    self.cond.notify_all()  # the encoder thread ends too
                    return
                take = max(0, min(len(self.waiting), self.max_batch - len(self.rows) - len(self.admitting)))
                tickets = [self.waiting.popleft() for _ in range(take)]
            self.stats.last_prefill = 0
            try:
                for t in tickets:
                    self._admit(t)
                self._drop_cancelled()
                self._prefill_step()
                decoded = len(self.rows)
                if self.rows:
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, never the engine
                log.exception("batch step failed")
                decoded = 0
                self._retire(list(range(len(self.rows))), "error", f"{type(e).__name__}: {e}")
                self.cache = None
            self.stats.history.append((decoded, self.stats.last_prefill))
            del self.stats.history[:-4096]
            if self.on_step:
                self.on_step(len(self.rows), len(self.waiting))

    # ------------------------------------------------------------------ admit: caches, then images
    def _admit(self, ticket: Ticket) -> None:
        if ticket.cancelled:
            self._finish(ticket, "cancelled")
            return
        prompt = Prompt.from_batch(self.pipe.cfg, ticket.batch, ticket.request.cache_scope)
        if self.near is not None and prompt.image_keys:  # near views take the last frame's keys
            pixels, cached = ticket.batch.pixel_values, self.image_cache.entries
            prompt.image_keys = self.near.snap(prompt.scope, prompt.image_keys, pixels, cached)
        keys = block_keys(prompt, self.prefix_cache.block) if self.prefix_cache.max_bytes else []
        reused = self.prefix_cache.lookup(prompt, keys) if self.prefix_cache.max_bytes else []
        a = _Admission(ticket, prompt, keys, reused)
        ticket.cached_tokens = self.prefix_cache.positions(reused)
        ticket.views = len(prompt.image_keys)
        # image rows are needed only for slots after the reused positions
        needed = int((prompt.ids[ticket.cached_tokens :] == prompt.slot_id).sum())
        embeds = [self.image_cache.get(k) for k in prompt.image_keys] if needed else []
        if all(e is not None for e in embeds):
            if embeds:
                prompt.rows = np.concatenate([e.reshape(-1, prompt.hidden) for e in embeds])
            a.encoded = True
        self.admitting.append(a)
        if not a.encoded:
            with self.cond:
                self.to_encode.append(a)
                self.cond.notify_all()

    def _drop_cancelled(self) -> None:
        self._retire([r for r, row in enumerate(self.rows) if row.ticket.cancelled], "cancelled")
        for a in [a for a in self.admitting if a.ticket.cancelled or a.error is not None]:
            self.admitting.remove(a)
            if a.error is not None:
                self._fail(a.ticket, a.error)
            else:
                self._finish(a.ticket, "cancelled")

    # ------------------------------------------------------------------ the encoder thread
    def run_encoder(self) -> None:
        """Encode queued requests' images, `encode_tiles` tiles per call, into the image cache."""
        while True:
            with self.cond:
                while not self.to_encode and not self.engine_done:
                    self.cond.wait()
                if not self.to_encode:
                    return
                a = self.to_encode.popleft()
            try:
                rows = self._encode(a)
                error = None
            except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
                rows, error = None, e
            with self.cond:
                a.prompt.rows, a.error = rows, error
                a.encoded = True
                self.cond.notify_all()

    def _encode(self, a: _Admission) -> np.ndarray | None:
        """[slots, hidden] rows of every view of `a`'s prompt: cached views from the cache, the
        others encoded `encode_tiles` at a time (consecutive ones together) and cached."""
        pixels, p, step = a.ticket.batch.pixel_values, a.prompt, self.config.encode_tiles
        embeds: list[np.ndarray | None] = [self.image_cache.get(k) for k in p.image_keys]
        todo = [i for i, e in enumerate(embeds) if e is None]
        while todo:
            run = [todo[0]]  # consecutive uncached views, at most `step`
            while len(run) < step and len(run) < len(todo) and todo[len(run)] == run[-1] + 1:
                run.append(todo[len(run)])
            if a.ticket.cancelled:
                return None
            out = self.backend.encode_images(pixels[run[0] : run[-1] + 1])  # [len(run), tokens, hidden]
            for i, e in zip(run, out, strict=True):
                embeds[i] = e[None]
                self.image_cache.put(p.image_keys[i], embeds[i])
            self.stats.encoded_tiles += len(run)
            a.ticket.encoded_views += len(run)
            todo = todo[len(run) :]
        rows = [e.reshape(-1, p.hidden) for e in embeds if e is not None]
        return np.concatenate(rows) if rows else np.zeros((0, p.hidden), np.float32)

    # ------------------------------------------------------------------ prefill: a piece or a group per loop
    def _prefill_step(self) -> None:
        """Prefill ready requests, oldest first, until this loop's positions are spent: at most
        `prefill_chunk` while streams decode; the first request into an empty batch whole."""
        while True:
            ready = [a for a in self.admitting if a.encoded and a.error is None]
            limit = self.config.prefill_chunk if self.rows else self.max_context
            if not ready or self.stats.last_prefill >= limit:
                return
            self._prefill_next(ready, limit - self.stats.last_prefill)

    def _prefill_next(self, ready: list[_Admission], budget: int) -> None:
        """The head's next piece, or, when its rest fits the budget, its rest together with other
        whole prefills of about its size (fresh prompts and ones after their reused KV alike)."""
        group_budget = min(budget, PREFILL_POSITIONS)
        head = ready[0]
        if head.whole and head.todo <= group_budget:
            whole = [a for a in ready if a.whole and a.todo <= group_budget]
            group = next(g for g in prefill_groups([a.todo for a in whole], group_budget) if 0 in g)
            members = [whole[i] for i in group]
            try:
                self._prefill_group(members)
            except Exception as e:  # noqa: BLE001 - retried one at a time, so a bad request fails alone
                if len(members) == 1:
                    self._drop(head, e)
                else:
                    log.warning(
                        "prefill of %d requests together failed (%s); retrying one at a time",
                        len(members),
                        e,
                        exc_info=e,
                    )
                    for a in members:
                        a.alone = True
            return
        try:
            self._prefill_piece(head, budget)
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            self._drop(head, e)

    def _drop(self, a: _Admission, e: Exception) -> None:
        self.admitting.remove(a)
        self._fail(a.ticket, e)

    def _prefill_group(self, members: list[_Admission]) -> None:
        """Whole prefills as one batch in the kept scratch cache, each after the reused KV it
        keeps (merge's layout: it recomputes what the longest rest makes it); each joins."""
        longest = max(a.todo for a in members)
        keep = [max(0, len(a.prompt) - longest) for a in members]  # <= its reused positions
        frame = merge([a.prompt for a in members], keep, self.pipe.tokenizer.pad_token_id)  # [n, S]
        n, S = frame.shape
        P = max(keep)
        cache = self._scratch_for(n, P + S)
        cache.start(n, P)
        for i, (a, k) in enumerate(zip(members, keep, strict=True)):
            self.prefix_cache.fill(cache, i, a.reused, P - k, k)
        logits = self.pipe.step(frame, cache)  # [n, V]
        self._count_prefill(n * S)
        for i, a in enumerate(members):
            self.admitting.remove(a)
            offset = P + S - len(a.prompt)  # the column where its prompt starts
            if self.prefix_cache.max_bytes:
                self.prefix_cache.insert(a.prompt, a.keys, cache, i, offset)
            self._start(a.ticket, a.prompt, logits[i : i + 1], cache, i, frame.attention_mask[i])

    def _prefill_piece(self, a: _Admission, budget: int) -> None:
        """The next `budget` positions of `a`'s prompt after its past, in its own cache."""
        n = len(a.prompt)
        if a.cache is None:
            a.cache = self.backend.new_cache(1, n)
            a.done = self.prefix_cache.positions(a.reused)
            a.cache.start(1, a.done)
            self.prefix_cache.fill(a.cache, 0, a.reused, 0, a.done)
            a.reused = []
        end = min(n, a.done + budget)
        logits = self.pipe.step(a.prompt.chunk(a.done, end), a.cache)  # [1, V]
        self._count_prefill(end - a.done)
        a.done = end
        if end < n:
            return
        self.admitting.remove(a)
        if self.prefix_cache.max_bytes:
            self.prefix_cache.insert(a.prompt, a.keys, a.cache, 0)
        self._start(a.ticket, a.prompt, logits, a.cache, 0, np.ones(n, np.int64))
        a.cache = None

    def _count_prefill(self, positions: int) -> None:
        self.stats.prefills += 1
        self.stats.prefill_positions += positions
        self.stats.last_prefill += positions

    def _fail(self, ticket: Ticket, e: Exception) -> None:
        log.error("request failed: %s: %s", type(e).__name__, e, exc_info=e)
        self._finish(ticket, "error", f"{type(e).__name__}: {e}")

    def _scratch_for(self, rows: int, length: int) -> KVCache:
        """A cache for one group prefill. The kept one starts as max_batch rows sharing
        SCRATCH_POSITIONS, grows (within that) to the widest and longest group seen, and is reused,
        so a steady load allocates nothing: the fused decoder's first prefill into a buffer makes
        all of it resident, at a page-fault cost as large as the prefill's. A group that does not
        fit gets a cache of its own."""
        if self.scratch is not None and self.scratch.fits(rows, length):
            return self.scratch
        kept = (
            self.scratch.capacity if self.scratch else (self.max_batch, SCRATCH_POSITIONS // self.max_batch)
        )
        grown = (max(kept[0], rows), max(kept[1], -(-length // 64) * 64))
        if grown[0] * grown[1] > SCRATCH_POSITIONS:
            return self.backend.new_cache(rows, length)
        self.scratch = self.backend.new_cache(*grown)
        return self.scratch

    def _start(
        self, ticket: Ticket, prompt: Prompt, logits: np.ndarray, cache: KVCache, src: int, mask: np.ndarray
    ) -> None:
        """Sample a prefilled request's first token; unless that ends it, its KV row joins the batch."""
        b = ticket.batch
        row = _Row(
            ticket,
            Sampler(ticket.request.sampling),
            TextStream(self.pipe.tokenizer, ticket.request.stop),
            seen=list(b.input_ids[0][b.attention_mask[0] == 1]),
            next_position=len(prompt),
            last_token=-1,
            prompt=prompt,
        )
        try:
            if ticket.request.constraint is not None:
                row.matcher = self.pipe.grammars.matcher(ticket.request.constraint)
                self.pipe.grammars.mask_logits(logits, [row.matcher])
            ticket.first_token = time.perf_counter()
            ended = self._emit(row, logits)
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            self._fail(ticket, e)
            return
        if not ended:
            self._join(row, cache, src, mask)

    def _join(self, row: _Row, scratch: KVCache, src: int, mask: np.ndarray) -> None:
        """Copy row `src` of the prefill's cache into the batch, right-aligned in the frame;
        `mask` [S] is that row's prefill mask (its padding stays masked)."""
        S = mask.shape[0]
        T = self.cache.length if self.cache and self.rows else 0
        need = max(T, S) + 1
        if not self.rows:  # an empty batch starts a frame of the newcomer's length
            if self.cache is None or not self.cache.fits(self.max_batch, need):
                self.cache = self._cache_for(need, None)
            self.cache.start(0, S)
            self.mask = np.zeros((0, S), np.int64)
        elif not self.cache.fits(self.max_batch, need):
            self.cache = self._cache_for(need, self.cache)
        if S > self.cache.length:
            self.mask = np.pad(self.mask, ((0, 0), (S - self.cache.length, 0)))
        self.cache.append_row(scratch, src)
        new = np.zeros((1, self.cache.length), np.int64)
        new[0, self.cache.length - S :] = mask
        self.mask = np.concatenate([self.mask, new])
        self.rows.append(row)

    def _cache_for(self, length: int, old: KVCache | None) -> KVCache:
        """A batch cache for max_batch rows and at least `length` positions, grown in steps of 256."""
        size = min(self.max_context, -(-length // 256) * 256)
        if old is None:
            return self.backend.new_cache(self.max_batch, size)
        return old.moved_to(self.max_batch, size)

    # ------------------------------------------------------------------ decode one step for every row
    def _decode(self) -> None:
        cache = self.cache
        lead = int((self.mask.argmax(axis=1)).min())  # columns that are padding in every row
        if lead:
            cache.reframe(-lead)
            self.mask = self.mask[:, lead:]
        if not cache.fits(cache.batch, cache.length + 1):
            self.cache = cache = self._cache_for(cache.length + 1, cache)
        B = len(self.rows)
        tokens = np.array([[r.last_token] for r in self.rows], np.int64)  # [B, 1]
        pos = np.array([[r.next_position] for r in self.rows], np.int64)  # [B, 1]
        self.mask = np.concatenate([self.mask, np.ones((B, 1), np.int64)], axis=1)  # [B, T + 1]
        empty = np.zeros((0, self.pipe.cfg.lm_hidden_dim), np.float32)
        logits = self.pipe.step(Frame(tokens, empty, self.mask, pos), cache)  # [B, V]
        self.stats.steps += 1
        if any(row.matcher for row in self.rows):  # each row only what its own grammar allows
            self.pipe.grammars.mask_logits(logits, [row.matcher for row in self.rows])
        done, answered = [], []
        for r, row in enumerate(self.rows):
            row.next_position += 1
            row.new_tokens += 1
            try:
                if self._emit(row, logits[r : r + 1]):
                    done.append(r)
                    answered.append(r)
            except Exception as e:  # noqa: BLE001 - this row's request fails, the batch goes on
                self._fail(row.ticket, e)
                done.append(r)
        if self.prefix_cache.max_bytes:
            for r in answered:
                try:
                    self._keep_answer(r)
                except Exception:  # noqa: BLE001 - its request is answered already; the cache just misses
                    log.exception("keeping an answer's KV failed")
        self._retire(done, None)

    def _keep_answer(self, r: int) -> None:
        """Put finished row `r`'s prompt and answer into the prefix cache: a chat's next turn
        re-sends the answer, so it reuses those positions too when the template renders the
        answer to the same token ids (the keys hash ids, so a different rendering just misses).
        The KV covers the prompt and every sampled token but the last (never fed back)."""
        row = self.rows[r]
        answer = row.seen[len(row.seen) - row.new_tokens : -1]  # [new_tokens - 1]
        full = replace(row.prompt, ids=np.concatenate([row.prompt.ids, np.asarray(answer, np.int64)]))
        # rows are right-aligned in the frame: this one's positions end at its last column
        self.prefix_cache.insert(
            full, block_keys(full, self.prefix_cache.block), self.cache, r, self.cache.length - len(full)
        )

    def _emit(self, row: _Row, logits: np.ndarray) -> bool:
        """Sample the row's next token and send its text; True when the request is finished."""
        req = row.ticket.request
        token = int(row.sampler(logits, [row.seen] if req.sampling.repetition_penalty != 1.0 else None)[0])
        row.seen.append(token)
        row.last_token = token
        if row.matcher is not None and not row.matcher.done:
            row.matcher.consume(token)
        eos = token == self.pipe.tokenizer.eos_token_id
        if req.logprobs is not None and not eos:
            row.logprobs.append(token_logprobs(logits[0], token, req.logprobs))
        if req.ignore_eos and eos:
            delta, ended = "", False  # benchmarks: always max_tokens
        else:
            delta, ended = row.text.push(token)
        length = not ended and row.new_tokens >= req.max_new_tokens
        if length:
            delta += row.text.flush()
        if delta and not ended and not length:
            row.ticket.on_event(Event(delta, row.new_tokens, logprobs=row.logprobs))
            row.logprobs = []
        if ended or length:
            reason = "stop" if ended else "length"
            self._finish(row.ticket, reason, text=delta, tokens=row.new_tokens, logprobs=row.logprobs)
            return True
        return False

    def _retire(self, rows: list[int], reason: str | None, error: str | None = None) -> None:
        """Remove rows (highest index first: the last row moves into a freed place)."""
        for r in sorted(rows, reverse=True):
            row = self.rows[r]
            if reason is not None:
                self._finish(row.ticket, reason, error)
            last = len(self.rows) - 1
            if self.cache is not None and self.cache.batch == len(self.rows):
                self.cache.remove_row(r)
            self.rows[r] = self.rows[last]
            self.mask[r] = self.mask[last]
            self.rows.pop()
            self.mask = self.mask[:last]

    def _finish(
        self,
        ticket: Ticket,
        reason: str,
        error: str | None = None,
        text: str = "",
        tokens: int = 0,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        ticket.finished = time.perf_counter()
        ticket.on_event(Event(text, tokens, finish=reason, error=error, logprobs=logprobs or []))

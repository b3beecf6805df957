"""Continuous batching: concurrent requests share the decoder's steps.

One engine thread owns the backend and runs this loop:

    admit     the waiting requests (while batch rows are free), in groups of similar prompt length:
              encode their images, prefill the group as one left-padded batch into a scratch
              cache, sample each first token, copy each KV row into the batch
    decode    one decoder step over every running row: [B, 1] tokens, one shared frame of T
              positions, each row left-padded and masked (runtime/kv_cache.py)
    sample    each row with its own sampler (own seed, own settings), text through its TextStream
    retire    rows that hit EOS, a stop string, max_tokens or were cancelled leave the batch

A burst of requests costs one prefill per group rather than one per request (eight 21-token
prompts: 86 ms together, 8 x 16.5 ms apart, docs/serving.md), so the last of a burst gets its
first token sooner. A prefill row sees only its own positions (padding is masked) and so does a
decode row, so under greedy decoding every request's answer equals the answer it gets alone (tests
check it). A group whose prefill fails is retried one request at a time: a request fails alone.
Consumers get `Event`s through a callback called on the engine thread; it must not block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from core.processors import Batch, left_pad
from core.sampling import Sampler

from .kv_cache import KVCache
from .pipeline import GenerationRequest, TextStream, VLMPipeline

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's waiting queue is at its limit; try again later."""


@dataclass
class Event:
    """What a request's consumer hears: new text, then one event with `finish` set."""

    text: str
    completion_tokens: int
    finish: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    error: str | None = None


@dataclass
class Ticket:
    """One submitted request; `cancel()` frees its batch row at the next step."""

    batch: Batch  # one row, from VLMPipeline's prepare path
    request: GenerationRequest
    on_event: Callable[[Event], None]
    prompt_tokens: int = 0
    first_token: float | None = None
    finished: float | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    """A running request's decode state."""

    ticket: Ticket
    sampler: Sampler
    text: TextStream
    seen: list[int]
    next_position: int
    last_token: int
    new_tokens: int = 1


# A prefill group holds at most this many positions, padding included, and pads at most a quarter
# of them: past ~150 positions a prefill is compute-bound on a CPU (0.5 ms per position on the
# 222M shape, 2 cores), so larger groups only raise the peak memory, and padding is pure waste.
PREFILL_POSITIONS = 512
PREFILL_PADDING = 0.25
SCRATCH_POSITIONS = 2 * PREFILL_POSITIONS  # rows x length of the kept prefill cache, at most


def prefill_groups(lengths: list[int], budget: int = PREFILL_POSITIONS) -> list[list[int]]:
    """Indices of `lengths` in groups to prefill together: sorted by length, a group grows while
    its padded size (rows x longest) stays within `budget` and its padding within PREFILL_PADDING."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        g = groups[-1] if groups else None
        if g is not None:
            padded = (len(g) + 1) * lengths[i]  # sorted: i is the longest so far
            real = sum(lengths[j] for j in g) + lengths[i]
            if padded <= budget and padded - real <= PREFILL_PADDING * padded:
                g.append(i)
                continue
        groups.append([i])
    return groups


def merge(batches: list[Batch], pad_id: int) -> Batch:
    """One-row batches -> one left-padded batch, tiles in row order (as prepare_batch lays them out)."""
    rows = [b.input_ids[0][b.attention_mask[0] == 1].tolist() for b in batches]
    ids, mask = left_pad(rows, pad_id)
    pixels = np.concatenate([b.pixel_values for b in batches])
    return Batch(ids, mask, pixels, [p for b in batches for p in b.prompts])


class ContinuousBatcher:
    def __init__(self, pipeline: VLMPipeline, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be at least 1")
        if pipeline.backend.device != "cpu" or not hasattr(pipeline.backend, "new_cache"):
            raise ValueError(
                "continuous batching runs on the ONNX Runtime CPU backend (it moves KV rows on the host)"
            )
        self.pipe, self.backend = pipeline, pipeline.backend
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context = self.backend.max_context
        self.waiting: deque[Ticket] = deque()
        self.rows: list[_Row] = []
        self.mask = np.zeros((0, 0), np.int64)  # [B, T] the frame's attention mask
        self.cache: KVCache | None = None
        self.scratch: KVCache | None = None
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and metrics)
        self.prefills = 0  # prefill batches run
        self.on_step: Callable[[int, int], None] | None = None  # (running rows, waiting) after each step

    # ------------------------------------------------------------------ the consumer side
    def prompt_length(self, batch: Batch) -> int:
        """Positions the prompt takes, image tokens included (prefix models put them in front)."""
        n = batch.input_ids.shape[1]
        if self.pipe.cfg.image_placement == "prefix" and batch.pixel_values.shape[0]:
            n += self.pipe.cfg.mp_image_token_length
        return n

    def submit(self, batch: Batch, request: GenerationRequest, on_event: Callable[[Event], None]) -> Ticket:
        """Queue a one-row batch; raises QueueFull or ValueError (too long for the context)."""
        if batch.input_ids.shape[0] != 1:
            raise ValueError(f"submit takes one request at a time, got a batch of {batch.input_ids.shape[0]}")
        n = self.prompt_length(batch)
        if n + request.max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt ({n} positions incl. image tokens) + max_tokens ({request.max_new_tokens}) = "
                f"{n + request.max_new_tokens} exceeds the model's context of {self.max_context}"
            )
        ticket = Ticket(batch, request, on_event, prompt_tokens=n)
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit is {self.max_queue})")
            self.waiting.append(ticket)
            self.cond.notify()
        return ticket

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="nanovlm-batcher", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, take nothing new, end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread:
            self.thread.join(timeout)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.rows and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.waiting and not self.rows:
                    return
                admit = [
                    self.waiting.popleft()
                    for _ in range(min(len(self.waiting), self.max_batch - len(self.rows)))
                ]
            try:
                self._admit(admit)
                self._retire([r for r, row in enumerate(self.rows) if row.ticket.cancelled], "cancelled")
                if self.rows:
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, never the engine
                log.exception("batch step failed")
                self._retire(list(range(len(self.rows))), "error", f"{type(e).__name__}: {e}")
                self.cache = None
            if self.on_step:
                self.on_step(len(self.rows), len(self.waiting))

    # ------------------------------------------------------------------ admit: prefill in groups, then join
    def _admit(self, tickets: list[Ticket]) -> None:
        live = []
        for t in tickets:
            if t.cancelled:
                self._finish(t, "cancelled")
            else:
                live.append(t)
        for group in prefill_groups([t.prompt_tokens for t in live]):
            members = [live[i] for i in group]
            error = self._prefill_and_start(members)
            if error is None:
                continue
            if len(members) == 1:
                self._fail(members[0], error)
                continue
            log.warning(
                "prefill of %d requests together failed (%s); retrying one at a time", len(members), error
            )
            for t in members:  # so a bad request fails only itself
                if (error := self._prefill_and_start([t])) is not None:
                    self._fail(t, error)

    def _prefill_and_start(self, tickets: list[Ticket]) -> Exception | None:
        """Prefill `tickets` together and start them; the prefill's exception, if it failed."""
        try:
            out = self._prefill(tickets)
        except Exception as e:  # noqa: BLE001 - returned: the caller retries alone or fails the request
            return e
        self._start(tickets, *out)
        return None

    def _fail(self, ticket: Ticket, e: Exception) -> None:
        log.error("prefill failed: %s: %s", type(e).__name__, e, exc_info=e)
        self._finish(ticket, "error", f"{type(e).__name__}: {e}")

    def _prefill(self, tickets: list[Ticket]) -> tuple[KVCache, np.ndarray, np.ndarray, np.ndarray]:
        """Prefill `tickets` as one batch into a scratch cache -> (that cache, logits [n, V],
        mask [n, S], position_ids [n, S]). Touches nothing else, so a failed group can be retried."""
        pipe, n = self.pipe, len(tickets)
        # each request's images encoded alone: the encoder's peak memory stays that of one
        embeds = [e for e in (pipe.encode_images(t.batch.pixel_values) for t in tickets) if e.shape[0]]
        batch = merge([t.batch for t in tickets], pipe.tokenizer.pad_token_id)
        ids, mask, image_rows, pos = pipe.prompt_inputs(
            batch, np.concatenate(embeds) if embeds else None
        )  # [n, S], padding masked
        S = ids.shape[1]
        cache = self._scratch_for(n, S)
        cache.start(n)
        logits = self.backend.step(ids, image_rows, mask, pos, cache=cache)  # [n, V]
        self.prefills += 1
        return cache, logits, mask, pos

    def _scratch_for(self, rows: int, length: int) -> KVCache:
        """A cache for one prefill. The kept one starts as max_batch rows sharing SCRATCH_POSITIONS,
        grows (within that) to the widest and longest group seen, and is reused, so a steady load
        allocates nothing: the fused decoder's first prefill into a buffer makes all of it
        resident, at a page-fault cost as large as the prefill's. A group that does not fit, a
        long prompt alone, gets a cache of its own."""
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
        self, tickets: list[Ticket], cache: KVCache, logits: np.ndarray, mask: np.ndarray, pos: np.ndarray
    ) -> None:
        """Sample each prefilled request's first token; those not finished by it join the batch."""
        now = time.perf_counter()
        for i, t in enumerate(tickets):
            b = t.batch
            row = _Row(t, Sampler(t.request.sampling), TextStream(self.pipe.tokenizer, t.request.stop),
                       seen=list(b.input_ids[0][b.attention_mask[0] == 1]), next_position=int(pos[i, -1]) + 1,
                       last_token=-1)  # fmt: skip
            t.first_token = now
            if not self._emit(row, logits[i : i + 1]):
                self._join(row, cache, i, mask[i])

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
        logits = self.backend.step(tokens, empty, self.mask, pos, cache=cache)  # [B, V]
        self.steps += 1
        done = []
        for r, row in enumerate(self.rows):
            row.next_position += 1
            row.new_tokens += 1
            if self._emit(row, logits[r : r + 1]):
                done.append(r)
        self._retire(done, None)

    def _emit(self, row: _Row, logits: np.ndarray) -> bool:
        """Sample the row's next token and send its text; True when the request is finished."""
        req = row.ticket.request
        token = int(row.sampler(logits, [row.seen] if req.sampling.repetition_penalty != 1.0 else None)[0])
        row.seen.append(token)
        row.last_token = token
        if req.ignore_eos and token == self.pipe.tokenizer.eos_token_id:
            delta, ended = "", False  # benchmarks: always max_tokens
        else:
            delta, ended = row.text.push(token)
        length = not ended and row.new_tokens >= req.max_new_tokens
        if length:
            delta += row.text.flush()
        if delta and not ended and not length:
            row.ticket.on_event(Event(delta, row.new_tokens))
        if ended or length:
            self._finish(row.ticket, "stop" if ended else "length", text=delta, tokens=row.new_tokens)
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
        self, ticket: Ticket, reason: str, error: str | None = None, text: str = "", tokens: int = 0
    ) -> None:
        ticket.finished = time.perf_counter()
        ticket.on_event(Event(text, tokens, finish=reason, error=error))

"""Watch a camera: answer a prompt on the newest frame of a live source, as fast as the model allows.

    for line in watch(pipe, "/dev/video0", "Is anyone at the door?"):
        print(line)  # {"t", "frame", "answer", "ttft_s", "total_s", "views", "reused_views", "lag_s"}

A reader thread decodes the source (a video file, a V4L2 device, an RTSP/HTTP stream; PyAV) and
keeps only its newest frame: frames that arrive while the model is busy are dropped, never queued,
so an answer is always about the present and memory holds one frame. A file plays at its own
rate, as a camera would deliver it. A live source that drops is reopened with backoff; a file ends.

Each answered frame goes through the serving engine (runtime/batching.py) as a one-image request:
views whose processed pixels did not change (or, with `reuse_threshold`, changed by less than it)
come from the image cache, and the prompt's KV is reused up to the first view that changed.
`every` answers at most once per that many seconds of stream; `on_change` skips frames whose
grey thumbnail moved by no more than that many 8-bit levels (mean) since the last answered one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .batching import ContinuousBatcher
from .constraint import Constraint
from .engine_api import EngineConfig, Event
from .pipeline import GenerationRequest, VLMPipeline

log = logging.getLogger(__name__)

THUMB = 32  # side of the grey thumbnail the change metric compares


@dataclass
class Frame:
    image: Image.Image
    t: float  # seconds into the stream
    index: int  # frames decoded before it


class FrameSource:
    """The newest frame of a source, decoded on a thread of its own."""

    def __init__(self, source: str, realtime: bool = True, max_backoff: float = 10.0):
        self.source, self.realtime, self.max_backoff = source, realtime, max_backoff
        self.is_file = os.path.isfile(source)
        if not (self.is_file or source.startswith("/dev/") or "://" in source):
            raise ValueError(f"{source}: no such video file (nor a /dev/ device or a stream URL)")
        self.cond = threading.Condition()
        self.newest: Frame | None = None
        self.ended = False
        self.error: str | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="nanovlm-frames", daemon=True)

    def start(self) -> FrameSource:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def next(self, after: int) -> Frame | None:
        """The newest frame with index > `after`, waiting for one; None once the source ended."""
        with self.cond:
            while not self.stopping and not (self.newest and self.newest.index > after) and not self.ended:
                self.cond.wait(0.5)
            if self.newest is not None and self.newest.index > after:
                return self.newest
            return None

    # ------------------------------------------------------------------ the reader thread
    def _open(self) -> Any:
        import av

        if self.source.startswith("/dev/video"):
            return av.open(self.source, format="v4l2")
        if self.source.startswith("rtsp://"):
            return av.open(self.source, options={"rtsp_transport": "tcp"}, timeout=10)
        return av.open(self.source, timeout=10) if "://" in self.source else av.open(self.source)

    def _run(self) -> None:
        import av

        backoff, index = 0.5, 0
        while not self.stopping:
            try:
                with self._open() as container:
                    stream = container.streams.video[0]
                    started, first = time.monotonic(), None
                    backoff = 0.5
                    for frame in container.decode(stream):
                        if self.stopping:
                            return
                        t = (
                            float(frame.time)
                            if frame.time is not None
                            else index / float(stream.average_rate or 1)
                        )
                        if first is None:
                            first = t
                        if not self.is_file:  # a live clock starts anywhere: count from the first frame
                            t -= first
                        if self.is_file and self.realtime:  # a file plays at its own rate, like a camera
                            time.sleep(max(0.0, started + t - time.monotonic()))
                        with self.cond:
                            self.newest = Frame(frame.to_image().convert("RGB"), t, index)
                            self.cond.notify_all()
                        index += 1
                if self.is_file:
                    break
                log.warning("%s ended; reopening in %.1f s", self.source, backoff)
            except (av.FFmpegError, OSError, IndexError) as e:
                if self.is_file:
                    self.error = f"{self.source}: cannot read the video ({type(e).__name__})"
                    break
                log.warning("%s: %s; reopening in %.1f s", self.source, type(e).__name__, backoff)
            with self.cond:
                self.cond.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)
        with self.cond:
            self.ended = True
            self.cond.notify_all()


def thumbnail(img: Image.Image) -> np.ndarray:
    """A grey THUMB x THUMB float view of a frame: what `on_change` compares."""
    return np.asarray(img.convert("L").resize((THUMB, THUMB), Image.BILINEAR), np.float32)


def engine_for(
    pipe: VLMPipeline, sample: Image.Image, reuse_threshold: float, max_new_tokens: int
) -> ContinuousBatcher:
    """An engine of one row whose caches hold about two frames: the last frame is all a camera reuses."""
    batch = pipe.prepare([[sample]], ["?"])
    positions = batch.input_ids.shape[1] + max_new_tokens + 64
    kv_mb = positions * pipe.bundle.kv.position_bytes / 2**20
    views_mb = batch.pixel_values.shape[0] * pipe.cfg.image_token_count * pipe.cfg.lm_hidden_dim * 4 / 2**20
    config = EngineConfig(
        max_batch=1,
        max_queue=1,
        image_cache_mb=2.5 * views_mb,
        prefix_cache_mb=2.5 * kv_mb,
        reuse_threshold=reuse_threshold,
    )
    return ContinuousBatcher(pipe, config=config)


def watch(
    pipe: VLMPipeline,
    source: str,
    prompt: str,
    every: float | None = None,
    on_change: float | None = None,
    reuse_threshold: float = 0.0,
    max_new_tokens: int = 32,
    constraint: Constraint | None = None,
    realtime: bool = True,
    max_answers: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Answer `prompt` on the newest frames of `source`, one dict per answered frame."""
    frames = FrameSource(source, realtime).start()
    engine: ContinuousBatcher | None = None
    started, last_t, last_thumb, taken, answers = time.monotonic(), None, None, -1, 0
    try:
        while max_answers is None or answers < max_answers:
            frame = frames.next(taken)
            if frame is None:
                if frames.error:
                    raise ValueError(frames.error)
                return
            taken = frame.index
            if every is not None and last_t is not None and frame.t - last_t < every:
                continue
            thumb = thumbnail(frame.image)
            if (
                on_change is not None
                and last_thumb is not None
                and np.abs(thumb - last_thumb).mean() <= on_change
            ):
                continue
            if engine is None and pipe.backend.device == "cpu":  # the engine moves KV on the host
                engine = engine_for(pipe, frame.image, reuse_threshold, max_new_tokens)
                engine.start()
            line = answer_frame(pipe, engine, frame, prompt, max_new_tokens, constraint)
            line["lag_s"] = (
                round(time.monotonic() - started - frame.t, 3) if realtime and frames.is_file else None
            )
            last_t, last_thumb, answers = frame.t, thumb, answers + 1
            yield line
    finally:
        frames.stop()
        if engine is not None:
            engine.stop(5)


def answer_frame(
    pipe: VLMPipeline,
    engine: ContinuousBatcher | None,
    frame: Frame,
    prompt: str,
    n: int,
    constraint: Constraint | None = None,
) -> dict[str, Any]:
    """One frame through the engine: its answer, timings and how many of its views were reused.
    Without an engine (a GPU backend: TensorRT, CUDA) the pipeline answers it whole, reusing nothing."""
    t0 = time.perf_counter()
    batch = pipe.prepare([[frame.image]], [prompt])
    if engine is None:
        text = "".join(pipe.stream_batch(batch, GenerationRequest(n, constraint=constraint)))
        return {
            "t": round(frame.t, 3),
            "frame": frame.index,
            "answer": text,
            "finish_reason": pipe.last_finish_reason,
            "ttft_s": round(pipe.last_timings.time_to_first_token_s, 4),
            "total_s": round(time.perf_counter() - t0, 4),
            "views": int(batch.pixel_values.shape[0]),
            "reused_views": 0,
            "cached_tokens": 0,
        }
    done, parts, first = threading.Event(), [], []

    def on_event(e: Event) -> None:
        if not first and (e.text or e.finish):
            first.append(time.perf_counter())
        parts.append(e)
        if e.finish:
            done.set()

    ticket = engine.submit(batch, GenerationRequest(n, constraint=constraint), on_event)
    done.wait()
    last = parts[-1]
    if last.finish == "error":
        raise RuntimeError(f"frame {frame.index}: generation failed ({last.error})")
    return {
        "t": round(frame.t, 3),
        "frame": frame.index,
        "answer": "".join(e.text for e in parts),
        "finish_reason": last.finish,
        "ttft_s": round(first[0] - t0, 4),
        "total_s": round(time.perf_counter() - t0, 4),
        "views": ticket.views,
        "reused_views": ticket.views - ticket.encoded_views,
        "cached_tokens": ticket.cached_tokens,
    }

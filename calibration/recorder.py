"""Record what each graph really sees, by running the fp32 bundle through the runtime pipeline.

The decoder is calibrated on real prefill and decode steps with real KV caches: the runtime's
own generation loop (`VLMPipeline.generate_ids`) drives a backend that runs the fp32 graphs with
plain `session.run` and keeps a copy of every input it was fed. The vision encoder is calibrated
on the preprocessed tiles of the same samples.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from onnxruntime.quantization.calibrate import CalibrationDataReader

from core.bundle import Bundle, KVLayout
from core.progress import progress
from core.sequence import Frame
from runtime.onnx_backend import session_options
from runtime.pipeline import GenerationRequest, VLMPipeline

from .data import CalibrationSet

log = logging.getLogger(__name__)


class ArrayCache:
    """The past as the arrays the last step returned (the graph's present outputs)."""

    def __init__(self, kv: KVLayout, rows: int, length: int):
        self.kv, self.capacity, self.length, self.past = kv, (rows, length), 0, []

    def start(self, rows: int, length: int = 0) -> None:
        if length:
            raise ValueError("an ArrayCache starts empty")
        empty = np.zeros((rows, self.kv.heads, 0, self.kv.head_dim), self.kv.dtype)
        self.past, self.length = [empty] * (2 * self.kv.layers), 0


class RecordingBackend:
    """runtime/backend.py's contract (encode_images / new_cache / step) over plain session.run."""

    def __init__(self, bundle: Bundle, threads: int | None = None):
        import onnxruntime as ort

        self.sessions = {
            g: ort.InferenceSession(
                bundle.graph_path(g), session_options(threads), providers=["CPUExecutionProvider"]
            )
            for g in ("vision_encoder", "decoder")
        }
        kv = bundle.kv
        self.kv, self.kv_dtype = kv, np.dtype(kv.dtype)
        self.max_context = bundle.config.lm_max_position_embeddings
        self.device = "cpu"
        self.vision_feeds: list[dict[str, np.ndarray]] = []
        self.decoder_feeds: list[dict[str, np.ndarray]] = []

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        feed = {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)}
        self.vision_feeds.append(feed)
        return self.sessions["vision_encoder"].run(None, feed)[0]

    def new_cache(self, rows: int, length: int) -> ArrayCache:
        return ArrayCache(self.kv, rows, length)

    def step(self, frame: Frame, cache: ArrayCache) -> np.ndarray:
        feed: dict[str, np.ndarray] = {
            "input_ids": np.ascontiguousarray(frame.input_ids, dtype=np.int64),
            "image_embeds": np.ascontiguousarray(frame.image_rows, dtype=np.float32),
            "attention_mask": np.ascontiguousarray(frame.attention_mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(frame.position_ids, dtype=np.int64),
        }
        for i in range(self.kv.layers):
            feed[f"past_key_values.{i}.key"] = cache.past[2 * i]
            feed[f"past_key_values.{i}.value"] = cache.past[2 * i + 1]
        self.decoder_feeds.append(feed)
        out = self.sessions["decoder"].run(None, feed)
        cache.past = out[1:]
        cache.length += frame.input_ids.shape[1]
        return out[0]


def record_feeds(
    bundle: Bundle, cal: CalibrationSet, decode_steps: int = 4
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """-> (vision encoder feeds, decoder feeds): per sample its tiles, its prefill and `decode_steps`
    greedy decode steps (EOS ignored, so every sample gives the same number of steps)."""
    backend = RecordingBackend(bundle)
    pipe = VLMPipeline(bundle, backend)
    request = GenerationRequest(max_new_tokens=decode_steps + 1, ignore_eos=True)
    for s in progress(cal.samples, desc="calibration: recording graph inputs", unit="sample", leave=False):
        batch = pipe.prepare([s.images], [s.prompt])
        for _ in pipe.generate_ids(batch, request):
            pass
    log.info("recorded %d vision and %d decoder feeds", len(backend.vision_feeds), len(backend.decoder_feeds))
    return backend.vision_feeds, backend.decoder_feeds


class FeedReader(CalibrationDataReader):
    """onnxruntime's CalibrationDataReader over recorded feeds, with a progress bar.

    set_range lets the calibrator take one feed at a time (CalibStridedMinMax=1): prefill and
    decode feeds have different shapes, which onnxruntime's histogram collectors (entropy,
    percentile) cannot stack in one batch, and one at a time also bounds the memory of minmax.
    """

    def __init__(self, feeds: list[dict[str, Any]], desc: str = "calibrating"):
        self.feeds = feeds
        self._bar = progress(total=len(feeds), desc=desc, unit="feed", leave=False)
        self.set_range(0, len(feeds))

    def get_next(self) -> dict[str, Any] | None:
        item = next(self._it, None)
        if item is not None:
            self._bar.update(1)
        return item

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.feeds[start_index:end_index])

    def rewind(self) -> None:
        self._bar.reset()
        self.set_range(0, len(self.feeds))

    def __len__(self) -> int:
        return len(self.feeds)

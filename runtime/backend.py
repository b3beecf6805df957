"""The contract every decoder backend keeps: encode images, make a KV cache, run one step.

Three implement it: OrtBackend (runtime/onnx_backend.py), TrtBackend (trt/backend.py)
and calibration's RecordingBackend. The cache belongs to whoever asked for it (a generation, a
prefill, the continuous batch): the backend holds none of its own, so several sequences can be
in flight on one backend and a cache can be filled from somewhere else (the prefix cache).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from core.sequence import Frame


class Cache(Protocol):
    """One KV cache: `length` positions of `rows` rows are filled (the past of the next step)."""

    capacity: tuple[int, int]  # (rows, positions) it holds at most
    length: int

    def start(self, rows: int, length: int = 0) -> None:
        """Begin a frame of `rows` rows whose first `length` positions are already filled."""
        ...


class Backend(Protocol):
    device: str  # where the KV cache lives: "cpu" or "cuda"
    max_context: int  # positions the decoder can attend over

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N_tiles, 3, S, S] float32 -> [N_tiles, image_tokens, hidden] float32."""
        ...

    def new_cache(self, rows: int, length: int) -> Cache:
        """A cache for up to `rows` rows of `length` positions."""
        ...

    def step(self, frame: Frame, cache: Cache) -> np.ndarray:
        """One decoder call over the frame's S new positions (core/sequence.py: input_ids [B, S]
        with image slots where image_rows [R, hidden] go, in order, attention_mask [B, past + S],
        position_ids [B, S]); writes their KV into `cache` after its past and returns the logits
        of the last position, [B, V]."""
        ...

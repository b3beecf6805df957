"""What one decoder step sees (a Frame), built in one place for every caller.

prompt_frame   a left-padded batch of prompts -> the prefill's Frame (prefix models get their
               image slots in front); positions count real tokens only, so padding moves nothing
next_frame     the Frame of one decode step after it: one more mask column, positions + 1
Prompt         one request's prompt as unpadded positions, prefilled whole or in pieces
               (`chunk`), with the image slot layout the prefix cache keys on

The one context-length check is core.config.check_context, shared with the PyTorch side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.config import VLMConfig
from core.processors import Batch, view_keys


@dataclass
class Frame:
    input_ids: np.ndarray  # [B, S] int64 new positions; image slots where image_rows go
    image_rows: np.ndarray  # [R, hidden] float32, one per image slot in input_ids, in order
    attention_mask: np.ndarray  # [B, T] int64, T = past + S; 0 = left padding
    position_ids: np.ndarray  # [B, S] int64

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids.shape  # (B, S)


def prompt_positions(cfg: VLMConfig, batch: Batch) -> int:
    """Positions the batch's prompt takes in the decoder, image tokens included."""
    n = batch.input_ids.shape[1]
    if cfg.image_placement == "prefix" and batch.pixel_values.shape[0]:
        n += cfg.mp_image_token_length
    return n


def prompt_frame(cfg: VLMConfig, batch: Batch, image_embeds: np.ndarray) -> Frame:
    """The prefill of `batch` given its images' embeddings [N_tiles, tokens, hidden] (in order)."""
    ids, mask = batch.input_ids, batch.attention_mask  # [B, S]
    rows = image_embeds.reshape(-1, image_embeds.shape[-1])  # [tiles * tokens, hidden]; may be empty
    if cfg.image_placement == "prefix":
        n = image_embeds.shape[1]
        ids = np.concatenate([np.full((ids.shape[0], n), -1, np.int64), ids], axis=1)
        mask = np.concatenate([np.ones((mask.shape[0], n), np.int64), mask], axis=1)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # [B, S]
    return Frame(ids, rows, mask, pos)


def next_frame(frame: Frame, tokens: np.ndarray) -> Frame:
    """The decode step after `frame`: tokens [B] at the next position of each row."""
    B = tokens.shape[0]
    mask = np.concatenate([frame.attention_mask, np.ones((B, 1), np.int64)], axis=1)  # [B, T + 1]
    pos = frame.position_ids[:, -1:] + 1  # [B, 1]
    empty = np.zeros((0, frame.image_rows.shape[-1]), np.float32)
    return Frame(tokens.reshape(B, 1).astype(np.int64), empty, mask, pos)


@dataclass
class Prompt:
    """One request's prompt as decoder positions 0..S-1, no padding."""

    ids: np.ndarray  # [S] int64; image slots (slot_id) where image rows go
    slot_id: int
    hidden: int
    image_keys: list[str] = field(default_factory=list)  # one per view (from_batch), in order
    image_tiles: list[int] = field(default_factory=list)  # views under each key, in order
    image_slots: list[int] = field(default_factory=list)  # slots each key's views fill, in order
    rows: np.ndarray | None = None  # [R, hidden] once the images are encoded
    # who may share cached work with it (a tenant and cache_salt digest; b"": everyone): the root
    # of its prefix-cache keys and a prefix of its image keys, so no entry crosses scopes
    scope: bytes = b""

    @classmethod
    def from_batch(cls, cfg: VLMConfig, batch: Batch, scope: bytes = b"") -> Prompt:
        """A one-row batch (prepare_batch's) as a Prompt; its images still to encode. Its unit is the
        view: one key, one tile and one image's worth of slots per view, so caches reuse views."""
        if batch.input_ids.shape[0] != 1:
            raise ValueError(f"a Prompt is one request, got a batch of {batch.input_ids.shape[0]}")
        ids = batch.input_ids[0][batch.attention_mask[0] == 1].astype(np.int64)
        keys = batch.view_keys or view_keys(batch.pixel_values)  # a batch made by hand
        if scope:
            keys = [f"{scope.hex()}/{k}" for k in keys]
        if cfg.image_placement == "prefix" and keys:
            ids = np.concatenate([np.full(cfg.mp_image_token_length, -1, np.int64), ids])
        n, per_view = len(keys), cfg.image_token_count
        return cls(
            ids, cfg.image_slot_id, cfg.lm_hidden_dim, list(keys), [1] * n, [per_view] * n, scope=scope
        )

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def chunk(self, start: int, end: int) -> Frame:
        """The Frame that prefills positions [start, end) after a past of `start` positions."""
        slots = np.concatenate([[0], np.cumsum(self.ids == self.slot_id)])  # slots before each position
        if self.rows is None and slots[end] > slots[start]:
            raise RuntimeError("the prompt's images are not encoded yet")
        rows = (
            self.rows[slots[start] : slots[end]]
            if self.rows is not None
            else np.zeros((0, self.hidden), np.float32)
        )
        return Frame(
            self.ids[None, start:end],
            np.ascontiguousarray(rows, np.float32),
            np.ones((1, end), np.int64),
            np.arange(start, end, dtype=np.int64)[None],
        )

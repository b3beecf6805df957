"""Conversations (images + question/answer turns) and Hugging Face `datasets` records in
the_cauldron / FineVision style turned into them; torch-free, for training and calibration.

A record holds `images` (a list of PIL images or image dicts) and `texts`, a list of turns
`{"user": ..., "assistant": ...}`; `messages`-style records (`{"role", "content"}` lists) work too.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Conversation:
    """One sample: images and (user, assistant) turns; images belong to the first turn."""

    images: list[Any]
    turns: list[tuple[str, str]]


def record_to_conversation(record: dict[str, Any]) -> Conversation:
    """Never raises on content: missing pieces become an empty list the collator skips and counts."""
    images = record.get("images") or ([record["image"]] if record.get("image") is not None else [])
    images = [_as_image_input(img) for img in images if img is not None]
    turns: list[tuple[str, str]] = []
    if isinstance(record.get("texts"), list):
        for t in record["texts"]:
            if isinstance(t, dict) and t.get("user") and t.get("assistant"):
                turns.append((str(t["user"]), str(t["assistant"])))
    elif isinstance(record.get("messages"), list):
        pending = None
        for m in record["messages"]:
            role, content = m.get("role"), m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image"}]
                content = " ".join(
                    c.get("text", "") for c in content if isinstance(c, dict) and c.get("text")
                )
            if role == "user":
                pending = content
            elif role == "assistant" and pending and content:
                turns.append((pending, content))
                pending = None
    return Conversation(images, turns)


def _as_image_input(img: Any) -> Any:
    """datasets gives PIL images, or {"bytes": ..., "path": ...} dicts when decoding is off."""
    if isinstance(img, dict):
        if img.get("bytes"):
            return io.BytesIO(img["bytes"])
        return img.get("path")
    return img


class HFConversations:
    """Iterate a Hugging Face dataset as conversations, sharded by rank (record i goes to rank i % world)."""

    def __init__(self, name: str, subset: str | None, split: str, streaming: bool):
        from datasets import Image, Sequence, load_dataset

        self.name = name
        ds = load_dataset(name, subset, split=split, streaming=streaming)
        # Decode images ourselves, so one broken image is a counted skip, not a crash mid-epoch.
        features = ds.features or {}
        if isinstance(features.get("images"), Sequence) or isinstance(features.get("images"), list):
            ds = ds.cast_column("images", Sequence(Image(decode=False)))
        if isinstance(features.get("image"), Image):
            ds = ds.cast_column("image", Image(decode=False))
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds) if hasattr(self.ds, "__len__") else 10**12

    def iterate(self, start: int, rank: int, world: int) -> Iterator[Conversation]:
        """This rank's records from its `start`-th on, looping over epochs."""
        seen = 0
        while True:
            for i, record in enumerate(self.ds):
                if i % world != rank:
                    continue
                if seen >= start:
                    yield record_to_conversation(record)
                seen += 1

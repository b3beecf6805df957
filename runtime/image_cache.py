"""Image embeddings already computed, keyed by the image's tiles (core.processors.image_key).

A chat re-sends its image every turn; the vision encoder is most of the first turn's cost
(a 17-tile photo on the SmolVLM-256M shape: seconds). Bounded in bytes, least recently used out;
thread-safe (the engine's encoder thread fills it, its loop reads it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class ImageCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the image cache size must be 0 or more bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        """The embeddings [tiles, tokens, hidden] of the image with this key, or None."""
        with self.lock:
            embeds = self.entries.get(key)
            if embeds is None:
                self.misses += 1
                return None
            self.hits += 1
            self.entries.move_to_end(key)
            return embeds

    def put(self, key: str, embeds: np.ndarray) -> None:
        """Keep `embeds` (read-only from here on) unless it alone is over the limit."""
        if embeds.nbytes > self.max_bytes:
            return
        embeds.flags.writeable = False  # shared by every request that hits it
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return
            while self.bytes + embeds.nbytes > self.max_bytes:  # room first: never over the limit
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.nbytes
            self.entries[key] = embeds
            self.bytes += embeds.nbytes

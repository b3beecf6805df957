"""KV of prompt positions already computed, shared across requests and turns.

A prompt is cut into blocks of BLOCK positions. A block's key hashes its parent block's key, its
token ids and, where image slots stand in it, the keys of those images (core.processors.image_key):
so a block matches only when everything before it and in it is the same, images included (a key
of token ids alone would hand one image's KV to another). A request looks up its prompt's blocks
in order and reuses the longest run found, then prefills the rest; after its prefill its own
blocks go in. Held in host memory, bounded in bytes; least recently used out, where a lookup
touches a chain's deepest block first and its root last, so leaves go before the blocks they
hang from.

Greedy answers do not change: a reused position holds the KV the prompt's own prefill would have
computed there (its positions, mask and inputs are the same), up to float rounding of a different
batch shape (tests check the answers against runs without the cache).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from core.bundle import KVLayout
from core.sequence import Prompt

from .kv_cache import KVCache

BLOCK = 32  # positions per block: a prompt's last partial block is recomputed, never shared


def block_keys(prompt: Prompt, block: int = BLOCK) -> list[bytes]:
    """The key of each full block of `prompt`, in order."""
    is_slot = prompt.ids == prompt.slot_id
    image_end = np.cumsum(prompt.image_slots)  # slots up to the end of each image
    slots_before = np.concatenate([[0], np.cumsum(is_slot)])
    keys, parent = [], b""
    for start in range(0, len(prompt) - block + 1, block):
        end = start + block
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(prompt.ids[start:end].tobytes())
        if slots_before[end] > slots_before[start]:  # images whose slots fall in this block
            first = int(np.searchsorted(image_end, slots_before[start], side="right"))
            last = int(np.searchsorted(image_end, slots_before[end] - 1, side="right"))
            for i in range(first, min(last, len(prompt.image_keys) - 1) + 1):
                h.update(prompt.image_keys[i].encode())
        parent = h.digest()
        keys.append(parent)
    return keys


class PrefixCache:
    def __init__(self, kv: KVLayout, max_bytes: int, block: int = BLOCK):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache size must be 0 or more bytes, got {max_bytes}")
        self.kv, self.max_bytes, self.block = kv, max_bytes, block
        self.block_bytes = 2 * kv.layers * kv.heads * block * kv.head_dim * np.dtype(kv.dtype).itemsize
        self.blocks: OrderedDict[bytes, np.ndarray] = OrderedDict()  # key -> [2 * layers, H, BLOCK, D]
        self.queried = self.hit = 0  # prompt positions looked up, and found

    @property
    def bytes(self) -> int:
        return len(self.blocks) * self.block_bytes

    def lookup(self, keys: list[bytes], positions: int) -> list[np.ndarray]:
        """The longest run of cached blocks from the start of a prompt of `positions` positions.
        Its last position is never reused: its logits are what the prefill must produce."""
        usable = (positions - 1) // self.block
        found = []
        for key in keys[:usable]:
            kv = self.blocks.get(key)
            if kv is None:
                break
            found.append(kv)
        for key in reversed(keys[: len(found)]):  # deepest first: roots stay the most recent
            self.blocks.move_to_end(key)
        self.queried += positions
        self.hit += len(found) * self.block
        return found

    def fill(self, cache: KVCache, row: int, blocks: list[np.ndarray]) -> None:
        """Write the blocks a lookup found into positions [0, len * BLOCK) of `cache`'s row."""
        for i, kv in enumerate(blocks):
            cache.write(row, i * self.block, kv)

    def insert(self, keys: list[bytes], cache: KVCache, row: int, offset: int = 0) -> None:
        """Keep the prompt's blocks that are not cached yet, read from `cache`'s row whose prompt
        starts at frame column `offset` (left padding before it)."""
        if self.block_bytes > self.max_bytes:
            return
        for i, key in enumerate(keys):
            if key in self.blocks:
                continue
            start = offset + i * self.block
            self.blocks[key] = cache.read(row, start, start + self.block)
        for key in reversed(keys):
            self.blocks.move_to_end(key)
        while self.bytes > self.max_bytes:
            self.blocks.popitem(last=False)

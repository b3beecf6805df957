"""KV of prompt positions already computed, shared across requests and turns.

A prompt is cut into blocks of BLOCK positions. A block's key hashes its parent block's key (the
first block's parent is the prompt's scope: requests of different tenants never share a key), its
token ids and, where image slots stand in it, the keys of those images (core.processors.image_key):
so a block matches only when everything before it and in it is the same, images included (a key
of token ids alone would hand one image's KV to another). After its full blocks a prompt keeps
one tail: its positions after the last block boundary before its final position, keyed the same
way. A request looks up its prompt's blocks in order, then the longest tail that continues the
run, and reuses what it found, at least its last position recomputed (its logits are what the
prefill must produce). So a repeated prompt or a chat's next turn reuses every position turn 1
computed, not only whole blocks. After its prefill a prompt's own blocks and tail go in, and
when its request finishes, the blocks and tail of its prompt and answer together (the engine's
`_keep_answer`): a chat's next turn then reuses the answer too, where the chat template renders
it to the ids it was sampled as (ChatML does; a template that adds a space before the answer
does not, and the lookup stops there). Held in
host memory, bounded in bytes; least recently used out, where a lookup touches a chain's deepest
entry first and its root last, so leaves go before the blocks they hang from.

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

BLOCK = 32  # positions per block


class _Spans:
    """Keys of spans [start, end) of one prompt: token ids and the images whose slots fall in them."""

    def __init__(self, prompt: Prompt):
        self.prompt = prompt
        self.image_end = np.cumsum(prompt.image_slots)  # slots up to the end of each image
        self.slots_before = np.concatenate([[0], np.cumsum(prompt.ids == prompt.slot_id)])

    def key(self, parent: bytes, start: int, end: int) -> bytes:
        p, before = self.prompt, self.slots_before
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(p.ids[start:end].tobytes())
        if before[end] > before[start]:  # images whose slots fall in this span
            first = int(np.searchsorted(self.image_end, before[start], side="right"))
            last = int(np.searchsorted(self.image_end, before[end] - 1, side="right"))
            for i in range(first, min(last, len(p.image_keys) - 1) + 1):
                h.update(p.image_keys[i].encode())
        return h.digest()


def block_keys(prompt: Prompt, block: int = BLOCK) -> list[bytes]:
    """The key of each full block of `prompt`, in order."""
    spans, keys, parent = _Spans(prompt), [], prompt.scope
    for start in range(0, len(prompt) - block + 1, block):
        parent = spans.key(parent, start, start + block)
        keys.append(parent)
    return keys


class PrefixCache:
    def __init__(self, kv: KVLayout, max_bytes: int, block: int = BLOCK):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache size must be 0 or more bytes, got {max_bytes}")
        self.kv, self.max_bytes, self.block = kv, max_bytes, block
        self.position_bytes = kv.position_bytes
        self.block_bytes = block * self.position_bytes
        # key -> [2 * layers, H, positions, D]: BLOCK positions for a block, fewer for a tail
        self.blocks: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.queried = self.hit = 0  # prompt positions looked up, and found

    @property
    def bytes(self) -> int:
        return self.nbytes

    @staticmethod
    def positions(found: list[np.ndarray]) -> int:
        """Prompt positions a lookup's entries cover."""
        return sum(kv.shape[2] for kv in found)

    def lookup(self, prompt: Prompt, keys: list[bytes]) -> list[np.ndarray]:
        """The longest run of cached blocks from the start of `prompt` (`keys`: its block_keys),
        then the longest cached tail after them; never its last position."""
        n, B = len(prompt), self.block
        found, touched = [], []
        for key in keys[: (n - 1) // B]:
            kv = self.blocks.get(key)
            if kv is None:
                break
            found.append(kv)
            touched.append(key)
        start, parent = len(found) * B, touched[-1] if touched else prompt.scope
        spans = _Spans(prompt)
        for end in range(min(start + B - 1, n - 1), start, -1):
            key = spans.key(parent, start, end)
            if key in self.blocks:
                found.append(self.blocks[key])
                touched.append(key)
                break
        for key in reversed(touched):  # deepest first: roots stay the most recent
            self.blocks.move_to_end(key)
        self.queried += n
        self.hit += self.positions(found)
        return found

    @staticmethod
    def fill(cache: KVCache, row: int, found: list[np.ndarray], column: int, positions: int) -> None:
        """Write the first `positions` positions of what a lookup found into `cache`'s row from
        frame column `column` on."""
        start = 0
        for kv in found:
            if start >= positions:
                break
            part = kv[:, :, : positions - start]
            cache.write(row, column + start, part)
            start += part.shape[2]

    def insert(self, prompt: Prompt, keys: list[bytes], cache: KVCache, row: int, offset: int = 0) -> None:
        """Keep `prompt`'s blocks (`keys`) and tail that are not cached yet, read from `cache`'s
        row whose prompt starts at frame column `offset` (left padding before it)."""
        n, B = len(prompt), self.block
        tail_start = (n - 1) // B * B  # the tail ends before the last position, as lookups do
        entries = [(key, i * B, (i + 1) * B) for i, key in enumerate(keys)]
        if n - 1 > tail_start:
            parent = keys[tail_start // B - 1] if tail_start else prompt.scope
            entries.append((_Spans(prompt).key(parent, tail_start, n - 1), tail_start, n - 1))
        for key, _, _ in reversed(entries):  # its cached entries newest, so room is made elsewhere
            if key in self.blocks:
                self.blocks.move_to_end(key)
        added = 0  # bytes this call adds: a prompt larger than the cache keeps its first entries
        for key, start, end in entries:
            size = (end - start) * self.position_bytes
            if key in self.blocks:
                continue
            if added + size > self.max_bytes:
                break
            added += size
            # room first, so the size never exceeds the limit, not even while /metrics reads it
            while self.nbytes + size > self.max_bytes:
                self.nbytes -= self.blocks.popitem(last=False)[1].nbytes
            self.blocks[key] = cache.read(row, offset + start, offset + end)
            self.nbytes += size
        for key, _, _ in reversed(entries):
            if key in self.blocks:
                self.blocks.move_to_end(key)

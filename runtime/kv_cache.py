"""The decoder's KV cache on the host: preallocated flat buffers bound to ONNX Runtime by pointer.

One buffer per layer and direction holds [rows, heads, positions, head_dim]. The standard decoder
reads its past from one set and writes the present into the other (ping-pong), so the layout of a
set is always the dense [B, H, T, D] of the current frame. The fused decoder writes new positions
in place into one set laid out [capacity_rows, H, capacity_len, D] (docs/bundle.md).

Besides single generations, the cache holds a continuous batch (runtime/batching.py): rows share
one frame of T positions, each row left-padded (its attention mask hides the padding), so a
request joins by copying its prefilled row in right-aligned, and leaves by moving the last row
into its place. Positions come from position_ids, not from frame columns, so a row's place in the
frame never changes its answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.bundle import KVLayout


class KVCache:
    def __init__(self, kv: KVLayout, rows: int, length: int, in_place: bool, device: str = "cpu"):
        self.kv, self.in_place, self.device = kv, in_place, device
        self.dtype = np.dtype(kv.dtype)
        self.capacity = (rows, length)
        size = rows * kv.heads * length * kv.head_dim
        sets = 1 if in_place else 2
        if device == "cpu":
            # numpy-owned, so the batching code can move rows and columns with plain slicing
            self.buffers: list[list[Any]] = [
                [np.zeros(size, self.dtype) for _ in range(2 * kv.layers)] for _ in range(sets)
            ]
        else:
            import onnxruntime as ort

            self.buffers = [
                [
                    ort.OrtValue.ortvalue_from_shape_and_type((size,), self.dtype, device, 0)
                    for _ in range(2 * kv.layers)
                ]
                for _ in range(sets)
            ]
        self.batch = 0  # rows in use
        self.length = 0  # positions in the frame (the past of the next step)
        self.turn = 0  # which set holds the current frame (ping-pong)

    def start(self, rows: int, length: int = 0) -> None:
        """Begin a frame of `rows` rows holding `length` positions (0: a new generation; otherwise
        the caller fills them, with `write` or a row copy)."""
        if not self.fits(rows, length):
            raise ValueError(f"frame {rows}x{length} exceeds the cache's {self.capacity}")
        self.batch, self.length, self.turn = rows, length, 0

    def fits(self, rows: int, length: int) -> bool:
        return rows <= self.capacity[0] and length <= self.capacity[1]

    # ------------------------------------------------------------------ binding
    def pointer(self, which: int, i: int) -> int:
        buf = self.buffers[which][i]
        return buf.ctypes.data if self.device == "cpu" else buf.data_ptr()

    def bindings(self, rows: int, new: int) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
        """(source set, destination set, past shape, present shape) for a step over `new` positions."""
        H, D = self.kv.heads, self.kv.head_dim
        if self.in_place:  # the whole capacity in and out: positions [length, length + new) get written
            shape = (rows, H, self.capacity[1], D)
            return 0, 0, shape, shape
        return self.turn, 1 - self.turn, (rows, H, self.length, D), (rows, H, self.length + new, D)

    def advance(self, new: int) -> None:
        self.length += new
        if not self.in_place:
            self.turn = 1 - self.turn

    # ------------------------------------------------------------------ host views (continuous batching)
    def views(
        self, which: int | None = None, rows: int | None = None, length: int | None = None
    ) -> list[np.ndarray]:
        """The frame as [rows, H, length, D] numpy views, one per layer and direction (CPU only)."""
        if self.device != "cpu":
            raise RuntimeError("moving KV rows needs the host cache (provider cpu)")
        which = self.turn if which is None else which
        rows = self.batch if rows is None else rows
        length = self.length if length is None else length
        H, D = self.kv.heads, self.kv.head_dim
        if self.in_place:
            full = [b.reshape(self.capacity[0], H, self.capacity[1], D) for b in self.buffers[0]]
            return [f[:rows, :, :length] for f in full]
        return [b[: rows * H * length * D].reshape(rows, H, length, D) for b in self.buffers[which]]

    def reframe(self, left: int) -> None:
        """Add `left` zero padding columns in front of every row (left < 0 drops the first columns)."""
        new_len = self.length + left
        if not self.fits(self.batch, new_len):
            raise ValueError(f"frame {self.batch}x{new_len} exceeds the cache's {self.capacity}")
        src = self.views()
        at, keep = max(left, 0), slice(max(-left, 0), self.length)  # where the kept columns go
        which = 0 if self.in_place else 1 - self.turn
        dst = self.views(which=which, length=new_len)
        for s, d in zip(src, dst, strict=True):
            d[:, :, at:] = s[:, :, keep].copy() if self.in_place else s[:, :, keep]  # in place may overlap
            d[:, :, :at] = 0  # padding is masked, but must be finite: 0 * NaN would leak through softmax
        self.turn, self.length = which, new_len

    def moved_to(self, rows: int, length: int) -> KVCache:
        """A new cache of capacity rows x length holding this frame (for when the frame outgrows it)."""
        new = KVCache(self.kv, rows, length, self.in_place, self.device)
        new.batch, new.length = self.batch, self.length
        for s, d in zip(self.views(), new.views(), strict=True):
            d[...] = s
        return new

    def append_row(self, other: KVCache, src: int = 0) -> int:
        """Copy row `src` of `other` (a prefill) in as a new last row, right-aligned in the frame,
        which grows on the left if the newcomer is longer. Returns its row index."""
        rows = self.batch + 1
        if other.length > self.length:
            self.reframe(other.length - self.length)
        if not self.fits(rows, self.length):
            raise ValueError(f"row {rows} exceeds the cache's {self.capacity}")
        self.batch = rows
        for s, d in zip(other.views(rows=src + 1), self.views(), strict=True):
            d[-1, :, : self.length - other.length] = 0
            d[-1, :, self.length - other.length :] = s[src]
        return rows - 1

    def read(self, row: int, start: int, end: int) -> np.ndarray:
        """Positions [start, end) of `row` in the frame as one copy, [2 * layers, H, end - start, D]."""
        return np.stack([v[row, :, start:end] for v in self.views()])

    def write(self, row: int, start: int, kv: np.ndarray) -> None:
        """Put `kv` [2 * layers, H, n, D] (what `read` gives) at positions [start, start + n) of `row`."""
        end = start + kv.shape[2]
        if end > self.length:
            raise ValueError(f"positions up to {end} are past the frame's {self.length}")
        for v, part in zip(self.views(), kv, strict=True):
            v[row, :, start:end] = part

    def remove_row(self, row: int) -> None:
        """Drop a row; the last row moves into its place (callers move their per-row state alike)."""
        last = self.batch - 1
        if row != last:
            for v in self.views():
                v[row] = v[last]
        self.batch = last

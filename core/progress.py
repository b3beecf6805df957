"""Progress for long work: a tqdm bar on a terminal, a plain line now and then anywhere else.

A bar redraws itself with carriage returns many times a second: in a file or a CI log that is
thousands of updates per bar on one line. When stderr is not a terminal, `progress` writes one
line every `every` seconds (and one at the end) instead, with the count, rate and time left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any


def progress(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    leave: bool = True,
    every: float = 30.0,
) -> Any:
    """tqdm on a terminal; elsewhere a `Lines` with the same update/set_postfix/reset/close."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(
            iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave
        )
    return Lines(iterable, total, desc, unit, initial, disable, every)


class Lines:
    """Progress as a line every `every` seconds on stderr, and one when done."""

    def __init__(
        self,
        iterable: Iterable | None,
        total: int | None,
        desc: str,
        unit: str,
        initial: int,
        disable: bool,
        every: float,
    ):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.start, self.disable, self.every = initial, initial, disable, every
        self.t0 = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line()

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def reset(self, total: int | None = None) -> None:
        self.n = self.start = 0
        self.total = total if total is not None else self.total
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.start:
                self._line()

    def _line(self) -> None:
        if self.disable:
            return
        elapsed = time.monotonic() - self.t0
        rate = (self.n - self.start) / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        left = (
            f", {(self.total - self.n) / rate:.0f} s left"
            if self.total and rate > 0 and self.n < self.total
            else ""
        )
        post = f", {self.postfix}" if self.postfix else ""
        print(
            f"{self.desc}: {self.n}{of} {self.unit}, {elapsed:.0f} s, {rate:.2f} {self.unit}/s{left}{post}",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Writes that land whole or not at all: a file or a directory appears complete, or not at all.

with staged_dir(out) as tmp:
    ... write everything into tmp ...
# out now holds exactly what was written; on an exception nothing changed and tmp is gone

with atomic_write("report.json") as f:
    json.dump(report, f)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, prefix: str = ".tmp-") -> Iterator[str]:
    """A temp directory next to `final`, renamed into place (replacing it) when the block succeeds."""
    final = os.fspath(final)
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: str, final: str) -> None:
    """Move a fully written temp directory into place, replacing any previous one."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    old = None
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(final)))
        os.rmdir(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file next to `path`; it replaces `path` only when the block succeeds."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise

"""Writes that land whole or not at all: a file or a directory appears complete, or not at all.

with staged_dir(out) as tmp:
    ... write everything into tmp ...
# out now holds exactly what was written; on an exception nothing changed and tmp is gone

with atomic_write("report.json") as f:
    json.dump(report, f)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

log = logging.getLogger(__name__)


def check_target(
    path: str | os.PathLike,
    owned: Callable[[str], bool],
    what: str,
    overwrite: bool,
    source: str | os.PathLike | None = None,
    also: str = "",
) -> None:
    """Refuse to replace `path` unless it is missing, empty, or our own earlier `what` and
    `overwrite` is set: a command never deletes files it did not write, nor its own input
    (`source`). `also` names another way on in the refusal (e.g. "or --resume to continue it")."""
    path = os.fspath(path)
    if source is not None:
        # real paths: a link to the source (or the source through a link) is the source
        src, out = os.path.realpath(source), os.path.realpath(path)
        if src == out:
            raise ValueError(f"{path}: the output must be another directory than the source {what}")
        if os.path.commonpath([src, out]) in (src, out):
            raise ValueError(f"{path}: the output and the source {what} must not hold one another")
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise ValueError(f"{path} exists and is not a directory; choose another output path")
    if not os.listdir(path):
        return
    if not owned(path):
        raise ValueError(
            f"{path} is not empty and does not hold a {what}; refusing to replace files this command did "
            "not write (choose another output directory)"
        )
    if not overwrite:
        raise ValueError(
            f"{path} already holds a {what}; pass --overwrite to replace it{' ' + also if also else ''}"
        )


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, prefix: str = ".tmp-") -> Iterator[str]:
    """A temp directory next to `final`, renamed into place (replacing it) when the block succeeds."""
    final = os.fspath(final)
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    leftovers = sorted(
        p for p in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*")) if os.path.isdir(p)
    )
    if leftovers:  # an interrupted run's unfinished output: never read, and not ours to delete
        n = len(leftovers)
        log.warning(
            "%s: %d unfinished %s from an interrupted run (%s); nothing reads them: remove them "
            "when no other run is writing there",
            parent,
            n,
            "directory" if n == 1 else "directories",
            os.path.basename(leftovers[0]),
        )
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
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    if exchange(tmp, final):  # one atomic step; tmp now holds the previous directory
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(final)))
    os.rmdir(old)
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


def exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically (renameat2 RENAME_EXCHANGE); False where the OS or the
    file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


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


def write_json(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON, written atomically (temp file, then rename)."""
    with atomic_write(path) as f:
        json.dump(data, f, indent=2)

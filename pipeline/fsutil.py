"""Crash-safe file operations: atomic writes, directory fsync, and an advisory lock."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BusyError, write_error

LOG = logging.getLogger(__name__)


def fsync_path(path: Path) -> None:
    """Make a file's written bytes durable, or, for a directory, the renames inside it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in blocks (a 20 GB vector store never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def temp_path(final: Path) -> Path:
    """A unique temporary name beside `final` (same filesystem, so rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp makes 0600; outputs are meant to be readable by searchers
    return Path(name)


def publish(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it over `final`, fsync the directory: readers see old or new, never half."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write `final` whole or not at all; a failure (full disk, no permission) is a PipelineError."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(final)
        try:
            tmp.write_bytes(data)
            publish(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise write_error(final, exc) from None


def atomic_write_text(final: Path, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


@contextmanager
def exclusive_lock(directory: Path, what: str) -> Iterator[None]:
    """Hold `directory/.lock` (flock) for the duration; a second holder gets BusyError at once.

    The kernel drops a flock when its process dies, so a killed run never leaves a stale lock;
    the pid it wrote tells the next holder that it is taking over from a run that did not finish.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(directory, exc, f"`{what}`") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                raise BusyError(f"{what} is already running on {directory} (pid {holder}); try again later") from None
            raise
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous:  # the holder died without releasing: the kernel dropped its flock, we take over
            LOG.warning(
                "%s: a previous run (pid %s) on %s did not finish; taking over its lock", what, previous, directory
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no pid behind
    finally:
        os.close(fd)

"""Decode images in worker processes, in parallel with inference, with bounded memory.

Each worker talks to the parent over its own pipe (sends are synchronous, so a result sent
before a crash is never lost); the parent keeps at most `prefetch` tasks outstanding per
worker, so decoded images never pile up faster than the model eats them. A worker that dies
(a crashing decoder) or hangs (stuck in C code past the timeout) is replaced: the image it
was on is reported as failed with the reason, the others it held are handed to the new worker.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from multiprocessing.connection import Connection, wait
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import ImageError
from .images import Decoded, load_image

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeSettings:
    size: int
    max_pixels: int
    timeout: float


DecodeFn = Callable[[str, DecodeSettings, bool], "tuple[Decoded | None, str | None]"]


def decode_one(path: str, s: DecodeSettings, use_alarm: bool) -> tuple[Decoded | None, str | None]:
    """Decode one file; (decoded, None) or (None, reason). SIGALRM timeouts only where `use_alarm`."""
    try:
        return load_image(path, s.size, s.max_pixels, s.timeout if use_alarm else None), None
    except ImageError as exc:
        return None, str(exc)
    except Exception as exc:  # a decoder bug must not take the run down; record it
        return None, f"unexpected error while decoding: {type(exc).__name__}: {exc}"


def _worker(conn: Connection, settings: DecodeSettings, decode: DecodeFn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        index, path = task
        decoded, error = decode(path, settings, True)
        conn.send((index, decoded, error))


class DecodePool:
    """`imap`-like decoding over worker processes; results come back in completion order."""

    def __init__(self, workers: int, settings: DecodeSettings, prefetch: int = 8, decode: DecodeFn = decode_one,
                 hard_timeout: float | None = None) -> None:
        """`decode` must be a module-level function (it is sent to spawned workers). A worker silent
        for `hard_timeout` seconds (default 2 x timeout + 10) is killed: SIGALRM could not stop it."""
        assert workers >= 0, "workers must be >= 0"
        self.n = workers
        self.settings = settings
        self.decode = decode
        self.prefetch = max(1, prefetch)
        self.hard_timeout = hard_timeout or settings.timeout * 2 + 10
        self.ctx = mp.get_context("spawn")  # never fork a process that holds ONNX Runtime threads
        self.procs: list = [None] * workers
        self.conns: list[Connection | None] = [None] * workers
        for w in range(workers):
            self._start(w)

    def _start(self, w: int) -> None:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker, args=(child, self.settings, self.decode), daemon=True)
        p.start()
        child.close()
        self.procs[w], self.conns[w] = p, parent

    def _stop(self, w: int, kill: bool) -> None:
        p, conn = self.procs[w], self.conns[w]
        if p is None:
            return
        if not kill and p.is_alive():
            try:
                conn.send(None)
            except OSError:
                pass
            p.join(timeout=2)
        if p.is_alive():
            p.kill()
        p.join()
        conn.close()
        self.procs[w] = self.conns[w] = None

    def close(self) -> None:
        for w in range(self.n):
            self._stop(w, kill=False)

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def imap(self, paths: list[str]) -> Iterator[tuple[int, Decoded | None, str | None]]:
        """Yield (index into paths, decoded or None, error reason or None) for every path, once."""
        if self.n == 0:
            for i, path in enumerate(paths):
                yield (i, *self.decode(path, self.settings, False))
            return
        pending = deque(range(len(paths)))
        outstanding: list[deque[int]] = [deque() for _ in range(self.n)]
        last_progress = [time.monotonic()] * self.n

        def feed(w: int) -> None:
            if not outstanding[w]:
                last_progress[w] = time.monotonic()  # the hang clock starts with the first task
            while pending and len(outstanding[w]) < self.prefetch:
                i = pending.popleft()
                outstanding[w].append(i)
                self.conns[w].send((i, paths[i]))

        def replace(w: int, why: str) -> int:
            """Fail the image worker w was on, restart it, hand its other images out again."""
            failed = outstanding[w].popleft()
            LOG.warning("decoder worker %d replaced: %s (%s)", w, why, paths[failed])
            self._stop(w, kill=True)
            pending.extendleft(reversed(outstanding[w]))
            outstanding[w].clear()
            self._start(w)
            feed(w)
            return failed

        for w in range(self.n):
            feed(w)
        remaining = len(paths)
        while remaining:
            ready = wait([c for c in self.conns], timeout=0.5)
            for w, conn in enumerate(self.conns):
                if conn not in ready:
                    continue
                try:
                    i, decoded, error = conn.recv()
                except (EOFError, OSError):  # died: every result it sent was read before this
                    self.procs[w].join(1)
                    code = self.procs[w].exitcode
                    i = replace(w, f"decoder process died (exit code {code})")
                    decoded, error = None, f"decoder crashed on this file (worker exit code {code})"
                else:
                    assert outstanding[w][0] == i, "a worker answers its tasks in order"
                    outstanding[w].popleft()
                    last_progress[w] = time.monotonic()
                    feed(w)
                remaining -= 1
                yield i, decoded, error
            now = time.monotonic()
            for w in range(self.n):
                if outstanding[w] and now - last_progress[w] > self.hard_timeout:
                    i = replace(w, "decoder hung")
                    remaining -= 1
                    yield i, None, f"decoding took longer than {self.hard_timeout:g} s; skipped"

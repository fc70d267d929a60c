"""Decode images in worker processes, in parallel with inference, with bounded memory.

Each worker owns a small task queue; the parent keeps at most `prefetch` tasks outstanding per
worker, so decoded images never pile up faster than the model eats them. A worker that dies
(a crashing decoder) or hangs (stuck in C code past the timeout) is replaced: the image it
was on is reported as failed with the reason, the others it held are handed to the new worker.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from .errors import ImageError
from .images import Decoded, load_image

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeSettings:
    size: int
    max_pixels: int
    timeout: float


def _decode_one(path: str, s: DecodeSettings, use_alarm: bool) -> tuple[Decoded | None, str | None]:
    try:
        return load_image(path, s.size, s.max_pixels, s.timeout if use_alarm else None), None
    except ImageError as exc:
        return None, str(exc)
    except Exception as exc:  # a decoder bug must not take the run down; record it
        return None, f"unexpected error while decoding: {type(exc).__name__}: {exc}"


def _worker(wid: int, tasks: mp.Queue, results: mp.Queue, settings: DecodeSettings) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    while True:
        task = tasks.get()
        if task is None:
            return
        index, path = task
        decoded, error = _decode_one(path, settings, use_alarm=True)
        results.put((wid, index, decoded, error))


class DecodePool:
    """`imap`-like decoding over worker processes; results come back in completion order."""

    def __init__(self, workers: int, settings: DecodeSettings, prefetch: int = 8) -> None:
        assert workers >= 0, "workers must be >= 0"
        self.n = workers
        self.settings = settings
        self.prefetch = max(1, prefetch)
        self.ctx = mp.get_context("spawn")  # never fork a process that holds ONNX Runtime threads
        self.results: mp.Queue = self.ctx.Queue()
        self.procs: list = [None] * workers
        self.tasks: list = [None] * workers
        self.hard_timeout = settings.timeout * 2 + 10  # for decoders stuck where SIGALRM cannot reach
        for w in range(workers):
            self._start(w)

    def _start(self, w: int) -> None:
        self.tasks[w] = self.ctx.Queue()
        p = self.ctx.Process(target=_worker, args=(w, self.tasks[w], self.results, self.settings), daemon=True)
        p.start()
        self.procs[w] = p

    def close(self) -> None:
        for w, p in enumerate(self.procs):
            if p is not None and p.is_alive():
                self.tasks[w].put(None)
        for p in self.procs:
            if p is not None:
                p.join(timeout=2)
                if p.is_alive():
                    p.kill()
                    p.join()
        self.procs = []

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def imap(self, paths: list[str]) -> Iterator[tuple[int, Decoded | None, str | None]]:
        """Yield (index into paths, decoded or None, error reason or None) for every path, once."""
        if self.n == 0:
            for i, path in enumerate(paths):
                yield (i, *_decode_one(path, self.settings, use_alarm=False))
            return
        pending = deque(range(len(paths)))
        outstanding: list[deque[int]] = [deque() for _ in range(self.n)]
        last_progress = [time.monotonic()] * self.n
        remaining = len(paths)

        def feed(w: int) -> None:
            if not outstanding[w]:
                last_progress[w] = time.monotonic()  # the hang clock starts with the first task
            while pending and len(outstanding[w]) < self.prefetch:
                i = pending.popleft()
                outstanding[w].append(i)
                self.tasks[w].put((i, paths[i]))

        def replace(w: int, reason: str) -> int:
            """Fail the image worker w was on, restart it, hand it its other images again."""
            failed = outstanding[w].popleft()
            if self.procs[w].is_alive():
                self.procs[w].kill()
            self.procs[w].join()
            LOG.warning("decoder worker %d replaced: %s (%s)", w, reason, paths[failed])
            requeue = list(outstanding[w])
            outstanding[w].clear()
            pending.extendleft(reversed(requeue))
            self._start(w)
            last_progress[w] = time.monotonic()
            feed(w)
            return failed

        def check() -> Iterator[tuple[int, None, str]]:
            """Replace dead or hung workers; yield the failure of the image each was on."""
            now = time.monotonic()
            for w in range(self.n):
                if not outstanding[w]:
                    continue
                if not self.procs[w].is_alive():
                    code = self.procs[w].exitcode
                    yield replace(w, f"decoder process died (exit code {code})"), None, (
                        f"decoder crashed on this file (worker exit code {code})")
                elif now - last_progress[w] > self.hard_timeout:
                    yield replace(w, "decoder hung"), None, f"decoding took longer than {self.hard_timeout:g} s; skipped"

        for w in range(self.n):
            feed(w)
        last_check = time.monotonic()
        while remaining:
            item = None
            try:
                w, i, decoded, error = self.results.get(timeout=0.5)
                if outstanding[w] and outstanding[w][0] == i:  # else: a late answer from a replaced worker
                    outstanding[w].popleft()
                    last_progress[w] = time.monotonic()
                    feed(w)
                    item = (i, decoded, error)
            except queue.Empty:
                pass
            if item is not None:
                remaining -= 1
                yield item
            if time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                for failed in list(check()):
                    remaining -= 1
                    yield failed

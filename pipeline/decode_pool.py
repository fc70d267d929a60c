"""Decode images in worker processes, in parallel with inference, with bounded memory.

Workers decode straight into slots of one shared-memory block (uint8, room for the model's
largest input shape) and tell the parent over their own pipe which slot holds which image and
its shape; sends are small and
synchronous, so a result sent before a crash is never lost. Each worker has at most
`prefetch` tasks (and slots) outstanding, so memory stays flat whatever the collection size;
the parent copies the pixels out of a slot before it hands the image on, so a decoded array
never points into shared memory (a 150 KB copy, nothing beside a VGG16 run). A worker that
dies (a crashing decoder) or hangs (stuck in C code past the timeout) is replaced: the image it
was on is reported as failed with the reason, the others it held are handed to the new worker.
A worker that dies or hangs before it is ready (bad install, no memory) fails the whole run:
every image would fail the same way.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing import shared_memory
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
from PIL import Image

from .errors import ImageError, PipelineError
from .images import Decoded, InputSize, input_shapes, load_image

LOG = logging.getLogger(__name__)
READY = (-1, None, None, None)  # a worker's first message
NO_PIXELS = np.empty((0, 0, 3), np.uint8)  # a worker's Decoded carries these: its pixels travel in the slot
STARTUP_GRACE = 60.0  # seconds a new worker may take to start (imports) before it counts as hung


@dataclass(frozen=True)
class DecodeSettings:
    size: InputSize  # the model's (images.nearest_shape)
    max_pixels: int
    timeout: float

    @property
    def slot_bytes(self) -> int:
        """Room for one decoded image of the largest input shape."""
        return max(h * w for h, w in input_shapes(self.size)) * 3


DecodeFn = Callable[[str, DecodeSettings, bool], "tuple[Decoded | None, ImageError | None]"]
Result = tuple[int, Decoded | None, ImageError | None]  # index into the paths, the image or None, why not or None


def decode_one(path: str, s: DecodeSettings, use_alarm: bool) -> tuple[Decoded | None, ImageError | None]:
    """Decode one file; (decoded, None) or (None, error). SIGALRM timeouts only where `use_alarm`."""
    try:
        return load_image(path, s.size, s.max_pixels, s.timeout if use_alarm else None), None
    except ImageError as exc:
        return None, exc
    except Exception as exc:  # a decoder bug must not take the run down; record it (a new version may fix it)
        return None, ImageError(f"unexpected error while decoding: {type(exc).__name__}: {exc}", transient=True)


def _worker(conn: Connection, shm_name: str, n_slots: int, settings: DecodeSettings, decode: DecodeFn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    shm = shared_memory.SharedMemory(name=shm_name)  # the parent owns it and unlinks it
    slots = np.ndarray((n_slots, settings.slot_bytes), np.uint8, buffer=shm.buf)
    Image.init()  # Pillow imports its format plugins on first use: do it before the hang clock starts
    conn.send(READY)  # imports done: from now on the parent's hang clock is fair
    try:
        while True:
            try:
                task = conn.recv()
            except EOFError:  # the parent is gone
                return
            if task is None:
                return
            index, path, slot = task
            decoded, error = decode(path, settings, True)
            shape = None
            if decoded is not None:
                shape = decoded.pixels.shape
                slots[slot, : decoded.pixels.size] = decoded.pixels.ravel()
                decoded = replace(decoded, pixels=NO_PIXELS)
            conn.send((index, decoded, error, shape))
    finally:
        del slots
        shm.close()


class DecodePool:
    """`imap`-like decoding over worker processes; results come back in completion order."""

    def __init__(
        self,
        workers: int,
        settings: DecodeSettings,
        prefetch: int = 8,
        decode: DecodeFn = decode_one,
        hard_timeout: float | None = None,
    ) -> None:
        """`decode` must be a module-level function (it is sent to spawned workers). A worker silent
        for `hard_timeout` seconds (default 2 x timeout + 10) is killed: SIGALRM could not stop it."""
        assert workers >= 0, "workers must be >= 0"
        self.n = workers
        self.settings = settings
        self.decode = decode
        self.prefetch = max(1, prefetch)
        self.hard_timeout = hard_timeout or settings.timeout * 2 + 10
        self.ctx = mp.get_context("spawn")  # never fork a process that holds ONNX Runtime threads
        self.procs: list[BaseProcess | None] = [None] * workers
        self.conns: list[Connection | None] = [None] * workers
        self.ready: list[bool] = [False] * workers
        self.n_slots = workers * self.prefetch
        self.shm: shared_memory.SharedMemory | None = None
        if workers:
            self.shm = shared_memory.SharedMemory(create=True, size=self.n_slots * settings.slot_bytes)
            self.slots = np.ndarray((self.n_slots, settings.slot_bytes), np.uint8, buffer=self.shm.buf)
        try:
            for w in range(workers):
                self._start(w)
        except BaseException:
            self.close()
            raise

    def _start(self, w: int) -> None:
        assert self.shm is not None, "workers decode into the shared block"
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(
            target=_worker, args=(child, self.shm.name, self.n_slots, self.settings, self.decode), daemon=True
        )
        try:
            p.start()
        except OSError as exc:  # no processes or memory left; EPIPE when the child died at once
            parent.close()
            raise PipelineError(f"decoder worker processes cannot start: {exc}") from None
        finally:
            child.close()
        self.procs[w], self.conns[w] = p, parent
        self.ready[w] = False

    def _stop(self, w: int, kill: bool) -> None:
        p, conn = self.procs[w], self.conns[w]
        if p is None or conn is None:
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
        if self.shm is not None:
            del self.slots
            self.shm.close()
            self.shm.unlink()
            self.shm = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self, w: int) -> Connection:
        conn = self.conns[w]
        assert conn is not None, "a worker is stopped only to be replaced at once"
        return conn

    def imap(self, paths: list[str]) -> Iterator[Result]:
        """Yield (index into paths, decoded or None, ImageError or None) for every path, once.

        Yielded pixels are the caller's own array. Raises PipelineError when a worker dies or
        hangs before it is ready: the decoders cannot run here at all.
        """
        if self.n == 0:
            for index, path in enumerate(paths):
                yield (index, *self.decode(path, self.settings, False))
            return
        run = _Run.of(paths, self.n, self.n_slots)
        self._feed_all(run)
        while run.remaining:
            ready = wait([conn for conn in self.conns if conn is not None], timeout=0.5)
            for w, conn in enumerate(self.conns):
                if conn is None or conn not in ready:
                    continue
                try:
                    message = conn.recv()
                except (EOFError, OSError):  # died: every result it sent was read before this
                    result = self._died(run, w)
                else:
                    if message[0] == READY[0]:
                        self.ready[w] = True
                        run.last_progress[w] = time.monotonic()
                        continue
                    result = self._decoded(run, w, message)
                if result is not None:
                    run.remaining -= 1
                    yield result
                self._feed_all(run)
            yield from self._hung(run)

    def _feed(self, run: _Run, w: int) -> None:
        """Send worker w images waiting, while it holds fewer than `prefetch` and a slot is free."""
        if not run.outstanding[w]:
            run.last_progress[w] = time.monotonic()  # the hang clock starts with the first task
        while run.pending and run.free and len(run.outstanding[w]) < self.prefetch:
            i, slot = run.pending.popleft(), run.free.popleft()
            try:
                self._conn(w).send((i, run.paths[i], slot))
            except OSError:  # it died since its last answer: the next wait() reports that, and it is replaced
                run.pending.appendleft(i)
                run.free.appendleft(slot)
                return
            run.outstanding[w].append((i, slot))

    def _feed_all(self, run: _Run) -> None:
        for w in range(self.n):
            self._feed(run, w)

    def _decoded(self, run: _Run, w: int, message: tuple[int, Decoded | None, ImageError | None, Any]) -> Result:
        """Worker w's answer to its oldest task: the pixels copied out of the slot, which is free again."""
        i, decoded, error, shape = message
        j, slot = run.outstanding[w].popleft()
        assert i == j, "a worker answers its tasks in order"
        run.last_progress[w] = time.monotonic()
        if decoded is not None:
            pixels = self.slots[slot, : int(np.prod(shape))].reshape(shape).copy()
            decoded = replace(decoded, pixels=pixels)
        run.free.append(slot)
        return i, decoded, error

    def _died(self, run: _Run, w: int) -> Result | None:
        """Worker w's process is gone: the image it was on failed (None when it was idle); w is replaced."""
        proc = self.procs[w]
        assert proc is not None, "a worker with a connection has a process"
        proc.join(1)
        code = proc.exitcode
        i = self._replace(run, w, f"decoder process died (exit code {code})")
        if i is None:
            return None
        return i, None, ImageError(f"decoder crashed on this file (worker exit code {code})", transient=True)

    def _hung(self, run: _Run) -> Iterator[Result]:
        """Replace every worker silent past its limit, yielding the image each was stuck on as failed."""
        now = time.monotonic()
        for w in range(self.n):
            limit = self.hard_timeout + (0 if self.ready[w] else STARTUP_GRACE)
            if run.outstanding[w] and now - run.last_progress[w] > limit:
                why = "decoder hung" if self.ready[w] else f"a worker gave no answer for {limit:g} s"
                i = self._replace(run, w, why)
                assert i is not None, "a worker that hangs has an image outstanding"
                run.remaining -= 1
                yield i, None, ImageError(f"decoding took longer than {self.hard_timeout:g} s; skipped", transient=True)
                self._feed(run, w)

    def _replace(self, run: _Run, w: int, why: str) -> int | None:
        """Fail the image worker w was on (None when it was idle), restart it, hand its other images out again."""
        if not self.ready[w]:
            self._stop(w, kill=True)
            raise PipelineError(
                f"decoder worker processes cannot start: {why} before it was ready (its error, "
                "if any, is above); use --workers 0 to decode in this process"
            )
        held = run.outstanding[w]
        failed = None
        if held:
            failed, slot = held.popleft()
            run.free.append(slot)
        LOG.warning("decoder worker %d replaced: %s (%s)", w, why, "idle" if failed is None else run.paths[failed])
        self._stop(w, kill=True)
        run.pending.extendleft(reversed([i for i, _ in held]))
        run.free.extend(slot for _, slot in held)
        held.clear()
        self._start(w)
        return failed


@dataclass
class _Run:
    """One imap call over worker processes: the images waiting, the free slots, and what each worker holds."""

    paths: list[str]
    pending: deque[int]  # indexes into paths not yet sent, in order
    free: deque[int]  # slots of the shared block no task holds
    outstanding: list[deque[tuple[int, int]]]  # per worker: (index, slot) of each task sent, oldest first
    last_progress: list[float]  # per worker: when it last answered, or was handed its first task
    remaining: int  # images not yet yielded

    @classmethod
    def of(cls, paths: list[str], workers: int, n_slots: int) -> _Run:
        return cls(
            paths,
            deque(range(len(paths))),
            deque(range(n_slots)),
            [deque() for _ in range(workers)],
            [time.monotonic()] * workers,
            len(paths),
        )

"""Micro-batching of image queries: one thread owns the model session and runs what waits as one batch."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import TypeAlias

import numpy as np

from ..errors import BusyError
from ..model import DEFAULT_BATCH_SIZE, FeatureModel
from .limits import DEFAULT_MAX_WAIT_MS, DEFAULT_QUEUE_SIZE

LOG = logging.getLogger(__name__)
Job: TypeAlias = tuple[np.ndarray, Future[np.ndarray]]  # an image and the future of its feature vector


class MicroBatcher:
    """One thread owns the model session and runs the images waiting for it as one batch.

    A lone query runs at once. When the previous batch held several images (queries arrive
    concurrently), the thread waits up to `max_wait` seconds for the batch to fill to
    `batch_size`. The queue is bounded: `submit` raises BusyError when `queue_size` images wait.
    """

    def __init__(
        self,
        model: FeatureModel,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_wait: float = DEFAULT_MAX_WAIT_MS / 1000,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        assert batch_size >= 1 and queue_size >= 1, "batch_size and queue_size must be at least 1"
        self.model, self.batch_size, self.max_wait = model, batch_size, max_wait
        self._queue: queue.Queue[Job | None] = queue.Queue(queue_size)
        self.batches = self.images = 0
        self.batch_sizes: Counter[int] = Counter()  # batches run, by their number of images (the metrics' histogram)
        self._thread = threading.Thread(target=self._run, name="pipeline-batcher", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> Future[np.ndarray]:
        """A future of the image's feature vector."""
        fut: Future[np.ndarray] = Future()
        try:
            self._queue.put_nowait((pixels, fut))
        except queue.Full:
            raise BusyError(
                f"the service is busy ({self._queue.maxsize} images wait for the model); retry shortly"
            ) from None
        return fut

    def waiting(self) -> int:
        """Images waiting for the model (the stats report it: a full queue answers busy)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop the thread once the batch in the model is done; what still waits is answered busy."""
        self._queue.put(None)
        self._thread.join()

    def _take(self, first: Job, wait: bool) -> tuple[list[Job], bool]:
        """`first` and what else is waiting, up to batch_size; and whether close() was called."""
        batch = [first]
        deadline = time.monotonic() + (self.max_wait if wait else 0.0)
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        last, stop = 1, False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._take(first, wait=last > 1)
            batch = [(px, fut) for px, fut in batch if fut.set_running_or_notify_cancel()]  # drop timed-out ones
            if not batch:
                continue
            try:
                feats = self.model.embed_each([px for px, _ in batch], self.batch_size)
            except Exception as exc:  # the model failed: every waiting request learns why
                LOG.exception("model run failed on a batch of %d", len(batch))
                for _, fut in batch:
                    fut.set_exception(exc)
            else:
                for (_, fut), feat in zip(batch, feats, strict=True):
                    fut.set_result(feat)
            self.batches += 1
            self.images += len(batch)
            self.batch_sizes[len(batch)] += 1
            last = len(batch)
        while True:  # closed: whatever still waits is answered, not left hanging
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(BusyError("the service is shutting down; retry shortly"))

"""The query service as a library object: one warm model, micro-batched image queries, hot swaps of the
published index version, thumbnails and statistics. Clients only ever name images by id: no request makes
the service read a path that a client sent."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..errors import BusyError, ImageError, PipelineError
from ..images import decode_bytes, input_shapes
from ..index import published_name
from ..model import DEFAULT_BATCH_SIZE, DEFAULT_THREADS, FeatureModel
from ..search import DEFAULT_K, Hit, QueryFile, QueryResult, Searcher
from ..sheet import thumbnail
from .batcher import MicroBatcher
from .limits import DEFAULT_MAX_WAIT_MS, DEFAULT_OPEN_VERSIONS, DEFAULT_POLL, DEFAULT_QUEUE_SIZE, DEFAULT_TIMEOUT

LOG = logging.getLogger(__name__)

MAX_IMAGES_PER_REQUEST = 32
THUMB_SIZE = 320  # px, the longer side: sharp on a 2x screen in a ~160 px tile
T = TypeVar("T")


class RequestError(PipelineError):
    """A request the service refuses (bad upload, unknown id); `status` is its HTTP status code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Service:
    """The published index under `index_dir`, its model warm in a MicroBatcher, and request statistics.

    `start()` opens the index and the model (the one recorded in the index, or `model`, checked
    against the index's checksum) and starts watching `CURRENT`: every `poll` seconds a newly
    published version is opened and swapped in between requests. A request keeps the Searcher it
    started with, so requests in flight finish on the old version; the last `keep` versions stay
    open, so ids of results already shown still resolve. A version made by another model is
    refused with a log line and the serving one stays. With `warm`, each version's files are read
    into the page cache before it is served (at start-up, and before a swap).
    """

    def __init__(
        self,
        index_dir: Path | str,
        model: Path | str | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        poll: float = DEFAULT_POLL,
        threads: int = DEFAULT_THREADS,
        keep: int = DEFAULT_OPEN_VERSIONS,
        warm: bool = True,
    ) -> None:
        self.index_dir, self._model_arg, self._threads = Path(index_dir), model, threads
        self.warm = warm  # read each version's files into the page cache before serving it (Searcher.warm)
        self.batch_size, self.max_wait, self.queue_size = batch_size, max_wait_ms / 1000, queue_size
        self.timeout, self.poll, self.keep = timeout, poll, keep
        self._searchers: OrderedDict[str, Searcher] = OrderedDict()  # version -> Searcher, newest last
        self._current: Searcher | None = None  # the swap is one reference assignment
        self._skipped: str | None = None  # a published version that was refused (logged once)
        self._lock = threading.Lock()  # faiss + sqlite look-ups: one at a time
        self._thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._latencies: deque[float] = deque(maxlen=1000)
        self.requests = 0
        self.batcher: MicroBatcher | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Service:
        """Open the index and the model, warm the model up, start the batcher and the watcher."""
        if self.batcher is not None:
            return self
        searcher = Searcher(self.index_dir, model=self._model_arg, threads=self._threads)
        model = searcher.model  # loads it and checks its checksum against the index
        self._warm(searcher)
        *others, largest = sorted(input_shapes(model.info.resize_to), key=lambda s: s[0] * s[1])
        for h, w in others:  # the first run of each input shape is slow: one image each
            model.embed(np.zeros((1, h, w, 3), np.uint8))
        model.embed(np.zeros((self.batch_size, *largest, 3), np.uint8))  # and a full batch of the largest
        self._searchers[searcher.version_dir.name] = self._current = searcher
        self.batcher = MicroBatcher(model, self.batch_size, self.max_wait, self.queue_size)
        if self.poll > 0:
            self._watcher = threading.Thread(target=self._watch, name="pipeline-watch", daemon=True)
            self._watcher.start()
        LOG.info("serving %s: %d images, model %s", searcher.version_dir.name, searcher.count, model.info.short())
        return self

    def close(self) -> None:
        """Stop watching for new versions and stop the batcher (what still waits is answered busy)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        if self.batcher is not None:
            self.batcher.close()

    @property
    def ready(self) -> bool:
        """Whether start() has loaded the index and the model (health answers 503 until then)."""
        return self.batcher is not None

    @property
    def model(self) -> FeatureModel:
        """The warm model the batcher runs."""
        return self._batcher().model

    def _batcher(self) -> MicroBatcher:
        assert self.batcher is not None, "Service.start() first"
        return self.batcher

    @property
    def searcher(self) -> Searcher:
        """The Searcher of the version being served (a request takes it once and keeps it)."""
        assert self._current is not None, "Service.start() first"
        return self._current

    def searcher_for(self, version: str | None) -> Searcher:
        """The Searcher of `version` (one of the last `keep` served), or of the current one."""
        if version is None:
            return self.searcher
        try:
            return self._searchers[version]
        except KeyError:
            raise RequestError(f"index version {version} is no longer served; search again", 410) from None

    # ------------------------------------------------------------------ hot swap

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.refresh()
            except Exception:  # the watcher must outlive anything a publish can do
                LOG.exception("checking for a new index version failed")

    def refresh(self) -> bool:
        """Serve the version `CURRENT` names if it is new and made by the serving model; True when swapped."""
        try:
            version = published_name(self.index_dir)
        except OSError:
            return False
        if version in self._searchers or version == self._skipped:
            return False
        serving = self.searcher.version_dir.name
        try:
            new = Searcher(self.index_dir, model=self._model_arg, threads=self._threads)
        except PipelineError as exc:
            LOG.error("cannot open the published index version %s (%s); still serving %s", version, exc, serving)
            self._skipped = version
            return False
        want = new.meta["model"].get("checksum")
        if want != self.model.info.checksum:
            LOG.error(
                "refused index version %s: made by model %s (checksum %s), this service runs %s; still serving %s",
                new.version_dir.name,
                new.meta["model"].get("name", "?"),
                (want or "none")[:12],
                self.model.info.short(),
                serving,
            )
            self._skipped = new.version_dir.name
            return False
        try:
            self._warm(new)  # before the swap: the serving version answers meanwhile
        except PipelineError as exc:
            LOG.error("cannot read the published index version %s (%s); still serving %s", version, exc, serving)
            self._skipped = version
            return False
        with self._lock:
            self._searchers[new.version_dir.name] = self._current = new  # later requests take this one
            while len(self._searchers) > self.keep:
                self._searchers.popitem(last=False)
        LOG.info("now serving index version %s (%d images); was %s", new.version_dir.name, new.count, serving)
        return True

    def _warm(self, searcher: Searcher) -> None:
        if self.warm:
            t0 = time.monotonic()
            read = searcher.warm()
            LOG.info(
                "index version %s read into the page cache: %.0f MiB in %.1f s",
                searcher.version_dir.name,
                read / 2**20,
                time.monotonic() - t0,
            )

    # ------------------------------------------------------------------ queries

    def decode(self, data: bytes) -> tuple[np.ndarray, str]:
        """Pixels at the model's input size and the content hash of uploaded bytes; ImageError if unusable."""
        pixels = decode_bytes(data, self.model.info.resize_to)
        return pixels, hashlib.blake2b(data, digest_size=16).hexdigest()

    async def search_uploads(
        self,
        uploads: Sequence[tuple[str, bytes]],
        k: int = DEFAULT_K,
        min_score: float | None = None,
        exclude_self: bool = False,
        nprobe: int | None = None,
    ) -> tuple[str, list[QueryResult]]:
        """(version, results) for uploaded images (name, bytes), in order.

        An upload that cannot be decoded gets an `error` and the others still answer; when none can
        be used, RequestError. BusyError when the model's queue is full or no answer came in time.
        """
        if not uploads:
            raise RequestError("no image uploaded (send multipart field 'image')")
        if len(uploads) > MAX_IMAGES_PER_REQUEST:
            raise RequestError(f"at most {MAX_IMAGES_PER_REQUEST} images per request (got {len(uploads)})")
        t0 = time.perf_counter()
        searcher = self.searcher
        try:
            results = await asyncio.wait_for(
                self._search_uploads(searcher, uploads, k, min_score, exclude_self, nprobe), self.timeout
            )
        except asyncio.TimeoutError:
            raise BusyError(f"no answer within {self.timeout:g} s (the service is overloaded); retry shortly") from None
        if all(r.error for r in results):
            raise RequestError("; ".join(f"{r.query}: {r.error}" for r in results))
        self._served(t0)
        return searcher.version_dir.name, results

    async def _search_uploads(
        self,
        searcher: Searcher,
        uploads: Sequence[tuple[str, bytes]],
        k: int,
        min_score: float | None,
        exclude_self: bool,
        nprobe: int | None,
    ) -> list[QueryResult]:
        decoded = await asyncio.gather(
            *(asyncio.to_thread(self.decode, data) for _, data in uploads), return_exceptions=True
        )
        for d in decoded:
            if isinstance(d, BaseException) and not isinstance(d, ImageError):
                raise d
        good = [(i, d) for i, d in enumerate(decoded) if not isinstance(d, BaseException)]
        batcher = self._batcher()
        futures: list[Future[np.ndarray]] = []
        try:
            for _, (pixels, _) in good:
                futures.append(batcher.submit(pixels))
            feats = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        finally:
            for f in futures:
                f.cancel()  # no-op once done; frees the model from a request that gave up
        hits: dict[int, list[Hit]] = {}
        if good:
            excl = [QueryFile("", content_hash) for _, (_, content_hash) in good] if exclude_self else None
            found = await asyncio.to_thread(
                self._locked, searcher.search_vectors, np.stack(feats), k, nprobe, min_score, excl
            )
            hits = {i: h for (i, _), h in zip(good, found, strict=True)}
        return [
            QueryResult(name, hits[i]) if i in hits else QueryResult(name, error=str(d))
            for i, ((name, _), d) in enumerate(zip(uploads, decoded, strict=True))
        ]

    async def search_like(
        self,
        idx: int,
        version: str | None = None,
        k: int = DEFAULT_K,
        min_score: float | None = None,
        exclude_self: bool = False,
        nprobe: int | None = None,
    ) -> tuple[str, QueryResult]:
        """(version, result) for the indexed image `idx` of `version` (default: the current one), from its
        stored vector."""
        t0 = time.perf_counter()
        searcher = self.searcher_for(version)
        path = self._path(searcher, idx)
        result = await asyncio.to_thread(self._locked, searcher.search_like, [path], k, nprobe, min_score, exclude_self)
        self._served(t0)
        return searcher.version_dir.name, result[0]

    def thumbnail(self, idx: int, version: str | None = None) -> bytes:
        """A small JPEG of the indexed image `idx` (read from the path the index records), cached."""
        searcher = self.searcher_for(version)
        key = (searcher.version_dir.name, idx)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        path = self._path(searcher, idx)
        im = thumbnail(path, THUMB_SIZE)
        if im is None:
            raise RequestError(f"image {idx} ({Path(path).name}) can no longer be read", 404)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        with self._lock:
            self._thumbs[key] = buf.getvalue()
            while len(self._thumbs) > 2048:  # about 40 MB at most
                self._thumbs.popitem(last=False)
        return buf.getvalue()

    def _path(self, searcher: Searcher, idx: int) -> str:
        path = self._locked(searcher.path_of, idx) if 0 <= idx < 2**62 else None
        if path is None:
            raise RequestError(f"no image with id {idx} in index version {searcher.version_dir.name}", 404)
        return path

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            return fn(*args)

    def _served(self, t0: float) -> None:
        self._latencies.append(time.perf_counter() - t0)
        self.requests += 1

    # ------------------------------------------------------------------ reports

    def health(self) -> dict[str, Any]:
        """ "ready" with the served version and size, or "starting": what a load balancer polls."""
        if not self.ready:
            return {"status": "starting"}
        return {"status": "ready", "version": self.searcher.version_dir.name, "count": self.searcher.count}

    def stats(self) -> dict[str, Any]:
        """What is served and how fast: index version and size, model, requests, latency percentiles."""
        s = self.searcher
        batcher = self._batcher()
        lat = np.array(self._latencies) * 1000
        model = batcher.model.info
        return {
            "version": s.version_dir.name,
            "count": s.count,
            "built_at": s.meta.get("created"),
            "factory": s.meta.get("factory"),
            "nprobe": s.nprobe,
            "model": {"name": model.name, "checksum": model.checksum, "input_size": model.input_size},
            "requests_served": self.requests,
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
                "p99": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
                "window": len(lat),
            },
            "batches": batcher.batches,
            "images_embedded": batcher.images,
            "queue": {"waiting": batcher.waiting(), "size": self.queue_size},
            "batch_size": self.batch_size,
            "max_wait_ms": self.max_wait * 1000,
        }

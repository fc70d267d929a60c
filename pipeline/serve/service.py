"""The query service as a library object: one warm model, micro-batched image queries, hot swaps of the
published index version, thumbnails and statistics. Clients only ever name images by id: no request makes
the service read a path that a client sent."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..errors import BusyError, ConfigError, DeadlineExceeded, ImageError, PipelineError
from ..images import content_hash, decode_bytes, decode_cost, image_suffix, input_shapes
from ..index import published_name
from ..ingest import Added, Collection, Removed, check_fields
from ..model import DEFAULT_BATCH_SIZE, DEFAULT_THREADS, FeatureModel
from ..search import DEFAULT_K, Hit, QueryFile, QueryResult, Searcher, check_deadline
from .batcher import MicroBatcher
from .limits import (
    DEFAULT_ADD_RATE,
    DEFAULT_DECODE_MEMORY,
    DEFAULT_MAX_ADDS,
    DEFAULT_MAX_DECODE,
    DEFAULT_MAX_WAIT_MS,
    DEFAULT_OPEN_VERSIONS,
    DEFAULT_POLL,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_TIMEOUT,
    MAX_WHERE,
    DecodeBudget,
    RateLimit,
    RequestError,
)
from .thumbnails import Thumbnails
from .verified import candidate_features, check_verify, verify_result, verify_uploads

LOG = logging.getLogger(__name__)

MAX_IMAGES_PER_REQUEST = 32
MAX_RETRY_S = 60.0  # the longest wait before a refused version is tried again
T = TypeVar("T")


@dataclass(frozen=True)
class Refusal:
    """Why the published version is not served: the version, the reason, how often it was tried, since when
    (wall clock) and when it is tried next (monotonic)."""

    version: str
    reason: str
    attempts: int
    at: float
    retry_at: float


def _file_stat(path: Path | str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


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
        decode_memory: int = DEFAULT_DECODE_MEMORY,
        max_decode: int = DEFAULT_MAX_DECODE,
        writable: bool = False,
        max_adds: int = DEFAULT_MAX_ADDS,
        add_rate: float = DEFAULT_ADD_RATE,
    ) -> None:
        self.index_dir, self._model_arg, self._threads = Path(index_dir), model, threads
        self.warm = warm  # read each version's files into the page cache before serving it (Searcher.warm)
        self.batch_size, self.max_wait, self.queue_size = batch_size, max_wait_ms / 1000, queue_size
        self.timeout, self.poll, self.keep = timeout, poll, keep
        self.decode_budget, self.max_decode = DecodeBudget(decode_memory), min(max_decode, decode_memory)
        self._searchers: OrderedDict[str, Searcher] = OrderedDict()  # version -> Searcher, newest last
        self._current: Searcher | None = None  # the swap is one reference assignment
        self.refusal: Refusal | None = None  # why the published version is not served, if it is not
        self._model_stat: tuple[int, int, int] | None = None  # the model file as loaded: inode, size, mtime
        self.model_file_changed = False
        self._lock = threading.Lock()  # swaps of the served version (reads run in parallel: faiss searches are
        # thread-safe, and each version's id table takes turns on its connection)
        self.thumbnails = Thumbnails()
        self._latencies: deque[float] = deque(maxlen=1000)
        self.requests = 0
        self.abandoned: Counter[str] = Counter()  # work stopped at a request's deadline, by stage
        self._stats_lock = threading.Lock()
        self.batcher: MicroBatcher | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.writable = writable  # POST and DELETE /api/images: the collection changes through this service
        self.collection: Collection | None = None  # opened by start() when writable
        self._adds = threading.BoundedSemaphore(max_adds)  # additions in flight; beyond, 503
        self._add_rate = RateLimit(add_rate, max_adds)  # additions a second; beyond, 503
        self.added = self.removed = 0

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
        if self.writable:
            features = searcher.meta.get("features_dir")
            if not features:
                raise ConfigError(
                    f"{self.index_dir} was built from a bare features folder; --writable needs an index "
                    "made by `pipeline rebuild --workdir`"
                )
            self.collection = Collection(Path(features).parent, model.info.checksum, model.info.dim)
        self._searchers[searcher.version_dir.name] = self._current = searcher
        self._model_stat = _file_stat(model.path)
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
        self.thumbnails.close()
        if self.collection is not None:
            self.collection.close()

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
        """Serve the version `CURRENT` names, if it is not the one served: a held one at once (a rollback), another
        once opened, checked (made by the serving model) and warmed. A version that cannot be served is
        refused, tried again with back-off (a transient EMFILE or EIO heals by itself) and shown in health and
        stats; the serving one stays. True when swapped."""
        self._check_model_file()
        try:
            version = published_name(self.index_dir)
        except (OSError, ValueError):
            return False
        serving = self.searcher.version_dir.name
        if version == serving:
            self.refusal = None
            return False
        held = self._searchers.get(version)
        if held is not None:  # a rollback (or forward again) to a version still open
            with self._lock:
                self._searchers.move_to_end(version)
                self._current = held
            self.refusal = None
            LOG.info("now serving index version %s again (%d images); was %s", version, held.count, serving)
            return True
        if self.refusal is not None and self.refusal.version == version and time.monotonic() < self.refusal.retry_at:
            return False
        try:
            new = Searcher(self.index_dir, model=self._model_arg, threads=self._threads)
        except PipelineError as exc:
            self._refuse(version, f"cannot open it: {exc}", transient=True)
            return False
        name = new.version_dir.name  # CURRENT may have moved on meanwhile
        want = new.meta["model"].get("checksum")
        if want != self.model.info.checksum:
            reason = (
                f"made by model {new.meta['model'].get('name', '?')} (checksum {(want or 'none')[:12]}), this service "
                f"runs {self.model.info.short()}"
            )
            self._refuse(name, reason, transient=False)
            return False
        try:
            self._warm(new)  # before the swap: the serving version answers meanwhile
        except PipelineError as exc:
            self._refuse(name, f"cannot read it: {exc}", transient=True)
            return False
        if self._stop.is_set():
            return False
        with self._lock:
            self._searchers[name] = self._current = new  # later requests take this one
            while len(self._searchers) > self.keep:
                self._searchers.popitem(last=False)
        self.refusal = None
        LOG.info("now serving index version %s (%d images); was %s", name, new.count, serving)
        return True

    def _refuse(self, version: str, reason: str, *, transient: bool) -> None:
        """Record why `version` is not served; log it the first time (and when the reason changes)."""
        last = self.refusal if self.refusal is not None and self.refusal.version == version else None
        attempts = last.attempts + 1 if last else 1
        delay = min(MAX_RETRY_S, self.poll * 2**attempts) if transient else MAX_RETRY_S
        self.refusal = Refusal(version, reason, attempts, time.time(), time.monotonic() + delay)
        if last is None or last.reason != reason:
            LOG.error(
                "refused index version %s: %s; still serving %s (%s)",
                version,
                reason,
                self.searcher.version_dir.name,
                f"trying again in {delay:.0f} s, backing off" if transient else f"checking again every {delay:.0f} s",
            )

    def _check_model_file(self) -> None:
        """Report, once, a model file replaced on disk under the running service: it keeps running the model
        it loaded, but a restart would load the new file (and refuse it if it is not the index's model)."""
        if self._model_stat is None or self.model_file_changed:
            return
        if _file_stat(self.model.path) != self._model_stat:
            self.model_file_changed = True
            LOG.error(
                "the model file %s changed on disk since this service loaded it; it keeps serving the model it "
                "loaded, but a restart would load the new file",
                self.model.path,
            )

    def _warm(self, searcher: Searcher) -> None:
        if self.warm:
            t0 = time.monotonic()
            read = searcher.warm(self._stop)
            LOG.info(
                "index version %s read into the page cache: %.0f MiB in %.1f s",
                searcher.version_dir.name,
                read / 2**20,
                time.monotonic() - t0,
            )

    # ------------------------------------------------------------------ queries

    def decode(self, data: bytes, deadline: float | None = None) -> tuple[np.ndarray, str]:
        """Pixels at the model's input size and the content hash of uploaded bytes; ImageError if unusable.

        What decoding will take is read from the header first: over `max_decode` the upload is refused
        unread; otherwise it waits for that much room in the decode budget, until `deadline`
        (time.monotonic(); default `timeout` from now): then DeadlineExceeded, and it is never decoded."""
        cost = decode_cost(data)
        if cost > self.max_decode:
            raise ImageError(
                f"decoding it would take {cost >> 20} MiB, over the {self.max_decode >> 20} MiB one upload may use"
            )
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        try:
            with self.decode_budget.take(cost, max(0.0, deadline - time.monotonic())):
                check_deadline(deadline, "decoding the upload")
                pixels = decode_bytes(data, self.model.info.resize_to)
        except BusyError:  # no room before the deadline, or none left after waiting for it: not decoded
            self._abandoned("decode")
            raise
        return pixels, content_hash(data)

    async def search_uploads(
        self,
        uploads: Sequence[tuple[str, bytes]],
        k: int = DEFAULT_K,
        min_score: float | None = None,
        exclude_self: bool = False,
        nprobe: int | None = None,
        where: Sequence[str] = (),
        verify: bool = False,
    ) -> tuple[str, list[QueryResult]]:
        """(version, results) for uploaded images (name, bytes), in order, among the images `where` selects;
        with `verify`, each result's hits checked as copies (Searcher.verified, files read as thumbnails are).

        An upload that cannot be decoded gets an `error` and the others still answer; when none can
        be used, RequestError. BusyError when the model's queue is full or no answer came in time.
        """
        if not uploads:
            raise RequestError("no image uploaded (send multipart field 'image')")
        if len(uploads) > MAX_IMAGES_PER_REQUEST:
            raise RequestError(f"at most {MAX_IMAGES_PER_REQUEST} images per request (got {len(uploads)})")
        t0 = time.perf_counter()
        searcher = self.searcher
        deadline = time.monotonic() + self.timeout  # every stage checks it: the work stops with the answer
        await self._check_where(searcher, where)
        check_verify(verify)
        results = await self._in_time(
            self._search_uploads(searcher, uploads, k, min_score, exclude_self, nprobe, deadline, where)
        )
        if all(r.error for r in results):
            raise RequestError("; ".join(f"{r.query}: {r.error}" for r in results))
        if verify:
            data = [d for _, d in uploads]  # (results are in the uploads' order)
            work = asyncio.to_thread(verify_uploads, searcher, results, data, self.decode_budget, deadline)
            results = await self._in_time(work)
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
        deadline: float,
        where: Sequence[str],
    ) -> list[QueryResult]:
        decoded = await asyncio.gather(
            *(asyncio.to_thread(self.decode, data, deadline) for _, data in uploads), return_exceptions=True
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
            vectors = np.stack(feats)
            found = await asyncio.to_thread(
                self._searching, searcher.search_vectors, vectors, k, nprobe, min_score, excl, deadline, where
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
        where: Sequence[str] = (),
        verify: bool = False,
    ) -> tuple[str, QueryResult]:
        """(version, result) for the indexed image `idx` of `version` (default: the current one), from its
        stored vector."""
        t0 = time.perf_counter()
        searcher = self.searcher_for(version)
        path = self._path(searcher, idx)
        deadline = time.monotonic() + self.timeout
        await self._check_where(searcher, where)
        check_verify(verify)
        result = await self._in_time(
            asyncio.to_thread(
                self._searching, searcher.search_like, [path], k, nprobe, min_score, exclude_self, deadline, where
            )
        )
        if verify:
            query = await asyncio.to_thread(candidate_features, searcher, path, True)
            verified = await self._in_time(asyncio.to_thread(verify_result, searcher, result[0], query, deadline))
            result = [verified]
        self._served(t0)
        return searcher.version_dir.name, result[0]

    # ------------------------------------------------------------------ the collection changed

    async def add_image(self, data: bytes, fields: dict[str, Any] | None = None) -> Added:
        """Add uploaded image bytes to the collection (ingest.Collection.add): decoded with the queries' limits,
        embedded by the warm model in the queries' batches, stored and recorded durably before it returns; the
        next search finds it. The same bytes again: the image already there (`duplicate_of`), decoded never.

        BusyError when `max_adds` additions are in flight or the model's queue is full. Once the file is being
        written the addition completes even if the client has gone: retrying it answers `duplicate_of`."""
        collection = self._writable()
        fields = check_fields(fields)  # a bad one is refused before any work, a duplicate's included
        if not self._add_rate.take():
            raise BusyError("additions are coming faster than this service takes them; retry shortly")
        if not self._adds.acquire(blocking=False):
            raise BusyError("too many additions in flight; retry shortly")
        try:
            t0 = time.perf_counter()
            deadline = time.monotonic() + self.timeout
            digest = content_hash(data)
            existing = await asyncio.to_thread(collection.existing, digest)
            if existing is not None:
                return existing
            try:
                image_suffix(data)  # a format the collection takes, before any decoding
                pixels, _ = await asyncio.to_thread(self.decode, data, deadline)
            except ImageError as exc:
                raise RequestError(f"not added: {exc}") from None
            future = self._batcher().submit(pixels)
            try:
                feature = await self._in_time(asyncio.wrap_future(future))
            finally:
                future.cancel()
            check_deadline(deadline, "storing the addition")
            added = await asyncio.shield(asyncio.to_thread(collection.add, data, feature, fields, None, digest))
            self.added += added.duplicate_of is None
            self._served(t0)
            return added
        finally:
            self._adds.release()

    async def remove_image(self, idx: int, version: str | None = None) -> Removed:
        """Never return image `idx` (of `version`, default the current one) again: an added file is deleted, a file
        of the user's folders hidden (ingest.Collection.remove). RequestError 404 for an unknown id."""
        collection = self._writable()
        path = self._path(self.searcher_for(version), idx)
        removed = await asyncio.shield(asyncio.to_thread(collection.remove, path, True))
        self.removed += 1
        return removed

    def _writable(self) -> Collection:
        if self.collection is None:
            raise RequestError("this service is read-only (start it with --writable to add and remove images)", 405)
        return self.collection

    async def thumbnail(self, idx: int, version: str | None = None) -> bytes:
        """A small JPEG of the indexed image `idx` (read from the path the index records), cached; read as
        serve.thumbnails says: a regular file inside the folders the version was scanned from, in a bounded
        pool with a deadline."""
        searcher = self.searcher_for(version)
        name = searcher.version_dir.name
        data = self.thumbnails.cached(name, idx)
        if data is None:
            path = await asyncio.to_thread(self._path, searcher, idx)
            data = await self.thumbnails.render(name, idx, path, searcher.roots)
        return data

    @staticmethod
    async def _check_where(searcher: Searcher, where: Sequence[str]) -> None:
        """A bad filter answers 422 before any upload is decoded (its selection is then kept for the search)."""
        if len(where) > MAX_WHERE:
            raise RequestError(f"at most {MAX_WHERE} where= conditions (got {len(where)})", 422)
        if where:
            await asyncio.to_thread(searcher.select, where)

    async def _in_time(self, work: Awaitable[T]) -> T:
        """`work`'s result, or BusyError (503) once `timeout` has passed; the work itself stops at its next stage
        (each checks the request's deadline), so that an abandoned request does not keep a thread busy."""
        try:
            return await asyncio.wait_for(work, self.timeout)
        except asyncio.TimeoutError:
            raise BusyError(f"no answer within {self.timeout:g} s (the service is overloaded); retry shortly") from None

    def _searching(self, search: Callable[..., T], *args: Any) -> T:
        """Run a Searcher search in a worker thread, counting a stop at the deadline."""
        try:
            return search(*args)
        except DeadlineExceeded:
            self._abandoned("search")
            raise

    def _abandoned(self, stage: str) -> None:
        with self._stats_lock:
            self.abandoned[stage] += 1
        LOG.warning("a request's time ran out before %s: that work was not done", stage)

    def _path(self, searcher: Searcher, idx: int) -> str:
        path = searcher.path_of(idx) if 0 <= idx < 2**62 else None
        if path is None:
            raise RequestError(f"no image with id {idx} in index version {searcher.version_dir.name}", 404)
        return path

    def _served(self, t0: float) -> None:
        self._latencies.append(time.perf_counter() - t0)
        self.requests += 1

    # ------------------------------------------------------------------ reports

    def health(self) -> dict[str, Any]:
        """ "ready" with the served version and size, or "starting": what a load balancer polls; and whether the
        served version is the published one, and if not why (the version keeps serving: still ready)."""
        if not self.ready:
            return {"status": "starting"}
        saturated = [
            name
            for name, full in (
                ("thumbnails", self.thumbnails.saturated),
                ("model queue", self._batcher().waiting() >= self.queue_size),
            )
            if full
        ]
        return {
            "status": "degraded" if saturated else "ready",
            "saturated": saturated,
            "version": self.searcher.version_dir.name,
            "count": self.searcher.count,
            "writable": self.writable,  # the page offers "Add to collection" and "Remove"
            **self.swaps(),
        }

    def swaps(self) -> dict[str, Any]:
        """The published version, whether it is the one served, the last refusal and the model file's state."""
        try:
            published: str | None = published_name(self.index_dir)
        except (OSError, ValueError):
            published = None
        r = self.refusal
        return {
            "published": published,
            "serving_published": published == self.searcher.version_dir.name,
            "refused": None
            if r is None
            else {
                "version": r.version,
                "reason": r.reason,
                "attempts": r.attempts,
                "since": datetime.fromtimestamp(r.at, timezone.utc).isoformat(timespec="seconds"),
            },
            "model_file_changed": self.model_file_changed,
        }

    def stats(self) -> dict[str, Any]:
        """What is served and how fast: index version and size, model, requests, latency percentiles."""
        s = self.searcher
        if s.live is not None:
            s.live.sync()  # the additions and removals up to now, whoever made them
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
            "abandoned": dict(self.abandoned),
            "live": {
                "writable": self.writable,
                "additions_served": 0 if s.live is None else len(s.live),  # searched beside the version
                "hidden_or_removed": 0 if s.live is None else len(s.live.excluded),
                "added": self.added,  # by this process
                "removed": self.removed,
            },
            "batches": batcher.batches,
            "images_embedded": batcher.images,
            "queue": {"waiting": batcher.waiting(), "size": self.queue_size},
            "batch_size": self.batch_size,
            "max_wait_ms": self.max_wait * 1000,
            **self.swaps(),
        }

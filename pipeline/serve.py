"""The query service: one warm model, micro-batched image queries, hot swaps of the published index.

`Service` is the library object (tests and programs call it directly); `create_app` is the thin
FastAPI layer over it that `pipeline serve` runs (the page lives in pipeline/web/). Clients only
ever name images by id: no request makes the service read a path that a client sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import ipaddress
import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Optional, Sequence

import numpy as np
from fastapi import Depends, FastAPI, File, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .version import __version__
from .errors import BusyError, ImageError, PipelineError
from .images import decode_bytes, input_shapes
from .index import CURRENT_FILE
from .model import FeatureModel
from .search import QueryResult, Searcher, QueryFile
from .sheet import thumbnail

LOG = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024  # bytes per request body
MAX_IMAGES_PER_REQUEST = 32
THUMB_SIZE = 320  # px, the longer side: sharp on a 2x screen in a ~160 px tile
API_KEY_HEADER = "X-API-Key"
API_KEY_COOKIE = "pipeline_key"  # what the page stores, so that <img> thumbnail requests carry it
RETRY_AFTER_S = 1

# Query parameters of the API (module level: FastAPI resolves the annotations here).
K = Annotated[int, Query(ge=1, le=1000, description="Results per query.")]
MinScore = Annotated[Optional[float], Query(description="Drop results below this cosine score.")]
ExcludeSelf = Annotated[bool, Query(description="Drop the query image itself and byte-identical copies.")]
Nprobe = Annotated[Optional[int], Query(ge=1, le=1 << 20, description="Override the index's tuned nprobe.")]
Version = Annotated[Optional[str], Query(max_length=64, description="Index version an id belongs to (default: the current one).")]


class RequestError(PipelineError):
    """A request the service refuses (bad upload, unknown id); `status` is its HTTP status code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class MicroBatcher:
    """One thread owns the model session and runs the images waiting for it as one batch.

    A lone query runs at once. When the previous batch held several images (queries arrive
    concurrently), the thread waits up to `max_wait` seconds for the batch to fill to
    `batch_size`. The queue is bounded: `submit` raises BusyError when `queue_size` images wait.
    """

    def __init__(self, model: FeatureModel, batch_size: int = 8, max_wait: float = 0.005, queue_size: int = 64) -> None:
        assert batch_size >= 1 and queue_size >= 1, "batch_size and queue_size must be at least 1"
        self.model, self.batch_size, self.max_wait = model, batch_size, max_wait
        self._queue: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue(queue_size)
        self.batches = self.images = 0
        self._thread = threading.Thread(target=self._run, name="pipeline-batcher", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> Future:
        """A future of the image's feature vector."""
        fut: Future = Future()
        try:
            self._queue.put_nowait((pixels, fut))
        except queue.Full:
            raise BusyError(f"the service is busy ({self._queue.maxsize} images wait for the model); retry shortly") from None
        return fut

    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _take(self, first: tuple[np.ndarray, Future], wait: bool) -> tuple[list[tuple[np.ndarray, Future]], bool]:
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
                for (_, fut), feat in zip(batch, feats):
                    fut.set_result(feat)
            self.batches += 1
            self.images += len(batch)
            last = len(batch)
        while True:  # closed: whatever still waits is answered, not left hanging
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(BusyError("the service is shutting down; retry shortly"))


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

    def __init__(self, index_dir: Path | str, model: Path | str | None = None, *, batch_size: int = 8,
                 max_wait_ms: float = 5.0, queue_size: int = 64, timeout: float = 30.0, poll: float = 0.5,
                 threads: int = 0, keep: int = 3, warm: bool = True) -> None:
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

    def start(self) -> "Service":
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
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        if self.batcher is not None:
            self.batcher.close()

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    @property
    def model(self) -> FeatureModel:
        assert self.batcher is not None, "Service.start() first"
        return self.batcher.model

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
            version = (self.index_dir / CURRENT_FILE).read_text().strip()
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
            LOG.error("refused index version %s: made by model %s (checksum %s), this service runs %s; still serving %s",
                      new.version_dir.name, new.meta["model"].get("name", "?"), (want or "none")[:12],
                      self.model.info.short(), serving)
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
            LOG.info("index version %s read into the page cache: %.0f MiB in %.1f s", searcher.version_dir.name,
                     read / 2**20, time.monotonic() - t0)

    # ------------------------------------------------------------------ queries

    def decode(self, data: bytes) -> tuple[np.ndarray, str]:
        """Pixels at the model's input size and the content hash of uploaded bytes; ImageError if unusable."""
        pixels = decode_bytes(data, self.model.info.resize_to)
        return pixels, hashlib.blake2b(data, digest_size=16).hexdigest()

    async def search_uploads(self, uploads: Sequence[tuple[str, bytes]], k: int = 10, min_score: float | None = None,
                             exclude_self: bool = False, nprobe: int | None = None) -> tuple[str, list[QueryResult]]:
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
            results = await asyncio.wait_for(self._search_uploads(searcher, uploads, k, min_score, exclude_self, nprobe),
                                             self.timeout)
        except asyncio.TimeoutError:
            raise BusyError(f"no answer within {self.timeout:g} s (the service is overloaded); retry shortly") from None
        if all(r.error for r in results):
            raise RequestError("; ".join(f"{r.query}: {r.error}" for r in results))
        self._served(t0)
        return searcher.version_dir.name, results

    async def _search_uploads(self, searcher: Searcher, uploads: Sequence[tuple[str, bytes]], k: int,
                              min_score: float | None, exclude_self: bool, nprobe: int | None) -> list[QueryResult]:
        decoded = await asyncio.gather(*(asyncio.to_thread(self.decode, data) for _, data in uploads),
                                       return_exceptions=True)
        for d in decoded:
            if isinstance(d, BaseException) and not isinstance(d, ImageError):
                raise d
        good = [(i, d) for i, d in enumerate(decoded) if not isinstance(d, BaseException)]
        futures: list[Future] = []
        try:
            for _, (pixels, _) in good:
                futures.append(self.batcher.submit(pixels))
            feats = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        finally:
            for f in futures:
                f.cancel()  # no-op once done; frees the model from a request that gave up
        results = [QueryResult(name, error=str(d)) if isinstance(d, ImageError) else None
                   for (name, _), d in zip(uploads, decoded)]
        if good:
            excl = [QueryFile("", content_hash) for _, (_, content_hash) in good] if exclude_self else None
            hits = await asyncio.to_thread(self._locked, searcher.search_vectors, np.stack(feats), k, nprobe,
                                           min_score, excl)
            for (i, _), h in zip(good, hits):
                results[i] = QueryResult(uploads[i][0], h)
        return results

    async def search_like(self, idx: int, version: str | None = None, k: int = 10, min_score: float | None = None,
                          exclude_self: bool = False, nprobe: int | None = None) -> tuple[str, QueryResult]:
        """(version, result) for the indexed image `idx` of `version` (default: the current one), from its stored vector."""
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
        path = self._locked(searcher.path_of, idx) if 0 <= idx < 2 ** 62 else None
        if path is None:
            raise RequestError(f"no image with id {idx} in index version {searcher.version_dir.name}", 404)
        return path

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    def _served(self, t0: float) -> None:
        self._latencies.append(time.perf_counter() - t0)
        self.requests += 1

    # ------------------------------------------------------------------ reports

    def health(self) -> dict:
        if not self.ready:
            return {"status": "starting"}
        return {"status": "ready", "version": self.searcher.version_dir.name, "count": self.searcher.count}

    def stats(self) -> dict:
        """What is served and how fast: index version and size, model, requests, latency percentiles."""
        s = self.searcher
        lat = np.array(self._latencies) * 1000
        model = self.model.info
        return {
            "version": s.version_dir.name, "count": s.count, "built_at": s.meta.get("created"),
            "factory": s.meta.get("factory"), "nprobe": s.nprobe,
            "model": {"name": model.name, "checksum": model.checksum, "input_size": model.input_size},
            "requests_served": self.requests,
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
                           "p99": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
                           "window": len(lat)},
            "batches": self.batcher.batches, "images_embedded": self.batcher.images,
            "queue": {"waiting": self.batcher.waiting(), "size": self.queue_size},
            "batch_size": self.batch_size, "max_wait_ms": self.max_wait * 1000,
        }


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the service on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app parses it.

    A declared Content-Length is refused at once, unread (curl, sending `Expect: 100-continue`,
    never sends the body; httpx reads the 413 after its write fails); a chunked body is counted as
    it arrives. The rest of an oversized body is never read: reading 50 MB costs the other requests
    half a second of CPU, and the connection is closed anyway.
    """

    def __init__(self, app, limit: int = DEFAULT_MAX_UPLOAD) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        async def answer(message) -> None:
            nonlocal started
            if seen > self.limit and not started:
                return  # the app's answer to a cut-off body (FastAPI: 400) gives way to the 413
            started = True
            await send(message)

        try:
            await self.app(scope, counted, answer)
        except _TooLarge:
            pass
        if seen > self.limit and not started:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = ('{"error": "request body too large: the limit is %d bytes"}' % self.limit).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(service: Service, api_key: str | None = None, max_upload: int = DEFAULT_MAX_UPLOAD):
    """The HTTP layer over `service`: the JSON API under /api, the page at /, the schema at /openapi.json.

    No docs UI (FastAPI's loads its assets from a CDN). With `api_key`, every /api route but
    health wants it in the X-API-Key header or the pipeline_key cookie (which the page sets).
    """
    @asynccontextmanager
    async def lifespan(_app):
        await asyncio.to_thread(service.start)
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(title="pipeline", version=__version__, summary="Search by image: upload a photo, get its look-alikes.",
                  docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_upload)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status, headers=headers)

    @app.exception_handler(RequestError)
    async def on_request_error(_request, exc: RequestError):
        return error(exc.status, str(exc))

    @app.exception_handler(BusyError)
    async def on_busy(_request, exc: BusyError):
        return error(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(PipelineError)
    async def on_pipeline_error(_request, exc: PipelineError):
        LOG.error("request failed: %s", exc)
        return error(500, str(exc))

    @app.exception_handler(HTTPException)
    async def on_http(_request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or str(first["loc"][0])
        return error(422, f"{where}: {first['msg']}")

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        sent = request.headers.get(API_KEY_HEADER) or request.cookies.get(API_KEY_COOKIE) or ""
        if not secrets.compare_digest(sent.encode(), api_key.encode()):
            raise RequestError(f"missing or wrong API key (send it in the {API_KEY_HEADER} header)", 401)

    guarded = [Depends(check_key)]

    def answer(version: str, results: list[QueryResult]) -> JSONResponse:
        body = []
        for r in results:
            d = r.to_dict()
            for hit in d["results"]:
                hit["thumbnail"] = f"/api/thumbnail/{hit['id']}?version={version}"
            body.append(d)
        return JSONResponse(body, headers={"X-Index-Version": version})

    @app.post("/api/search", dependencies=guarded, summary="Search by uploaded images")
    async def search_images(image: Annotated[list[UploadFile], File(description="One or more images (repeat the field).")],
                            k: K = 10, min_score: MinScore = None, exclude_self: ExcludeSelf = False,
                            nprobe: Nprobe = None) -> JSONResponse:
        uploads = [(f.filename or f"upload-{i + 1}", await f.read()) for i, f in enumerate(image)]
        version, results = await service.search_uploads(uploads, k, min_score, exclude_self, nprobe)
        return answer(version, results)

    @app.get("/api/search", dependencies=guarded, summary="More like an indexed image (its stored feature, no model run)")
    async def search_like(like: Annotated[int, Query(ge=0, description="Id of an indexed image.")], version: Version = None,
                          k: K = 10, min_score: MinScore = None, exclude_self: ExcludeSelf = False,
                          nprobe: Nprobe = None) -> JSONResponse:
        served, result = await service.search_like(like, version, k, min_score, exclude_self, nprobe)
        return answer(served, [result])

    @app.get("/api/thumbnail/{idx}", dependencies=guarded, summary="A small JPEG of an indexed image",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail_image(idx: Annotated[int, PathParam(ge=0)], version: Version = None) -> Response:
        data = await asyncio.to_thread(service.thumbnail, idx, version)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/health", summary="Ready once the index and the model are loaded")
    async def health() -> JSONResponse:
        state = service.health()
        return JSONResponse(state, 200 if state["status"] == "ready" else 503)

    @app.get("/api/stats", dependencies=guarded, summary="Index version and size, model, requests, latency")
    async def stats() -> dict:
        return service.stats()

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app

"""The HTTP layer over a Service, which `pipeline serve` runs: the JSON API under /api, the page at / (web/),
request body limits, the API key, and whether a host keeps the service on this machine."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile, params
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import BusyError, PipelineError
from ..search import DEFAULT_K, QueryResult
from ..version import __version__
from .limits import DEFAULT_MAX_UPLOAD
from .service import RequestError, Service

LOG = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
API_KEY_HEADER = "X-API-Key"
API_KEY_COOKIE = "pipeline_key"  # what the page stores, so that <img> thumbnail requests carry it
RETRY_AFTER_S = 1

# Query parameters of the API (module level: FastAPI resolves the annotations here).
K = Annotated[int, Query(ge=1, le=1000, description="Results per query.")]
MinScore = Annotated[float | None, Query(description="Drop results below this cosine score.")]
ExcludeSelf = Annotated[bool, Query(description="Drop the query image itself and byte-identical copies.")]
Nprobe = Annotated[int | None, Query(ge=1, le=1 << 20, description="Override the index's tuned nprobe.")]
Version = Annotated[
    str | None, Query(max_length=64, description="Index version an id belongs to (default: the current one).")
]
Uploads = Annotated[list[UploadFile], File(description="One or more images (repeat the field).")]
LikeId = Annotated[int, Query(ge=0, description="Id of an indexed image.")]


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

    def __init__(self, app: ASGIApp, limit: int = DEFAULT_MAX_UPLOAD) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, started = 0, False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        async def answer(message: Message) -> None:
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

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": f"request body too large: the limit is {self.limit} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(service: Service, api_key: str | None = None, max_upload: int = DEFAULT_MAX_UPLOAD) -> FastAPI:
    """The HTTP layer over `service`: the JSON API under /api, the page at /, the schema at /openapi.json.

    No docs UI (FastAPI's loads its assets from a CDN). With `api_key`, every /api route but
    health wants it in the X-API-Key header or the pipeline_key cookie (which the page sets).
    The app starts the service when it starts and closes it when it stops.
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(service.start)
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(
        title="pipeline",
        version=__version__,
        summary="Search by image: upload a photo, get its look-alikes.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=max_upload)
    _add_error_handlers(app)
    _add_api(app, service, [Depends(_key_check(api_key))])

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers {"error": one line}: refusals their status, busy 503 with Retry-After."""

    @app.exception_handler(RequestError)
    async def on_request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(BusyError)
    async def on_busy(_request: Request, exc: BusyError) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(PipelineError)
    async def on_pipeline_error(_request: Request, exc: PipelineError) -> JSONResponse:
        LOG.error("request failed: %s", exc)
        return _error(500, str(exc))

    @app.exception_handler(HTTPException)
    async def on_http(_request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or str(first["loc"][0])
        return _error(422, f"{where}: {first['msg']}")


def _key_check(api_key: str | None) -> Callable[[Request], None]:
    """A dependency refusing (401) a request without `api_key` in the header or the cookie; none: all pass."""

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        sent = request.headers.get(API_KEY_HEADER) or request.cookies.get(API_KEY_COOKIE) or ""
        if not secrets.compare_digest(sent.encode(), api_key.encode()):
            raise RequestError(f"missing or wrong API key (send it in the {API_KEY_HEADER} header)", 401)

    return check_key


def _answer(version: str, results: list[QueryResult]) -> JSONResponse:
    """Results as JSON, each hit with the URL of its thumbnail in the version it came from."""
    body = []
    for r in results:
        d = r.to_dict()
        for hit in d["results"]:
            hit["thumbnail"] = f"/api/thumbnail/{hit['id']}?version={version}"
        body.append(d)
    return JSONResponse(body, headers={"X-Index-Version": version})


def _add_api(app: FastAPI, service: Service, guarded: Sequence[params.Depends]) -> None:
    """The /api routes; all but health behind the `guarded` dependencies (the API key)."""

    @app.post("/api/search", dependencies=guarded, summary="Search by uploaded images")
    async def search_images(
        image: Uploads,
        k: K = DEFAULT_K,
        min_score: MinScore = None,
        exclude_self: ExcludeSelf = False,
        nprobe: Nprobe = None,
    ) -> JSONResponse:
        uploads = [(f.filename or f"upload-{i + 1}", await f.read()) for i, f in enumerate(image)]
        version, results = await service.search_uploads(uploads, k, min_score, exclude_self, nprobe)
        return _answer(version, results)

    @app.get(
        "/api/search", dependencies=guarded, summary="More like an indexed image (its stored feature, no model run)"
    )
    async def search_like(
        like: LikeId,
        version: Version = None,
        k: K = DEFAULT_K,
        min_score: MinScore = None,
        exclude_self: ExcludeSelf = False,
        nprobe: Nprobe = None,
    ) -> JSONResponse:
        served, result = await service.search_like(like, version, k, min_score, exclude_self, nprobe)
        return _answer(served, [result])

    @app.get(
        "/api/thumbnail/{idx}",
        dependencies=guarded,
        summary="A small JPEG of an indexed image",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    async def thumbnail_image(idx: Annotated[int, PathParam(ge=0)], version: Version = None) -> Response:
        data = await asyncio.to_thread(service.thumbnail, idx, version)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/health", summary="Ready once the index and the model are loaded")
    async def health() -> JSONResponse:
        state = service.health()
        return JSONResponse(state, 200 if state["status"] == "ready" else 503)

    @app.get("/api/stats", dependencies=guarded, summary="Index version and size, model, requests, latency")
    async def stats() -> dict[str, Any]:
        return service.stats()

"""The HTTP layer over a Service, which `pipeline serve` runs: the JSON API under /api, the page at / (web/),
request body limits, the API key, and whether a host keeps the service on this machine."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import BusyError, ConfigError, InputError, PipelineError
from ..search import DEFAULT_K, QueryResult
from ..version import __version__
from .limits import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_UPLOAD, MAX_WHERE, MAX_WHERE_LENGTH, RequestError
from .metrics import METRICS_PATH, Measured, ServiceMetrics
from .service import Service

LOG = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
API_KEY_HEADER = "X-API-Key"
API_KEY_COOKIE = "pipeline_session"  # set by the server (HttpOnly): <img> thumbnail requests carry it
RETRY_AFTER_S = 1

# Query parameters of the API (module level: FastAPI resolves the annotations here).
K = Annotated[int, Query(ge=1, le=1000, description="Results per query.")]
MinScore = Annotated[float | None, Query(description="Drop results below this cosine score.")]
ExcludeSelf = Annotated[bool, Query(description="Drop the query image itself and byte-identical copies.")]
Nprobe = Annotated[
    int | None,
    Query(
        ge=1,
        le=65536,
        description="Override the index's tuned nprobe (IVF: at most its lists; binary codes: the candidate "
        "pool, at most 10,000).",
    ),
]
Version = Annotated[
    str | None, Query(max_length=64, description="Index version an id belongs to (default: the current one).")
]
Uploads = Annotated[list[UploadFile], File(description="One or more images (repeat the field).")]
Addition = Annotated[UploadFile, File(description="The image to add (JPEG, PNG, WebP, BMP, GIF or TIFF).")]
AdditionFields = Annotated[
    str | None,
    Form(max_length=16_384, description='Your metadata for it, a JSON object such as {"sku": "A12", "price": 40}.'),
]
LikeId = Annotated[int, Query(ge=0, description="Id of an indexed image.")]
Verify = Annotated[
    bool,
    Query(description="Check each hit (the top 50) with local features and a geometric fit; verified copies first."),
]
Where = Annotated[
    list[str],
    Query(
        max_length=MAX_WHERE_LENGTH,
        description="A filter (key=value, key!=value, key in (a,b), key<N, <=, >, >=, path:GLOB); repeat the "
        f"parameter to combine with AND (at most {MAX_WHERE} conditions).",
    ),
]


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the service on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # the Host names a loopback service answers by default
SESSION_PATH = "/api/session"  # where the page trades the key for an HttpOnly cookie
OPEN_PATHS = ("/api/health", SESSION_PATH)  # /api routes that need no key (session checks the header itself)
# The page is plain same-origin JS and CSS; the dropped photo is shown from a blob: URL.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


def session_token(api_key: str) -> str:
    """The cookie the page holds: derived from the key, so the key itself never sits in a cookie."""
    return hmac.new(api_key.encode(), b"pipeline session", hashlib.sha256).hexdigest()


def host_name(header: str) -> str:
    """The name of a Host header without its port ('[::1]:8000' -> '::1')."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _TooLarge(Exception):
    pass


class Gate:
    """ASGI middleware: what is checked before any body is read, and the headers every answer carries.

    In order: the Host header (one of `allowed_hosts`, DNS rebinding: a web page cannot reach a loopback
    service under its own name; None: any), the API key for /api routes (header or the page's session
    cookie; 401), the declared body size (413, unread; a chunked body is counted as it arrives and cut at
    the limit), and a body that has not all arrived within `body_timeout` seconds (408: a slow client holds
    no memory or connection for long). curl, sending `Expect: 100-continue`, never sends a refused body.
    Every answer carries the page's security headers; API answers also `Cache-Control: no-store`
    (thumbnails set their own).
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int = DEFAULT_MAX_UPLOAD,
        api_key: str | None = None,
        allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
    ) -> None:
        self.app, self.limit, self.api_key, self.body_timeout = app, limit, api_key, body_timeout
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.token = session_token(api_key) if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = host_name(headers.get(b"host", b"").decode("latin-1")).lower()
        if self.allowed is not None and host not in self.allowed:
            return await _refuse(send, 421, f"this service does not answer to the host name {host[:60]!r}")
        path: str = scope["path"]
        if self.api_key and path.startswith("/api/") and path not in OPEN_PATHS and not self._key_ok(headers):
            message = f"missing or wrong API key (send it in the {API_KEY_HEADER} header)"
            return await _refuse(send, 401, message)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _refuse(send, 413, f"request body too large: the limit is {self.limit} bytes")
        api = path.startswith("/api/")
        seen, started, complete, slow = 0, False, False, False
        deadline = asyncio.get_running_loop().time() + self.body_timeout

        async def counted() -> Message:
            nonlocal seen, complete, slow
            if complete:  # the body is in: later receives wait for a disconnect, with no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                slow = True
                raise _TooLarge from None
            seen += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if seen > self.limit:
                raise _TooLarge
            return message

        async def answer(message: Message) -> None:
            nonlocal started
            if (seen > self.limit or slow) and not started:
                return  # the app's answer to a cut-off body (FastAPI: 400) gives way to the 413 or 408
            if message["type"] == "http.response.start":
                started = True
                extra = list(SECURITY_HEADERS)
                if api and not any(k.lower() == b"cache-control" for k, _ in message.get("headers", [])):
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, counted, answer)
        except _TooLarge:
            pass
        if slow and not started:
            await _refuse(send, 408, f"the request body did not arrive within {self.body_timeout:g} s")
        elif seen > self.limit and not started:
            await _refuse(send, 413, f"request body too large: the limit is {self.limit} bytes")

    def _key_ok(self, headers: dict[bytes, bytes]) -> bool:
        assert self.api_key is not None and self.token is not None
        sent = headers.get(API_KEY_HEADER.lower().encode())
        if sent is not None:
            return hmac.compare_digest(sent, self.api_key.encode())
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get(b"cookie", b"").decode("latin-1"))
        except CookieError:
            return False
        morsel = cookies.get(API_KEY_COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), self.token.encode())


async def _refuse(send: Send, status: int, message: str) -> None:
    """Answer at once, the body unread, and close the connection (what the client still sends is dropped)."""
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                (b"cache-control", b"no-store"),
                *SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(
    service: Service,
    api_key: str | None = None,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> FastAPI:
    """The HTTP layer over `service`: the JSON API under /api, the page at /, the schema at /openapi.json.

    No docs UI (FastAPI's loads its assets from a CDN). With `api_key`, every /api route but health wants
    it in the X-API-Key header, or the session cookie the server sets when the page sends the key to
    /api/session. `allowed_hosts`: the Host names answered (None: any). Key, Host and size are checked
    before a body is read (Gate). The app starts the service when it starts and closes it when it stops.
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
    if service.writable and not api_key:
        raise ConfigError("a writable service (--writable) needs an API key: its write routes always want it")
    app.add_middleware(Gate, limit=max_upload, api_key=api_key, allowed_hosts=allowed_hosts, body_timeout=body_timeout)
    metrics = ServiceMetrics(service)
    app.add_middleware(Measured, metrics=metrics)  # added last: outermost, so refusals count too

    @app.get(METRICS_PATH, include_in_schema=False)
    async def prometheus() -> Response:
        body, content_type = await asyncio.to_thread(metrics.render)
        return Response(body, media_type=content_type)

    _add_error_handlers(app)
    _add_api(app, service)

    @app.post(SESSION_PATH, status_code=204, summary="Trade the API key (header) for an HttpOnly session cookie")
    async def session(request: Request) -> Response:
        response = Response(status_code=204)
        if api_key is None:
            return response
        sent = request.headers.get(API_KEY_HEADER, "")
        if not hmac.compare_digest(sent.encode(), api_key.encode()):
            raise RequestError(f"missing or wrong API key (send it in the {API_KEY_HEADER} header)", 401)
        response.set_cookie(
            API_KEY_COOKIE,
            session_token(api_key),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

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

    @app.exception_handler(InputError)
    async def on_input(_request: Request, exc: InputError) -> JSONResponse:  # a filter, an addition's metadata
        return _error(422, str(exc))

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


def _answer(version: str, results: list[QueryResult]) -> JSONResponse:
    """Results as JSON, each hit with the URL of its thumbnail in the version it came from."""
    body = []
    for r in results:
        d = r.to_dict()
        for hit in d["results"]:
            hit["thumbnail"] = f"/api/thumbnail/{hit['id']}?version={version}"
        body.append(d)
    return JSONResponse(body, headers={"X-Index-Version": version})


def _add_api(app: FastAPI, service: Service) -> None:
    """The /api routes (Gate checks the key of all but health)."""

    @app.post("/api/search", summary="Search by uploaded images")
    async def search_images(
        image: Uploads,
        k: K = DEFAULT_K,
        min_score: MinScore = None,
        exclude_self: ExcludeSelf = False,
        nprobe: Nprobe = None,
        where: Where = [],  # noqa: B006  # FastAPI copies a list default per request
        verify: Verify = False,
    ) -> JSONResponse:
        uploads = [(f.filename or f"upload-{i + 1}", await f.read()) for i, f in enumerate(image)]
        version, results = await service.search_uploads(uploads, k, min_score, exclude_self, nprobe, where, verify)
        return _answer(version, results)

    @app.get("/api/search", summary="More like an indexed image (its stored feature, no model run)")
    async def search_like(
        like: LikeId,
        version: Version = None,
        k: K = DEFAULT_K,
        min_score: MinScore = None,
        exclude_self: ExcludeSelf = False,
        nprobe: Nprobe = None,
        where: Where = [],  # noqa: B006  # FastAPI copies a list default per request
        verify: Verify = False,
    ) -> JSONResponse:
        served, result = await service.search_like(like, version, k, min_score, exclude_self, nprobe, where, verify)
        return _answer(served, [result])

    @app.get(
        "/api/thumbnail/{idx}",
        summary="A small JPEG of an indexed image",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    async def thumbnail_image(idx: Annotated[int, PathParam(ge=0)], version: Version = None) -> Response:
        data = await service.thumbnail(idx, version)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    if service.writable:
        _add_writes(app, service)

    @app.get("/api/fields", summary="The fields the served version's images can be filtered on, and their types")
    async def fields() -> dict[str, Any]:
        searcher = service.searcher
        return {"version": searcher.version_dir.name, "fields": searcher.fields}

    @app.get("/api/health", summary="Ready once the index and the model are loaded")
    async def health() -> JSONResponse:
        state = service.health()
        return JSONResponse(state, 503 if state["status"] == "starting" else 200)  # degraded: still serving

    @app.get("/api/stats", summary="Index version and size, model, requests, latency")
    async def stats() -> dict[str, Any]:
        return service.stats()


def _add_writes(app: FastAPI, service: Service) -> None:
    """POST and DELETE /api/images: routes of a writable service only (Gate wants the key for every /api route,
    and create_app a key for a writable service)."""

    @app.post(
        "/api/images",
        status_code=201,
        summary="Add an image to the collection: durable, and found by the next search",
        responses={200: {"description": "These bytes are in the collection already: their id (duplicate_of)"}},
    )
    async def add_image(image: Addition, metadata: AdditionFields = None) -> JSONResponse:
        fields = None
        if metadata:
            try:
                fields = json.loads(metadata)
            except ValueError as exc:
                raise RequestError(f"metadata is not JSON ({exc})", 422) from None
        added = await service.add_image(await image.read(), fields)
        return JSONResponse(added.to_dict(), 201 if added.duplicate_of is None else 200)

    @app.delete(
        "/api/images/{idx}",
        status_code=204,
        summary="Remove an image: never returned again (an added file is deleted, one of your folders hidden)",
        response_class=Response,
    )
    async def remove_image(idx: Annotated[int, PathParam(ge=0)], version: Version = None) -> Response:
        await service.remove_image(idx, version)
        return Response(status_code=204)

"""The service's defaults and limits, importable without FastAPI (the serve extra): `pipeline serve`
offers them before it knows whether the extra is installed."""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"  # loopback: anything else needs an API key
DEFAULT_PORT = 8000
DEFAULT_MAX_WAIT_MS = 5.0  # most milliseconds a batch waits to fill, under concurrent load only
DEFAULT_QUEUE_SIZE = 64  # images that may wait for the model; beyond it, BusyError (503 with Retry-After)
DEFAULT_TIMEOUT = 30.0  # seconds a search may take before it is answered BusyError (503)
DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024  # bytes per request body (413 beyond)
DEFAULT_BODY_TIMEOUT = 30.0  # seconds for a request body to arrive whole (408 beyond)
DEFAULT_MAX_CONNECTIONS = 256  # open connections at once; beyond, new ones are answered 503 (uvicorn)
DEFAULT_POLL = 0.5  # seconds between looks at the index's CURRENT for a newly published version
DEFAULT_OPEN_VERSIONS = 3  # index versions kept open, so that ids of results already shown still resolve
DEFAULT_DECODE_MEMORY = 1536 * 1024 * 1024  # bytes all uploads being decoded may take at once (images.decode_cost)
DEFAULT_MAX_DECODE = DEFAULT_DECODE_MEMORY * 2 // 3  # one upload's decoding (a 16-bit 9000 x 9000 PNG: 0.9 GB)

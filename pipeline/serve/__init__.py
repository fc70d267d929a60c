"""The query service: one warm model, micro-batched image queries, hot swaps of the published index, over HTTP.

One door to the package: `from pipeline.serve import X`. `Service` (service.py) is the library object
(tests and programs call it directly); `create_app` (app.py) is the thin FastAPI layer over it that
`pipeline serve` runs, with the page in web/; `MicroBatcher` (batcher.py) owns the model session.
Importing it imports FastAPI (the serve extra).
"""

from __future__ import annotations

from .app import API_KEY_COOKIE, API_KEY_HEADER, DEFAULT_MAX_UPLOAD, WEB_DIR, BodyLimit, create_app, is_loopback
from .batcher import MicroBatcher
from .service import MAX_IMAGES_PER_REQUEST, THUMB_SIZE, RequestError, Service

__all__ = [
    "API_KEY_COOKIE", "API_KEY_HEADER", "DEFAULT_MAX_UPLOAD", "MAX_IMAGES_PER_REQUEST", "THUMB_SIZE", "WEB_DIR",
    "BodyLimit", "MicroBatcher", "RequestError", "Service", "create_app", "is_loopback",
]

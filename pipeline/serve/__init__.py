"""The query service: one warm model, micro-batched image queries, hot swaps of the published index, over HTTP.

One door to the package: `from pipeline.serve import X`. `Service` (service.py) is the library object
(tests and programs call it directly); `create_app` (app.py) is the thin FastAPI layer over it that
`pipeline serve` runs, with the page in web/; `MicroBatcher` (batcher.py) owns the model session; the
defaults and limits are in limits.py. Only limits.py is imported with the package: the other names are
imported on first use (PEP 562), so `pipeline serve` reads its defaults without the serve extra; using
one of them imports FastAPI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_UPLOAD,
    DEFAULT_MAX_WAIT_MS,
    DEFAULT_OPEN_VERSIONS,
    DEFAULT_POLL,
    DEFAULT_PORT,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_TIMEOUT,
    RequestError,
)

if TYPE_CHECKING:
    from .app import API_KEY_COOKIE, API_KEY_HEADER, LOOPBACK_HOSTS, WEB_DIR, Gate, create_app, is_loopback
    from .batcher import MicroBatcher
    from .service import MAX_IMAGES_PER_REQUEST, Service
    from .thumbnails import THUMB_SIZE

# Name -> the module that defines it, imported by __getattr__ on first use.
_LAZY = {
    "API_KEY_COOKIE": "app",
    "API_KEY_HEADER": "app",
    "LOOPBACK_HOSTS": "app",
    "WEB_DIR": "app",
    "Gate": "app",
    "create_app": "app",
    "is_loopback": "app",
    "MicroBatcher": "batcher",
    "MAX_IMAGES_PER_REQUEST": "service",
    "THUMB_SIZE": "thumbnails",
    "Service": "service",
}

__all__ = [
    "API_KEY_COOKIE",
    "API_KEY_HEADER",
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_UPLOAD",
    "DEFAULT_MAX_WAIT_MS",
    "DEFAULT_OPEN_VERSIONS",
    "DEFAULT_POLL",
    "DEFAULT_PORT",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_TIMEOUT",
    "LOOPBACK_HOSTS",
    "MAX_IMAGES_PER_REQUEST",
    "THUMB_SIZE",
    "WEB_DIR",
    "Gate",
    "MicroBatcher",
    "RequestError",
    "Service",
    "create_app",
    "is_loopback",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

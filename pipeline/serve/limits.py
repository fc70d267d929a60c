"""The service's defaults and limits, importable without FastAPI (the serve extra): `pipeline serve`
offers them before it knows whether the extra is installed; the decode-memory budget, and the error a
refused request gets."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import BusyError, PipelineError

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
MAX_WHERE = 16  # filter conditions per request: each costs a pass over a column (about 1 ms per million images)
MAX_WHERE_LENGTH = 1000  # characters per condition
DEFAULT_MAX_ADDS = 16  # additions (POST /api/images) in flight at once; beyond, BusyError (503 with Retry-After)
DEFAULT_ADD_RATE = 50.0  # additions per second, on average (bursts of DEFAULT_MAX_ADDS); beyond, BusyError
DEFAULT_MAX_DECODE = DEFAULT_DECODE_MEMORY * 2 // 3  # one upload's decoding (a 16-bit 9000 x 9000 PNG: 0.9 GB)


class RequestError(PipelineError):
    """A request the service refuses (bad upload, unknown id); `status` is its HTTP status code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class DecodeBudget:
    """The bytes of decoding in progress across all requests (images.decode_cost of each upload): a decode
    waits for room, up to a deadline, then answers busy; so concurrent uploads hold a bounded memory."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._room = threading.Condition()

    @contextmanager
    def take(self, nbytes: int, timeout: float) -> Iterator[None]:
        with self._room:
            if not self._room.wait_for(lambda: self.used + nbytes <= self.total, timeout):
                raise BusyError(
                    f"other uploads are being decoded ({self.used >> 20} MiB of {self.total >> 20} MiB in use); "
                    "retry shortly"
                )
            self.used += nbytes
        try:
            yield
        finally:
            with self._room:
                self.used -= nbytes
                self._room.notify_all()


class RateLimit:
    """At most `rate` events a second on average, `burst` at once (a token bucket): what keeps a client from
    filling the disk and the journal at the model's speed. `take()` says whether one more may go now."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens, self._at = float(burst), clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True

"""Thumbnails of indexed files for the page: read safely, in a bounded pool of their own, with a deadline,
and cached; so that a hung disk or a hostile file can cost thumbnails, never searches."""

from __future__ import annotations

import asyncio
import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..errors import BusyError, ImageError
from ..images import read_regular_file
from ..sheet import thumbnail_of
from .limits import RequestError

THUMB_SIZE = 320  # px, the longer side: sharp on a 2x screen in a ~160 px tile
THUMB_WORKERS = 4  # threads reading files for thumbnails; a hung read holds one until it returns
THUMB_TIMEOUT = 5.0  # seconds a thumbnail's file may take to read and shrink before the answer is 503
THUMB_MAX_BYTES = 64 * 1024 * 1024  # largest file read for a thumbnail
THUMB_CACHE = 2048  # thumbnails kept (about 40 MB at most)


def render_thumbnail(idx: int, path: str, roots: Sequence[str] | None = None) -> bytes:
    """The JPEG thumbnail of an indexed file, read safely (images.read_regular_file: a regular file, inside
    `roots` when the version records them, at most THUMB_MAX_BYTES); RequestError 404 when unusable."""
    try:
        im = thumbnail_of(read_regular_file(path, THUMB_MAX_BYTES, roots), THUMB_SIZE)
    except ImageError as exc:
        raise RequestError(f"image {idx} ({Path(path).name}) cannot be shown: {exc}", 404) from None
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


class Thumbnails:
    """The pool (THUMB_WORKERS threads) and the cache. A read that hangs (a stale network mount) answers
    BusyError after THUMB_TIMEOUT and holds its thread until it returns; when every thread is held,
    thumbnails answer busy at once (`saturated`: health says "degraded") and nothing else waits."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()  # the cache and the count of reads in progress
        self._busy = 0
        self._pool = ThreadPoolExecutor(THUMB_WORKERS, thread_name_prefix="pipeline-thumb")

    @property
    def saturated(self) -> bool:
        """Whether every reader thread is held."""
        return self._busy >= THUMB_WORKERS

    def cached(self, version: str, idx: int) -> bytes | None:
        """The thumbnail if it was made before."""
        with self._lock:
            data = self._cache.get((version, idx))
            if data is not None:
                self._cache.move_to_end((version, idx))
            return data

    async def render(self, version: str, idx: int, path: str, roots: Sequence[str] | None) -> bytes:
        """Make (and cache) the thumbnail of image `idx` of `version` from `path`."""
        with self._lock:
            if self._busy >= THUMB_WORKERS:
                raise BusyError(f"thumbnails are busy ({THUMB_WORKERS} file reads in progress); retry shortly")
            self._busy += 1
        job = self._pool.submit(render_thumbnail, idx, path, roots)
        job.add_done_callback(self._done)
        try:
            data = await asyncio.wait_for(asyncio.wrap_future(job), THUMB_TIMEOUT)
        except asyncio.TimeoutError:
            raise BusyError(f"image {idx}'s file did not read within {THUMB_TIMEOUT:g} s; retry later") from None
        with self._lock:
            self._cache[(version, idx)] = data
            while len(self._cache) > THUMB_CACHE:
                self._cache.popitem(last=False)
        return data

    def _done(self, _job: Future[bytes]) -> None:
        with self._lock:
            self._busy -= 1

    def close(self) -> None:
        """Stop the pool; a hung read is not waited for."""
        self._pool.shutdown(wait=False, cancel_futures=True)

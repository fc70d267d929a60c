"""The features folder: shards, their catalog, the errors file and the lock, behind one small API.

It is the one store between the model and the index, and this module is its only door: extract
writes it under `writing()` (the lock and the catalog) through a ShardWriter (its Ray workers too),
and rewrites its errors file; rebuild `compact`s it; the index reads `live_parts` and rebuild
`live_digest` with the catalog opened read-only; duplicates reads `exact_features`. So the data
flows one way: images -> decode -> model -> features folder -> index -> search -> serve.

Layout:
  shard-NNNNN.h5      HDF5 feature shards (format: shards.py)
  catalog.sqlite      every image, where its feature lives, which rows are live (catalog.py)
  errors.jsonl        every current file that could not be used, and why (write_errors_file)
  .lock               held by a writer (writing): extract, compaction

Readers do not wait for the lock: they read the catalog in one transaction (see live_parts).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from ..errors import ImageError, PipelineError
from ..fsutil import atomic_write_text, exclusive_lock, fsync_path
from ..model import ModelInfo
from .catalog import Catalog
from .shards import (
    ShardData,
    ShardInfo,
    list_shards,
    next_shard_number,
    read_rows,
    read_shard,
    shard_damage,
    shard_info,
    shard_model,
    shard_name,
    write_shard,
)

LOG = logging.getLogger(__name__)
ERRORS_FILE = "errors.jsonl"
DEFAULT_SHARD_SIZE = 512  # images per shard: the unit of extraction's resume, and what compaction writes
DEFAULT_COMPACT_BELOW = 0.5  # shards whose share of live rows is under this are rewritten by compaction


@contextmanager
def writing(features_dir: Path) -> Iterator[Catalog]:
    """The folder's lock (BusyError for a second writer) and its catalog, opened for writing: what
    every writer (extract, compaction) holds."""
    with exclusive_lock(features_dir, "pipeline extract"), Catalog(features_dir) as catalog:
        yield catalog


def scrub(features_dir: Path) -> list[tuple[str, str]]:
    """Read every shard through its checksums; delete the damaged ones, so that the catalog forgets them
    and the next extract embeds their images again (the images are the source of truth). Returns each
    deleted shard's name and why. Runs under the folder's lock; what rebuild does before extracting."""
    damaged: list[tuple[str, str]] = []
    if not features_dir.is_dir():
        return damaged
    with writing(features_dir) as catalog:
        for path in list_shards(features_dir):
            why = shard_damage(path)
            if why is not None:
                LOG.warning("deleting a damaged shard, its images will be extracted again: %s", why)
                path.unlink()
                damaged.append((path.name, why))
        if damaged:
            fsync_path(features_dir)
            catalog.reconcile()
    return damaged


@dataclass(frozen=True)
class RowMeta:
    """The file facts stored with a feature row (Decoded has the same attributes)."""

    content_hash: str
    size: int
    mtime: float
    width: int = 0
    height: int = 0
    id: int | None = None  # an id given in advance (an addition folded in); None: the catalog's


class ShardRecords(Protocol):
    """Where a ShardWriter records each shard it writes: the catalog, or, in an extraction task, a
    stand-in that keeps the shard for the driver to record."""

    def record_shard(self, name: str, rows: Iterable, errors: Iterable) -> None: ...


class ShardWriter:
    """Accumulates rows and failures; writes a shard each time `shard_size` images are ready and
    records it at once. Shards are numbered from `number` (default: after the folder's last)."""

    def __init__(
        self,
        out: Path,
        model: ModelInfo,
        model_path: Path | str,
        shard_size: int,
        catalog: ShardRecords,
        *,
        number: int | None = None,
    ) -> None:
        self.out, self.model, self.model_path, self.shard_size = out, model, str(model_path), shard_size
        self.catalog = catalog
        self.number = next_shard_number(out) if number is None else number
        self.written: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self.features: list[np.ndarray] = []
        self.paths: list[str] = []
        self.metas: list = []
        self.errors: list[tuple] = []  # path, size, mtime, ctime, reason, transient

    def add(self, paths: list[str], features: np.ndarray, metas: list) -> list[tuple[str, int]]:
        """Queue rows (a shard never exceeds shard_size); returns (shard name, row) of each."""
        where: list[tuple[str, int]] = []
        start = 0
        while start < len(paths):
            take = min(self.shard_size - len(self.paths), len(paths) - start)
            rows = slice(start, start + take)
            where += [(shard_name(self.number), len(self.paths) + j) for j in range(take)]
            self.features.append(features[rows])
            self.paths += paths[rows]
            self.metas += metas[rows]
            start += take
            if len(self.paths) >= self.shard_size:
                self.flush()
        return where

    def row(self, name: str, row: int) -> np.ndarray:
        """A feature row already given to this writer, pending or written."""
        if name != shard_name(self.number):
            return read_rows(self.out / name, np.array([row]))[0]
        for block in self.features:
            if row < len(block):
                return block[row]
            row -= len(block)
        raise AssertionError(f"row {row} is not pending in {name}")

    def add_error(self, path: str, error: ImageError, stat: tuple[int | None, float | None, float | None]) -> None:
        self.errors.append((path, *stat, str(error), error.transient))

    def flush(self) -> None:
        if not self.paths and not self.errors:
            return
        features = np.concatenate(self.features) if self.features else np.zeros((0, self.model.dim), np.float32)
        data = ShardData(
            features,
            self.paths,
            [m.content_hash for m in self.metas],
            np.array([m.size for m in self.metas], np.int64),
            np.array([m.mtime for m in self.metas], np.float64),
            [e[0] for e in self.errors],
            [e[4] for e in self.errors],
            np.array([m.width for m in self.metas], np.uint32),
            np.array([m.height for m in self.metas], np.uint32),
        )
        name = shard_name(self.number)
        write_shard(self.out / name, data, self.model, self.model_path)
        self.catalog.record_shard(
            name,
            [
                (p, m.size, m.mtime, m.content_hash, r, getattr(m, "id", None))
                for r, (p, m) in enumerate(zip(self.paths, self.metas, strict=True))
            ],
            self.errors,
        )
        LOG.debug("wrote %s (%d images, %d failures)", name, len(self.paths), len(self.errors))
        self.written.append(name)
        self.number += 1
        self._reset()


def write_errors_file(features_dir: Path, catalog: Catalog, unreadable: list[tuple[str, str]]) -> int:
    """Rewrite errors.jsonl beside the shards: every folder that could not be listed and every current
    file that could not be used, and why. Returns the number of files."""
    failures = catalog.failures()
    folders = [
        (p, f"folder cannot be listed ({r}); the images recorded under it keep their state") for p, r in unreadable
    ]
    atomic_write_text(
        features_dir / ERRORS_FILE,
        "".join(json.dumps({"path": p, "reason": r}, ensure_ascii=False) + "\n" for p, r in folders + failures),
    )
    return len(failures)


def compact(
    features_dir: Path, below: float = DEFAULT_COMPACT_BELOW, shard_size: int = DEFAULT_SHARD_SIZE
) -> list[str]:
    """Rewrite the live rows of shards whose live fraction is under `below` into new shards, then
    delete those shards, under the folder's lock. Returns the retired names.

    Crash-safe: new shards are recorded before old ones are retired; a shard left behind with
    no live rows is retired by the next compaction, and never indexed meanwhile.
    """
    with writing(features_dir) as catalog:
        live = catalog.live_rows()
        victims = [
            name for name, n in sorted(catalog.shard_rows().items()) if len(live.get(name, ())) < below * n or n == 0
        ]
        if not victims:
            return []
        info, model_path = shard_model(features_dir / victims[0])
        writer = ShardWriter(features_dir, info, model_path, shard_size, catalog)
        for name in victims:
            rows = live.get(name, np.zeros(0, np.int64))
            if len(rows):
                d = read_shard(features_dir / name)
                w, h = (np.zeros(len(d.paths), np.uint32) if c is None else c for c in (d.widths, d.heights))
                writer.add(
                    [d.paths[r] for r in rows],
                    d.features[rows],
                    [RowMeta(d.hashes[r], int(d.sizes[r]), float(d.mtimes[r]), int(w[r]), int(h[r])) for r in rows],
                )
        writer.flush()
        catalog.retire(victims)
    LOG.info(
        "compacted %d shard(s) with under %.0f%% live rows into %d", len(victims), below * 100, len(writer.written)
    )
    return victims


class Lookup:
    """Read-only look-ups of a features folder's live images, by content and by path, on one catalog connection
    opened on first use and kept (opening checks every page): what an addition asks before it is stored."""

    def __init__(self, features_dir: Path) -> None:
        self.dir = features_dir
        self._catalog: Catalog | None = None
        self._lock = threading.Lock()  # a service asks from several threads

    def _open(self) -> Catalog | None:
        if self._catalog is None and Catalog.exists(self.dir):
            self._catalog = Catalog(self.dir, readonly=True, shared=True)
        return self._catalog

    def with_hash(self, content_hash: str) -> tuple[int, str] | None:
        """(id, path) of a live image with these bytes."""
        with self._lock:
            catalog = self._open()
            return None if catalog is None else catalog.live_with_hash(content_hash)

    def holds(self, path: str) -> bool:
        with self._lock:
            catalog = self._open()
            return catalog is not None and bool(catalog.live_of([path]))

    def max_id(self) -> int:
        """The highest id the catalog ever gave (-1: none, or no catalog)."""
        with self._lock:
            catalog = self._open()
            return -1 if catalog is None else catalog.max_id()

    def close(self) -> None:
        with self._lock:
            if self._catalog is not None:
                self._catalog.close()


class LiveParts(NamedTuple):
    """What a features folder holds to index (live_parts)."""

    infos: list[ShardInfo]  # every shard
    parts: list[tuple[ShardInfo, np.ndarray]]  # each shard with rows to index, and those rows
    ids: np.ndarray  # the id of each of those rows, in order
    digest: str | None  # the catalog's live digest; None without a catalog
    roots: list[str]  # the folders the collection was scanned from (Catalog.roots)


def live_parts(features_dir: Path) -> LiveParts:
    """Every shard, the rows to index per shard: the catalog's live rows (deleted, changed and
    moved-away images left out), or every row when the folder has no catalog; the id of each of
    those rows, in the same order (the catalog's stable ids, else positions); the catalog's live digest;
    and the roots it records, read in the same opening of the catalog.

    An extract may be writing meanwhile (build-index does not wait for it): the live rows and the
    digest are read in one transaction and before the shards are listed, so every shard they name
    is listed and whatever the extract records later is wholly left out (the digest says so, and the
    next rebuild builds again).
    """
    live = digest = None
    roots: list[str] = []
    if Catalog.exists(features_dir):
        with Catalog(features_dir, readonly=True) as catalog:
            live, digest = catalog.live_snapshot()
            roots = catalog.roots()
    infos = [shard_info(p) for p in list_shards(features_dir)]
    if live is None:
        parts = [(i, np.arange(i.count)) for i in infos if i.count]
        return LiveParts(infos, parts, np.arange(sum(len(rows) for _, rows in parts)), None, roots)
    lost = sorted(set(live) - {i.path.name for i in infos})
    if lost:
        raise PipelineError(
            f"the catalog of {features_dir} records images in {lost[0]}, which is missing; "
            "run `pipeline extract` to reconcile it"
        )
    used = [i for i in infos if i.path.name in live]
    ids = np.concatenate([live[i.path.name][1] for i in used]) if used else np.zeros(0, np.int64)
    return LiveParts(infos, [(i, live[i.path.name][0]) for i in used], ids, digest, roots)


def live_digest(features_dir: Path) -> str | None:
    """The catalog's digest of which contents are live under which paths (equal digests, equal
    indexes); None when the folder has no catalog."""
    if not Catalog.exists(features_dir):
        return None
    with Catalog(features_dir, readonly=True) as catalog:
        return catalog.live_digest()


def exact_features(features_dir: Path, shards: list[dict], dim: int, built: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Exact features by id, read from the shards of the features folder an index was built from
    (for compressed codes): its catalog says where each stable id's row lives now (compaction may
    have moved it since the build; the id still names the same file and content). shards, dim:
    the index meta's; built: the index version (named in errors)."""
    # without a catalog, ids count every row of the index's shards in order
    catalog = Catalog(features_dir, readonly=True) if Catalog.exists(features_dir) else None
    starts = np.cumsum([0] + [s["count"] for s in shards])

    def vectors(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if catalog is None:
            s = np.searchsorted(starts, ids, side="right") - 1
            where = {int(i): (shards[j]["name"], int(i - starts[j])) for i, j in zip(ids, s, strict=True)}
        else:
            where = catalog.live_places(ids)
        if len(where) < len(set(ids.tolist())):
            raise PipelineError(
                f"the features behind {built} changed since it was built (some of its "
                "images are no longer live): rebuild the index to re-rank its compressed codes"
            )
        out = np.empty((len(ids), dim), np.float32)
        shard_of = np.array([where[int(i)][0] for i in ids])
        row_of = np.array([where[int(i)][1] for i in ids], np.int64)
        for shard in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == shard)
            order = np.argsort(row_of[sel])
            path = features_dir / str(shard)
            if not path.is_file():
                raise PipelineError(
                    f"the features behind {built} changed since it was built ({path} is "
                    "gone): rebuild the index to re-rank its compressed codes"
                )
            out[sel[order]] = read_rows(path, row_of[sel][order])
        return out

    return vectors

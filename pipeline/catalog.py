"""The catalog: a SQLite record, beside the shards, of every image and where its feature lives.

It is what makes extraction incremental: a file whose size and mtime are unchanged is never
decoded again, a changed one is re-extracted, a deleted one is marked gone, and a moved one
(same content hash) keeps its feature. It is derived state: every shard also carries its own
paths, hashes, sizes and mtimes, so a shard written just before a crash (not yet recorded
here) is imported on the next run, and a lost catalog is rebuilt from the shards.

Tables:
  images(path PK, size, mtime, hash, shard, row, status 'live'|'failed'|'gone', error)
  shards(name PK, rows, state 'active'|'retired')   retired = compacted away, file to delete
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import PipelineError, write_error
from .shards import list_shards, read_shard

LOG = logging.getLogger(__name__)
CATALOG_FILE = "catalog.sqlite"


@dataclass(frozen=True)
class Entry:
    size: int | None
    mtime: float | None
    hash: str | None
    status: str


def _catalog_error(path: Path, exc: sqlite3.Error) -> PipelineError:
    """The one-line message for a catalog that cannot be opened: damaged, or a full disk, or unwritable."""
    if getattr(exc, "sqlite_errorname", None) not in (None, "SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return write_error(path, exc, "`pipeline extract`")
    return PipelineError(f"{path} is damaged ({exc}): delete it (and any {CATALOG_FILE}-wal/-shm beside it) "
                         "and rerun `pipeline extract`, which rebuilds it from the shards")


class Catalog:
    """Open (creating if needed) the catalog of a features folder. Use under the folder's lock."""

    def __init__(self, features_dir: Path) -> None:
        self.dir = Path(features_dir)
        path = self.dir / CATALOG_FILE
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.dir, exc, "`pipeline extract`") from None
        try:
            self.db = sqlite3.connect(path)
            # Damage is found here, once (under 0.5 s per million images), not midway through a run.
            problems = [row for (row,) in self.db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(problems[0])
            self.db.execute("PRAGMA journal_mode=WAL")  # a killed writer loses at most its open transaction
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS images (
                    path TEXT PRIMARY KEY, size INTEGER, mtime REAL, hash TEXT,
                    shard TEXT, row INTEGER, status TEXT NOT NULL, error TEXT);
                CREATE INDEX IF NOT EXISTS images_hash ON images(hash);
                CREATE INDEX IF NOT EXISTS images_shard ON images(shard);
                CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, rows INTEGER NOT NULL, state TEXT NOT NULL);
                """
            )
        except sqlite3.Error as exc:
            raise _catalog_error(path, exc) from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- recovery

    def reconcile(self) -> int:
        """Finish what a killed run left: delete retired shard files, import shards not recorded yet,
        forget shards whose files were removed.

        Returns the number of shards imported.
        """
        for (name,) in self.db.execute("SELECT name FROM shards WHERE state = 'retired'").fetchall():
            (self.dir / name).unlink(missing_ok=True)
            with self.db:
                self.db.execute("DELETE FROM shards WHERE name = ?", (name,))
        recorded = {name for (name,) in self.db.execute("SELECT name FROM shards")}
        for name in sorted(recorded):
            if not (self.dir / name).exists():  # removed by hand: its images must be extracted again
                LOG.warning("catalog: shard %s is missing; its images will be extracted again", name)
                with self.db:
                    self.db.execute("DELETE FROM images WHERE shard = ?", (name,))
                    self.db.execute("DELETE FROM shards WHERE name = ?", (name,))
        imported = 0
        for path in list_shards(self.dir):
            if path.name in recorded:
                continue
            data = read_shard(path, features=False)
            rows = [(p, int(s), float(m), h, r) for r, (p, s, m, h) in
                    enumerate(zip(data.paths, data.sizes, data.mtimes, data.hashes))]
            errors = [(p, None, None, reason) for p, reason in zip(data.error_paths, data.error_reasons)]
            self.record_shard(path.name, rows, errors)
            imported += 1
        if imported:
            LOG.info("catalog: imported %d shard(s) written by an interrupted run", imported)
        return imported

    # ---------------------------------------------------------------- reading

    def entries(self) -> dict[str, Entry]:
        return {p: Entry(s, m, h, st) for p, s, m, h, st in
                self.db.execute("SELECT path, size, mtime, hash, status FROM images")}

    def live_by_hash(self) -> dict[str, tuple[str, int, str]]:
        """content hash -> (shard, row, path) of a live feature with that content."""
        out: dict[str, tuple[str, int, str]] = {}
        for h, shard, row, path in self.db.execute(
                "SELECT hash, shard, row, path FROM images WHERE status = 'live' ORDER BY shard, row"):
            out.setdefault(h, (shard, row, path))
        return out

    def live_rows(self) -> dict[str, np.ndarray]:
        """shard name -> sorted rows that hold live features (the rows an index should contain)."""
        rows: dict[str, list[int]] = {}
        for shard, row in self.db.execute("SELECT shard, row FROM images WHERE status = 'live'"):
            rows.setdefault(shard, []).append(row)
        return {s: np.sort(np.array(r, dtype=np.int64)) for s, r in rows.items()}

    def shard_rows(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, rows FROM shards WHERE state = 'active'"))

    def failures(self) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT path, error FROM images WHERE status = 'failed' ORDER BY path"))

    def live_digest(self) -> str:
        """A digest of which contents are live under which paths: equal digests, equal indexes."""
        import hashlib

        h = hashlib.sha256()
        for path, content in self.db.execute("SELECT path, hash FROM images WHERE status = 'live' ORDER BY path"):
            h.update(f"{path}\0{content}\n".encode())
        return h.hexdigest()

    # ---------------------------------------------------------------- writing

    def record_shard(self, name: str, rows: Iterable[tuple[str, int, float, str, int]],
                     errors: Iterable[tuple[str, int | None, float | None, str]]) -> None:
        """In one transaction: the shard, its live rows (path, size, mtime, hash, row) and failures."""
        rows, errors = list(rows), list(errors)
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, 'active')", (name, len(rows)))
            self.db.executemany(
                "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, 'live', NULL)",
                [(p, s, m, h, name, r) for p, s, m, h, r in rows])
            self.db.executemany(
                "INSERT OR REPLACE INTO images VALUES (?, ?, ?, NULL, NULL, NULL, 'failed', ?)", errors)

    def mark_gone(self, paths: Iterable[str]) -> None:
        with self.db:
            self.db.executemany("UPDATE images SET status = 'gone', shard = NULL, row = NULL, error = NULL "
                                "WHERE path = ?", [(p,) for p in paths])

    def retire(self, names: list[str]) -> None:
        """Compaction: these shards' live rows were copied to new shards; delete them now (or, after a
        crash, in the next reconcile)."""
        with self.db:
            self.db.executemany("UPDATE shards SET state = 'retired' WHERE name = ?", [(n,) for n in names])
        self.reconcile()

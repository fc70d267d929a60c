"""The catalog: a SQLite record, beside the shards, of every image and where its feature lives.

It is what makes extraction incremental: a file whose size and mtime are unchanged is never
decoded again, a changed one is re-extracted, a deleted one is marked gone, and a moved one
(same content hash) keeps its feature. It is derived state: every shard also carries its own
paths, hashes, sizes and mtimes, so a shard written just before a crash (not yet recorded
here) is imported on the next run, and a lost catalog is rebuilt from the shards.

Tables:
  images(path PK, size, mtime, hash, shard, row, status 'live'|'failed'|'gone', error,
         ctime, transient, attempts, retry_run,      these four: failures only (see record_shard)
         id)                                         live rows: the stable id the index stores
  shards(name PK, rows, state 'active'|'retired')   retired = compacted away, file to delete
  counters(name PK, value)                           'runs': extract runs so far (the retry clock);
                                                     'next_id': the next image id (never reused)
"""

from __future__ import annotations

import itertools
import logging
import operator
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .shards import list_shards, read_shard

LOG = logging.getLogger(__name__)
CATALOG_FILE = "catalog.sqlite"
# Added after the first release: catalogs without them get them (ALTER TABLE) when opened.
FAILURE_COLUMNS = {"ctime": "REAL", "transient": "INTEGER", "attempts": "INTEGER NOT NULL DEFAULT 0",
                   "retry_run": "INTEGER"}


@dataclass(frozen=True)
class Entry:
    size: int | None
    mtime: float | None
    hash: str | None
    status: str
    ctime: float | None = None  # failures: with size and mtime, tells a new version of the file (or a chmod)
    transient: bool | None = None  # failures: ImageError.transient (None: imported from a shard, unknown)
    attempts: int = 0  # failures: runs in a row that failed on this file
    retry_run: int | None = None  # transient failures: the run from which it is tried again


class Catalog:
    """Open (creating if needed) the catalog of a features folder. Use under the folder's lock."""

    def __init__(self, features_dir: Path) -> None:
        self.dir = Path(features_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.dir / CATALOG_FILE)
        self.db.execute("PRAGMA journal_mode=WAL")  # a killed writer loses at most its open transaction
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS images (
                path TEXT PRIMARY KEY, size INTEGER, mtime REAL, hash TEXT,
                shard TEXT, row INTEGER, status TEXT NOT NULL, error TEXT);
            CREATE INDEX IF NOT EXISTS images_hash ON images(hash);
            CREATE INDEX IF NOT EXISTS images_shard ON images(shard);
            CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, rows INTEGER NOT NULL, state TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
            """
        )
        have = {row[1] for row in self.db.execute("PRAGMA table_info(images)")}
        with self.db:
            for column, decl in FAILURE_COLUMNS.items():
                if column not in have:
                    self.db.execute(f"ALTER TABLE images ADD COLUMN {column} {decl}")
            if "id" not in have:  # catalogs older than stable ids: number their rows once
                self.db.execute("ALTER TABLE images ADD COLUMN id INTEGER")
                self.db.execute("UPDATE images SET id = rowid WHERE status = 'live'")
                self.db.execute("INSERT OR REPLACE INTO counters "
                                "SELECT 'next_id', COALESCE(MAX(rowid), 0) + 1 FROM images")
            self.db.execute("CREATE INDEX IF NOT EXISTS images_id ON images(id)")
        self.run = self._counter("runs")

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
            errors = [(p, None, None, None, reason, None) for p, reason in zip(data.error_paths, data.error_reasons)]
            self.record_shard(path.name, rows, errors)
            imported += 1
        if imported:
            LOG.info("catalog: imported %d shard(s) written by an interrupted run", imported)
        return imported

    # ---------------------------------------------------------------- reading

    def entries(self) -> dict[str, Entry]:
        return {p: Entry(s, m, h, st, c, None if t is None else bool(t), a, r) for p, s, m, h, st, c, t, a, r in
                self.db.execute("SELECT path, size, mtime, hash, status, ctime, transient, attempts, retry_run "
                                "FROM images")}

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

    def live_ids(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """shard name -> (sorted rows that hold live features, the stable id of each row)."""
        cur = self.db.execute("SELECT shard, row, id FROM images WHERE status = 'live' ORDER BY shard, row")
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for shard, group in itertools.groupby(cur, key=operator.itemgetter(0)):
            rows_ids = np.array([(r, i) for _, r, i in group], np.int64)
            out[shard] = (rows_ids[:, 0], rows_ids[:, 1])
        return out

    def live_snapshot(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
        """live_ids() and live_digest() read in one transaction: rows recorded meanwhile by a running
        extract are in both or in neither."""
        self.db.execute("BEGIN")
        try:
            return self.live_ids(), self.live_digest()
        finally:
            self.db.execute("COMMIT")

    # ---------------------------------------------------------------- writing

    def _counter(self, name: str) -> int:
        row = self.db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    def begin_run(self) -> int:
        """Count one more extract run (the clock of retry back-off) and return its number."""
        with self.db:
            self.db.execute("INSERT INTO counters VALUES ('runs', 1) "
                            "ON CONFLICT(name) DO UPDATE SET value = value + 1")
        self.run = self._counter("runs")
        return self.run

    def record_shard(self, name: str, rows: Iterable[tuple[str, int, float, str, int]],
                     errors: Iterable[tuple[str, int | None, float | None, float | None, str, bool | None]]) -> None:
        """In one transaction: the shard, its live rows (path, size, mtime, hash, row) and failures
        (path, size, mtime, ctime, reason, transient).

        A failure counts its attempts (failed runs in a row); a transient one is tried again
        `2 ** (attempts - 1)` runs after this one: the next run, then 2, 4, 8... runs later.
        A live row keeps the id of its path if that path is live with the same content (compaction,
        a touched but unchanged file); any other row gets a new id, so an id always names one
        path with one feature and the index can be updated by ids.
        """
        rows, errors = list(rows), list(errors)
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, 'active')", (name, len(rows)))
            self.db.executemany(
                "INSERT OR REPLACE INTO images (path, size, mtime, hash, shard, row, status, id) "
                "SELECT :p, :s, :m, :h, :shard, :r, 'live', "
                "       (SELECT id FROM images WHERE path = :p AND hash = :h AND status = 'live')",
                [{"p": p, "s": s, "m": m, "h": h, "shard": name, "r": r} for p, s, m, h, r in rows])
            fresh = [r for (r,) in self.db.execute(
                "SELECT rowid FROM images WHERE shard = ? AND status = 'live' AND id IS NULL ORDER BY row", (name,))]
            first = self._counter("next_id")
            self.db.executemany("UPDATE images SET id = ? WHERE rowid = ?", enumerate(fresh, first))
            self.db.execute("UPDATE counters SET value = ? WHERE name = 'next_id'", (first + len(fresh),))
            self.db.executemany(
                "INSERT OR REPLACE INTO images "
                "(path, size, mtime, ctime, status, error, transient, attempts, retry_run) "
                "SELECT :path, :size, :mtime, :ctime, 'failed', :error, :transient, a, "
                "       CASE WHEN :transient THEN :run + (1 << (a - 1)) END "
                "FROM (SELECT 1 + COALESCE((SELECT attempts FROM images WHERE path = :path AND status = 'failed'), 0)"
                "      AS a)",
                [{"path": p, "size": s, "mtime": m, "ctime": c, "error": e, "transient": t, "run": self.run}
                 for p, s, m, c, e, t in errors])

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

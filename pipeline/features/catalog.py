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

While an extract compares the folders with this record, TEMP tables (private to its connection, in
SQLite's temporary file, dropped when it closes) hold the comparison: scan(path PK, size, mtime,
ctime, kind), missing(path PK, moved), scopes and unseen(folder, lo, hi). Memory does not grow
with the number of files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, groupby
from operator import itemgetter
from pathlib import Path

import numpy as np

from ..errors import PipelineError, write_error
from .shards import list_shards, read_shard

LOG = logging.getLogger(__name__)
CATALOG_FILE = "catalog.sqlite"
# Added after the first release: catalogs without them get them (ALTER TABLE) when opened.
FAILURE_COLUMNS = {
    "ctime": "REAL",
    "transient": "INTEGER",
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "retry_run": "INTEGER",
}


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


def _catalog_error(path: Path, exc: sqlite3.Error) -> PipelineError:
    """The one-line message for a catalog that cannot be opened: damaged, or a full disk, or unwritable."""
    if getattr(exc, "sqlite_errorname", None) not in (None, "SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return write_error(path, exc, "`pipeline extract`")
    return PipelineError(
        f"{path} is damaged ({exc}): delete it (and any {CATALOG_FILE}-wal/-shm beside it) "
        "and rerun `pipeline extract`, which rebuilds it from the shards"
    )


def catalog_damage(features_dir: Path) -> str | None:
    """Why a features folder's catalog is damaged, by SQLite's full integrity check (every page and index;
    Catalog() runs the quick one), or None when it is sound or absent."""
    path = Path(features_dir) / CATALOG_FILE
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            problems = [row for (row,) in db.execute("PRAGMA integrity_check")]
        finally:
            db.close()
    except sqlite3.Error as exc:
        return str(_catalog_error(path, exc))
    if problems == ["ok"]:
        return None
    return str(_catalog_error(path, sqlite3.DatabaseError(problems[0])))


class Catalog:
    """Open (creating if needed) the catalog of a features folder. Use under the folder's lock.

    readonly: for readers of an existing catalog (the index), which need not wait for the lock: it
    is opened read-only, nothing is created or migrated. shared: usable from any thread (one at a time: the
    caller serialises)."""

    def __init__(self, features_dir: Path, *, readonly: bool = False, shared: bool = False) -> None:
        self.dir = Path(features_dir)
        path = self.dir / CATALOG_FILE
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.dir, exc, "`pipeline extract`") from None
        try:
            self.db = (
                sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=not shared)
                if readonly
                else sqlite3.connect(path, check_same_thread=not shared)
            )
            # Damage is found here, once (under 0.5 s per million images), not midway through a run.
            problems = [row for (row,) in self.db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(problems[0])
            if readonly:
                if "id" not in {row[1] for row in self.db.execute("PRAGMA table_info(images)")}:
                    self.db.close()
                    raise PipelineError(
                        f"{path} is older than stable image ids: run `pipeline extract` once to upgrade it"
                    )
                return
            self.db.execute("PRAGMA journal_mode=WAL")  # a killed writer loses at most its open transaction
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS images (
                    path TEXT PRIMARY KEY, size INTEGER, mtime REAL, hash TEXT,
                    shard TEXT, row INTEGER, status TEXT NOT NULL, error TEXT);
                CREATE INDEX IF NOT EXISTS images_hash ON images(hash);
                CREATE INDEX IF NOT EXISTS images_shard ON images(shard);
                CREATE INDEX IF NOT EXISTS images_size ON images(size);
                CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, rows INTEGER NOT NULL, state TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS roots (path TEXT PRIMARY KEY);
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
                    self.db.execute(
                        "INSERT OR REPLACE INTO counters SELECT 'next_id', COALESCE(MAX(rowid) + 1, 0) FROM images"
                    )
                self.db.execute("CREATE INDEX IF NOT EXISTS images_id ON images(id)")
            self.run = self._counter("runs")
        except sqlite3.Error as exc:
            raise _catalog_error(path, exc) from None

    @staticmethod
    def exists(features_dir: Path) -> bool:
        """Whether the folder has a catalog (a folder of shards alone is read without one)."""
        return (Path(features_dir) / CATALOG_FILE).exists()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
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
            rows = [
                (p, int(s), float(m), h, r)
                for r, (p, s, m, h) in enumerate(zip(data.paths, data.sizes, data.mtimes, data.hashes, strict=True))
            ]
            errors = [
                (p, None, None, None, reason, None)
                for p, reason in zip(data.error_paths, data.error_reasons, strict=True)
            ]
            self.record_shard(path.name, rows, errors)
            imported += 1
        if imported:
            LOG.info("catalog: imported %d shard(s) written by an interrupted run", imported)
        return imported

    # ---------------------------------------------------------------- reading

    def entries(self) -> dict[str, Entry]:
        return {
            p: Entry(s, m, h, st, c, None if t is None else bool(t), a, r)
            for p, s, m, h, st, c, t, a, r in self.db.execute(
                "SELECT path, size, mtime, hash, status, ctime, transient, attempts, retry_run FROM images"
            )
        }

    def live_feature(self, content_hash: str) -> tuple[str, int, str] | None:
        """(shard, row, path) of a live feature with this content, if any: an indexed look-up, so no
        run holds a map of every hash."""
        return self.db.execute(
            "SELECT shard, row, path FROM images WHERE hash = ? AND status = 'live' ORDER BY shard, row LIMIT 1",
            (content_hash,),
        ).fetchone()

    def live_with_hash(self, content_hash: str) -> tuple[int, str] | None:
        """(id, path) of a live image with this content, if any (an indexed look-up)."""
        row = self.db.execute(
            "SELECT id, path FROM images WHERE hash = ? AND status = 'live' ORDER BY id LIMIT 1", (content_hash,)
        ).fetchone()
        return None if row is None else (int(row[0]), row[1])

    def max_id(self) -> int:
        """The highest id ever given (gone images keep theirs), -1 for none."""
        row = self.db.execute("SELECT MAX(id) FROM images").fetchone()
        return -1 if row[0] is None else int(row[0])

    def live_features_of_size(self, sizes: Iterable[int], limit: int) -> dict[str, tuple[str, int, str]]:
        """content hash -> live_feature(hash) of the live contents whose files have one of these sizes
        (at most `limit` rows: uncompressed images of one shape all have one size): what a Ray task may
        reuse, found before its files are read (equal contents have equal sizes)."""
        rows = self.db.execute(
            "SELECT hash, shard, row, path FROM images WHERE status = 'live' AND size IN "
            "(SELECT value FROM json_each(?)) ORDER BY shard, row LIMIT ?",
            (json.dumps(sorted(set(sizes))), limit),
        )
        out: dict[str, tuple[str, int, str]] = {}
        for h, shard, row, path in rows:
            out.setdefault(h, (shard, row, path))
        return out

    def live_rows(self) -> dict[str, np.ndarray]:
        """shard name -> sorted rows that hold live features (the rows an index should contain).
        Read shard by shard: 8 bytes per live row in the end, no Python object per row."""
        rows = self.db.execute("SELECT shard, row FROM images WHERE status = 'live' ORDER BY shard, row")
        return {s: np.fromiter((r for _, r in group), np.int64) for s, group in groupby(rows, key=itemgetter(0))}

    def live_places(self, ids: np.ndarray) -> dict[int, tuple[str, int]]:
        """id -> (shard, row) of the live images among these stable ids: where an index's row is now."""
        where: dict[int, tuple[str, int]] = {}
        try:
            for start in range(0, len(ids), 500):
                chunk = [int(i) for i in ids[start : start + 500]]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT id, shard, row FROM images WHERE status = 'live' AND id IN ({marks})"
                rows = self.db.execute(query, chunk)
                where.update((i, (s, r)) for i, s, r in rows)
        except sqlite3.Error as exc:
            raise PipelineError(f"cannot read {self.dir / CATALOG_FILE} ({exc}); rerun `pipeline extract`") from None
        return where

    def live_of(self, paths: Sequence[str]) -> dict[str, tuple[int, str]]:
        """path -> (id, content hash) of the live images among these paths."""
        out: dict[str, tuple[int, str]] = {}
        for start in range(0, len(paths), 500):
            chunk = list(paths[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT path, id, hash FROM images WHERE status = 'live' AND path IN ({marks})", chunk
            )
            out.update((p, (i, h)) for p, i, h in rows)
        return out

    def live_paths_under(self, folder: str) -> list[str]:
        """Every live path under `folder`, sorted."""
        return [
            p
            for on in _EITHER_OF_UNDER
            for (p,) in self.db.execute(
                f"SELECT path FROM images WHERE status = 'live' AND {on.format(p='path', f=':')} ORDER BY path",
                _folder_params(folder),
            )
        ]

    def shard_rows(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, rows FROM shards WHERE state = 'active'"))

    def failures(self) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT path, error FROM images WHERE status = 'failed' ORDER BY path"))

    def live_digest(self) -> str:
        """A digest of which contents are live under which paths: equal digests, equal indexes."""
        return _ids_digest(
            np.fromiter(chain.from_iterable(self.db.execute("SELECT id FROM images WHERE status = 'live'")), np.int64)
        )

    def live_ids(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """shard name -> (sorted rows that hold live features, the stable id of each row). Read as two
        integers a row (shard number and row in one) and grouped by numpy, not by Python objects
        per row. Every live row's shard is in `shards` (record_shard writes both at once)."""
        names = dict(self.db.execute("SELECT rowid, name FROM shards"))
        key_id = np.fromiter(
            chain.from_iterable(
                self.db.execute(
                    "SELECT (s.rowid << 32) | i.row, i.id FROM images AS i JOIN shards AS s ON s.name = i.shard "
                    "WHERE i.status = 'live'"
                )
            ),
            np.int64,
        ).reshape(-1, 2)
        key_id = key_id[np.argsort(key_id[:, 0])]
        shard = key_id[:, 0] >> 32
        cuts = np.flatnonzero(np.diff(shard)) + 1
        keys, ids_of = np.split(key_id[:, 0], cuts), np.split(key_id[:, 1], cuts)
        return {
            names[int(key[0] >> 32)]: (key & 0xFFFFFFFF, ids) for key, ids in zip(keys, ids_of, strict=True) if len(key)
        }

    def add_roots(self, roots: Iterable[str]) -> None:
        """Record folders the collection is scanned from (absolute): a service reads thumbnails only from
        files that resolve inside one of them."""
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO roots VALUES (?)", ((r,) for r in roots))

    def roots(self) -> list[str]:
        """Every folder the collection was ever scanned from, sorted ([] for catalogs older than the record)."""
        try:
            return [r for (r,) in self.db.execute("SELECT path FROM roots ORDER BY path")]
        except sqlite3.OperationalError:  # no such table: a catalog older than roots, opened read-only
            return []

    def live_snapshot(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
        """live_ids() (read in one transaction: rows recorded meanwhile by a running extract are wholly
        left out) and the digest of those very ids, equal to live_digest() at that moment."""
        self.db.execute("BEGIN")
        try:
            live = self.live_ids()
        finally:
            self.db.execute("COMMIT")
        return live, _ids_digest(np.concatenate([ids for _, ids in live.values()] or [np.zeros(0, np.int64)]))

    # ---------------------------------------------------------------- writing

    def _counter(self, name: str) -> int:
        row = self.db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    def begin_run(self) -> int:
        """Count one more extract run (the clock of retry back-off) and return its number."""
        with self.db:
            self.db.execute("INSERT INTO counters VALUES ('runs', 1) ON CONFLICT(name) DO UPDATE SET value = value + 1")
        self.run = self._counter("runs")
        return self.run

    def record_shard(
        self,
        name: str,
        rows: Iterable[tuple],
        errors: Iterable[tuple[str, int | None, float | None, float | None, str, bool | None]],
    ) -> None:
        """In one transaction: the shard, its live rows (path, size, mtime, hash, row[, id given in advance: an
        addition folded in]) and failures (path, size, mtime, ctime, reason, transient).

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
                "       COALESCE(:id, (SELECT id FROM images WHERE path = :p AND hash = :h AND status = 'live'))",
                [
                    {"p": row[0], "s": row[1], "m": row[2], "h": row[3], "shard": name, "r": row[4], "id": _given(row)}
                    for row in rows
                ],
            )
            fresh = [
                r
                for (r,) in self.db.execute(
                    "SELECT rowid FROM images WHERE shard = ? AND status = 'live' AND id IS NULL ORDER BY row", (name,)
                )
            ]
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
                [
                    {"path": p, "size": s, "mtime": m, "ctime": c, "error": e, "transient": t, "run": self.run}
                    for p, s, m, c, e, t in errors
                ],
            )

    def mark_gone(self, paths: Iterable[str]) -> None:
        with self.db:
            self.db.executemany(
                "UPDATE images SET status = 'gone', shard = NULL, row = NULL, error = NULL WHERE path = ?",
                [(p,) for p in paths],
            )

    def retire(self, names: list[str]) -> None:
        """Compaction: these shards' live rows were copied to new shards; delete them now (or, after a
        crash, in the next reconcile)."""
        with self.db:
            self.db.executemany("UPDATE shards SET state = 'retired' WHERE name = ?", [(n,) for n in names])
        self.reconcile()

    # ---------------------------------------------------------------- comparing the folders with the record

    def begin_scan(self) -> None:
        """Start a comparison: empty TEMP tables for the files found now."""
        self.db.executescript(
            """
            DROP TABLE IF EXISTS temp.scan;
            DROP TABLE IF EXISTS temp.missing;
            CREATE TEMP TABLE scan (path TEXT PRIMARY KEY, size INTEGER, mtime REAL, ctime REAL,
                                    kind TEXT NOT NULL DEFAULT 'new');
            CREATE TEMP TABLE missing (path TEXT PRIMARY KEY, moved INTEGER NOT NULL DEFAULT 0);
            """
        )
        for table in ("scopes", "unseen"):
            self.db.execute(f"DROP TABLE IF EXISTS temp.{table}")
            self.db.execute(f"CREATE TEMP TABLE {table} (folder TEXT NOT NULL, lo TEXT NOT NULL, hi TEXT NOT NULL)")

    def add_scanned(self, files: Iterable[tuple[str, int | None, float | None, float | None]]) -> None:
        """Files found: (path, size, mtime, ctime), None where stat failed. A path found twice counts once."""
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO scan (path, size, mtime, ctime) VALUES (?, ?, ?, ?)", files)

    def scanned(self) -> int:
        return self.db.execute("SELECT count(*) FROM scan").fetchone()[0]

    def compare_scan(
        self, scopes: list[str], unseen: list[str], *, run: int, retry_failed: bool, max_attempts: int
    ) -> dict[str, int]:
        """Give every scanned file its kind and list the recorded files the scan did not find. Returns
        the count of each kind ('new', 'changed', 'retried', 'unchanged') and of 'missing'.

        new: never recorded, or recorded as gone. changed: live, and its size or mtime differ (or it
        vanished before its stat). retried: failed before and tried again now: `retry_failed`, or its
        file changed (size, mtime or ctime), or its kind of failure is unknown (imported from a shard),
        or it is transient, its back-off is over (`run`) and it has attempts left. Everything else is
        unchanged. missing: recorded (live or failed) under a folder of `scopes`, not under one of
        `unseen` (folders that could not be listed: what they hold is unknown), and not found.
        """
        with self.db:
            for table, folders in (("scopes", scopes), ("unseen", unseen)):
                self.db.execute(f"DELETE FROM {table}")
                self.db.executemany(f"INSERT INTO {table} VALUES (?, ?, ?)", map(_folder_range, folders))
            self.db.execute(
                """
                UPDATE scan SET kind = CASE
                    WHEN i.status = 'gone' THEN 'new'
                    WHEN i.status = 'failed' THEN
                        CASE WHEN :retry_failed OR i.size IS NOT scan.size OR i.mtime IS NOT scan.mtime
                                  OR i.ctime IS NOT scan.ctime OR i.transient IS NULL
                                  OR (i.transient AND i.attempts < :max_attempts AND :run >= i.retry_run)
                             THEN 'retried' ELSE 'unchanged' END
                    WHEN scan.size IS NOT NULL AND i.size = scan.size AND i.mtime = scan.mtime THEN 'unchanged'
                    ELSE 'changed' END
                FROM images AS i WHERE i.path = scan.path
                """,
                {"retry_failed": retry_failed, "max_attempts": max_attempts, "run": run},
            )
            for on in _EITHER_OF_UNDER:
                self.db.execute(
                    f"""
                    INSERT OR IGNORE INTO missing (path)
                    SELECT i.path FROM scopes AS s JOIN images AS i ON {on.format(p="i.path", f="s.")}
                    WHERE i.status != 'gone' AND NOT EXISTS (SELECT 1 FROM scan WHERE scan.path = i.path)
                      AND NOT EXISTS (SELECT 1 FROM unseen AS u WHERE {_UNDER.format(p="i.path", f="u.")})
                    """
                )
        counts = dict(self.db.execute("SELECT kind, count(*) FROM scan GROUP BY kind"))
        counts["missing"] = self.db.execute("SELECT count(*) FROM missing").fetchone()[0]
        return {k: counts.get(k, 0) for k in ("new", "changed", "retried", "unchanged", "missing")}

    def scanned_under(self, folder: str) -> bool:
        """Whether the scan found a file under `folder` (or the file `folder` itself)."""
        return (
            self.db.execute(
                f"SELECT 1 FROM scan WHERE {_UNDER.format(p='path', f=':')} LIMIT 1", _folder_params(folder)
            ).fetchone()
            is not None
        )

    def live_under(self, folder: str) -> int:
        """How many live images are recorded under `folder`, leaving out the unseen folders of the
        last compare_scan()."""
        return sum(
            self.db.execute(
                f"""SELECT count(*) FROM images AS i WHERE i.status = 'live' AND {on.format(p="i.path", f=":")}
                AND NOT EXISTS (SELECT 1 FROM unseen AS u WHERE {_UNDER.format(p="i.path", f="u.")})""",
                _folder_params(folder),
            ).fetchone()[0]
            for on in _EITHER_OF_UNDER
        )

    def scanned_todo(self, chunk: int) -> Iterator[list[tuple[str, str, int | None, float | None, float | None]]]:
        """The scanned files to decode (every kind but 'unchanged'), in path order, `chunk` at a time:
        (path, kind, size, mtime, ctime). Each chunk is its own query, so writes may come in between."""
        last = ""
        while rows := self.db.execute(
            "SELECT path, kind, size, mtime, ctime FROM scan WHERE kind != 'unchanged' "
            "AND path > ? ORDER BY path LIMIT ?",
            (last, chunk),
        ).fetchall():
            yield rows
            last = rows[-1][0]

    def note_moved(self, path: str) -> bool:
        """If `path` is a missing file, note that its content was found under a new path; returns whether."""
        with self.db:
            return self.db.execute("UPDATE missing SET moved = 1 WHERE path = ?", (path,)).rowcount > 0

    def mark_missing_gone(self) -> int:
        """Mark every missing file gone; returns how many of them were deleted (not moved)."""
        with self.db:
            self.db.execute(
                "UPDATE images SET status = 'gone', shard = NULL, row = NULL, error = NULL "
                "WHERE path IN (SELECT path FROM missing)"
            )
        return self.db.execute("SELECT count(*) FROM missing WHERE NOT moved").fetchone()[0]


def _given(row: tuple) -> int | None:
    """The id a row of record_shard brings (its sixth value), if any."""
    return row[5] if len(row) > 5 else None


def _ids_digest(ids: np.ndarray) -> str:
    """The digest of a live set from its ids: an id names one path with one content for as long as
    it is live and is never reused (record_shard), so equal id sets are equal (path, content) sets."""
    return hashlib.sha256(np.sort(ids).astype("<i8").tobytes()).hexdigest()


# A path p under a folder f (columns of a row of scopes or unseen, or the parameters of _folder_params):
# p is f itself, or starts with f + "/", which in text order is the range [lo, hi) and uses the index.
# A query over many rows runs one half at a time (they never both hold): on an OR, SQLite gathers the
# row ids of every match in memory to drop repeats.
_EITHER_OF_UNDER = ("{p} = {f}folder", "({p} >= {f}lo AND {p} < {f}hi)")
_UNDER = "(" + " OR ".join(_EITHER_OF_UNDER) + ")"


def _folder_range(folder: str) -> tuple[str, str, str]:
    lo = folder.rstrip(os.sep) + os.sep
    return folder, lo, lo[:-1] + chr(ord(os.sep) + 1)


def _folder_params(folder: str) -> dict[str, str]:
    return dict(zip(("folder", "lo", "hi"), _folder_range(folder), strict=True))

"""ids.sqlite, a version's id table (id -> path, content hash): the one module that writes, edits or reads it.

A build writes it from the shards, an update copies the published one and edits the copy, and readers
(search, serve, duplicates) open it read-only through IdTable.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..features import ShardInfo, read_shard
from ..fsutil import fsync_path
from .versions import damaged

IDS_FILE = "ids.sqlite"
# The rows an update adds: features, ids, paths and content hashes of a shard's added rows (fill.rows_with_ids).
AddedRows = tuple[np.ndarray, np.ndarray, list[str], list[str]]


def write_ids(
    parts: list[tuple[ShardInfo, np.ndarray]],
    ids: np.ndarray,
    path: Path,
    each: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> None:
    """Write the id table: `ids` are the stable ids of the shards' live rows, in order. With `each`,
    the shards are read with their features and each(ids, features) is called with every shard's live
    rows on the way (a local build fills the index and the vector store with them)."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=OFF")  # a failed build discards the whole version folder
        db.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL, hash TEXT NOT NULL)")
        offset = 0
        for info, rows in parts:
            data = read_shard(info.path, features=each is not None)
            block = ids[offset : offset + len(rows)]
            if each is not None:
                each(block, data.features[rows])
            paths, hashes = (data.paths[r] for r in rows), (data.hashes[r] for r in rows)
            db.executemany("INSERT INTO images VALUES (?, ?, ?)", zip(block.tolist(), paths, hashes, strict=True))
            offset += len(rows)
        db.execute("CREATE INDEX images_path ON images(path)")
        db.commit()
    finally:
        db.close()


def update_ids(old: Path, new: Path, removed: np.ndarray, added: list[AddedRows]) -> None:
    """Write the id table `new`: a copy of `old` (only read) without the `removed` ids and with the
    `added` rows, durable when it returns."""
    shutil.copyfile(old, new)
    db = sqlite3.connect(new)
    try:
        db.execute("PRAGMA journal_mode=OFF")  # a failed update discards the whole version folder
        db.executemany("DELETE FROM images WHERE id = ?", ((i,) for i in removed.tolist()))
        for _, new_ids, paths, hashes in added:
            db.executemany("INSERT INTO images VALUES (?, ?, ?)", zip(new_ids.tolist(), paths, hashes, strict=True))
        db.commit()
    finally:
        db.close()
    fsync_path(new)


class IdTable:
    """A version's id table, opened read-only. Opened once per reader, so that the version stays readable
    even if a later build prunes it. Damage can show only when a damaged page is read, so every query
    translates it into the one-line error (versions.damaged), not just the opening."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # One connection, kept: a version pruned later stays readable. Threads (the service's requests) take
        # turns on it: each look-up is short, and the searches around them run in parallel.
        self._turn = threading.Lock()
        try:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            raise damaged(path, exc) from None
        self._query("SELECT 1 FROM images LIMIT 1")

    def __enter__(self) -> IdTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        try:
            with self._turn:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise damaged(self.path, exc) from None

    def count(self) -> int:
        return int(self._query("SELECT count(*) FROM images")[0][0])

    def paths(self) -> list[str]:
        """Every indexed path, in id order."""
        # one string joined by SQLite, split once: a million rows fetched one by one take several times longer
        # (no path holds a NUL)
        joined = self._query("SELECT group_concat(path, char(0)) FROM (SELECT path FROM images ORDER BY id)")[0][0]
        return joined.split("\0") if joined is not None else []

    def path_of(self, idx: int) -> str | None:
        """The path of an id; None when the table has no such id."""
        row = self._query("SELECT path FROM images WHERE id = ?", (int(idx),))
        return row[0][0] if row else None

    def find(self, path: str) -> tuple[int, str] | None:
        """(id, content hash) of an indexed path; None when it is not indexed."""
        return next(iter(self._query("SELECT id, hash FROM images WHERE path = ?", (path,))), None)

    def ids_of(self, paths: Sequence[str]) -> dict[str, int]:
        """path -> id of the given paths that are indexed (looked up 500 at a time)."""
        out: dict[str, int] = {}
        wanted = sorted(set(paths))
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows = self._query(f"SELECT path, id FROM images WHERE path IN ({','.join('?' * len(chunk))})", chunk)
            out.update(rows)
        return out

    def ids_matching(self, prefix: str, pattern: re.Pattern[str]) -> np.ndarray:
        """The ids (sorted) of the paths that start with `prefix` and fully match `pattern` (a path glob's
        regex): a range scan of the path index, then the pattern on what it gives."""
        if prefix:
            rows = self._query(
                "SELECT id, path FROM images WHERE path >= ? AND path < ?", (prefix, prefix + "\U0010ffff")
            )
        else:
            rows = self._query("SELECT id, path FROM images")
        return np.array(sorted(i for i, p in rows if pattern.fullmatch(p)), np.int64)

    def rows(self, ids: np.ndarray) -> dict[int, tuple[str, str]]:
        """id -> (path, content hash) for the given ids (-1 ignored); an id not in the table means the
        table does not match its index: damaged."""
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        out: dict[int, tuple[str, str]] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows = self._query(f"SELECT id, path, hash FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            out.update((i, (p, h)) for i, p, h in rows)
        if len(out) < len(wanted):
            raise damaged(self.path, f"{len(wanted) - len(out)} ids the index returned are not in it")
        return out

    def known(self, ids: Sequence[int]) -> set[int]:
        """The ids among these that the table has."""
        wanted = sorted({int(i) for i in ids})
        out: set[int] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            out.update(
                i for (i,) in self._query(f"SELECT id FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            )
        return out

    def ids(self) -> np.ndarray:
        """Every id, sorted (stable catalog ids: sparse, not positions)."""
        try:
            with self._turn:
                return np.fromiter((i for (i,) in self._db.execute("SELECT id FROM images ORDER BY id")), np.int64)
        except sqlite3.Error as exc:
            raise damaged(self.path, exc) from None

    def same_content_ids(self) -> list[np.ndarray]:
        """Ids of byte-identical files (same content hash), one sorted array per content listed more than once."""
        rows = self._query(
            "SELECT group_concat(id) FROM (SELECT id, hash FROM images ORDER BY id) GROUP BY hash HAVING count(*) > 1"
        )
        return [np.sort(np.array(ids.split(","), np.int64)) for (ids,) in rows]

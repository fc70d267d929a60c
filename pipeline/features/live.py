"""live.sqlite, the features folder's journal of images added and removed between nightly builds: its only owner.

Adding an image through the service or `pipeline add` must be durable and searchable at once, while the
nightly job may hold the folder's lock for hours: so additions do not go through the catalog and a shard,
but into this journal, one short SQLite transaction each (WAL, synchronous=FULL: a committed row survives
a power loss). Searchers read the rows their version lacks as its live part; the nightly job folds them
into shards and the catalog (folder.fold_live) with the ids they were given here, running no model.

Tables:
  added(id PK AUTOINCREMENT from LIVE_FIRST_ID, path, hash, size, mtime, width, height,
        feature BLOB (float16, dim values), fields TEXT (the user's metadata, JSON), at REAL (added, Unix time),
        state 'live'|'removed', folded TEXT (the shard it was folded into; NULL: not yet))
  hidden(path PK, at REAL)       images never returned, until unhidden: a file of the user's own folders
                                 removed (the product never deletes those), or an added file deleted
  info(key PK, value)            'model' (ModelInfo.checksum of the features), 'dim', 'ingest' (the folder
                                 added files are stored under)

Ids start at 2**40, far above any the catalog gives (one per image ever seen), and are never reused, so an
id names one added image before and after its fold. `locked()` (a flock beside the journal, held for
milliseconds) orders the changes that touch an added file and its row: two writers of the same content,
or a removal and a new addition of it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BusyError, ModelMismatchError, PipelineError, write_error

JOURNAL_FILE = "live.sqlite"
LOCK_FILE = ".live.lock"
LIVE_FIRST_ID = 1 << 40
LOCK_WAIT_S = 10.0  # the longest a writer waits for another's file-and-row change (each takes milliseconds)
BUSY_MS = 10_000  # SQLite's wait for another connection's transaction


@dataclass(frozen=True)
class LiveImage:
    """An added image as the journal records it."""

    id: int
    path: str
    content_hash: str
    size: int
    mtime: float
    width: int
    height: int
    feature: np.ndarray  # float32 [dim]
    fields: dict[str, Any] = field(default_factory=dict)
    at: float = 0.0


class Journal:
    """The journal of a features folder, opened (and created when `create`) for reading and writing.

    Every method is one transaction. The connection may be used from several threads (one at a time:
    a lock serialises them)."""

    def __init__(self, features_dir: Path | str, *, create: bool = False) -> None:
        self.dir = Path(features_dir)
        self.path = self.dir / JOURNAL_FILE
        self._lock = threading.RLock()  # one transaction at a time on the shared connection
        if not create and not self.path.exists():
            raise PipelineError(f"{self.path} does not exist: nothing was ever added to {self.dir}")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=BUSY_MS / 1000, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it returns
            with self._transaction():
                for statement in _SCHEMA:
                    self.db.execute(statement)
                if self.db.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'added'").fetchone() is None:
                    self.db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('added', ?)", (LIVE_FIRST_ID - 1,))
        except sqlite3.Error as exc:
            raise _journal_error(self.path, exc) from None
        except OSError as exc:
            raise write_error(self.path, exc) from None

    @staticmethod
    def exists(features_dir: Path | str) -> bool:
        return (Path(features_dir) / JOURNAL_FILE).exists()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _journal_error(self.path, exc) from None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        try:
            with self._lock:
                return self.db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _journal_error(self.path, exc) from None

    # ------------------------------------------------------------------ the journal's settings

    def info(self) -> dict[str, str]:
        return dict(self._query("SELECT key, value FROM info"))

    def bind(self, model_checksum: str, dim: int, ingest: Path) -> None:
        """Record the model, dimension and ingest folder of the features added (the first time), or check them:
        ModelMismatchError when this journal holds another model's features."""
        with self._transaction():
            have = dict(self.db.execute("SELECT key, value FROM info").fetchall())
            if have.get("model", model_checksum) != model_checksum or int(have.get("dim", dim)) != dim:
                raise ModelMismatchError(
                    f"{self.path} holds features of model {have['model'][:12]} ({have['dim']}-d), not of "
                    f"{model_checksum[:12]} ({dim}-d): fold it into the index with the model that made it "
                    "(`pipeline rebuild`) first"
                )
            want = {"model": model_checksum, "dim": str(dim), "ingest": str(ingest)}
            self.db.executemany("INSERT OR IGNORE INTO info VALUES (?, ?)", want.items())

    def reserve(self, above: int) -> None:
        """Give new additions ids above `above` too (a journal made anew after a lost one: ids it gave out live on
        in the catalog)."""
        with self._transaction():
            self.db.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'added'", (int(above),))

    @property
    def ingest(self) -> Path | None:
        """The folder added files are stored under (None before the first addition)."""
        value = self.info().get("ingest")
        return Path(value) if value else None

    # ------------------------------------------------------------------ writing

    def add(self, image: LiveImage) -> int:
        """Record an added image (its file already durable); returns its new id. The path is unhidden: adding
        the same bytes again after a removal brings them back."""
        with self._transaction():
            cursor = self.db.execute(
                "INSERT INTO added (path, hash, size, mtime, width, height, feature, fields, at, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'live')",
                (
                    image.path,
                    image.content_hash,
                    image.size,
                    image.mtime,
                    image.width,
                    image.height,
                    np.asarray(image.feature, "<f2").tobytes(),
                    json.dumps(image.fields, ensure_ascii=False, sort_keys=True),
                    image.at or time.time(),
                ),
            )
            self.db.execute("DELETE FROM hidden WHERE path = ?", (image.path,))
        assert cursor.lastrowid is not None
        return int(cursor.lastrowid)

    def remove(self, path: str) -> list[int]:
        """Hide `path` and mark its live additions removed, in one transaction; returns their ids."""
        with self._transaction():
            ids = [i for (i,) in self.db.execute("SELECT id FROM added WHERE path = ? AND state = 'live'", (path,))]
            self.db.execute("UPDATE added SET state = 'removed' WHERE path = ? AND state = 'live'", (path,))
            self.db.execute("INSERT OR REPLACE INTO hidden VALUES (?, ?)", (path, time.time()))
        return ids

    def unhide(self, path: str) -> bool:
        """Return a hidden image to the results; False if it was not hidden."""
        with self._transaction():
            return self.db.execute("DELETE FROM hidden WHERE path = ?", (path,)).rowcount > 0

    def mark_folded(self, ids: Sequence[int], shard: str) -> None:
        with self._transaction():
            self.db.executemany("UPDATE added SET folded = ? WHERE id = ?", [(shard, int(i)) for i in ids])

    # ------------------------------------------------------------------ reading

    def changes(self) -> int:
        """A number that changes whenever another connection commits (SQLite's data_version): a reader's
        microsecond check for news."""
        return int(self._query("PRAGMA data_version")[0][0])

    def find(self, content_hash: str) -> tuple[int, str] | None:
        """(id, path) of a live addition with these bytes."""
        rows = self._query("SELECT id, path FROM added WHERE hash = ? AND state = 'live' LIMIT 1", (content_hash,))
        return (int(rows[0][0]), rows[0][1]) if rows else None

    def live(self, after: int = 0, unfolded: bool = False, folded: bool = False) -> list[LiveImage]:
        """Live additions with ids above `after`, in id order (`unfolded`, `folded`: only those not folded yet,
        or only those folded)."""
        where = " AND folded IS NULL" if unfolded else " AND folded IS NOT NULL" if folded else ""
        return self._rows(f"WHERE state = 'live' AND id > ?{where} ORDER BY id", (after,))

    def _rows(self, where: str, params: Sequence[Any]) -> list[LiveImage]:
        sql = "SELECT id, path, hash, size, mtime, width, height, feature, fields, at FROM added " + where
        return [
            LiveImage(i, p, h, s, m, w, ht, np.frombuffer(f, "<f2").astype(np.float32), json.loads(fl), at)
            for i, p, h, s, m, w, ht, f, fl, at in self._query(sql, params)
        ]

    def live_paths(self) -> list[str]:
        """The path of every live addition (no features read)."""
        return [p for (p,) in self._query("SELECT path FROM added WHERE state = 'live'")]

    def live_ids(self, after: int = 0) -> list[int]:
        """The ids of the live additions above `after`, in order (no features read)."""
        return [i for (i,) in self._query("SELECT id FROM added WHERE state = 'live' AND id > ? ORDER BY id", (after,))]

    def rows(self, ids: Sequence[int]) -> list[LiveImage]:
        """The live additions of these ids, in id order."""
        out: list[LiveImage] = []
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            out += self._rows(f"WHERE state = 'live' AND id IN ({','.join('?' * len(chunk))}) ORDER BY id", chunk)
        return out

    def live_at(self, path: str) -> list[LiveImage]:
        """The live additions recorded under `path` (one, unless the same file was added twice)."""
        return self._rows("WHERE state = 'live' AND path = ?", (path,))

    def removed(self) -> list[tuple[int, str, str | None]]:
        """(id, path, folded shard or None) of every removed addition."""
        return [(int(i), p, f) for i, p, f in self._query("SELECT id, path, folded FROM added WHERE state = 'removed'")]

    def is_hidden(self, path: str) -> bool:
        return bool(self._query("SELECT 1 FROM hidden WHERE path = ?", (path,)))

    def hidden(self) -> list[str]:
        """Every hidden path, sorted."""
        return [p for (p,) in self._query("SELECT path FROM hidden ORDER BY path")]

    def counts(self) -> dict[str, int]:
        """Additions live and not yet folded, live in all, removed; hidden paths."""
        (unfolded, live, removed), (hidden,) = (
            self._query(
                "SELECT COALESCE(SUM(state = 'live' AND folded IS NULL), 0), COALESCE(SUM(state = 'live'), 0), "
                "COALESCE(SUM(state = 'removed'), 0) FROM added"
            )[0],
            self._query("SELECT count(*) FROM hidden")[0],
        )
        return {"unfolded": unfolded, "live": live, "removed": removed, "hidden": hidden}

    # ------------------------------------------------------------------ the lock of file-and-row changes

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the journal's change lock (blocking up to LOCK_WAIT_S, then BusyError): around writing or
        deleting an added file together with its row."""
        try:
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.dir / LOCK_FILE, exc) from None
        try:
            give_up = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > give_up:
                        raise BusyError(f"{self.dir / LOCK_FILE} is held by another writer; retry shortly") from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)


def ingest_folder(features_dir: Path | str) -> Path | None:
    """The folder the additions of a features folder are stored under (None: nothing was ever added)."""
    if not Journal.exists(features_dir):
        return None
    with Journal(features_dir) as journal:
        return journal.ingest


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS added (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, hash TEXT NOT NULL, "
    "size INTEGER NOT NULL, mtime REAL NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, "
    "feature BLOB NOT NULL, fields TEXT NOT NULL, at REAL NOT NULL, state TEXT NOT NULL, folded TEXT)",
    "CREATE INDEX IF NOT EXISTS added_hash ON added(hash)",
    "CREATE INDEX IF NOT EXISTS added_path ON added(path)",
    "CREATE TABLE IF NOT EXISTS hidden (path TEXT PRIMARY KEY, at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


def _journal_error(path: Path, exc: sqlite3.Error) -> PipelineError:
    if getattr(exc, "sqlite_errorname", None) in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return PipelineError(
            f"{path} is damaged ({exc}): the images added since the last rebuild are in its folder's ingest files; "
            "move it away and add them again (`pipeline add`)"
        )
    if getattr(exc, "sqlite_errorname", None) == "SQLITE_BUSY":
        return BusyError(f"{path} is busy ({exc}); retry shortly")
    return write_error(path, exc, "the addition")

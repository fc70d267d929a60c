"""The catalog recovers from every crash point: orphan shards imported, retired ones deleted,
removed ones forgotten; an older catalog is migrated."""

from __future__ import annotations

import sqlite3

import numpy as np

from pipeline.features import CATALOG_FILE, Catalog, Entry, ShardData, shard_name, write_shard
from pipeline.model import ModelInfo

INFO = ModelInfo(name="m", weights_sha256="w" * 64, input_size=32, dim=4)


def shard(tmp_path, number: int, paths: list[str], errors: list[str] = ()) -> None:
    n = len(paths)
    write_shard(
        tmp_path / shard_name(number),
        ShardData(
            np.eye(n, 4, dtype=np.float32),
            paths,
            [p[-1] * 32 for p in paths],
            np.full(n, 10),
            np.full(n, 1.5),
            list(errors),
            ["bad"] * len(errors),
        ),
        INFO,
    )


def test_orphan_shard_is_imported(tmp_path):
    shard(tmp_path, 0, ["/a/1", "/a/2"], ["/a/broken"])  # written, then the run died before recording it
    with Catalog(tmp_path) as c:
        assert c.reconcile() == 1
        e = c.entries()
        assert (e["/a/1"].status, e["/a/1"].size, e["/a/1"].mtime, e["/a/1"].hash) == ("live", 10, 1.5, "1" * 32)
        assert e["/a/broken"].status == "failed" and c.failures() == [("/a/broken", "bad")]
        assert {k: list(v) for k, v in c.live_rows().items()} == {"shard-00000.h5": [0, 1]}
        assert c.reconcile() == 0  # recorded now
        assert c.live_feature("2" * 32) == ("shard-00000.h5", 1, "/a/2") and c.live_feature("3" * 32) is None


def test_live_features_of_size(tmp_path):
    with Catalog(tmp_path) as c:
        c.record_shard(
            "shard-00000.h5",
            [
                ("/a/1", 10, 1.0, "h1", 0),
                ("/a/1copy", 10, 1.0, "h1", 1),
                ("/a/2", 10, 1.0, "h2", 2),
                ("/a/3", 20, 1.0, "h3", 3),
            ],
            [],
        )
        assert c.live_features_of_size([10, 10, 30], limit=100) == {
            "h1": ("shard-00000.h5", 0, "/a/1"),
            "h2": ("shard-00000.h5", 2, "/a/2"),
        }
        assert c.live_features_of_size([10, 20], limit=2) == {"h1": ("shard-00000.h5", 0, "/a/1")}
        assert c.live_features_of_size([], limit=100) == {}


def test_retired_and_removed_shards(tmp_path):
    shard(tmp_path, 0, ["/a/1"])
    shard(tmp_path, 1, ["/a/2"])
    with Catalog(tmp_path) as c:
        c.reconcile()
        before = c.live_digest()
        live, digest = c.live_snapshot()  # the digest of the ids it read, the same as live_digest()'s
        assert digest == before and {s: (r.tolist(), i.tolist()) for s, (r, i) in live.items()} == {
            "shard-00000.h5": ([0], [0]),
            "shard-00001.h5": ([0], [1]),
        }
        c.mark_gone(["/a/1"])
        assert c.live_digest() != before and "shard-00000.h5" not in c.live_rows()
        c.retire(["shard-00000.h5"])
        assert not (tmp_path / shard_name(0)).exists() and set(c.shard_rows()) == {"shard-00001.h5"}
        (tmp_path / shard_name(1)).unlink()  # removed by hand: its images must be extracted again
        c.reconcile()
        assert "/a/2" not in c.entries() and c.shard_rows() == {}


def test_catalog_of_an_older_version_is_migrated(tmp_path):
    old = sqlite3.connect(tmp_path / CATALOG_FILE)  # the schema before failure classes and retries
    old.executescript("""
        CREATE TABLE images (path TEXT PRIMARY KEY, size INTEGER, mtime REAL, hash TEXT,
                             shard TEXT, row INTEGER, status TEXT NOT NULL, error TEXT);
        CREATE TABLE shards (name TEXT PRIMARY KEY, rows INTEGER NOT NULL, state TEXT NOT NULL);
        INSERT INTO images VALUES ('/a/old', 5, 1.0, NULL, NULL, NULL, 'failed', 'corrupt image');
        """)
    old.close()
    with Catalog(tmp_path) as c:
        assert c.entries()["/a/old"] == Entry(5, 1.0, None, "failed", None, None, 0, None)  # kind unknown: retried
        c.begin_run()
        c.record_shard("shard-00000.h5", [], [("/a/old", 5, 1.0, 2.0, "timed out", True)])
        c.begin_run()
        c.record_shard("shard-00001.h5", [], [("/a/old", 5, 1.0, 2.0, "timed out", True)])
        assert c.entries()["/a/old"] == Entry(5, 1.0, None, "failed", 2.0, True, 2, 4)  # run 2 + 2 runs of back-off
    with Catalog(tmp_path) as c:  # reopening migrates nothing twice and keeps the run count
        assert c.run == 2 and c.failures() == [("/a/old", "timed out")]


def ids(c: Catalog) -> dict[str, int]:
    return dict(c.db.execute("SELECT path, id FROM images WHERE status = 'live'"))


def test_ids_are_stable_and_never_reused(tmp_path):
    """A live path with the same content keeps its id when its row is written again (compaction, a
    touched file); a new content, a moved file or a path that comes back gets a new id."""
    with Catalog(tmp_path) as c:
        c.record_shard(
            "shard-00000.h5",
            [("/a/1", 1, 1.0, "1" * 32, 0), ("/a/2", 1, 1.0, "2" * 32, 1), ("/a/3", 1, 1.0, "3" * 32, 2)],
            [],
        )
        first = ids(c)
        assert sorted(first.values()) == [0, 1, 2]  # a new catalog counts from 0
        c.record_shard(
            "shard-00001.h5",
            [
                ("/a/2", 1, 2.0, "2" * 32, 0),  # compacted or touched: same id
                ("/a/3", 1, 2.0, "9" * 32, 1),  # new content: new id
                ("/b/1", 1, 1.0, "1" * 32, 2),
            ],
            [],
        )  # a copy or a move: new id
        c.mark_gone(["/a/1"])
        second = ids(c)
        assert second["/a/2"] == first["/a/2"] and second["/a/3"] == 3 and second["/b/1"] == 4
        c.record_shard("shard-00002.h5", [("/a/1", 1, 1.0, "1" * 32, 0)], [])  # back again: a new id
        assert ids(c)["/a/1"] == 5
        rows, row_ids = c.live_ids()["shard-00001.h5"]
        assert list(rows) == [0, 1, 2] and list(row_ids) == [1, 3, 4]


def test_a_catalog_without_ids_is_numbered_once(tmp_path):
    shard(tmp_path, 0, ["/a/1", "/a/2"])
    with Catalog(tmp_path) as c:
        c.reconcile()
        c.db.execute("DROP INDEX images_id")  # as a catalog written before stable ids
        c.db.execute("ALTER TABLE images DROP COLUMN id")
        c.db.execute("DELETE FROM counters WHERE name = 'next_id'")
        c.db.commit()
    with Catalog(tmp_path) as c:
        before = ids(c)
        assert sorted(before.values()) == [1, 2]
        c.record_shard("shard-00001.h5", [("/a/3", 1, 1.0, "3" * 32, 0)], [])
        assert ids(c) == {**before, "/a/3": 3}
    with Catalog(tmp_path) as c:
        assert ids(c) == {**before, "/a/3": 3}  # reopening renumbers nothing

"""The features folder through its API: writing, compaction and live rows, and readers that open
the catalog read-only."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.features import Catalog, RowMeta, ShardWriter, compact, exact_features, live_digest, live_parts, writing
from pipeline.features import folder as folder_module
from pipeline.index import build_index
from pipeline.model import ModelInfo

INFO = ModelInfo(name="m", weights_sha256="w" * 64, input_size=32, dim=4)


def write_rows(folder: Path, paths: list[str], shard_size: int) -> np.ndarray:
    """Rows through the folder's writer, as extract writes them; returns their features."""
    vectors = np.eye(len(paths), 4, dtype=np.float32) + 0.5
    with writing(folder) as catalog:
        writer = ShardWriter(folder, INFO, "/models/m.onnx", shard_size, catalog)
        writer.add(paths, vectors, [RowMeta(f"{i:032x}", 10 + i, 1.5) for i in range(len(paths))])
        writer.flush()
    return vectors


def test_write_compact_and_read_live_rows(tmp_path):
    folder = tmp_path / "features"
    paths = [f"/a/{i}.jpg" for i in range(6)]
    vectors = write_rows(folder, paths, shard_size=4)  # shards of 4 and 2
    with writing(folder) as catalog:
        catalog.mark_gone(paths[:3])
    infos, parts, ids, digest, _ = live_parts(folder)
    assert [(i.path.name, rows.tolist()) for i, rows in parts] == [("shard-00000.h5", [3]), ("shard-00001.h5", [0, 1])]
    assert len(infos) == 2 and digest == live_digest(folder)

    assert compact(folder, below=0.5, shard_size=4) == ["shard-00000.h5"]  # 1 of 4 rows live
    infos, parts, after, digest_after, _ = live_parts(folder)
    assert [(i.path.name, rows.tolist()) for i, rows in parts] == [("shard-00001.h5", [0, 1]), ("shard-00002.h5", [0])]
    assert sorted(after.tolist()) == sorted(ids.tolist()) and digest_after == digest  # same images, same ids
    shards = [{"name": i.path.name, "count": len(rows)} for i, rows in parts]
    got = exact_features(folder, shards, 4, tmp_path / "v1")(ids)
    np.testing.assert_array_equal(got, vectors[3:6])


def test_readers_open_the_catalog_read_only(tmp_path, monkeypatch):
    folder = tmp_path / "features"
    write_rows(folder, [f"/a/{i}.jpg" for i in range(3)], shard_size=4)
    with Catalog(folder, readonly=True) as catalog, pytest.raises(sqlite3.OperationalError, match="readonly"):
        catalog.db.execute("DELETE FROM images")

    opened = []

    class Spy(Catalog):
        def __init__(self, features_dir: Path, *, readonly: bool = False) -> None:
            opened.append(readonly)
            super().__init__(features_dir, readonly=readonly)

    monkeypatch.setattr(folder_module, "Catalog", Spy)
    assert build_index(folder, tmp_path / "index").meta["count"] == 3
    assert opened == [True]

    db = sqlite3.connect(folder / "catalog.sqlite")  # a catalog older than stable ids: a reader does not migrate it
    db.execute("DROP INDEX images_id")
    db.execute("ALTER TABLE images DROP COLUMN id")
    db.commit()
    db.close()
    with pytest.raises(PipelineError, match="older than stable image ids: run `pipeline extract`"):
        live_parts(folder)

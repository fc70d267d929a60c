"""The shard format round-trips whatever it is given, and says what made it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import PipelineError
from pipeline.features import ShardData, list_shards, read_rows, read_shard, shard_info, shard_model, write_shard
from pipeline.model import ModelInfo

INFO = ModelInfo(name="m", weights_sha256="w" * 64, input_size=32, dim=8)
names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(names, max_size=12, unique=True), st.lists(st.tuples(names, names), max_size=4), st.integers(0, 2**32 - 1)
)
def test_round_trip(paths, errors, seed):
    rng = np.random.default_rng(seed)
    n = len(paths)
    data = ShardData(
        rng.normal(size=(n, 8)).astype(np.float32),
        paths,
        [f"{i:032x}" for i in range(n)],
        rng.integers(0, 2**40, n),
        rng.uniform(0, 2e9, n),
        [e[0] for e in errors],
        [e[1] for e in errors],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-00000.h5"
        write_shard(path, data, INFO, "/models/m.onnx")
        back = read_shard(path)
        stored = data.features.astype(np.float16).astype(np.float32)  # float16 on disk, float32 to readers
        assert back.features.dtype == np.float32
        np.testing.assert_array_equal(back.features, stored)
        assert back.paths == paths and back.hashes == data.hashes
        np.testing.assert_array_equal(back.sizes, data.sizes)
        np.testing.assert_array_equal(back.mtimes, data.mtimes)
        assert (back.error_paths, back.error_reasons) == (data.error_paths, data.error_reasons)
        info = shard_info(path)
        assert (info.count, info.error_count, info.model_sha256, info.dim) == (n, len(errors), INFO.checksum, 8)
        assert shard_model(path) == (INFO, "/models/m.onnx")
        if n:
            runs = np.unique(np.clip(np.r_[0, n // 3 : n // 3 + 3, n - 2 : n], 0, n - 1))  # consecutive rows
            for rows in (np.unique([0, n - 1]), runs):
                np.testing.assert_array_equal(read_rows(path, rows), stored[rows])
        assert list_shards(Path(tmp)) == [path] and not list(Path(tmp).glob(".*tmp"))


def test_unreadable_shard_is_a_clear_error(tmp_path):
    (tmp_path / "shard-00000.h5").write_bytes(b"not hdf5")
    with pytest.raises(PipelineError, match="cannot read shard"):
        shard_info(tmp_path / "shard-00000.h5")


def test_shard_with_columns_of_different_lengths_is_damaged(tmp_path):
    import h5py

    path = tmp_path / "shard-00000.h5"
    write_shard(
        path,
        ShardData(
            np.ones((2, 8), np.float32), ["/a", "/b"], ["a" * 32, "b" * 32], np.ones(2, np.int64), np.ones(2), [], []
        ),
        INFO,
        "/models/m.onnx",
    )
    with h5py.File(path, "r+") as f:  # one row's size lost: its rows would no longer line up
        del f["sizes"]
        f["sizes"] = np.ones(1, np.int64)
    for features in (True, False):
        with pytest.raises(PipelineError, match="columns have different lengths"):
            read_shard(path, features=features)


def _written(path: Path, n: int = 100) -> ShardData:
    rng = np.random.default_rng(0)
    data = ShardData(
        rng.normal(size=(n, 8)).astype(np.float32),
        [f"/p/{i}.jpg" for i in range(n)],
        [f"{i:032x}" for i in range(n)],
        np.arange(n),
        np.ones(n),
        [],
        [],
    )
    write_shard(path, data, INFO, "/models/m.onnx")
    return data


def test_bytes_flipped_inside_the_feature_matrix_are_detected(tmp_path):
    import h5py

    path = tmp_path / "shard-00000.h5"
    _written(path)
    with h5py.File(path, "r") as f:
        chunk = f["features"].id.get_chunk_info(0)
    with open(path, "r+b") as f:  # one byte of a feature, the file still valid HDF5
        f.seek(chunk.byte_offset + 10)
        byte = f.read(1)
        f.seek(chunk.byte_offset + 10)
        f.write(bytes([byte[0] ^ 0x40]))
    assert shard_info(path).count == 100  # its metadata still reads
    for read in (lambda: read_shard(path), lambda: read_rows(path, np.array([0]))):
        with pytest.raises(PipelineError, match="cannot read shard .*a checksum of its data does not match"):
            read()


def test_a_changed_path_is_detected(tmp_path):
    import h5py

    path = tmp_path / "shard-00000.h5"
    _written(path, 3)
    with h5py.File(path, "r+") as f:  # a path rewritten in place, lengths unchanged
        f["paths"][1] = "/p/X.jpg"
    with pytest.raises(PipelineError, match="do not match their checksum"):
        read_shard(path)


def test_version_1_shards_float32_without_checksums_are_still_read(tmp_path):
    import h5py

    path = tmp_path / "shard-00000.h5"
    data = _written(path, 5)
    features = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    with h5py.File(path, "r+") as f:  # as version 1 wrote it
        del f["features"]
        f["features"] = features
        f.attrs["schema_version"] = 1
        del f.attrs["strings_sha256"]
    back = read_shard(path)
    np.testing.assert_array_equal(back.features, features)
    assert back.paths == data.paths
    np.testing.assert_array_equal(read_rows(path, np.array([1, 3])), features[[1, 3]])

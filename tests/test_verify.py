"""`pipeline verify` and the nightly scrub: changed bytes are found, named with their fix, never served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

from helpers import save_pattern
from pipeline.cli import app
from pipeline.features import list_shards
from pipeline.index import CURRENT_FILE, INDEX_FILE, current_version, version_dirs
from pipeline.search import Searcher

runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_model) -> Path:
    """A workdir made by two `pipeline rebuild`s (two published versions), shards of 4 images."""
    root = tmp_path_factory.mktemp("verify")
    for i in range(10):
        save_pattern(root / "gallery" / f"img{i:02d}.png", seed=i)
    assert runner.invoke(app, rebuild_args(root, root / "work", tiny_model)).exit_code == 0
    save_pattern(root / "gallery" / "img10.png", seed=10)
    assert runner.invoke(app, rebuild_args(root, root / "work", tiny_model)).exit_code == 0
    return root


def rebuild_args(root: Path, work: Path, model: Path) -> list[str]:
    return [
        *("rebuild", str(root / "gallery"), "--workdir", str(work), "--model", str(model)),
        *("--workers", "0", "--shard-size", "4", "--json"),
    ]


@pytest.fixture()
def work(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine / "work", tmp_path / "work"))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def flip_a_feature(shard: Path) -> None:
    """One bit of one feature value: the file still reads as valid HDF5."""
    with h5py.File(shard, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    flip(shard, offset + 7)


def verify(path: Path) -> tuple[int, dict]:
    result = runner.invoke(app, ["verify", str(path), "--json"])
    return result.exit_code, json.loads(result.stdout)


def test_an_intact_workdir_verifies(pristine):
    code, report = verify(pristine / "work")
    shards = list_shards(pristine / "work" / "features")
    versions = version_dirs(pristine / "work" / "index")
    assert code == 0 and report["ok"] and not report["damaged"] and not report["unverifiable"]
    assert len(versions) == 2 and report["checked"] == len(shards) + 1 + 1 + len(versions)  # catalog, CURRENT
    for folder in (pristine / "work" / "features", pristine / "work" / "index"):  # either folder alone
        assert verify(folder)[0] == 0
    text = runner.invoke(app, ["verify", str(pristine / "work")])
    assert text.exit_code == 0 and text.stdout.strip().endswith("intact, 0 damaged")


def test_a_flipped_bit_in_a_feature_is_found_never_served_and_rebuilt(pristine, work, tiny_model):
    shard = list_shards(work / "features")[0]
    flip_a_feature(shard)
    code, report = verify(work)
    assert code == 1 and [d["path"] for d in report["damaged"]] == [str(shard)]
    assert "checksum" in report["damaged"][0]["why"] and "pipeline rebuild" in report["damaged"][0]["fix"]
    text = runner.invoke(app, ["verify", str(work)])
    assert text.exit_code == 1 and f"DAMAGED {shard}" in text.stdout and "fix: delete it" in text.stdout

    built = runner.invoke(app, ["build-index", str(work / "features"), "--out", str(work / "index")])
    assert built.exit_code == 1 and shard.name in built.stderr  # never indexed
    assert Searcher(work / "index").count == 11  # the published version still answers

    result = runner.invoke(app, rebuild_args(pristine, work, tiny_model))
    out = json.loads(result.stdout)
    assert result.exit_code == 0 and [d["shard"] for d in out["damaged_shards"]] == [shard.name]
    assert out["extract"]["extracted"] == 4  # the damaged shard's images, through the model again
    assert verify(work)[0] == 0
    query = str(pristine / "gallery" / "img03.png")
    fresh = Searcher(work / "index").search([query], k=3)[0].hits
    before = Searcher(pristine / "work" / "index").search([query], k=3)[0].hits
    assert [h.path for h in fresh] == [h.path for h in before]
    assert [h.score for h in fresh] == pytest.approx([h.score for h in before], abs=1e-6)


def test_a_damaged_index_file_names_the_rollback(work):
    published = current_version(work / "index")
    older = [v for v in version_dirs(work / "index") if v != published][0]
    flip(published / INDEX_FILE, (published / INDEX_FILE).stat().st_size // 2)
    code, report = verify(work)
    (damage,) = report["damaged"]
    assert code == 1 and damage["path"] == str(published / INDEX_FILE) and "sha256" in damage["why"]
    assert f"write the name of an intact version ({older.name})" in damage["fix"]

    (work / "index" / CURRENT_FILE).write_text(older.name + "\n")  # the rollback it names
    code, report = verify(work)
    (damage,) = report["damaged"]
    assert code == 1 and damage["fix"] == f"delete the folder {published} (it is not the published version)"
    shutil.rmtree(published)
    assert verify(work)[0] == 0


def test_files_without_checksums_are_unverifiable_not_damaged(work):
    shard = list_shards(work / "features")[0]
    with h5py.File(shard, "r+") as f:  # as schema 1 wrote it: float32, no checksums
        features = f["features"][()].astype("float32")
        del f["features"]
        f["features"] = features
        f.attrs["schema_version"] = 1
        del f.attrs["strings_sha256"]
    meta_path = current_version(work / "index") / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]  # as versions published before checksums were recorded
    meta_path.write_text(json.dumps(meta))
    code, report = verify(work)
    assert code == 0 and report["unverifiable"] == [str(shard), str(meta_path.parent)]


def test_not_a_workdir_is_one_line(tmp_path):
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "holds no features folder" in result.stderr

"""Nightly rebuilds: incremental, compacting, overlap-safe, and correct after a kill at any moment."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import kill_at_step, obey_file_modes, save_pattern, stopping_program
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.features import list_shards
from pipeline.fsutil import exclusive_lock
from pipeline.index import IDS_FILE, current_version
from pipeline.rebuild import rebuild
from pipeline.search import Searcher


def indexed_paths(index_dir: Path) -> list[str]:
    db = sqlite3.connect(current_version(index_dir) / IDS_FILE)
    try:
        return [p for (p,) in db.execute("SELECT path FROM images ORDER BY id")]
    finally:
        db.close()


def live_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.png"))


def make_collection(root: Path, seeds) -> None:
    for s in seeds:
        save_pattern(root / f"img{s:04d}.png", s)


def test_incremental_rebuild(tmp_path, tiny_model):
    root, work = tmp_path / "photos", tmp_path / "work"
    make_collection(root, range(30))
    first = rebuild([root], work, tiny_model, workers=0, shard_size=8)
    assert first.extract.extracted == 30 and first.index_built
    again = rebuild([root], work, tiny_model, workers=0, shard_size=8)
    assert (again.extract.extracted, again.extract.unchanged, again.index_built) == (0, 30, False)

    make_collection(root, range(100, 110))  # 10 new
    deleted = [root / f"img{s:04d}.png" for s in range(5)]
    for p in deleted:
        p.unlink()
    renamed = {}
    for s in range(5, 10):
        old, new = root / f"img{s:04d}.png", root / "renamed" / f"moved{s:04d}.png"
        new.parent.mkdir(exist_ok=True)
        old.rename(new)
        renamed[str(old)] = str(new)
    third = rebuild([root], work, tiny_model, workers=0, shard_size=8)
    ex = third.extract
    assert (ex.extracted, ex.new, ex.moved, ex.deleted, ex.unchanged) == (10, 10, 5, 5, 20)
    paths = indexed_paths(work / "index")
    assert sorted(paths) == live_files(root)  # every live image exactly once, nothing deleted or moved away
    searcher = Searcher(work / "index", model=tiny_model)
    for old, new in renamed.items():
        hits = searcher.search([new], k=3)[0].hits
        assert hits[0].path == new and all(h.path != old for h in hits)


def test_an_emptied_root_is_refused_not_wiped(tmp_path, tiny_model):
    a, b, work = tmp_path / "a", tmp_path / "b", tmp_path / "work"
    make_collection(a, range(3))
    make_collection(b, range(10, 13))
    rebuild([a, b], work, tiny_model, workers=0)
    for p in b.iterdir():
        p.unlink()  # as if b's disk were not mounted
    with pytest.raises(PipelineError, match="is it unmounted"):
        rebuild([a, b], work, tiny_model, workers=0)
    assert len(indexed_paths(work / "index")) == 6  # the published index is untouched


@pytest.mark.slow
def test_an_unreadable_folder_is_not_a_deletion(tmp_path, tiny_model):
    """A folder the run cannot list, and a root it cannot list, keep their recorded images; the run
    reports them and --strict exits 3. The folders are made unreadable for real (mode 000) and the
    run, a subprocess, obeys file modes even as root (helpers.obey_file_modes drops the capabilities
    that let root read anything); a probe proves the folder cannot be listed, or the test fails."""
    photos, other, work = tmp_path / "photos", tmp_path / "other", tmp_path / "work"
    make_collection(photos, range(3))
    make_collection(photos / "locked", range(10, 13))
    make_collection(other, range(20, 23))
    rebuild([photos, other], work, tiny_model, workers=0)
    make_collection(photos, range(30, 32))  # meanwhile two new images: the run has real work to do
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "rebuild",
        str(photos),
        str(other),
        "--workdir",
        str(work),
        "--model",
        str(tiny_model),
        "--workers",
        "0",
        "--strict",
        "--json",
    ]
    os.chmod(photos / "locked", 0)
    os.chmod(other, 0)
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])", str(other)],
            preexec_fn=obey_file_modes,
            capture_output=True,
            text=True,
        )
        if "PermissionError" not in probe.stderr:
            pytest.fail(
                f"cannot make an unreadable folder here (euid {os.geteuid()}): "
                f"{probe.stderr.strip() or 'mode 000 was listed anyway'}"
            )
        result = subprocess.run(cmd, preexec_fn=obey_file_modes, capture_output=True, text=True)
    finally:
        os.chmod(photos / "locked", 0o755)
        os.chmod(other, 0o755)
    assert result.returncode == 3, result.stderr
    ex = json.loads(result.stdout)["extract"]
    assert {u["path"] for u in ex["unreadable_folders"]} == {str(photos / "locked"), str(other)}
    assert (ex["new"], ex["deleted"], ex["unchanged"]) == (2, 0, 3)
    assert f"cannot list folder {photos / 'locked'} (Permission denied)" in result.stderr
    assert sorted(indexed_paths(work / "index")) == live_files(tmp_path)  # nothing was taken for deleted
    errors = [json.loads(line)["path"] for line in (work / "features" / "errors.jsonl").read_text().splitlines()]
    assert errors == [str(photos / "locked"), str(other)]
    readable = rebuild([photos, other], work, tiny_model, workers=0)  # listed again: nothing to redo
    assert (readable.extract.unchanged, readable.extract.new, readable.extract.deleted) == (11, 0, 0)


def test_changed_file_is_extracted_again(tmp_path, tiny_model):
    root, work = tmp_path / "photos", tmp_path / "work"
    make_collection(root, range(6))
    rebuild([root], work, tiny_model, workers=0)
    target = root / "img0003.png"
    save_pattern(target, 999)
    os.utime(target, (time.time() + 5, time.time() + 5))
    report = rebuild([root], work, tiny_model, workers=0)
    assert (report.extract.changed, report.extract.extracted, report.index_built) == (1, 1, True)
    assert sorted(indexed_paths(work / "index")) == live_files(root)
    hits = Searcher(work / "index", model=tiny_model).search([target], k=1)[0].hits
    assert hits[0].path == str(target) and hits[0].score > 0.999


def test_compaction_drops_dead_rows(tmp_path, tiny_model):
    root, work = tmp_path / "photos", tmp_path / "work"
    make_collection(root, range(24))
    rebuild([root], work, tiny_model, workers=0, shard_size=6)
    assert len(list_shards(work / "features")) == 4
    for s in range(24):
        if s % 6 != 0:  # keep one image of each shard
            (root / f"img{s:04d}.png").unlink()
    report = rebuild([root], work, tiny_model, workers=0, shard_size=6)
    assert len(report.compacted) == 4 and len(list_shards(work / "features")) == 1
    assert sorted(indexed_paths(work / "index")) == live_files(root)


def test_overlapping_run_exits_75_and_stale_lock_is_taken_over(tmp_path, tiny_model, caplog):
    root, work = tmp_path / "photos", tmp_path / "work"
    make_collection(root, range(3))
    args = ["rebuild", str(root), "--workdir", str(work), "--model", str(tiny_model), "--workers", "0"]
    with exclusive_lock(work, "test"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 75 and "already running" in result.stderr
    (work / ".lock").write_text("999999")  # a run that was killed: its pid stays, its flock is gone
    result = CliRunner().invoke(app, args + ["--json"])
    assert result.exit_code == 0
    assert "did not finish" in result.stderr


def _rebuild_cmd(root: Path, work: Path, model: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "--verbose",
        "rebuild",
        str(root),
        "--workdir",
        str(work),
        "--model",
        str(model),
        "--workers",
        "1",
        "--batch-size",
        "2",
        "--shard-size",
        "3",
        "--compact-below",
        "0.7",
        "--flat-below",
        "30",
    ]


STOP_AT_STEP = stopping_program(
    """
from pipeline import fsutil
from pipeline.index import build, versions
from pipeline.features import catalog
from pipeline.features import folder as features

STEPS = [(owner, name, name) for owner, name in [
    (features, "write_shard"), (catalog.Catalog, "record_shard"), (catalog.Catalog, "mark_missing_gone"),
    (catalog.Catalog, "retire"), (fsutil, "publish"), (build, "fill_index"), (build, "update_base"),
    (versions, "prune_versions")]]
"""
)
KILL_POINTS = [
    ("write_shard", 1),
    ("record_shard", 1),
    ("mark_missing_gone", 1),  # extract
    ("publish", 1),  # extract's errors.jsonl
    ("write_shard", 3),
    ("retire", 1),  # compaction
    # index: filled, update's base loaded, CURRENT swapped, pruned
    ("fill_index", 1),
    ("update_base", 1),
    ("publish", 2),
    ("prune_versions", 1),
    ("record_shard", 2),
]


@pytest.mark.slow
def test_kill_at_any_moment(tmp_path, tiny_model):
    """SIGKILL rebuild right after each kind of step (shard written, recorded, files marked gone,
    errors list, compaction, index filled, base of an update loaded, published, pruned) over a changing
    collection; every time: the published index still answers, a rerun completes, and then every live
    image is indexed exactly once. The kill waits for the step, not for a clock: every run is the same.
    Runs update the published index (--retrain-above 100) except those stopped while filling a new
    index (--retrain), so the other index steps land in an update."""
    rng = random.Random(0)
    root, work = tmp_path / "photos", tmp_path / "work"
    make_collection(root, range(40))  # >= 39: an IVF index
    cmd = _rebuild_cmd(root, work, tiny_model)
    subprocess.run(cmd, check=True, capture_output=True)
    cmd += ["--retrain-above", "100"]
    next_seed = 1000
    for round_, (step, count) in enumerate(KILL_POINTS):
        files = sorted(root.rglob("*.png"))  # change the collection: add, delete, rename
        for p in rng.sample(files, 2):
            p.unlink()
        for p in rng.sample(sorted(root.rglob("*.png")), 2):
            p.rename(p.with_name(f"r{round_}_{p.name}"))
        make_collection(root, range(next_seed, next_seed + 4))
        next_seed += 4
        run = cmd + ["--retrain"] if step == "fill_index" else cmd
        kill_at_step(STOP_AT_STEP, step, count, tmp_path / f"stopped-{round_}", run[3:])  # (round_ in its marker)
        searcher = Searcher(work / "index", model=tiny_model)  # (a) the published index still answers
        assert len(searcher.search_vectors(np.ones((1, 64), np.float32) / 8, k=3)[0]) == 3
        subprocess.run(run, check=True, capture_output=True)  # (b) a rerun completes
        paths = indexed_paths(work / "index")  # (c) every live image once, nothing deleted
        assert sorted(paths) == live_files(root), f"round {round_}, killed after {step} #{count}"
        made_by = json.loads((current_version(work / "index") / "meta.json").read_text())["made_by"]
        assert made_by == ("build" if step == "fill_index" else "update"), f"round {round_}"


def test_the_nightly_job_keeps_the_kind_of_index_asked_for(tmp_path, tiny_model):
    """An index built with options (here compressed SQ8 codes with re-ranking) stays that kind through
    rebuilds: the nightly job takes no index options, and a re-plan by size would give a Flat index."""
    from pipeline.index import build_index

    root, work = tmp_path / "photos", tmp_path / "work"
    make_collection(root, range(12))
    rebuild([root], work, tiny_model, workers=0, shard_size=8)
    build_index(work / "features", work / "index", factory="SQ8", progress=False)
    for retrain, seeds in ((False, [100, 101]), (True, [200])):  # (a version with a vector store is built in full)
        make_collection(root, seeds)
        report = rebuild([root], work, tiny_model, workers=0, shard_size=8, retrain=retrain)
        meta = report.index_meta
        assert report.index_built
        assert (meta["factory"], meta["asked"]) == ("SQ8", {"factory": "SQ8"}) and meta["rerank"] > 0
        assert sorted(indexed_paths(work / "index")) == live_files(root)


def scrape(text: str) -> dict[str, float]:
    """Prometheus text format -> {name{labels}: value} (comments left out)."""
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_the_nightly_metrics_file_keeps_the_last_success_through_failures(tmp_path, tiny_model):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    root, work, metrics = tmp_path / "photos", tmp_path / "work", tmp_path / "textfile" / "pipeline.prom"
    metrics.parent.mkdir()
    make_collection(root, range(6))
    args = ["rebuild", str(root), "--workdir", str(work), "--model", str(tiny_model), "--workers", "0"]
    before = time.time()
    assert CliRunner().invoke(app, [*args, "--metrics-file", str(metrics)]).exit_code == 0
    text = metrics.read_text()
    assert {f.name for f in text_string_to_metric_families(text)} >= {  # node_exporter's parser reads it
        "pipeline_rebuild_last_run_exit_status",
        "pipeline_rebuild_last_success_timestamp_seconds",
        "pipeline_rebuild_images",
        "pipeline_rebuild_index_images",
    }
    first = scrape(text)
    assert first["pipeline_rebuild_last_run_exit_status"] == 0 and first['pipeline_rebuild_images{state="new"}'] == 6
    assert first["pipeline_rebuild_index_images"] == 6 and first["pipeline_rebuild_index_built"] == 1
    assert before <= first["pipeline_rebuild_last_success_timestamp_seconds"] <= time.time()

    broken = [*args[:5], str(tmp_path / "missing.onnx"), *args[6:], "--metrics-file", str(metrics)]
    failed = CliRunner().invoke(app, broken)  # the model file is gone: the run fails
    assert failed.exit_code == 1
    after = scrape(metrics.read_text())
    assert after["pipeline_rebuild_last_run_exit_status"] == 1
    assert (
        after["pipeline_rebuild_last_success_timestamp_seconds"]
        == first["pipeline_rebuild_last_success_timestamp_seconds"]
    )
    assert after["pipeline_rebuild_last_run_timestamp_seconds"] >= first["pipeline_rebuild_last_run_timestamp_seconds"]
    assert not list(metrics.parent.glob(".*tmp"))  # written atomically

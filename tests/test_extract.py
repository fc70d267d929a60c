"""Extraction: every bad file survived and listed, duplicates run once, resume after a crash or kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from helpers import misbehaving_decode, save_pattern, tiny_layers, write_bad_corpus
from pipeline.decode_pool import DecodePool, DecodeSettings
from pipeline.errors import BusyError, ModelMismatchError
from pipeline.extract import extract
from pipeline.features import ERRORS_FILE, list_shards, read_shard, shard_info
from pipeline.fsutil import exclusive_lock
from pipeline.images import load_image
from pipeline.index import build_index
from pipeline.model import FeatureModel, build_feature_graph, save_model
from pipeline.search import Searcher


def all_rows(features_dir: Path) -> tuple[list[str], np.ndarray, list[str]]:
    paths, feats, errors = [], [], []
    for p in list_shards(features_dir):
        d = read_shard(p)
        paths += d.paths
        feats.append(d.features)
        errors += d.error_paths
    return paths, np.concatenate(feats), errors


def test_bad_input_survives(tmp_path, tiny_model):
    good, bad = write_bad_corpus(tmp_path / "corpus")
    report = extract([tmp_path / "corpus"], tmp_path / "f", tiny_model, workers=1, progress=False)
    paths, feats, errors = all_rows(tmp_path / "f")
    assert sorted(Path(p).name for p in paths) == sorted(good)  # each decodable image exactly once
    assert np.isfinite(feats).all()
    assert report.failed == len(bad) and report.failed_total == len(bad)
    listed = [json.loads(line) for line in (tmp_path / "f" / ERRORS_FILE).read_text().splitlines()]
    reasons = {Path(e["path"]).name: e["reason"] for e in listed}
    assert set(reasons) == set(bad)
    for name, word in bad.items():
        assert word in reasons[name] and "\n" not in reasons[name]
    assert {Path(p).name for p, _ in report.failures} == set(bad)
    assert sorted(Path(p).name for p in errors) == sorted(bad)


def test_in_process_and_worker_decoding_agree(tmp_path, tiny_model, gallery):
    extract([gallery], tmp_path / "a", tiny_model, workers=0, progress=False)
    extract([gallery], tmp_path / "b", tiny_model, workers=2, batch_size=3, progress=False)
    pa, fa, _ = all_rows(tmp_path / "a")
    pb, fb, _ = all_rows(tmp_path / "b")
    order = np.argsort(pb)
    assert sorted(pa) == [pb[i] for i in order]
    np.testing.assert_allclose(fa[np.argsort(pa)], fb[order], atol=1e-6)


@pytest.mark.slow
def test_frame_recipe_trims_in_workers_and_in_queries(tmp_path):
    """A model that trims frames: extraction (decode workers) and search (queries) both trim, so a framed
    copy embeds as its original; the recipe is in the checksum, so it never mixes with an untrimmed one."""
    from PIL import Image, ImageOps

    model, info = build_feature_graph(tiny_layers(0), input_size=64, pooling="rmac", aspect=True, frame=True)
    save_model(model, tmp_path / "frame.onnx")
    assert info.checksum != build_feature_graph(tiny_layers(0), input_size=64, pooling="rmac", aspect=True)[1].checksum
    files = [save_pattern(tmp_path / "imgs" / f"p{i}.png", i, (96, 72)) for i in range(6)]
    (tmp_path / "q").mkdir()
    framed = []
    for i, f in enumerate(files):
        with Image.open(f) as im:
            framed_im = ImageOps.expand(im, border=(10 + i, 8), fill=(250, 250, 250) if i % 2 else (0, 0, 0))
            framed_im.save(tmp_path / "q" / f"{i}.png")
        framed.append(tmp_path / "q" / f"{i}.png")
    report = extract(
        [tmp_path / "imgs"], tmp_path / "f", tmp_path / "frame.onnx", workers=2, batch_size=2, progress=False
    )
    assert report.extracted == len(files) and not report.failures
    build_index(tmp_path / "f", tmp_path / "i", progress=False)
    results = Searcher(tmp_path / "i", model=tmp_path / "frame.onnx").search(framed, k=1)
    assert [r.hits[0].path for r in results] == [str(f) for f in files]
    assert min(r.hits[0].score for r in results) > 0.999  # the frame is gone (untrimmed: 0.98-0.997)


@pytest.mark.slow
def test_aspect_buckets_batch_per_shape_and_search_uses_them(tmp_path):
    model, info = build_feature_graph(tiny_layers(0), input_size=64, pooling="rmac", aspect=True)
    save_model(model, tmp_path / "aspect.onnx")
    sizes = [(96, 72), (72, 96), (80, 80), (128, 72), (96, 64), (64, 96), (72, 128)]  # width x height
    files = [save_pattern(tmp_path / "imgs" / f"p{i}.png", i, size) for i, size in enumerate(sizes)]
    report = extract(
        [tmp_path / "imgs"], tmp_path / "f", tmp_path / "aspect.onnx", workers=2, batch_size=2, progress=False
    )
    assert report.extracted == len(files) and not report.failures
    fm = FeatureModel(tmp_path / "aspect.onnx")
    alone = {str(f): fm.embed(load_image(f, info.resize_to).pixels[None])[0] for f in files}  # one image per run
    assert {load_image(f, info.resize_to).pixels.shape[:2] for f in files} == set(info.resize_to)  # every bucket used
    paths, feats, _ = all_rows(tmp_path / "f")
    want = np.stack([alone[p] for p in paths]).astype(np.float16).astype(np.float32)  # as the shards store them
    np.testing.assert_allclose(feats, want, rtol=1e-3, atol=1e-5)
    build_index(tmp_path / "f", tmp_path / "i", progress=False)
    results = Searcher(tmp_path / "i", model=tmp_path / "aspect.onnx").search(files, k=1)  # queries: same buckets
    assert [r.hits[0].path for r in results] == [str(f) for f in files]
    assert all(r.hits[0].score == pytest.approx(1.0, abs=1e-3) for r in results)


def test_duplicates_run_once_and_stay_findable(tmp_path, tiny_model):
    src = save_pattern(tmp_path / "imgs" / "one.png", 1)
    (tmp_path / "imgs" / "copy_a.png").write_bytes(src.read_bytes())
    (tmp_path / "imgs" / "copy_b.png").write_bytes(src.read_bytes())
    save_pattern(tmp_path / "imgs" / "two.png", 2)
    report = extract([tmp_path / "imgs"], tmp_path / "f", tiny_model, workers=1, progress=False)
    assert (report.extracted, report.duplicates) == (2, 2)
    (tmp_path / "imgs" / "later_copy.png").write_bytes(src.read_bytes())  # a copy of an earlier shard's image
    again = extract([tmp_path / "imgs"], tmp_path / "f", tiny_model, workers=0, progress=False)
    assert (again.extracted, again.duplicates, again.unchanged) == (0, 1, 4)
    paths, feats, _ = all_rows(tmp_path / "f")
    by_name = {Path(p).name: f for p, f in zip(paths, feats, strict=True)}
    assert len(paths) == 5
    for name in ("copy_a.png", "copy_b.png", "later_copy.png"):
        np.testing.assert_array_equal(by_name[name], by_name["one.png"])


def test_rerun_does_only_missing_work(tmp_path, tiny_model, gallery):
    first = extract([gallery], tmp_path / "f", tiny_model, workers=1, shard_size=5, progress=False)
    assert first.extracted == 12 and len(first.shards_written) == 3
    again = extract([gallery], tmp_path / "f", tiny_model, workers=1, shard_size=5, progress=False)
    assert (again.extracted, again.unchanged, again.shards_written) == (0, 12, [])
    list_shards(tmp_path / "f")[-1].unlink()  # as if the run had died before its last shard
    (tmp_path / "f" / ".shard-00003.h5.abc.tmp").write_bytes(b"half a shard")  # and left a temporary
    resumed = extract([gallery], tmp_path / "f", tiny_model, workers=1, shard_size=5, progress=False)
    assert resumed.extracted == 2
    paths, _, _ = all_rows(tmp_path / "f")
    assert Counter(paths).most_common(1)[0][1] == 1 and len(paths) == 12


def test_extract_hands_its_tasks_to_the_distributor_given(tmp_path, tiny_model, gallery):
    """Where the tasks run is the distributor's business (the CLI's --ray hands a RayDistributor): extract()
    calls it with the files to do, and the tasks it runs are recorded as a local run's."""
    from pipeline.extract import LocalDistributor

    asked = []

    class Watching(LocalDistributor):
        def embed_shards(self, job, files, catalog, report, bar) -> None:
            asked.append((job.shard_size, job.batch_size))
            super().embed_shards(job, files, catalog, report, bar)

    report = extract(
        [gallery],
        tmp_path / "f",
        tiny_model,
        workers=0,
        shard_size=5,
        batch_size=3,
        distributor=Watching(),
        progress=False,
    )
    assert asked == [(5, 3)] and report.extracted == 12 and len(report.shards_written) == 3
    again = extract([gallery], tmp_path / "f", tiny_model, workers=0, distributor=Watching(), progress=False)
    assert asked == [(5, 3)] and again.unchanged == 12  # nothing to do: the distributor is not called


STALL_AFTER_FIRST_SHARD = """
import sys
from pipeline import cli
from pipeline.features import folder as features

write_shard = features.write_shard

def write_then_stall(*args, **kwargs):
    write_shard(*args, **kwargs)
    open(sys.argv[1]).read()  # a FIFO nobody writes to: the run stops here, its first shard written, until killed

features.write_shard = write_then_stall
cli.app(sys.argv[2:], prog_name="pipeline")
"""


@pytest.mark.slow
def test_sigkill_then_rerun_has_every_image_once(tmp_path, tiny_model):
    for i in range(60):
        save_pattern(tmp_path / "imgs" / f"{i:03d}.png", i)
    args = [
        "extract",
        str(tmp_path / "imgs"),
        "--out",
        str(tmp_path / "f"),
        "--model",
        str(tiny_model),
        "--workers",
        "1",
        "--batch-size",
        "2",
        "--shard-size",
        "4",
    ]
    os.mkfifo(tmp_path / "stall")
    proc = subprocess.Popen(
        [sys.executable, "-c", STALL_AFTER_FIRST_SHARD, str(tmp_path / "stall"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not list_shards(tmp_path / "f"):  # a state, not a clock: the run cannot go past its first shard
        assert proc.poll() is None, "extract ended before writing its first shard"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [shard_info(p).count for p in list_shards(tmp_path / "f")] == [4]  # killed mid-run, shard not yet recorded
    subprocess.run(
        [sys.executable, "-m", "pipeline", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    paths, _, _ = all_rows(tmp_path / "f")
    assert sorted(Path(p).name for p in paths) == [f"{i:03d}.png" for i in range(60)]


def test_second_run_on_same_folder_is_refused(tmp_path, tiny_model, gallery):
    with exclusive_lock(tmp_path / "f", "test"):
        with pytest.raises(BusyError, match="already running") as err:
            extract([gallery], tmp_path / "f", tiny_model, progress=False)
    assert err.value.exit_code == 75
    extract([gallery], tmp_path / "f", tiny_model, workers=0, progress=False)  # the lock died with its holder


def test_features_of_another_model_are_refused(tmp_path, tiny_model, gallery):
    from helpers import write_tiny_model

    extract([gallery], tmp_path / "f", tiny_model, workers=0, progress=False)
    other = write_tiny_model(tmp_path / "other.onnx", seed=9)
    with pytest.raises(ModelMismatchError, match="separate features folder"):
        extract([gallery], tmp_path / "f", other, workers=0, progress=False)


def test_pool_survives_crashing_decoders(tmp_path):
    names = ["a.png", "crash.png", "b.png", "crash2.png", "c.png", "d.png"]
    for i, n in enumerate(names):
        save_pattern(tmp_path / n, i)
    paths = [str(tmp_path / n) for n in names]
    with DecodePool(2, DecodeSettings(16, 10**8, 30.0), prefetch=2, decode=misbehaving_decode) as pool:
        out = {Path(paths[i]).name: (d, e) for i, d, e in pool.imap(paths)}
    assert set(out) == set(names)
    assert "crashed" in str(out["crash.png"][1]) and "crashed" in str(out["crash2.png"][1])
    assert out["crash.png"][1].transient and out["crash2.png"][1].transient  # retried on later runs
    assert all(out[n][0] is not None for n in ("a.png", "b.png", "c.png", "d.png"))


def test_pool_replaces_a_hung_decoder(tmp_path):
    """Only the hung image is timed against the short limit: no good image can be too slow on a busy machine."""
    path = str(save_pattern(tmp_path / "hang.png", 0))
    with DecodePool(1, DecodeSettings(16, 10**8, 30.0), decode=misbehaving_decode, hard_timeout=1) as pool:
        hung = pool.procs[0]
        [(i, decoded, error)] = pool.imap([path])
        assert (i, decoded, str(error)) == (0, None, "decoding took longer than 1 s; skipped")
        assert error.transient
        assert not hung.is_alive() and pool.procs[0].is_alive()  # killed and replaced


def test_timeouts_under_load_are_retried_on_the_next_run(tmp_path, tiny_model):
    for i in range(3):
        save_pattern(tmp_path / "imgs" / f"{i}.png", i)
    loaded = extract([tmp_path / "imgs"], tmp_path / "f", tiny_model, workers=1, timeout=1e-6, progress=False)
    assert loaded.failed == 3  # every decode ran past its (absurd) time limit: a transient failure
    calm = extract([tmp_path / "imgs"], tmp_path / "f", tiny_model, workers=1, progress=False)
    assert (calm.retried, calm.still_failing, calm.extracted, calm.new, calm.failed_total) == (3, 0, 3, 0, 0)


def test_transient_failures_back_off_then_stop(tmp_path, tiny_model):
    save_pattern(tmp_path / "imgs" / "good.png", 1)
    link = tmp_path / "imgs" / "link.png"
    os.symlink(tmp_path / "elsewhere.png", link)  # broken until its target appears (a disk not mounted yet)
    retried_in = []
    for run in range(1, 41):
        report = extract([tmp_path / "imgs"], tmp_path / "f", tiny_model, workers=0, progress=False)
        assert report.failed_total == 1 and report.still_failing == report.retried
        if report.retried:
            retried_in.append(run)
    assert retried_in == [2, 4, 8, 16, 32]  # back-off doubling; 6 attempts, then only on a change
    forced = extract([tmp_path / "imgs"], tmp_path / "f", tiny_model, workers=0, retry_failed=True, progress=False)
    assert (forced.retried, forced.still_failing) == (1, 1)
    save_pattern(tmp_path / "elsewhere.png", 2)
    fixed = extract([tmp_path / "imgs"], tmp_path / "f", tiny_model, workers=0, progress=False)
    assert (fixed.retried, fixed.still_failing, fixed.extracted, fixed.failed_total) == (1, 0, 1, 0)
    assert sorted(Path(p).name for p in all_rows(tmp_path / "f")[0]) == ["good.png", "link.png"]


def test_content_failures_wait_for_a_change_of_the_file(tmp_path, tiny_model):
    save_pattern(tmp_path / "imgs" / "good.png", 1)
    bad = tmp_path / "imgs" / "bad.png"
    bad.write_text("not an image")
    extract([tmp_path / "imgs"], tmp_path / "f", tiny_model, workers=0, progress=False)
    for _ in range(3):  # bad content does not get better by itself
        again = extract([tmp_path / "imgs"], tmp_path / "f", tiny_model, workers=0, progress=False)
        assert (again.retried, again.unchanged, again.failed_total) == (0, 2, 1)
    ctime = bad.stat().st_ctime
    os.chmod(bad, 0o600)  # changes only ctime: e.g. a permission fixed by hand
    assert bad.stat().st_ctime != ctime, "the chmod must change ctime for this test to mean anything"
    chmodded = extract([tmp_path / "imgs"], tmp_path / "f", tiny_model, workers=0, progress=False)
    assert (chmodded.retried, chmodded.still_failing, chmodded.changed, chmodded.new) == (1, 1, 0, 0)
    save_pattern(bad, 2)
    replaced = extract([tmp_path / "imgs"], tmp_path / "f", tiny_model, workers=0, progress=False)
    assert (replaced.retried, replaced.still_failing, replaced.extracted, replaced.failed_total) == (1, 0, 1, 0)


def test_retry_failed_from_the_cli(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from pipeline.cli import app

    save_pattern(tmp_path / "imgs" / "good.png", 1)
    (tmp_path / "imgs" / "bad.png").write_text("not an image")
    args = [
        "extract",
        str(tmp_path / "imgs"),
        "--out",
        str(tmp_path / "f"),
        "--model",
        str(tiny_model),
        "--workers",
        "0",
    ]
    CliRunner().invoke(app, args)
    plain = json.loads(CliRunner().invoke(app, args + ["--json"]).stdout)
    assert (plain["retried"], plain["still_failing"], plain["failed_total"]) == (0, 0, 1)
    result = CliRunner().invoke(app, args + ["--retry-failed"])
    assert result.exit_code == 0, result.output
    assert "1 files that had failed before were tried again: 0 recovered, 1 still failing" in result.stderr


def test_a_folder_that_cannot_be_listed_keeps_its_images(tmp_path, tiny_model, monkeypatch):
    """The walk's error path, with the error injected (test_rebuild.py makes a really unreadable folder)."""
    import errno

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.features import Catalog

    for i in range(4):
        save_pattern(tmp_path / "imgs" / "ab"[i % 2] / f"{i}.png", i)
    extract([tmp_path / "imgs"], tmp_path / "f", tiny_model, workers=0, progress=False)
    broken = tmp_path / "imgs" / "b"
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == broken:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = CliRunner().invoke(
        app,
        [
            "extract",
            str(tmp_path / "imgs"),
            "--out",
            str(tmp_path / "f"),
            "--model",
            str(tiny_model),
            "--workers",
            "0",
            "--strict",
        ],
    )
    assert result.exit_code == 3, result.output
    assert f"{broken}: Input/output error" in result.stderr and "0 deleted" in result.stderr
    listed = [json.loads(line) for line in (tmp_path / "f" / ERRORS_FILE).read_text().splitlines()]
    assert listed == [
        {
            "path": str(broken),
            "reason": "folder cannot be listed (Input/output error); the images recorded under it keep their state",
        }
    ]
    with Catalog(tmp_path / "f") as catalog:
        live = sorted(Path(p).name for p, e in catalog.entries().items() if e.status == "live")
    assert live == ["0.png", "1.png", "2.png", "3.png"]


def test_counts_do_not_depend_on_the_scan_chunk(tmp_path, tiny_model, monkeypatch):
    """Walk, compare and decode 3 files at a time (folders of 2 to 6 images, shards of 4) and all at
    once: the same counts, the same live images, for new, changed, moved, deleted, duplicate, failed
    and unchanged files and a folder that cannot be listed."""
    import errno
    import shutil

    from pipeline.features import Catalog

    imgs = tmp_path / "imgs"
    for folder, seeds in {"a": range(4), "b": range(4, 8), "c": range(8, 12), "e": range(20, 22)}.items():
        for s in seeds:
            save_pattern(imgs / folder / f"{s}.png", s)
    extract([imgs], tmp_path / "small", tiny_model, workers=0, shard_size=4, scan_chunk=3, progress=False)
    shutil.copytree(tmp_path / "small", tmp_path / "large")
    for s, folder in ((0, "a"), (5, "b")):  # changed
        save_pattern(imgs / folder / f"{s}.png", 200 + s)
        os.utime(imgs / folder / f"{s}.png", (time.time() + 5, time.time() + 5))
    for s in range(100, 103):  # new
        save_pattern(imgs / "d" / f"new{s}.png", s)
    (imgs / "a" / "1.png").unlink()  # deleted
    (imgs / "c" / "9.png").unlink()
    (imgs / "a" / "2.png").rename(imgs / "d" / "moved2.png")  # moved
    (imgs / "c" / "10.png").rename(imgs / "a" / "moved10.png")
    shutil.copy(imgs / "b" / "6.png", imgs / "d" / "copy6.png")  # a copy of an image recorded before
    (imgs / "z").mkdir()
    shutil.copy(imgs / "d" / "new100.png", imgs / "z" / "copy100.png")  # a copy of an image new in this run
    (imgs / "d" / "bad.png").write_text("not an image")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == imgs / "e":
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    runs = {
        name: extract(
            [imgs], tmp_path / name, tiny_model, workers=0, shard_size=4, batch_size=2, scan_chunk=chunk, progress=False
        )
        for name, chunk in (("small", 3), ("large", 10_000))
    }
    counts = {
        name: (
            r.found,
            r.unchanged,
            r.new,
            r.changed,
            r.moved,
            r.deleted,
            r.extracted,
            r.duplicates,
            r.failed,
            r.unreadable_folders,
        )
        for name, r in runs.items()
    }
    assert counts["small"] == counts["large"] == (16, 6, 6, 2, 2, 2, 5, 2, 1, [(str(imgs / "e"), "Input/output error")])
    live = {}
    for name in runs:
        with Catalog(tmp_path / name) as catalog:
            live[name] = sorted(p for p, e in catalog.entries().items() if e.status == "live")
    assert live["small"] == live["large"] and len(live["small"]) == 15 + 2  # e's two images kept
    monkeypatch.undo()
    again = extract([imgs], tmp_path / "small", tiny_model, workers=0, shard_size=4, scan_chunk=3, progress=False)
    assert (again.found, again.unchanged, again.new, again.deleted, again.extracted) == (18, 18, 0, 0, 0)

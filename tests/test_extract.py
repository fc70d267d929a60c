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

from helpers import misbehaving_decode, save_pattern, write_bad_corpus
from pipeline.decode_pool import DecodePool, DecodeSettings
from pipeline.errors import BusyError, ModelMismatchError
from pipeline.extract import ERRORS_FILE, extract
from pipeline.fsutil import exclusive_lock
from pipeline.shards import list_shards, read_shard, shard_info


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
    by_name = {Path(p).name: f for p, f in zip(paths, feats)}
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


STALL_AFTER_FIRST_SHARD = """
import sys
from pipeline import cli, extract

write_shard = extract.write_shard

def write_then_stall(*args, **kwargs):
    write_shard(*args, **kwargs)
    open(sys.argv[1]).read()  # a FIFO nobody writes to: the run stops here, its first shard written, until killed

extract.write_shard = write_then_stall
cli.app(sys.argv[2:], prog_name="pipeline")
"""


def test_sigkill_then_rerun_has_every_image_once(tmp_path, tiny_model):
    for i in range(60):
        save_pattern(tmp_path / "imgs" / f"{i:03d}.png", i)
    args = ["extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "f"), "--model", str(tiny_model),
            "--workers", "1", "--batch-size", "2", "--shard-size", "4"]
    os.mkfifo(tmp_path / "stall")
    proc = subprocess.Popen([sys.executable, "-c", STALL_AFTER_FIRST_SHARD, str(tmp_path / "stall"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list_shards(tmp_path / "f"):  # a state, not a clock: the run cannot go past its first shard
        assert proc.poll() is None, "extract ended before writing its first shard"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [shard_info(p).count for p in list_shards(tmp_path / "f")] == [4]  # killed mid-run, shard not yet recorded
    subprocess.run([sys.executable, "-m", "pipeline", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
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
    assert "crashed" in out["crash.png"][1] and "crashed" in out["crash2.png"][1]
    assert all(out[n][0] is not None for n in ("a.png", "b.png", "c.png", "d.png"))


def test_pool_replaces_a_hung_decoder(tmp_path):
    """Only the hung image is timed against the short limit: no good image can be too slow on a busy machine."""
    path = str(save_pattern(tmp_path / "hang.png", 0))
    with DecodePool(1, DecodeSettings(16, 10**8, 30.0), decode=misbehaving_decode, hard_timeout=1) as pool:
        hung = pool.procs[0]
        [(i, decoded, error)] = pool.imap([path])
        assert (i, decoded, error) == (0, None, "decoding took longer than 1 s; skipped")
        assert not hung.is_alive() and pool.procs[0].is_alive()  # killed and replaced

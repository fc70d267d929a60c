"""Extraction and index building on a local Ray cluster give what a local run gives, and survive kills."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import clustered_vectors, save_pattern, write_synthetic_shards
from pipeline import distributed
from pipeline.cli import app
from pipeline.distributed import RayDistributor
from pipeline.errors import PipelineError
from pipeline.extract import extract
from pipeline.features import Catalog, list_shards, read_shard
from pipeline.index import build_index
from pipeline.search import Searcher

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> str:
    """One local Ray cluster for the module (starting one takes seconds); its address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def features_by_path(features_dir: Path) -> dict[str, np.ndarray]:
    """Every live feature of a features folder by path; fails on a path recorded twice."""
    with Catalog(features_dir) as catalog:
        live = catalog.live_rows()
    out: dict[str, np.ndarray] = {}
    for name, rows in live.items():
        data = read_shard(features_dir / name)
        for r in rows:
            assert data.paths[r] not in out, f"{data.paths[r]} recorded twice"
            out[data.paths[r]] = data.features[r]
    return out


def test_ray_extract_equals_local(cluster, gallery, tiny_model, tmp_path):
    (gallery / "copy.png").write_bytes((gallery / "a" / "img01.PNG").read_bytes())  # a duplicate
    (gallery / "broken.jpg").write_bytes(b"not an image")
    local = extract([gallery], tmp_path / "local", tiny_model, workers=0, shard_size=5, progress=False)
    on_ray = extract(
        [gallery],
        tmp_path / "ray",
        tiny_model,
        workers=0,
        shard_size=5,
        distributor=RayDistributor(cluster),
        progress=False,
    )
    a, b = features_by_path(tmp_path / "local"), features_by_path(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 13
    assert all(np.array_equal(a[p], b[p]) for p in a)  # bitwise
    # the copy is in another task than its original: it waits for its original's shard and reuses its feature
    assert (on_ray.extracted, on_ray.duplicates) == (local.extracted, local.duplicates) == (12, 1)
    assert on_ray.failed == local.failed == 1
    assert [p for p, _ in on_ray.failures] == [str(gallery / "broken.jpg")]
    again = extract(
        [gallery],
        tmp_path / "ray",
        tiny_model,
        workers=0,
        shard_size=5,
        distributor=RayDistributor(cluster),
        progress=False,
    )
    assert again.extracted == 0 and again.unchanged == 14


@pytest.mark.slow
def test_moved_and_duplicate_files_on_ray_reuse_features(cluster, gallery, tiny_model, tmp_path):
    runs = {}
    for name, distributor in (("local", None), ("ray", RayDistributor(cluster))):
        photos = shutil.copytree(gallery, tmp_path / name / "photos")
        first = extract(
            [photos],
            tmp_path / name / "f",
            tiny_model,
            workers=0,
            shard_size=1,
            distributor=distributor,
            progress=False,
        )
        assert first.extracted == 12
        (photos / "c").mkdir()
        (photos / "a" / "img01.PNG").rename(photos / "c" / "img01.PNG")  # moved
        (photos / "d").mkdir()
        (photos / "d" / "copy.jpg").write_bytes((photos / "b" / "deep" / "img00.jpg").read_bytes())  # a known content
        # a new content, twice: in two tasks (shard_size=1), the second cut while the first is in flight
        save_pattern(photos / "c" / "new.png", seed=60)
        (photos / "c" / "new_copy.png").write_bytes((photos / "c" / "new.png").read_bytes())
        runs[name] = extract(
            [photos],
            tmp_path / name / "f",
            tiny_model,
            workers=0,
            shard_size=1,
            distributor=distributor,
            progress=False,
        )
    local, on_ray = runs["local"], runs["ray"]
    assert (on_ray.extracted, on_ray.moved, on_ray.duplicates, on_ray.deleted) == (1, 1, 2, 0)
    assert (local.extracted, local.moved, local.duplicates, local.deleted) == (1, 1, 2, 0)
    a, b = (
        {Path(p).relative_to(tmp_path / name): f for p, f in features_by_path(tmp_path / name / "f").items()}
        for name in ("local", "ray")
    )
    assert sorted(a) == sorted(b) and len(a) == 15
    assert all(np.array_equal(a[p], b[p]) for p in a)  # bitwise


def gated_decode(path, settings, use_alarm):
    """Decode as the pipeline does; a file named hold* first writes its process id to `started`
    beside it, then waits for a file `open` there."""
    from pipeline.decode_pool import decode_one

    p = Path(path)
    if p.name.startswith("hold"):
        (p.parent / "started").write_text(str(os.getpid()))
        while not (p.parent / "open").exists():
            time.sleep(0.02)
    return decode_one(path, settings, use_alarm)


def wait_for(condition, what: str, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def assert_each_once(features_dir: Path, n: int) -> None:
    """n live images, each in exactly one row of one shard."""
    assert len(features_by_path(features_dir)) == n
    paths = [p for s in list_shards(features_dir) for p in read_shard(s, features=False).paths]
    assert len(paths) == len(set(paths)) == n


def test_worker_killed_mid_task(cluster, gallery, tiny_model, tmp_path, monkeypatch):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's decode, sent to the worker
    monkeypatch.setattr(distributed, "decode_one", gated_decode)
    save_pattern(gallery / "b" / "hold.png", seed=50)
    result = {}
    run = threading.Thread(
        target=lambda: result.update(
            report=extract(
                [gallery],
                tmp_path / "f",
                tiny_model,
                workers=0,
                shard_size=2,
                distributor=RayDistributor(cluster),
                progress=False,
            )
        )
    )
    run.start()
    started = gallery / "b" / "started"
    wait_for(started.exists, "the worker to start on the held file")
    os.kill(int(started.read_text()), signal.SIGKILL)  # the actor process, blocked inside a task
    (gallery / "b" / "open").touch()
    run.join()
    assert result["report"].failed == 0
    assert_each_once(tmp_path / "f", 13)


def killing_decode(path, settings, use_alarm):
    """Decode as the pipeline does, but a file named poison* kills the process decoding it."""
    from pipeline.decode_pool import decode_one

    if Path(path).name.startswith("poison"):
        os.kill(os.getpid(), signal.SIGKILL)
    return decode_one(path, settings, use_alarm)


@pytest.mark.slow
def test_a_file_that_kills_its_worker_is_reported_not_retried_forever(
    cluster, gallery, tiny_model, tmp_path, monkeypatch
):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(distributed, "decode_one", killing_decode)
    poison = save_pattern(gallery / "a" / "poison.png", seed=51)
    report = extract(
        [gallery],
        tmp_path / "f",
        tiny_model,
        workers=0,
        shard_size=4,
        distributor=RayDistributor(cluster),
        progress=False,
    )
    assert [p for p, _ in report.failures] == [str(poison)] and "Ray worker" in report.failures[0][1]
    assert_each_once(tmp_path / "f", 12)
    with Catalog(tmp_path / "f") as catalog:
        assert [p for p, _ in catalog.failures()] == [str(poison)]


DRIVER = """
import sys
from typer.testing import CliRunner

from pipeline import distributed
from pipeline.cli import app
from pipeline.extract import extract
from pipeline.index import build_index
from pipeline.search import Searcher
from test_distributed import gated_decode
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
ray.cloudpickle.register_pickle_by_value(sys.modules["test_distributed"])
distributed.decode_one = gated_decode
extract([sys.argv[2]], sys.argv[3], sys.argv[4], workers=0, shard_size=2,
        distributor=distributed.RayDistributor(sys.argv[1]), progress=False)
"""


@pytest.mark.slow
def test_driver_killed_then_rerun(cluster, gallery, tiny_model, tmp_path):
    save_pattern(gallery / "b" / "hold.png", seed=50)
    features = tmp_path / "f"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, cluster, str(gallery), str(features), str(tiny_model)], env=env
    )
    try:

        def recorded() -> int:
            if not (features / "catalog.sqlite").exists():
                return 0
            with Catalog(features) as catalog:
                return len(catalog.shard_rows())

        wait_for(
            lambda: (gallery / "b" / "started").exists() and recorded() > 0, "a recorded shard and a task in flight"
        )
        assert driver.poll() is None, "the driver ended before it was killed"
    finally:
        driver.kill()
        driver.wait()
    rerun = extract(
        [gallery], features, tiny_model, workers=0, shard_size=2, distributor=RayDistributor(cluster), progress=False
    )
    assert 0 < rerun.extracted < 13 and rerun.failed == 0
    assert_each_once(features, 13)


@pytest.mark.slow
def test_ray_index_equals_local(cluster, tmp_path):
    write_synthetic_shards(tmp_path / "f", clustered_vectors(4000, clusters=50), 500)
    local = build_index(tmp_path / "f", tmp_path / "local", flat_below=1000, recall_queries=300, progress=False)
    on_ray = build_index(
        tmp_path / "f",
        tmp_path / "ray",
        flat_below=1000,
        recall_queries=300,
        distributor=RayDistributor(cluster),
        progress=False,
    )
    for key in ("factory", "count", "nprobe", "recall_at_10"):
        assert on_ray.meta[key] == local.meta[key]
    a, b = (Path(r.version_dir) for r in (local, on_ray))
    assert (a / "index.faiss").read_bytes() == (b / "index.faiss").read_bytes()  # same lists, same ids, same order
    queries = [f"/synthetic/{i:07d}.jpg" for i in range(0, 4000, 97)]
    here, there = Searcher(tmp_path / "local"), Searcher(tmp_path / "ray")
    assert here.search_like(queries, k=10) == there.search_like(queries, k=10)


def test_ray_exact_index_is_filled_by_the_driver(cluster, tmp_path):
    write_synthetic_shards(tmp_path / "f", clustered_vectors(300), 100)
    report = build_index(tmp_path / "f", tmp_path / "i", distributor=RayDistributor(cluster), progress=False)
    assert report.meta["factory"] == "Flat" and report.meta["count"] == 300


def test_nightly_job_on_ray_through_the_cli(cluster, gallery, tiny_model, tmp_path):
    runs = {}
    for name, extra in (("local", []), ("ray", ["--ray", cluster])):
        result = CliRunner().invoke(
            app,
            [
                "rebuild",
                str(gallery),
                "--workdir",
                str(tmp_path / name),
                "--model",
                str(tiny_model),
                "--workers",
                "0",
                "--shard-size",
                "5",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        runs[name] = Searcher(tmp_path / name / "index").search(sorted(gallery.rglob("img0*")), k=5)
    assert runs["ray"] == runs["local"]


def test_missing_ray_is_one_line(monkeypatch, gallery, tiny_model, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(PipelineError, match=r"pip install 'pipeline\[ray\]'"):
        extract([gallery], tmp_path / "f", tiny_model, distributor=RayDistributor("auto"), progress=False)
    with pytest.raises(PipelineError, match=r"pip install 'pipeline\[ray\]'"):
        build_index(tmp_path / "f", tmp_path / "i", distributor=RayDistributor("auto"), progress=False)
    result = CliRunner().invoke(app, ["extract", str(gallery), "--out", str(tmp_path / "f"), "--ray", "auto"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --ray needs the ray package: pip install 'pipeline[ray]'"

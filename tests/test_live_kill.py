"""Additions and removals under SIGKILL at named points, and interleaved with the nightly job at named points.

Every kill waits for its point (a marker file written by the stopped process), never for a clock. After each
kill: every acknowledged addition is found, no unacknowledged half-addition is visible, no acknowledged
removal comes back, and a rerun (or the next rebuild) completes with each image indexed exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import kill_at_step, png_bytes, save_pattern, serve_child, stopping_program, wait_for
from pipeline.features import Journal, fold_live, writing
from pipeline.images import decode_bytes
from pipeline.ingest import Collection
from pipeline.model import FeatureModel
from pipeline.rebuild import rebuild
from pipeline.search import Searcher

STOP_AT = stopping_program(
    """
from pipeline import ingest
from pipeline.features import catalog, folder, live

STEPS = [
    (ingest, "atomic_write_bytes", "file stored"),  # an addition's bytes durable, no row yet
    (live.Journal, "add", "row committed"),  # the addition acknowledged
    (live.Journal, "remove", "removal committed"),  # before an added file is deleted
    (folder, "write_shard", "fold shard written"),  # the fold comes first in a rebuild: its shard
    (catalog.Catalog, "record_shard", "shard recorded"),  # folded rows in the catalog, the journal not told
    (live.Journal, "mark_folded", "marked folded"),
]
"""
)


def run_until(tmp_path: Path, point: str, count: int, args: list[str]) -> None:
    """Run `pipeline ARGS` in a child, stopped right after the count-th `point`, and SIGKILL it there."""
    kill_at_step(
        STOP_AT, point, count, tmp_path / f"stopped-{point.replace(' ', '-')}-{count}-{time.monotonic_ns()}", args
    )


def top_ids(work: Path, model: Path, data: bytes, k: int = 50) -> list[int]:
    fm = FeatureModel(model)
    vector = fm.embed_each([decode_bytes(data, fm.info.resize_to)])[0]
    return [h.id for h in Searcher(work / "index", model).search_vectors(vector[None], k=k)[0]]


def indexed_once(work: Path, model: Path) -> dict[str, int]:
    """path -> id of everything a fresh searcher can return (version and live part), each exactly once."""
    searcher = Searcher(work / "index", model)
    live = searcher.live
    paths = searcher.indexed_paths()
    ids = searcher.ids()
    seen = dict(zip(paths, ids.tolist(), strict=True))
    excluded = live.excluded if live is not None else frozenset()
    out = {p: i for p, i in seen.items() if i not in excluded}
    for idx, a in live.images.items() if live is not None else []:
        if idx in excluded:
            continue
        assert a.path not in out, f"{a.path} is both in the version and in the live part"
        out[a.path] = idx
    assert len(set(out.values())) == len(out)
    return out


@pytest.mark.slow
def test_kills_of_add_and_remove_lose_no_acknowledged_change(tmp_path, workdir, tiny_model):
    new = [save_pattern(tmp_path / "new" / f"n{i}.png", 7000 + i) for i in range(4)]
    add = ["add", "--workdir", str(workdir), "--model", str(tiny_model)]
    # killed with the first file's bytes stored, before its row: nothing visible, the rerun adds it once
    run_until(tmp_path, "file stored", 1, [*add, str(new[0])])
    assert Journal(workdir / "features").counts()["live"] == 0
    assert len(list((workdir / "ingest").rglob("*.png"))) == 1  # the orphan, deleted by the fold in an hour
    # killed right after the second file's row committed (acknowledged): found after the "restart"
    run_until(tmp_path, "row committed", 2, [*add, str(new[0]), str(new[1]), str(new[2])])
    journal = Journal(workdir / "features")
    added = {a.path: a.id for a in journal.live()}
    assert len(added) == 2
    for a in journal.live():
        assert a.id in top_ids(workdir, tiny_model, Path(a.path).read_bytes(), k=1)
    # a removal killed after its row, before its file went: never returned again; the fold deletes the file
    victim = sorted(added)[0]
    run_until(tmp_path, "removal committed", 1, ["remove", victim, "--workdir", str(workdir)])
    assert Path(victim).exists() and added[victim] not in top_ids(workdir, tiny_model, Path(victim).read_bytes())
    # the nightly job killed at each step of its fold; every time a rerun brings every image exactly once
    photos = workdir.parent / "photos"
    job = ["rebuild", str(photos), "--workdir", str(workdir), "--model", str(tiny_model), "--workers", "0"]
    subprocess.run([sys.executable, "-m", "pipeline", *add, str(new[3])], check=True, capture_output=True)
    for point in ("fold shard written", "shard recorded", "marked folded"):
        run_until(tmp_path, point, 1, job)
        assert set(indexed_once(workdir, tiny_model)) >= {str(p) for p in photos.glob("*.png")}
        subprocess.run([sys.executable, "-m", "pipeline", *job], check=True, capture_output=True)
        # (the next round needs something to fold)
        more = save_pattern(tmp_path / "more" / f"{len(point)}.png", 9000 + len(point))
        subprocess.run([sys.executable, "-m", "pipeline", *add, str(more)], check=True, capture_output=True)
    assert not Path(victim).exists()
    final = indexed_once(workdir, tiny_model)
    journal = Journal(workdir / "features")
    for a in journal.live():
        assert final[a.path] == a.id  # the id it was given, before and after its fold
    assert victim not in final
    assert {str(p) for p in photos.glob("*.png")} <= set(final)
    assert len([p for p in final if "/ingest/" in p]) == len(journal.live())


def test_an_addition_during_the_fold_stays_live_and_is_folded_the_next_night(workdir, tiny_model, monkeypatch):
    """Interleaving point: an addition committed after the fold read the journal, before it marked its rows
    folded (and so before the build): the new version lacks it, the live part serves it, the next rebuild folds it."""
    fm = FeatureModel(tiny_model)
    first, late = png_bytes(8000), png_bytes(8001)
    vec = {d: fm.embed_each([decode_bytes(d, fm.info.resize_to)])[0] for d in (first, late)}
    collection = Collection(workdir, fm.info.checksum, fm.info.dim)
    a = collection.add(first, vec[first])
    real = Journal.mark_folded
    sneaked: list[int] = []

    def mark_folded(self, ids, shard):
        if not sneaked:
            sneaked.append(collection.add(late, vec[late]).id)
        return real(self, ids, shard)

    monkeypatch.setattr(Journal, "mark_folded", mark_folded)
    rebuild([workdir.parent / "photos"], workdir, tiny_model, workers=0)
    monkeypatch.setattr(Journal, "mark_folded", real)
    searcher = Searcher(workdir / "index", tiny_model)
    assert searcher.id_table.path_of(a.id) is not None and searcher.id_table.path_of(sneaked[0]) is None
    assert searcher.live is not None and list(searcher.live.images) == sneaked
    assert searcher.search_vectors(vec[late][None], k=1)[0][0].id == sneaked[0]
    rebuild([workdir.parent / "photos"], workdir, tiny_model, workers=0)
    searcher = Searcher(workdir / "index", tiny_model)
    assert searcher.id_table.path_of(sneaked[0]) is not None and searcher.live is not None and not len(searcher.live)
    assert [h.id for h in searcher.search_vectors(vec[late][None], k=40)[0]].count(sneaked[0]) == 1


def test_a_removal_during_the_build_is_never_returned_by_the_version_it_publishes(workdir, tiny_model, monkeypatch):
    """Interleaving point: a removal committed after the fold wrote the image into the shards, while the index is
    built: the published version holds the image, and every searcher leaves it out; the next rebuild drops it."""
    from pipeline.index import build as build_module

    fm = FeatureModel(tiny_model)
    data = png_bytes(8100)
    vec = fm.embed_each([decode_bytes(data, fm.info.resize_to)])[0]
    collection = Collection(workdir, fm.info.checksum, fm.info.dim)
    a = collection.add(data, vec)
    real = build_module.build_index
    removed: list[str] = []

    def build_index(*args, **kwargs):
        removed.append(collection.remove(a.path).path)
        return real(*args, **kwargs)

    monkeypatch.setattr(sys.modules["pipeline.rebuild"], "build_index", build_index)
    rebuild([workdir.parent / "photos"], workdir, tiny_model, workers=0)
    monkeypatch.undo()
    searcher = Searcher(workdir / "index", tiny_model)
    assert removed and searcher.id_table.path_of(a.id) == a.path  # in the version...
    assert a.id not in [h.id for h in searcher.search_vectors(vec[None], k=50)[0]]  # ...never returned
    report = rebuild([workdir.parent / "photos"], workdir, tiny_model, workers=0)
    assert report.folded.gone == 1 and report.index_built
    assert Searcher(workdir / "index", tiny_model).id_table.path_of(a.id) is None


def test_additions_do_not_wait_for_a_running_extract_and_a_fold_waits_for_nothing_long(workdir, tiny_model):
    """Interleaving point: an extract (or a rebuild) holds the features folder's lock for as long as it runs;
    additions and removals take only the journal's lock, for milliseconds, and go on meanwhile."""
    fm = FeatureModel(tiny_model)
    data = png_bytes(8200)
    vec = fm.embed_each([decode_bytes(data, fm.info.resize_to)])[0]
    with Collection(workdir, fm.info.checksum, fm.info.dim) as collection, writing(workdir / "features"):
        t0 = time.monotonic()
        added = collection.add(data, vec)
        collection.remove(str(workdir.parent / "photos" / "img0001.png"))
        assert time.monotonic() - t0 < 5  # (a stated bound, far above the milliseconds it takes)
    assert added.id in top_ids(workdir, tiny_model, data, k=1)


def test_a_removal_and_an_addition_of_the_same_bytes_keep_file_and_row_together(workdir, tiny_model):
    """Interleaving point: the same bytes removed by one writer and added again by another, in either order around
    the journal's lock: the file exists exactly when a live row names it, and only the newest id is returned."""
    fm = FeatureModel(tiny_model)
    data = png_bytes(8300)
    vec = fm.embed_each([decode_bytes(data, fm.info.resize_to)])[0]
    one = Collection(workdir, fm.info.checksum, fm.info.dim)
    other = Collection(workdir, fm.info.checksum, fm.info.dim)
    first = one.add(data, vec)
    results: dict[str, object] = {}
    with one.journal.locked():  # the remover holds the lock; the adder waits for it, then stores anew
        adder = threading.Thread(target=lambda: results.setdefault("added", other.add(data, vec)))
        adder.start()
        time.sleep(0.05)  # (no assertion depends on it: the lock orders the two either way)
        ids = one.journal.remove(first.path)
        Path(first.path).unlink()
    adder.join()
    again = results["added"]
    assert ids == [first.id] and again.id != first.id and Path(again.path).exists()  # type: ignore[attr-defined]
    found = top_ids(workdir, tiny_model, data)
    assert again.id in found and first.id not in found  # type: ignore[attr-defined]
    report = fold_live(workdir / "features")
    assert report.deleted == 0 and Path(again.path).exists()  # type: ignore[attr-defined]


def test_a_searcher_sees_each_image_once_across_the_publish_that_folds_it(workdir, tiny_model):
    """Interleaving point: a searcher of the old version (in flight across the publish) still finds an addition in
    its live part; one of the new version finds it in the version; neither returns it twice."""
    fm = FeatureModel(tiny_model)
    data = png_bytes(8400)
    vec = fm.embed_each([decode_bytes(data, fm.info.resize_to)])[0]
    with Collection(workdir, fm.info.checksum, fm.info.dim) as collection:
        a = collection.add(data, vec)
    old = Searcher(workdir / "index", tiny_model)
    rebuild([workdir.parent / "photos"], workdir, tiny_model, workers=0)
    new = Searcher(workdir / "index", tiny_model)
    for s in (old, new):
        assert [h.id for h in s.search_vectors(vec[None], k=45)[0]].count(a.id) == 1
    assert old.version_dir != new.version_dir
    assert json.loads((new.version_dir / "meta.json").read_text())["count"] == old.count + 1
    assert np.isclose(new.search_vectors(vec[None], k=1)[0][0].score, 1.0, atol=1e-3)


@pytest.mark.slow
def test_a_killed_writable_service_keeps_every_acknowledged_addition(tmp_path, workdir, tiny_model):
    """SIGKILL `pipeline serve --writable` while 4 clients add images: after a restart every addition answered 201
    is found, every row the journal holds names its whole file, and removals answered 204 stay removed."""
    httpx = pytest.importorskip("httpx")
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    auth = {"X-API-Key": "s3cret"}
    acked: dict[int, bytes] = {}
    removed: list[int] = []
    stop = threading.Event()
    with serve_child(workdir / "index", tiny_model, "--writable", "--api-key-file", str(key)) as (child, url):

        def client(n: int) -> None:
            seed = 20_000 + 1000 * n
            while not stop.is_set():
                data = png_bytes(seed)
                seed += 1
                try:
                    r = httpx.post(f"{url}/api/images", files={"image": ("a.png", data)}, headers=auth, timeout=30)
                    assert r.status_code == 201, r.text
                    acked[r.json()["id"]] = data
                    if seed % 4 == 0:
                        gone = httpx.delete(f"{url}/api/images/{r.json()['id']}", headers=auth)
                        assert gone.status_code == 204, gone.text
                        removed.append(r.json()["id"])
                except httpx.TransportError:
                    return  # the service was killed

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(acked) >= 12 or not any(t.is_alive() for t in threads), "12 acknowledged additions")
        child.kill()  # (SIGKILL) with additions in flight
        child.wait()
        stop.set()
        for t in threads:
            t.join()
    assert len(acked) >= 12, "a client failed (its assertion is in the log above)"
    journal = Journal(workdir / "features")
    for a in journal.live():
        assert Path(a.path).read_bytes() == acked.get(a.id, Path(a.path).read_bytes())  # each row's whole file
    live_ids = {a.id for a in journal.live()}
    assert set(acked) - set(removed) <= live_ids  # every acknowledged addition, after the "restart"
    searcher = Searcher(workdir / "index", tiny_model)
    fm = FeatureModel(tiny_model)
    for idx, data in list(acked.items())[:12]:
        vector = fm.embed_each([decode_bytes(data, fm.info.resize_to)])[0]
        found = [h.id for h in searcher.search_vectors(vector[None], k=3)[0]]
        assert (idx in found) == (idx not in removed)

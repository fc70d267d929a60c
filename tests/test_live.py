"""Images in and out between nightly builds: added durably, found at once, removed for good, folded at night."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import png_bytes, save_pattern
from pipeline.cli import app
from pipeline.errors import InputError
from pipeline.features import LIVE_FIRST_ID, Journal, fold_live, list_shards
from pipeline.ingest import Collection, add_files, open_collection
from pipeline.model import FeatureModel
from pipeline.rebuild import rebuild
from pipeline.search import Searcher


def embed(model: FeatureModel, data: bytes) -> np.ndarray:
    from pipeline.images import decode_bytes

    return model.embed_each([decode_bytes(data, model.info.resize_to)])[0]


def test_an_addition_is_found_by_the_next_search_and_a_copy_answers_its_id(workdir, tiny_model):
    model = FeatureModel(tiny_model)
    searcher = Searcher(workdir / "index", tiny_model)
    before = searcher.count
    data = png_bytes(1000)
    with Collection(workdir, model.info.checksum, model.info.dim) as collection:
        added = collection.add(data, embed(model, data), {"sku": "A12", "price": 40})
        assert added.id >= LIVE_FIRST_ID and added.duplicate_of is None
        assert Path(added.path).read_bytes() == data and "/ingest/" in added.path
        again = collection.add(data, embed(model, data))
        assert (again.id, again.duplicate_of) == (added.id, added.id)
        # bytes the index already holds answer that image's id
        indexed = workdir.parent / "photos" / "img0003.png"
        old = collection.add(indexed.read_bytes(), embed(model, indexed.read_bytes()))
        assert old.duplicate_of is not None and old.path == str(indexed)
    hit = searcher.search_vectors(embed(model, data)[None], k=3)[0][0]
    assert (hit.id, hit.path, round(hit.score, 4)) == (added.id, added.path, 1.0)
    assert hit.metadata["sku"] == "A12" and hit.metadata["width"] == 96
    assert searcher.count == before
    # filters see additions, their own fields included
    assert [h.id for h in searcher.search_vectors(embed(model, data)[None], k=3, where=["sku=A12"])[0]] == [added.id]
    assert searcher.search_vectors(embed(model, data)[None], k=3, where=["price>50"])[0] == []
    # --like by the added path, and a fresh searcher (a restart) sees it too
    like = searcher.search_like([added.path], k=1)[0]
    assert like.hits[0].id == added.id
    assert Searcher(workdir / "index", tiny_model).path_of(added.id) == added.path


def test_removal_hides_a_users_file_and_deletes_an_added_one_across_restarts_and_rebuilds(workdir, tiny_model):
    model = FeatureModel(tiny_model)
    searcher = Searcher(workdir / "index", tiny_model)
    users = str(workdir.parent / "photos" / "img0005.png")
    query = embed(model, Path(users).read_bytes())[None]
    assert searcher.search_vectors(query, k=1)[0][0].path == users
    data = png_bytes(2000)
    with Collection(workdir, model.info.checksum, model.info.dim) as collection:
        added = collection.add(data, embed(model, data))
        gone = collection.remove(added.path)
        assert gone.deleted and gone.ids == [added.id] and not Path(added.path).exists()
        hidden = collection.remove(users)
        assert not hidden.deleted and Path(users).exists()
        with pytest.raises(InputError):
            collection.unhide(added.path)
    for s in (searcher, Searcher(workdir / "index", tiny_model)):
        found = s.search_vectors(query, k=50)[0]
        assert users not in {h.path for h in found}
        assert added.id not in {h.id for h in s.search_vectors(embed(model, data)[None], k=50)[0]}
    rebuild([workdir.parent / "photos"], workdir, tiny_model, workers=0, shard_size=16, retrain=True)
    fresh = Searcher(workdir / "index", tiny_model)
    assert users not in {h.path for h in fresh.search_vectors(query, k=50)[0]}
    with open_collection(workdir) as collection:
        assert collection.unhide(users)
    assert fresh.search_vectors(query, k=1)[0][0].path == users


def test_the_nightly_fold_runs_no_model_and_keeps_every_id(workdir, tiny_model, monkeypatch):
    model = FeatureModel(tiny_model)
    datas = [png_bytes(3000 + i) for i in range(5)]
    with Collection(workdir, model.info.checksum, model.info.dim) as collection:
        added = [collection.add(d, embed(model, d), {"batch": "x"}) for d in datas]
        collection.remove(added[4].path)
    queries = np.stack([embed(model, d) for d in datas])
    shards = len(list_shards(workdir / "features"))

    def no_model(*args, **kwargs):
        raise AssertionError("the fold ran the model")

    monkeypatch.setattr(FeatureModel, "embed_each", no_model)
    report = rebuild([workdir.parent / "photos"], workdir, tiny_model, workers=0, shard_size=16)
    assert report.index_built and report.extract.extracted == 0
    assert len(list_shards(workdir / "features")) == shards + 1
    searcher = Searcher(workdir / "index", tiny_model)
    assert searcher.live is not None and len(searcher.live) == 0  # all in the version now
    for a, q in zip(added[:4], queries[:4], strict=True):
        assert searcher.id_table.path_of(a.id) == a.path
        hit = searcher.search_vectors(q[None], k=1)[0][0]
        assert (hit.id, hit.metadata["batch"]) == (a.id, "x")  # its metadata folded in too
    assert searcher.id_table.path_of(added[4].id) is None
    assert Journal(workdir / "features").counts() == {"unfolded": 0, "live": 4, "removed": 1, "hidden": 1}
    again = fold_live(workdir / "features")
    assert (again.folded, again.deleted) == (0, 0)


def test_cli_add_remove_unhide(workdir, tiny_model, tmp_path):
    runner = CliRunner()
    new = [save_pattern(tmp_path / "new" / f"n{i}.png", 4000 + i) for i in range(3)]
    (tmp_path / "new" / "bad.png").write_bytes(b"not an image")
    result = runner.invoke(
        app,
        [
            "add",
            *map(str, new),
            str(tmp_path / "new" / "bad.png"),
            "--workdir",
            str(workdir),
            "--model",
            str(tiny_model),
            "--fields",
            '{"sku": "B1"}',
            "--json",
        ],
    )
    assert result.exit_code == 1, result.output  # one file could not be added
    out = json.loads(result.stdout)
    assert [o.get("error") is None for o in out] == [True, True, True, False]
    for f in new:
        f.unlink()  # the originals may go: the collection keeps its copies
    searcher = Searcher(workdir / "index", tiny_model)
    model = FeatureModel(tiny_model)
    hit = searcher.search_vectors(embed(model, png_bytes(4001))[None], k=1)[0][0]
    assert hit.id == out[1]["id"] and hit.metadata["sku"] == "B1"
    result = runner.invoke(app, ["remove", out[1]["path"], "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    assert out[1]["id"] not in {h.id for h in searcher.search_vectors(embed(model, png_bytes(4001))[None], k=10)[0]}
    users0 = str(workdir.parent / "photos" / "img0000.png")
    typo = runner.invoke(app, ["remove", users0, users0 + ".typo", "--workdir", str(workdir)])
    assert typo.exit_code == 2 and "nothing was removed" in typo.output
    assert searcher.search_vectors(embed(model, Path(users0).read_bytes())[None], k=1)[0][0].path == users0
    bad = runner.invoke(app, ["add", str(new[0]), "--workdir", str(workdir), "--fields", '{"path": 1}'])
    assert bad.exit_code == 2 and "built in" in bad.output
    users = str(workdir.parent / "photos" / "img0002.png")
    assert runner.invoke(app, ["remove", users, "--workdir", str(workdir)]).exit_code == 0
    assert runner.invoke(app, ["unhide", users, "--workdir", str(workdir)]).exit_code == 0
    assert runner.invoke(app, ["unhide", users, "--workdir", str(workdir)]).exit_code == 1  # not hidden


def test_add_files_reports_each_file(workdir, tiny_model, tmp_path):
    good = save_pattern(tmp_path / "a.png", 5000)
    missing = tmp_path / "missing.png"
    out = add_files([good, missing], workdir, tiny_model)
    assert out[0].added is not None and out[1].error and "not found" in out[1].error
    assert os.path.exists(out[0].added.path)


KEY = "k" * 32


def test_a_writable_service_adds_and_removes_behind_the_key(workdir, tiny_model):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from pipeline.errors import ConfigError
    from pipeline.serve import Service, create_app

    with pytest.raises(ConfigError):
        create_app(Service(workdir / "index", tiny_model, poll=0, writable=True))
    read_only = Service(workdir / "index", tiny_model, poll=0)
    with TestClient(create_app(read_only), base_url="http://127.0.0.1") as c:
        assert c.post("/api/images", files={"image": ("a.png", png_bytes(1))}).status_code == 404  # no such route
    service = Service(workdir / "index", tiny_model, poll=0, writable=True)
    with TestClient(create_app(service, api_key=KEY), base_url="http://127.0.0.1") as c:
        data = png_bytes(6000)
        refused = c.post("/api/images", files={"image": ("a.png", data)})
        assert refused.status_code == 401  # loopback included
        c.headers["X-API-Key"] = KEY
        r = c.post("/api/images", files={"image": ("a.png", data)}, data={"metadata": '{"sku": "Z9"}'})
        assert r.status_code == 201, r.text
        added = r.json()
        assert added["duplicate_of"] is None and Path(added["path"]).read_bytes() == data
        hits = c.post("/api/search?k=3", files={"image": ("q.png", data)}).json()[0]["results"]
        assert (hits[0]["id"], hits[0]["metadata"]["sku"]) == (added["id"], "Z9")
        assert c.get(hits[0]["thumbnail"]).status_code == 200  # the ingest folder is one of the collection's
        like = c.get(f"/api/search?like={added['id']}&k=1").json()[0]["results"]
        assert like[0]["id"] == added["id"]
        assert c.get(f"/api/thumbnail/{added['id']}").status_code == 200  # known at once, no search needed
        again = c.post("/api/images", files={"image": ("b.png", data)})
        assert again.status_code == 200 and again.json()["duplicate_of"] == added["id"]
        assert c.post("/api/images", files={"image": ("x.png", b"GIF89a nope")}).status_code == 400
        bad = c.post("/api/images", files={"image": ("a.png", png_bytes(6001))}, data={"metadata": '["x"]'})
        assert bad.status_code == 422
        assert c.delete(f"/api/images/{added['id']}").status_code == 204
        assert not Path(added["path"]).exists()
        assert c.get(f"/api/search?like={added['id']}").status_code == 404  # gone by id too
        assert c.delete(f"/api/images/{added['id']}").status_code == 404
        hits = c.post("/api/search?k=50", files={"image": ("q.png", data)}).json()[0]["results"]
        assert added["id"] not in {h["id"] for h in hits}
        assert c.delete("/api/images/123456789").status_code == 404
        users = workdir.parent / "photos" / "img0007.png"
        top = c.post("/api/search?k=1", files={"image": ("q.png", users.read_bytes())}).json()[0]["results"][0]
        assert top["path"] == str(users)
        assert c.delete(f"/api/images/{top['id']}").status_code == 204
        assert users.exists()  # hidden, never deleted
        assert c.get(f"/api/thumbnail/{top['id']}").status_code == 404
        hits = c.post("/api/search?k=50", files={"image": ("q.png", users.read_bytes())}).json()[0]["results"]
        assert str(users) not in {h["path"] for h in hits}
        stats = c.get("/api/stats").json()["live"]
        assert stats["writable"] and stats["added"] == 1 and stats["removed"] == 2
        assert stats["hidden_or_removed"] == 2 and stats["additions_served"] == 0
        metrics = c.get("/metrics").text
        assert 'pipeline_collection_changes_total{change="added"} 1.0' in metrics
        assert 'pipeline_http_requests_total{route="/api/images",status="201"} 1.0' in metrics
        assert "pipeline_live_excluded 2.0" in metrics


def test_additions_past_the_live_limit_wait_for_the_nightly_fold(workdir, tiny_model, monkeypatch):
    from pipeline import ingest
    from pipeline.errors import BusyError

    model = FeatureModel(tiny_model)
    monkeypatch.setattr(ingest, "MAX_LIVE", 2)
    with Collection(workdir, model.info.checksum, model.info.dim) as collection:
        for seed in (9100, 9101):
            collection.add(png_bytes(seed), embed(model, png_bytes(seed)))
        with pytest.raises(BusyError, match="pipeline rebuild"):
            collection.add(png_bytes(9102), embed(model, png_bytes(9102)))
        rebuild([workdir.parent / "photos"], workdir, tiny_model, workers=0)
        assert collection.add(png_bytes(9102), embed(model, png_bytes(9102))).duplicate_of is None


def test_additions_of_another_model_are_neither_searched_nor_folded(workdir, tiny_model):
    from pipeline.errors import ModelMismatchError

    model = FeatureModel(tiny_model)
    with Collection(workdir, "0" * 64, model.info.dim) as collection:  # a journal written by another model
        added = collection.add(png_bytes(9200), embed(model, png_bytes(9200)))
    searcher = Searcher(workdir / "index", tiny_model)
    assert added.id not in {h.id for h in searcher.search_vectors(embed(model, png_bytes(9200))[None], k=50)[0]}
    with pytest.raises(ModelMismatchError):
        Collection(workdir, model.info.checksum, model.info.dim)
    with pytest.raises(ModelMismatchError):
        fold_live(workdir / "features")


def test_a_root_holding_the_workdir_never_loses_or_doubles_an_addition(tmp_path, tiny_model, monkeypatch):
    """The user's root contains the workdir (and so its ingest folder): extract never scans what the fold owns (an
    addition made between the fold and the scan stays the journal's), and never takes an addition for deleted."""
    import sys

    root = tmp_path / "data"
    for s in range(40):
        save_pattern(root / "photos" / f"img{s:04d}.png", s)
    work = root / "pipeline-work"
    rebuild([root], work, tiny_model, workers=0, shard_size=16)
    model = FeatureModel(tiny_model)
    collection = Collection(work, model.info.checksum, model.info.dim)
    first = collection.add(png_bytes(9300), embed(model, png_bytes(9300)))
    late: list = []
    module = sys.modules["pipeline.rebuild"]
    real = module.extract

    def extract(*args, **kwargs):
        late.append(collection.add(png_bytes(9301), embed(model, png_bytes(9301))))  # after the fold, before the scan
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "extract", extract)
    report = rebuild([root], work, tiny_model, workers=0, shard_size=16)
    assert report.folded.folded == 1 and report.extract.extracted == 0 and report.extract.deleted == 0
    searcher = Searcher(work / "index", tiny_model)
    assert searcher.indexed_paths().count(first.path) == 1 and late[0].path not in searcher.indexed_paths()
    found = searcher.search_vectors(embed(model, png_bytes(9301))[None], k=5)[0]
    assert [h.id for h in found].count(late[0].id) == 1 and found[0].id == late[0].id
    monkeypatch.undo()
    report = rebuild([root], work, tiny_model, workers=0, shard_size=16)
    assert report.folded.folded == 1 and report.extract.extracted == 0 and report.extract.deleted == 0
    assert Searcher(work / "index", tiny_model).count == 42


def test_ids_stay_unique_and_single_when_the_journal_or_the_catalog_is_lost(workdir, tiny_model):
    """A journal made anew gives ids above every one given out; a catalog rebuilt from its shards gives folded
    additions other ids, and searchers then know them by path: never twice."""
    model = FeatureModel(tiny_model)
    photos = workdir.parent / "photos"
    with Collection(workdir, model.info.checksum, model.info.dim) as collection:
        first = collection.add(png_bytes(9400), embed(model, png_bytes(9400)))
    rebuild([photos], workdir, tiny_model, workers=0)
    (workdir / "features" / "live.sqlite").rename(workdir / "journal.lost")
    with Collection(workdir, model.info.checksum, model.info.dim) as collection:
        second = collection.add(png_bytes(9401), embed(model, png_bytes(9401)))
    assert second.id > first.id  # first's id lives on in the catalog: never given again
    rebuild([photos], workdir, tiny_model, workers=0)
    (workdir / "features" / "catalog.sqlite").rename(workdir / "catalog.lost")
    rebuild([photos], workdir, tiny_model, workers=0, retrain=True)  # the catalog rebuilt from the shards
    searcher = Searcher(workdir / "index", tiny_model)
    assert second.id not in set(searcher.ids().tolist())  # renumbered...
    found = searcher.search_vectors(embed(model, png_bytes(9401))[None], k=5)[0]
    assert [h.path for h in found].count(second.path) == 1  # ...and found once


def test_the_rate_of_additions_is_limited_with_bursts():
    from pipeline.serve.limits import RateLimit

    now = [0.0]
    limit = RateLimit(2.0, 3, clock=lambda: now[0])
    assert [limit.take() for _ in range(4)] == [True, True, True, False]  # a burst of 3
    now[0] += 0.5  # one more a half second later, at 2 a second
    assert [limit.take(), limit.take()] == [True, False]
    now[0] += 10  # never more than the burst saved up
    assert sum(limit.take() for _ in range(5)) == 3


def test_a_writable_service_answers_busy_past_its_rate_of_additions(workdir, tiny_model):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from pipeline.serve import Service, create_app

    service = Service(workdir / "index", tiny_model, poll=0, writable=True, max_adds=1, add_rate=1e-6)
    with TestClient(create_app(service, api_key=KEY), base_url="http://127.0.0.1") as c:
        c.headers["X-API-Key"] = KEY
        assert c.post("/api/images", files={"image": ("a.png", png_bytes(9500))}).status_code == 201
        busy = c.post("/api/images", files={"image": ("b.png", png_bytes(9501))})
        assert busy.status_code == 503 and busy.headers["Retry-After"] and "faster" in busy.json()["error"]
        searched = c.post("/api/search?k=1", files={"image": ("q.png", png_bytes(9501))})
        assert searched.status_code == 200  # searches go on


def test_an_ivf_version_probes_its_additions_in_its_own_lists(tmp_path, tiny_model):
    """An IVF version: additions go to the lists of the version's own quantizer, probed with the version's
    nprobe in one coarse pass; every probe finds them as an exact search over version and additions would."""
    root, work = tmp_path / "photos", tmp_path / "work"
    for s in range(60):
        save_pattern(root / f"img{s:04d}.png", s)
    rebuild([root], work, tiny_model, workers=0, shard_size=16, flat_below=30)
    searcher = Searcher(work / "index", tiny_model)
    assert searcher.meta.get("nlist") and searcher.live is not None
    model = FeatureModel(tiny_model)
    datas = [png_bytes(9600 + i) for i in range(6)]
    with Collection(work, model.info.checksum, model.info.dim) as collection:
        added = [collection.add(d, embed(model, d)) for d in datas]
    queries = np.stack([embed(model, d) for d in datas])
    nlist = int(searcher.meta["nlist"])
    for i, a in enumerate(added):
        assert searcher.search_vectors(queries[i : i + 1], k=1, nprobe=nlist)[0][0].id == a.id
        assert searcher.search_vectors(queries[i : i + 1], k=1, nprobe=1)[0][0].id == a.id  # its own list first
    every = np.concatenate([searcher.vectors(searcher.ids()), queries])
    ids = np.concatenate([searcher.ids(), [a.id for a in added]])
    truth = ids[np.argsort(-(queries @ every.T), axis=1)[:, :10]]
    found = [[h.id for h in hits] for hits in searcher.search_vectors(queries, k=10, nprobe=nlist)]
    assert [set(f) for f in found] == [set(t) for t in truth.tolist()]

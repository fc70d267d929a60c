"""Coarse-to-fine binary codes: ITQ codes lose less than PCA sign codes, the kind returns the exact
top-k when its candidate pool covers it, and it behaves like the other kinds towards deletions,
updates, exclusions and the CLI."""

from __future__ import annotations

import json
import logging

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import clustered_vectors, write_synthetic_shards
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.features import Catalog
from pipeline.index import VectorStore, build_index, current_version
from pipeline.index import codes as codes_module
from pipeline.index.codes import CODES_FILE, encode, learn_itq, parse_codes, quantisation_error
from pipeline.search import Searcher


def assert_exact_top_k(hits: list, vecs: np.ndarray, query: np.ndarray, k: int) -> None:
    """The hits are the exact top k, up to the float16 rounding of the store (ties within 2e-3 may swap)."""
    exact = np.sort(vecs @ query)[::-1][:k]
    assert len(hits) == k and np.allclose([h.score for h in hits], exact, atol=2e-3)
    assert all(vecs[h.id] @ query >= exact[-1] - 2e-3 for h in hits)


@pytest.mark.slow
def test_itq_lowers_the_quantisation_error_of_pca_sign_codes():
    x = clustered_vectors(5000, dim=64, clusters=30)
    for bits in (16, 32):
        centre, pca = learn_itq(x, bits, rotate=False)
        _, itq = learn_itq(x, bits)
        assert np.allclose(itq.T @ itq, np.eye(bits), atol=1e-4)  # still an orthonormal projection
        assert quantisation_error((x - centre) @ itq) < quantisation_error((x - centre) @ pca) - 0.01


def test_faiss_hamming_distance_counts_the_sign_bits_that_differ():
    x = clustered_vectors(200, dim=64)
    centre, proj = learn_itq(x, 32)
    codes = encode(x, centre, proj)
    assert codes.shape == (200, 4) and codes.dtype == np.uint8
    index = faiss.IndexBinaryFlat(32)
    index.add(codes)
    d, i = index.search(codes[:1], 200)
    bits = (x - centre) @ proj >= 0
    assert (d[0] == (bits[i[0]] != bits[0]).sum(axis=1)).all()


def test_parse_codes():
    assert parse_codes("binary", 512) == 256 and parse_codes("binary:64", 512) == 64
    for bad in ("binary:12", "binary:1024", "binary:x", "pq:32"):
        with pytest.raises(PipelineError):
            parse_codes(bad, 512)


def test_binary_kind_returns_the_exact_top_k_when_the_pool_covers_it(tmp_path, monkeypatch):
    vecs = clustered_vectors(3000, clusters=40)
    write_synthetic_shards(tmp_path / "f", vecs, 700)
    m = build_index(
        tmp_path / "f", tmp_path / "i", codes="binary:32", nprobe=3000, recall_queries=200, progress=False
    ).meta
    assert m["kind"] == "binary/IndexBinaryFlat/32" and m["codes"]["setting"] == 3000 and m["recall_at_10"] >= 0.99
    assert m["codes"]["bits"] == 32 and len(m["codes"]["rotation_sha256"]) == 64
    version = current_version(tmp_path / "i")
    assert (version / CODES_FILE).is_file() and not (version / "index.faiss").exists()
    store = VectorStore.open(version)
    assert store.vectors.dtype == np.float16 and (np.asarray(store.ids) == np.arange(3000)).all()
    queries = clustered_vectors(20, clusters=40, seed=7)
    searcher = Searcher(tmp_path / "i")
    for hits, q in zip(searcher.search_vectors(queries, k=10), queries, strict=True):
        assert_exact_top_k(hits, vecs, q, 10)
    # A small pool: still the exact order among what it finds, and a tuned default finds most.
    few = searcher.search_vectors(queries, k=10, nprobe=10)
    assert all([h.score for h in hits] == sorted((h.score for h in hits), reverse=True) for hits in few)
    with pytest.raises(PipelineError, match="binary codes cannot be decoded"):  # sign bits: no vectors to decode
        searcher.decoded([0])
    # However large a pool a request asks for, a query re-ranks at most MAX_POOL candidates.
    asked = []
    search = searcher.index.index.search
    searcher.index.index.search = lambda codes, n, params=None: asked.append(n) or search(codes, n, params=params)
    monkeypatch.setattr(codes_module, "MAX_POOL", 500)
    hits = searcher.search_vectors(queries[:1], k=10, nprobe=1 << 20)[0]
    assert asked == [500] and len(hits) == 10


@pytest.mark.slow
def test_tuning_picks_the_smallest_pool_reaching_the_target(tmp_path):
    vecs = clustered_vectors(3000, clusters=40)
    write_synthetic_shards(tmp_path / "f", vecs, 1000)
    m = build_index(tmp_path / "f", tmp_path / "i", codes="binary:64", recall_queries=300, progress=False).meta
    sweep = m["setting_sweep"]
    assert m["codes"]["setting_name"] == "pool" and sweep[-1]["pool"] == m["codes"]["setting"]
    assert sweep[-1]["recall_lower_bound"] >= 0.95 and all(s["recall_lower_bound"] < 0.95 for s in sweep[:-1])
    assert m["recall_at_10"] >= 0.95 and m["recall_queries_held_out_from_training"]


@pytest.mark.parametrize("factory,setting_name", [("BIVF16", "nprobe"), ("BHNSW16", "efSearch")])
@pytest.mark.slow
def test_binary_ivf_and_hnsw_tune_their_setting(tmp_path, factory, setting_name):
    vecs = clustered_vectors(2000, clusters=40)
    write_synthetic_shards(tmp_path / "f", vecs, 1000)
    m = build_index(
        tmp_path / "f", tmp_path / "i", codes="binary:64", factory=factory, recall_queries=200, progress=False
    ).meta
    assert m["codes"]["setting_name"] == setting_name and m["codes"]["index"] == factory
    assert m["setting_sweep"][-1][setting_name] == m["codes"]["setting"]
    hits = Searcher(tmp_path / "i").search_vectors(vecs[:3], k=5)
    assert [h[0].id for h in hits] == [0, 1, 2]


def test_like_exclude_self_and_min_score(tmp_path):
    vecs = clustered_vectors(1500, clusters=30)
    vecs[7] = vecs[8]  # a second copy of the same picture
    write_synthetic_shards(tmp_path / "f", vecs, 500)
    build_index(tmp_path / "f", tmp_path / "i", codes="binary:64", recall_queries=100, progress=False)
    searcher = Searcher(tmp_path / "i")
    assert np.allclose(searcher.vectors([5]), vecs[5], atol=2e-3)  # float16 store
    like = searcher.search_like(["/synthetic/0000005.jpg"], k=3)[0].hits
    assert like[0].path == "/synthetic/0000005.jpg" and like[0].score == pytest.approx(1.0, abs=2e-3)
    others = searcher.search_like(["/synthetic/0000005.jpg"], k=3, exclude_self=True)[0].hits
    assert len(others) == 3 and "/synthetic/0000005.jpg" not in [h.path for h in others]
    high = searcher.search_vectors(vecs[:1], k=10, min_score=0.99)[0]
    assert [h.id for h in high] == [0]


@pytest.mark.slow
def test_deleted_images_are_never_returned_and_update_builds_in_full(tmp_path, caplog):
    f = tmp_path / "f"
    vecs = clustered_vectors(1200, clusters=30)
    write_synthetic_shards(f, vecs, 400)
    with Catalog(f) as c:
        c.reconcile()
    first = build_index(f, tmp_path / "i", codes="binary:64", recall_queries=100, progress=False).meta
    gone = [f"/synthetic/{i:07d}.jpg" for i in range(0, 1200, 10)]
    with Catalog(f) as c:
        c.mark_gone(gone)
    with caplog.at_level(logging.INFO, logger="pipeline.index"):
        m = build_index(f, tmp_path / "i", codes="binary:64", update=True, recall_queries=100, progress=False).meta
    assert "full build, not an update: binary codes" in caplog.text
    assert m["made_by"] == "build" and m["count"] == 1080 and m["version"] != first["version"]
    searcher = Searcher(tmp_path / "i")
    found = {h.path for hits in searcher.search_vectors(vecs[::10], k=20) for h in hits}
    assert found and not found & set(gone)
    assert searcher.path_of(5) == "/synthetic/0000005.jpg" and searcher.vectors([5]).shape == (1, 64)


def test_a_damaged_rotation_is_one_clear_error(tmp_path):
    write_synthetic_shards(tmp_path / "f", clustered_vectors(500), 500)
    build_index(tmp_path / "f", tmp_path / "i", codes="binary:32", recall_queries=50, progress=False)
    meta_path = current_version(tmp_path / "i") / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["codes"]["rotation_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match="rotation checksum"):
        Searcher(tmp_path / "i")


def test_cli_codes(tmp_path):
    write_synthetic_shards(tmp_path / "f", clustered_vectors(800, clusters=20), 400)
    runner = CliRunner()
    res = runner.invoke(
        app, ["build-index", str(tmp_path / "f"), "--out", str(tmp_path / "i"), "--codes", "binary:32", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert "pool" in res.output and "recall@10" in res.output
    res = runner.invoke(
        app, ["search", "--index", str(tmp_path / "i"), "--like", "/synthetic/0000003.jpg", "-k", "2", "--json"]
    )
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["results"][0]["path"] == "/synthetic/0000003.jpg"
    res = runner.invoke(app, ["duplicates", "--index", str(tmp_path / "i")])
    assert res.exit_code == 1 and "without --codes" in res.output
    res = runner.invoke(app, ["build-index", str(tmp_path / "f"), "--out", str(tmp_path / "i"), "--codes", "binary:12"])
    assert res.exit_code == 1 and "multiple of 8" in res.output
    help_text = runner.invoke(app, ["build-index", "--help"]).output
    assert "--codes" in help_text and "Hamming" in help_text

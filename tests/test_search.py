"""Search: batch folders, --like, --exclude-self, --min-score, contact sheets, error cases."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import write_synthetic_shards
from pipeline.cli import app
from pipeline.extract import extract
from pipeline.index import build_index, current_version
from pipeline.search import Hit, QueryResult, Searcher
from pipeline.sheet import sheet_size

runner = CliRunner()


def cli(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


@pytest.fixture()
def indexed(tmp_path, gallery, tiny_model):
    first = sorted(gallery.rglob("*.jpg"))[0]
    shutil.copy(first, gallery / "copy_of_first.jpg")  # a byte-identical copy
    extract([gallery], tmp_path / "f", tiny_model, workers=0, progress=False)
    build_index(tmp_path / "f", tmp_path / "i", progress=False)
    return tmp_path / "i", gallery, first


def test_api_returns_dataclasses(indexed, tiny_model):
    index, gallery, first = indexed
    results = Searcher(index, model=tiny_model).search([first], k=3)
    assert isinstance(results[0], QueryResult) and all(isinstance(h, Hit) for h in results[0].hits)
    assert {results[0].hits[0].path, results[0].hits[1].path} == {str(first), str(gallery / "copy_of_first.jpg")}


def test_warm_reads_the_index_file(indexed):
    searcher = Searcher(indexed[0])  # an exact index has no vector store: warm() reads the index alone
    assert searcher.warm() == (searcher.version_dir / "index.faiss").stat().st_size > 0


def test_folder_is_batch_mode(indexed, tmp_path):
    index, gallery, _ = indexed
    out = json.loads(cli("search", gallery / "a", "--index", index, "-k", "2", "--json").stdout)
    assert len(out) == len(list((gallery / "a").rglob("*.*")))
    assert all(r["results"][0]["path"] == r["query"] for r in out)  # each finds itself first


def test_like_uses_the_stored_vector(indexed):
    index, gallery, first = indexed
    out = json.loads(cli("search", "--like", first, "--index", index, "-k", "3", "--json").stdout)
    assert out[0]["query"] == str(first)
    assert out[0]["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    missing = cli("search", "--like", gallery / "nope.jpg", "--index", index, "--json", code=1)
    assert "not in the index" in json.loads(missing.stdout)[0]["error"]


def test_exclude_self_drops_the_file_and_its_copies(indexed):
    index, gallery, first = indexed
    for args in (["search", first], ["search", "--like", first]):
        out = json.loads(cli(*args, "--index", index, "-k", "4", "--exclude-self", "--json").stdout)
        paths = [h["path"] for h in out[0]["results"]]
        assert len(paths) == 4
        assert str(first) not in paths and str(gallery / "copy_of_first.jpg") not in paths


def test_min_score(indexed):
    index, _, first = indexed
    everything = json.loads(cli("search", first, "--index", index, "-k", "13", "--json").stdout)[0]["results"]
    cut = everything[5]["score"]
    kept = json.loads(cli("search", first, "--index", index, "-k", "13", "--min-score", cut, "--json").stdout)[0][
        "results"
    ]
    assert kept == everything[:6] or all(h["score"] >= cut for h in kept) and len(kept) >= 6


def test_contact_sheet(indexed, tmp_path):
    index, gallery, first = indexed
    victim = sorted(gallery.rglob("*.webp"))[0]
    victim.unlink()  # an indexed file that is gone by search time: placeholder tile
    out = tmp_path / "sheet.png"
    cli("search", first, victim.with_name("x.jpg"), "--index", index, "-k", "12", "--sheet", out, code=1)
    cli("search", first, "--index", index, "-k", "12", "--sheet", out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == sheet_size(1, 12)


def test_error_cases_are_one_line(indexed, tmp_path, gallery):
    index, _, first = indexed
    version = current_version(index)
    meta = json.loads((version / "meta.json").read_text())
    del meta["model"]["checksum"]  # an index written before model checksums existed
    (version / "meta.json").write_text(json.dumps(meta))
    result = cli("search", first, "--index", index, code=1)
    assert "an older index format" in result.stderr and result.stderr.count("\n") == 1
    (version / "index.faiss").write_bytes(b"garbage")
    result = cli("search", first, "--index", index, code=1)
    assert "missing or corrupt" in result.stderr and result.stderr.count("\n") == 1
    result = cli("search", "--index", index, code=1)
    assert "give query images" in result.stderr


class _CountingIndex:
    """Wraps a faiss index and records the k of every search: the deterministic cost of a query."""

    def __init__(self, index) -> None:
        self.index, self.asked = index, []

    def __getattr__(self, name):
        return getattr(self.index, name)

    def search(self, x, k, params=None):
        self.asked.append(k)
        return self.index.search(x, k, params=params)


@pytest.mark.parametrize("flat_below", [100_000, 1000], ids=["flat", "ivf"])
def test_high_min_score_costs_no_more_than_a_plain_search(tmp_path, flat_below):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(50_000, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    paths = write_synthetic_shards(tmp_path / "f", vecs, 10_000)
    build_index(
        tmp_path / "f",
        tmp_path / "i",
        flat_below=flat_below,
        nlist=None if flat_below > 50_000 else 64,
        recall_queries=200,
        progress=False,
    )
    searcher = Searcher(tmp_path / "i")
    searcher.index = counting = _CountingIndex(searcher.index)
    queries = np.concatenate([vecs[:1], rng.normal(size=(3, 32)).astype(np.float32)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    plain = searcher.search_vectors(queries, k=10)
    plain_cost, counting.asked = sum(counting.asked), []
    strict = searcher.search_vectors(queries, k=10, min_score=0.99)
    assert sum(counting.asked) <= plain_cost == 10
    assert [[h.path for h in hits] for hits in strict] == [[paths[0]], [], [], []]
    assert all(h.score >= 0.99 for hits in strict for h in hits) and plain[0][0].path == paths[0]

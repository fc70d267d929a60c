"""Retrieval metrics against hand-computed cases, and `pipeline eval` end to end."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from helpers import centre_crop
from pipeline.cli import app
from pipeline.evaluate import average_precision, score
from pipeline.extract import extract
from pipeline.index import build_index


def test_average_precision_hand_cases():
    assert average_precision(["a", "b", "x", "y"], {"a", "b"}) == 1.0  # perfect
    assert average_precision(["x", "y", "a", "b"], {"a", "b"}) == pytest.approx((1 / 3 + 2 / 4) / 2)  # reversed
    assert average_precision(["a", "x", "y"], {"a", "b"}) == pytest.approx(0.5)  # b never retrieved: a miss
    assert average_precision(["x", "a"], {"a"}) == pytest.approx(0.5)


def test_score_drops_query_and_ignored():
    gt = [{"query": "q.jpg", "positives": ["p1.jpg", "p2.jpg"], "ignore": ["junk.jpg", "q.jpg"]},
          {"query": "r.jpg", "positives": ["p3.jpg"]}]
    rankings = {"q.jpg": ["q.jpg", "junk.jpg", "p1.jpg", "n.jpg", "p2.jpg"],  # cleaned: p1, n, p2
                "r.jpg": ["r.jpg", "n.jpg", "m.jpg", "x.jpg", "y.jpg", "z.jpg", "p3.jpg"]}  # cleaned: p3 at 6
    report = score(rankings, gt)
    assert report.per_query[0].ap == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert report.per_query[1].ap == pytest.approx(1 / 6) and report.per_query[1].first_positive == 6
    assert report.map == pytest.approx(((1 + 2 / 3) / 2 + 1 / 6) / 2)
    assert report.recall == {1: 0.5, 5: 0.5, 10: 1.0}
    assert report.precision[1] == 0.5 and report.precision[5] == pytest.approx((2 / 5 + 0) / 2)


@given(st.permutations(list("abcdefgh")), st.sets(st.sampled_from(list("abcdefgh")), min_size=1))
def test_ap_bounds_and_perfect_order(ranking, positives):
    ap = average_precision(ranking, positives)
    assert 0 < ap <= 1
    perfect = sorted(ranking, key=lambda x: x not in positives)
    assert average_precision(perfect, positives) == 1.0 >= ap


def test_eval_cli(tmp_path, gallery, tiny_model):
    db = tmp_path / "db"
    originals = sorted(gallery.rglob("*.*"))[:8]
    db.mkdir()
    for p in originals:
        shutil.copy(p, db / p.name)
    (tmp_path / "queries").mkdir()
    gt = []
    for p in originals[:5]:
        crop = centre_crop(db / p.name, tmp_path / "queries" / f"crop_{p.stem}.png")
        gt.append({"query": crop.name, "positives": [p.name]})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    extract([db], tmp_path / "f", tiny_model, workers=0, progress=False)
    build_index(tmp_path / "f", tmp_path / "i", progress=False)
    args = ["eval", "--index", str(tmp_path / "i"), "--groundtruth", str(tmp_path / "gt.json"),
            "--queries", str(tmp_path / "queries"), "--model", str(tiny_model)]
    result = CliRunner().invoke(app, args + ["--json", "--per-query", str(tmp_path / "pq.csv")])
    assert result.exit_code == 0, result.stderr
    d = json.loads(result.stdout)
    assert d["queries"] == 5 and d["mAP"] == 1.0 and d["recall@1"] == 1.0 and d["precision@1"] == 1.0
    rows = list(csv.DictReader(open(tmp_path / "pq.csv")))
    assert len(rows) == 5 and all(r["first_positive_rank"] == "1" for r in rows)
    bad = CliRunner().invoke(app, args[:4] + [str(tmp_path / "missing.json")] + args[5:])
    assert bad.exit_code == 1 and "cannot read ground truth" in bad.stderr

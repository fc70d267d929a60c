"""Retrieval metrics against hand-computed cases, and `pipeline eval` end to end."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from helpers import centre_crop
from pipeline.cli import app
from pipeline.evaluate import PLOT_COLOURS, average_precision, score, write_pr_plot
from pipeline.extract import extract
from pipeline.index import build_index


def test_average_precision_hand_cases():
    assert average_precision(["a", "b", "x", "y"], {"a", "b"}) == 1.0  # perfect
    assert average_precision(["x", "y", "a", "b"], {"a", "b"}) == pytest.approx((1 / 3 + 2 / 4) / 2)  # reversed
    assert average_precision(["a", "x", "y"], {"a", "b"}) == pytest.approx(0.5)  # b never retrieved: a miss
    assert average_precision(["x", "a"], {"a"}) == pytest.approx(0.5)


def test_score_drops_query_and_ignored():
    gt = [
        {"query": "q.jpg", "positives": ["p1.jpg", "p2.jpg"], "ignore": ["junk.jpg", "q.jpg"]},
        {"query": "r.jpg", "positives": ["p3.jpg"]},
    ]
    rankings = {
        "q.jpg": ["q.jpg", "junk.jpg", "p1.jpg", "n.jpg", "p2.jpg"],  # cleaned: p1, n, p2
        "r.jpg": ["r.jpg", "n.jpg", "m.jpg", "x.jpg", "y.jpg", "z.jpg", "p3.jpg"],
    }  # cleaned: p3 at 6
    report = score(rankings, gt)
    assert report.per_query[0].ap == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert report.per_query[1].ap == pytest.approx(1 / 6) and report.per_query[1].first_positive == 6
    assert report.map == pytest.approx(((1 + 2 / 3) / 2 + 1 / 6) / 2)
    assert report.recall == {1: 0.5, 5: 0.5, 10: 1.0}
    assert report.precision[1] == 0.5 and report.precision[5] == pytest.approx((2 / 5 + 0) / 2)


def test_breakdown_by_transformation():
    gt = [
        {"query": f"pic{i}_{t}.jpg", "positives": [f"pic{i}.jpg"]}
        for i, t in enumerate(["crop70+jpeg15", "crop70+blur", "blur+gray", "flip"])
    ]
    rankings = {
        "pic0_crop70+jpeg15.jpg": ["pic0.jpg", "x"],
        "pic1_crop70+blur.jpg": ["x", "pic1.jpg"],
        "pic2_blur+gray.jpg": ["x", "pic2.jpg"],
        "pic3_flip.jpg": ["pic3.jpg"],
    }
    rows = score(rankings, gt).by_transformation()
    assert rows == {
        "blur": {"queries": 2, "recall@1": 0.0},
        "gray": {"queries": 1, "recall@1": 0.0},
        "crop70": {"queries": 2, "recall@1": 0.5},
        "flip": {"queries": 1, "recall@1": 1.0},
        "jpeg15": {"queries": 1, "recall@1": 1.0},
    }  # weakest first
    assert score(rankings, gt).to_dict()["by_transformation"]["crop70"] == {"queries": 2, "recall@1": 0.5}
    plain = score({"100000.jpg": ["a.jpg"]}, [{"query": "100000.jpg", "positives": ["a.jpg"]}])  # holidays names
    assert plain.by_transformation() == {} and "by_transformation" not in plain.to_dict()


def test_pr_curve_interpolated_and_averaged():
    gt = [{"query": "q", "positives": ["a", "b"]}, {"query": "r", "positives": ["c"]}]
    report = score({"q": ["a", "x", "b"], "r": ["x", "y", "z", "c"]}, gt)  # q: P=1 at R=.5, 2/3 at R=1; r: 1/4
    recall, precision = report.pr_curve()
    assert recall[0] == 0 and recall[-1] == 1 and len(recall) == 21
    assert precision[recall <= 0.5] == pytest.approx((1 + 1 / 4) / 2)
    assert precision[recall > 0.5] == pytest.approx((2 / 3 + 1 / 4) / 2)
    missed = score({"q": ["x"]}, [{"query": "q", "positives": ["a"]}])  # never found: precision 0 everywhere
    assert not missed.pr_curve()[1].any()


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
        crop = centre_crop(db / p.name, tmp_path / "queries" / f"{p.stem}_crop.png")  # copies-dev style
        gt.append({"query": crop.name, "positives": [p.name]})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    extract([db], tmp_path / "f", tiny_model, workers=0, progress=False)
    build_index(tmp_path / "f", tmp_path / "i", progress=False)
    args = [
        "eval",
        "--index",
        str(tmp_path / "i"),
        "--groundtruth",
        str(tmp_path / "gt.json"),
        "--queries",
        str(tmp_path / "queries"),
        "--model",
        str(tiny_model),
    ]
    result = CliRunner().invoke(
        app, args + ["--json", "--per-query", str(tmp_path / "pq.csv"), "--plot", str(tmp_path / "pr.png")]
    )
    assert result.exit_code == 0, result.stderr
    d = json.loads(result.stdout)
    assert d["queries"] == 5 and d["mAP"] == 1.0 and d["recall@1"] == 1.0 and d["precision@1"] == 1.0
    assert d["by_transformation"] == {"crop": {"queries": 5, "recall@1": 1.0}}  # img00_crop.png: one transformation
    rows = list(csv.DictReader(open(tmp_path / "pq.csv")))
    assert len(rows) == 5 and all(r["first_positive_rank"] == "1" for r in rows)
    with Image.open(tmp_path / "pr.png") as im:  # a real PNG: white page, a blue curve along precision 1
        assert im.format == "PNG" and im.size == (640, 480)
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert ((pixels == (30, 90, 200)).all(axis=1)).sum() > 500
    text = CliRunner().invoke(app, args)
    assert text.exit_code == 0 and "recall@1 by transformation" in text.stdout and "crop" in text.stdout
    # A subset: only the images whose names sort before the third original; the others' queries are not scored.
    kept = sorted(p.name for p in originals)[:3]
    subset = CliRunner().invoke(app, args + ["--json", "--where", f"path in ({','.join(str(db / n) for n in kept)})"])
    assert subset.exit_code == 0, subset.stderr
    scored = json.loads(subset.stdout)
    assert scored["queries"] == len({p.name for p in originals[:5]} & set(kept)) and scored["mAP"] == 1.0
    unwritable = CliRunner().invoke(app, args + ["--plot", str(tmp_path / "gt.json" / "pr.png")])  # under a file
    assert unwritable.exit_code == 1 and "cannot write" in unwritable.stderr
    bad = CliRunner().invoke(app, args[:4] + [str(tmp_path / "missing.json")] + args[5:])
    assert bad.exit_code == 1 and "cannot read ground truth" in bad.stderr


def test_pr_plot_draws_each_recipe_in_its_own_colour(tmp_path):
    gt = [{"query": f"q{i}", "positives": [f"a{i}", f"b{i}"]} for i in range(4)]
    perfect = score({f"q{i}": [f"a{i}", f"b{i}", "x"] for i in range(4)}, gt)
    late = score({f"q{i}": ["x", "y", f"a{i}", f"b{i}"] for i in range(4)}, gt)
    write_pr_plot([("perfect", perfect), ("late", late)], tmp_path / "pr.png")
    with Image.open(tmp_path / "pr.png") as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    for colour in PLOT_COLOURS[:2]:  # both curves (and their legend lines) drawn
        assert ((pixels == colour).all(axis=1)).sum() > 300
    assert ((pixels == PLOT_COLOURS[2]).all(axis=1)).sum() == 0

"""Retrieval quality against ground truth: mAP, recall@k, precision@k.

Definitions (per query, after removing the query itself and its "ignore" files from the ranking):
  AP           mean over all positives of the precision at the rank where each is found;
               a positive that is never retrieved contributes 0 (so it counts as a miss)
  recall@k     1 if at least one positive is in the top k, else 0 (averaged: the fraction of
               queries answered correctly within k)
  precision@k  the fraction of the top k that are positives
  PR curve     per query, the interpolated precision (the best precision at this recall or more)
               at recall levels 0, 0.05, ..., 1, averaged over queries
Query names like `img0007_crop70+jpeg15.jpg` (copies-dev) name the transformations that made the
query; when every query is named so, recall@1 is also broken down per transformation.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PipelineError, write_error
from .fsutil import atomic_write_bytes

KS = (1, 5, 10)
RECALL_LEVELS = np.linspace(0.0, 1.0, 21)
TRANSFORM_NAME = re.compile(r"^.+_([a-z][a-z0-9]*(?:\+[a-z][a-z0-9]*)*)\.[A-Za-z0-9]+$")  # pic0007_crop70+jpeg15.jpg


def average_precision(ranked: Sequence[str], positives: set[str]) -> float:
    """Non-interpolated AP of a ranking (already cleaned of the query and ignored items)."""
    if not positives:
        raise ValueError("a query needs at least one positive")
    hits, total = 0, 0.0
    for rank, item in enumerate(ranked, start=1):
        if item in positives:
            hits += 1
            total += hits / rank
    return total / len(positives)


def positive_ranks(ranked: Sequence[str], positives: set[str]) -> tuple[int, ...]:
    """1-based ranks of the positives found in the ranking, best first."""
    return tuple(r for r, item in enumerate(ranked, start=1) if item in positives)


def precision_at(ranked: Sequence[str], positives: set[str], k: int) -> float:
    return sum(item in positives for item in ranked[:k]) / k


@dataclass(frozen=True)
class QueryScore:
    query: str
    positives: int
    ap: float
    ranks: tuple[int, ...]  # of the positives found, best first
    precision: dict[int, float]

    @property
    def first_positive(self) -> int | None:
        return self.ranks[0] if self.ranks else None


@dataclass
class EvalReport:
    queries: int
    map: float
    recall: dict[int, float]
    precision: dict[int, float]
    per_query: list[QueryScore] = field(default_factory=list)

    def by_transformation(self) -> dict[str, dict[str, float]]:
        """recall@1 of the queries whose name carries each transformation, weakest first; empty
        unless every query is named like `img0007_crop70+jpeg15.jpg`."""
        names = [m for s in self.per_query if (m := TRANSFORM_NAME.match(s.query))]
        if not names or len(names) != len(self.per_query):
            return {}
        hits: dict[str, list[bool]] = {}
        for s, m in zip(self.per_query, names, strict=True):
            for t in m.group(1).split("+"):
                hits.setdefault(t, []).append(s.first_positive == 1)
        rows = {t: {"queries": len(h), "recall@1": float(np.mean(h))} for t, h in hits.items()}
        return dict(sorted(rows.items(), key=lambda kv: (kv[1]["recall@1"], kv[0])))

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall levels, mean interpolated precision at each): see the module docstring."""
        curves = []
        for s in self.per_query:
            ranks = np.array(s.ranks, float)
            found = np.arange(1, len(ranks) + 1)
            recall, precision = found / s.positives, found / ranks
            curves.append([precision[recall >= level].max(initial=0.0) for level in RECALL_LEVELS])
        return RECALL_LEVELS, np.mean(curves, axis=0)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "queries": self.queries,
            "mAP": round(self.map, 4),
            **{f"recall@{k}": round(v, 4) for k, v in self.recall.items()},
            **{f"precision@{k}": round(v, 4) for k, v in self.precision.items()},
        }
        if rows := self.by_transformation():
            d["by_transformation"] = {
                t: {"queries": r["queries"], "recall@1": round(r["recall@1"], 4)} for t, r in rows.items()
            }
        return d


def score(rankings: dict[str, list[str]], groundtruth: list[dict[str, Any]], ks: Sequence[int] = KS) -> EvalReport:
    """Score rankings (query name -> ranked item names) against ground truth entries
    {"query", "positives", "ignore"?}. The query itself never counts as a result."""
    per_query = []
    for entry in groundtruth:
        q = entry["query"]
        positives = set(entry["positives"])
        drop = set(entry.get("ignore", ())) | {q}
        ranked = [item for item in rankings[q] if item not in drop]
        positives -= drop
        if not positives:
            raise PipelineError(
                f"ground truth query {q}: no positive left once the query itself and its ignored "
                "files are left out; give it another positive or remove it"
            )
        per_query.append(
            QueryScore(
                q,
                len(positives),
                average_precision(ranked, positives),
                positive_ranks(ranked, positives),
                {k: precision_at(ranked, positives, k) for k in ks},
            )
        )
    if not per_query:
        raise PipelineError("the ground truth has no queries")
    return EvalReport(
        queries=len(per_query),
        map=float(np.mean([s.ap for s in per_query])),
        recall={
            k: float(np.mean([s.first_positive is not None and s.first_positive <= k for s in per_query])) for k in ks
        },
        precision={k: float(np.mean([s.precision[k] for s in per_query])) for k in ks},
        per_query=per_query,
    )


def load_groundtruth(path: Path) -> list[dict[str, Any]]:
    try:
        gt = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot read ground truth {path}: {exc}") from None
    if not isinstance(gt, list) or not all(isinstance(e, dict) and "query" in e and e.get("positives") for e in gt):
        raise PipelineError(f'{path}: expected a list of {{"query": name, "positives": [names], "ignore": [names]}}')
    return gt


def evaluate(
    index_dir: Path | str,
    groundtruth: Path | str,
    queries: Path | str,
    *,
    model: Path | str | None = None,
    nprobe: int | None = None,
    exact: bool = False,
    root: Path | str | None = None,
    depth: int = 10_000,
    where: Sequence[str] = (),
) -> EvalReport:
    """Run every ground-truth query image (from `queries`) against the index and score the rankings.

    Indexed paths are named relative to `root` (default: the common folder of all indexed paths).
    Rankings go `depth` deep (the whole collection when it is smaller); `exact` probes every IVF list.
    `where`: score a subset: only the images the filter selects are searched, and ground-truth positives
    outside it are left out (a query left with none is not scored).
    """
    from .search import Searcher

    gt = load_groundtruth(Path(groundtruth))
    queries = Path(queries)
    searcher = Searcher(index_dir, model=model)
    all_paths = searcher.indexed_paths()
    if root:
        base = str(Path(root).absolute())
    else:
        base = os.path.commonpath(all_paths) if len(all_paths) > 1 else str(Path(all_paths[0]).parent)
    files = [queries / e["query"] for e in gt]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise PipelineError(f"{len(missing)} query images not found, e.g. {missing[0]}")
    selection = searcher.select(where)
    if selection is not None:
        kept = {path for path, _ in searcher.rows(selection.ids).values()}
        gt = [{**e, "positives": [p for p in e["positives"] if os.path.join(base, p) in kept]} for e in gt]
        gt = [e for e in gt if e["positives"]]
        files = [queries / e["query"] for e in gt]
    k = min(depth, searcher.count)
    probe = searcher.meta.get("nlist") or None if exact else nprobe
    results = searcher.search(files, k=k, nprobe=probe, where=where)
    rankings: dict[str, list[str]] = {}
    for entry, result in zip(gt, results, strict=True):
        if result.error:
            raise PipelineError(f"query {result.query}: {result.error}")
        rankings[entry["query"]] = [os.path.relpath(h.path, base) for h in result.hits]
    return score(rankings, gt)


def write_per_query(report: EvalReport, path: Path) -> None:
    try:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["query", "positives", "ap", "first_positive_rank", *[f"precision@{k}" for k in KS]])
            for s in report.per_query:
                precisions = [f"{s.precision[k]:.4f}" for k in KS]
                w.writerow([s.query, s.positives, f"{s.ap:.4f}", s.first_positive or "", *precisions])
    except OSError as exc:
        raise write_error(path, exc, "`pipeline eval --per-query`") from None


PLOT_COLOURS = ((30, 90, 200), (220, 110, 20), (40, 150, 60), (200, 40, 60), (130, 70, 180), (90, 90, 90))


def write_pr_plot(curves: Sequence[tuple[str, EvalReport]], path: Path) -> None:
    """A PNG of precision-recall curves (Pillow only), one per (label, report) on the same set, so recipes can
    be compared at a glance: axes with ticks, labels, a legend with each curve's mAP."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 640, 480, 60, 20, 20, 50
    im = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    pw, ph = width - left - right, height - top - bottom

    def xy(r: float, p: float) -> tuple[float, float]:
        return left + r * pw, top + (1 - p) * ph

    for tick in np.linspace(0, 1, 6):
        x, y = xy(tick, tick)
        d.line([(x, top), (x, top + ph)], fill=(225, 225, 225))
        d.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        d.text((x - 8, top + ph + 6), f"{tick:.1f}", fill=(0, 0, 0), font=font)
        d.text((left - 28, y - 6), f"{tick:.1f}", fill=(0, 0, 0), font=font)
    d.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    d.text((left + pw // 2 - 18, height - 20), "recall", fill=(0, 0, 0), font=font)
    axis = Image.new("RGB", (60, 14), (255, 255, 255))
    ImageDraw.Draw(axis).text((0, 0), "precision", fill=(0, 0, 0), font=font)
    im.paste(axis.rotate(90, expand=True), (4, top + ph // 2 - 30))
    colours = [PLOT_COLOURS[k % len(PLOT_COLOURS)] for k in range(len(curves))]
    for (_, report), colour in zip(curves, colours, strict=True):
        recall, precision = report.pr_curve()
        d.line([xy(r, p) for r, p in zip(recall, precision, strict=True)], fill=colour, width=3)
    legends = [
        f"{label + ': ' if label else ''}mAP {report.map:.3f}, {report.queries} queries" for label, report in curves
    ]
    lx = left + pw - 10 - max(d.textlength(text, font=font) for text in legends) - 28
    ly = top + ph - 10 - 18 * len(curves)
    d.rectangle(
        [lx - 6, ly - 6, left + pw - 6, ly + 18 * len(curves) - 2], fill=(255, 255, 255), outline=(120, 120, 120)
    )
    for k, (text, colour) in enumerate(zip(legends, colours, strict=True)):
        d.line([(lx, ly + 18 * k + 5), (lx + 20, ly + 18 * k + 5)], fill=colour, width=3)
        d.text((lx + 28, ly + 18 * k), text, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    try:
        atomic_write_bytes(Path(path), buf.getvalue())
    except OSError as exc:
        raise write_error(path, exc, "`pipeline eval --plot`") from None

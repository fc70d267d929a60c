"""Retrieval quality against ground truth: mAP, recall@k, precision@k.

Definitions (per query, after removing the query itself and its "ignore" files from the ranking):
  AP           mean over all positives of the precision at the rank where each is found;
               a positive that is never retrieved contributes 0 (so it counts as a miss)
  recall@k     1 if at least one positive is in the top k, else 0 (averaged: the fraction of
               queries answered correctly within k)
  precision@k  the fraction of the top k that are positives
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PipelineError, write_error

KS = (1, 5, 10)


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


def first_positive_rank(ranked: Sequence[str], positives: set[str]) -> int | None:
    return next((r for r, item in enumerate(ranked, start=1) if item in positives), None)


def precision_at(ranked: Sequence[str], positives: set[str], k: int) -> float:
    return sum(item in positives for item in ranked[:k]) / k


@dataclass(frozen=True)
class QueryScore:
    query: str
    positives: int
    ap: float
    first_positive: int | None
    precision: dict[int, float]


@dataclass
class EvalReport:
    queries: int
    map: float
    recall: dict[int, float]
    precision: dict[int, float]
    per_query: list[QueryScore] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"queries": self.queries, "mAP": round(self.map, 4),
                **{f"recall@{k}": round(v, 4) for k, v in self.recall.items()},
                **{f"precision@{k}": round(v, 4) for k, v in self.precision.items()}}


def score(rankings: dict[str, list[str]], groundtruth: list[dict], ks: Sequence[int] = KS) -> EvalReport:
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
            raise PipelineError(f"ground truth query {q}: no positive left once the query itself and its ignored "
                                "files are left out; give it another positive or remove it")
        per_query.append(QueryScore(q, len(positives), average_precision(ranked, positives),
                                    first_positive_rank(ranked, positives),
                                    {k: precision_at(ranked, positives, k) for k in ks}))
    if not per_query:
        raise PipelineError("the ground truth has no queries")
    return EvalReport(
        queries=len(per_query),
        map=float(np.mean([s.ap for s in per_query])),
        recall={k: float(np.mean([s.first_positive is not None and s.first_positive <= k for s in per_query])) for k in ks},
        precision={k: float(np.mean([s.precision[k] for s in per_query])) for k in ks},
        per_query=per_query,
    )


def load_groundtruth(path: Path) -> list[dict]:
    try:
        gt = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot read ground truth {path}: {exc}") from None
    if not isinstance(gt, list) or not all(isinstance(e, dict) and "query" in e and e.get("positives") for e in gt):
        raise PipelineError(f"{path}: expected a list of {{\"query\": name, \"positives\": [names], \"ignore\": [names]}}")
    return gt


def evaluate(index_dir: Path | str, groundtruth: Path | str, queries: Path | str, *, model: Path | str | None = None,
             nprobe: int | None = None, exact: bool = False, root: Path | str | None = None,
             depth: int = 10_000) -> EvalReport:
    """Run every ground-truth query image (from `queries`) against the index and score the rankings.

    Indexed paths are named relative to `root` (default: the common folder of all indexed paths).
    Rankings go `depth` deep (the whole collection when it is smaller); `exact` probes every IVF list.
    """
    from .search import Searcher

    gt = load_groundtruth(Path(groundtruth))
    queries = Path(queries)
    searcher = Searcher(index_dir, model=model)
    all_paths = searcher.indexed_paths()
    root = str(Path(root).absolute()) if root else os.path.commonpath(all_paths) if len(all_paths) > 1 else str(Path(all_paths[0]).parent)
    files = [queries / e["query"] for e in gt]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise PipelineError(f"{len(missing)} query images not found, e.g. {missing[0]}")
    k = min(depth, searcher.count)
    probe = searcher.meta.get("nlist") or None if exact else nprobe
    results = searcher.search(files, k=k, nprobe=probe)
    rankings = {}
    for entry, result in zip(gt, results):
        if result.error:
            raise PipelineError(f"query {result.query}: {result.error}")
        rankings[entry["query"]] = [os.path.relpath(h.path, root) for h in result.hits]
    return score(rankings, gt)


def write_per_query(report: EvalReport, path: Path) -> None:
    try:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["query", "positives", "ap", "first_positive_rank", *[f"precision@{k}" for k in KS]])
            for s in report.per_query:
                w.writerow([s.query, s.positives, f"{s.ap:.4f}", s.first_positive or "", *[f"{s.precision[k]:.4f}" for k in KS]])
    except OSError as exc:
        raise write_error(path, exc, "`pipeline eval --per-query`") from None

"""Recall against exact search, and the nprobe a version is published with (the smallest that reaches it)."""

from __future__ import annotations

import logging
import time
from typing import Protocol

import faiss
import numpy as np

LOG = logging.getLogger(__name__)

# Every nprobe to 8, then steps of a quarter or less: at the few lists a large IVF index settles on, one
# step of (4, 6, 8) moved recall@10 by 0.005-0.01 at 1M, so builds of the same data landed that far apart.
NPROBE_GRID = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    10,
    12,
    14,
    16,
    20,
    24,
    28,
    32,
    40,
    48,
    56,
    64,
    80,
    96,
    112,
    128,
    160,
    192,
    224,
    256,
    320,
    384,
    448,
    512,
    640,
    768,
    896,
    1024,
)
DEFAULT_TARGET_RECALL = 0.95  # recall@10 against exact search that a tuned nprobe must reach (with confidence)


class Searchable(Protocol):
    """What tuning searches: a faiss index, or anything that searches like one (re-ranked, probed truth)."""

    def search(self, x: np.ndarray, k: int, *, params: faiss.SearchParameters | None = None) -> tuple: ...


def ivf_params(nprobe: int) -> faiss.SearchParametersIVF:
    """Search parameters of an IVF search at `nprobe` (set as a field: faiss's stubs know no keywords)."""
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    return params


def recall_at(found: np.ndarray, truth: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Per query, the fraction of its true top-k neighbours found (the query itself left out of both)."""
    out = np.empty(len(query_ids))
    for j, (q, f, t) in enumerate(zip(query_ids, found, truth, strict=True)):
        t = [x for x in t if x != q and x >= 0][:k]
        f = {x for x in f if x != q and x >= 0}
        out[j] = len(f.intersection(t)) / max(1, len(t))
    return out


def lower_bound(per_query: np.ndarray) -> float:
    """One-sided 95% lower confidence bound of mean recall (normal approximation)."""
    if len(per_query) < 2:
        return float(per_query.mean())
    return float(per_query.mean() - 1.645 * per_query.std(ddof=1) / np.sqrt(len(per_query)))


def tune_nprobe(
    index: Searchable,
    queries: np.ndarray,
    query_ids: np.ndarray,
    truth: np.ndarray,
    nlist: int,
    k: int = 10,
    target: float = DEFAULT_TARGET_RECALL,
    nprobe: int | None = None,
    start: int | None = None,
    hold: float | None = None,
) -> tuple[int, float, float, list[dict]]:
    """Smallest nprobe whose recall@k reaches `target` with 95% confidence (or just the given `nprobe`).

    "With confidence": the lower bound of the mean over the sampled queries must reach the
    target, so that new queries get the target recall too, not just these. Returns nprobe, its
    mean recall, ms per query and every setting tried. The index is not modified (parameters
    are passed per call), so it may be serialised at the same time. With `start` (the nprobe an
    update's base version chose), the search walks down from there while the target holds, or up
    until it does: two or three settings instead of the grid up to it. With `hold` (an update: the
    mean recall its quantizer reached when it was trained, measured on these same queries), the mean
    must reach it too, so nprobe rises as the kept centroids drift from the data instead of letting
    recall slide down to the target's bound.
    """
    grid = [nprobe] if nprobe else [p for p in NPROBE_GRID if p < nlist] + [nlist]
    results: dict[int, tuple[float, float, float]] = {}  # grid position -> mean recall, lower bound, ms

    def reaches(j: int) -> bool:
        t0 = time.perf_counter()
        _, found = index.search(queries, k + 1, params=ivf_params(grid[j]))
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        per_query = recall_at(found, truth, query_ids, k)
        results[j] = (float(per_query.mean()), lower_bound(per_query), ms)
        return results[j][1] >= target and (hold is None or results[j][0] >= hold)

    j = next((i for i, p in enumerate(grid) if p >= start), len(grid) - 1) if start and not nprobe else 0
    if reaches(j):
        while j > 0 and reaches(j - 1):
            j -= 1
    else:
        while j < len(grid) - 1 and not reaches(j + 1):
            j += 1
        j = min(j + 1, len(grid) - 1)
    tried = [
        {"nprobe": grid[i], "recall": round(rec, 4), "recall_lower_bound": round(lb, 4), "ms_per_query": round(ms, 4)}
        for i, (rec, lb, ms) in sorted(results.items())
    ]
    return grid[j], results[j][0], results[j][2], tried


def tune(
    index: Searchable,
    nlist: int,
    queries: np.ndarray,
    q_ids: np.ndarray,
    truth: np.ndarray,
    nprobe: int | None,
    target: float,
    start: int | None = None,
    hold: float | None = None,
) -> dict:
    """The meta.json fields of tuning: recall@10 against exact search, and the nprobe that reaches
    `target` (and `hold`: tune_nprobe); an index without IVF lists is searched once."""
    k = 10
    if nlist:
        nprobe, rec, ms, tried = tune_nprobe(index, queries, q_ids, truth, nlist, k, target, nprobe, start, hold)
    else:
        t0 = time.perf_counter()
        _, found = index.search(queries, k + 1)
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        rec, tried = float(recall_at(found, truth, q_ids, k).mean()), []
    LOG.info("nprobe %s: recall@10 %.3f, %.3f ms/query (%d queries)", nprobe, rec, ms, len(q_ids))
    return {
        "nprobe": nprobe,
        "recall_at_10": round(rec, 4),
        "target_recall": target,
        "recall_queries": len(q_ids),
        "query_ms": round(ms, 4),
        "nprobe_sweep": tried,
    }


def exact_tuning() -> dict:
    """The tuning fields of an exact index: nothing to tune, recall 1 by construction."""
    return {"nprobe": None, "recall_at_10": 1.0, "recall_note": "exact search"}


def with_search_time(index: faiss.Index, queries: np.ndarray, tuning: dict, sample: int = 200) -> dict:
    """`tuning` with the ms per query of a real search at its nprobe, on the first `sample` recall
    queries: tuning from list membership searched nothing, so its sweep's times are dropped."""
    t0 = time.perf_counter()
    index.search(queries[:sample], 11, params=ivf_params(tuning["nprobe"]))
    ms = (time.perf_counter() - t0) * 1000 / len(queries[:sample])
    LOG.info("nprobe %s: %.3f ms/query (%d queries searched)", tuning["nprobe"], ms, len(queries[:sample]))
    return {
        **tuning,
        "query_ms": round(ms, 4),
        "nprobe_sweep": [{k: v for k, v in s.items() if k != "ms_per_query"} for s in tuning["nprobe_sweep"]],
        "recall_note": "nprobe tuned from the lists that hold each query's true neighbours (IVF-Flat: exact)",
    }

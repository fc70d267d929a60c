"""Duplicate groups joined only by verified pairs (`pipeline duplicates --verify`).

Candidates: each image's NEIGHBOURS nearest others in the index at cosine >= a "possible" floor (possible_for:
on copies-dev the floor that keeps 0.95 of the true pairs; a global threshold there would make every pair of a
large collection a candidate, a per-image top-k does not). Each candidate pair is verified with local features
and one geometric fit (copies.verify_pair; the mirror image tried too), in worker processes (one per core by
default, at most 16: the matching loop holds the GIL, so threads would not scale), each computing the features
of its pairs' images from their files once and keeping them (an LRU of KEPT images across the workers). Pairs
go out in chunks in the order of their first image, so a chunk reads each image about once. Only verified pairs join
images; byte-identical files are joined without a check (find_groups).

One false link must not chain two groups: a verified pair whose images are each already in a group of two or
more joins those groups only with a second verified pair between them, or inliers >= STRONG_INLIERS. A lone
image joins a group on one verified pair: a false pair adds one image to a group, never a group to another.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import faiss
import numpy as np

from ..copies import INLIER_THRESHOLD, LocalFeatures, Verdict, local_features, opencv, verify_pair
from ..model import POOLINGS, ModelInfo
from ..progress import Progress
from ..search import Searcher
from .groups import root_of, union

LOG = logging.getLogger(__name__)

NEIGHBOURS = 10  # candidates per image: its nearest others (copies-dev: 4 copies a picture, all within them)
# The cosine floor of a candidate, per (pooling, regions whitened): the default's keeps 0.95 of copies-dev's true
# pairs (docs/quality.md, "Verified copies"); other recipes are not measured and take their calibrated group
# threshold less the default's margin (0.75 - 0.266).
POSSIBLE = {(POOLINGS["rmac45"], True): 0.266}
POSSIBLE_MARGIN = 0.484
STRONG_INLIERS = 3 * INLIER_THRESHOLD  # a pair this sure joins two groups on its own
KEPT = 4096  # images' local features kept at once over all workers (about 30 KB each)
CHUNK = 512  # pairs a worker verifies per task
BATCH = 4096  # images whose neighbours are searched at once


@dataclass
class VerifyReport:
    candidates: int = 0  # pairs verified
    verified: int = 0  # of them, the same picture
    unreadable: int = 0  # of them, not checked: a file could not be read (their reasons are logged, once each)
    joined: int = 0  # verified pairs that joined two groups
    held_back: int = 0  # verified pairs that would have chained two groups on their own


def possible_for(info: ModelInfo | None, threshold: float) -> float:
    """The candidates' cosine floor for a recipe (POSSIBLE), else `threshold` less POSSIBLE_MARGIN."""
    if info is not None and (info.pooling, bool(info.whitening)) in POSSIBLE:
        return POSSIBLE[(info.pooling, bool(info.whitening))]
    return threshold - POSSIBLE_MARGIN


def candidate_pairs(
    searcher: Searcher,
    ids: np.ndarray,
    vectors: Callable[[np.ndarray], np.ndarray],
    floor: float,
    chosen: np.ndarray | None,
    neighbours: int = NEIGHBOURS,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (a < b) into `ids` of each chosen image's `neighbours` nearest chosen others at cosine >= `floor`
    (the version's own search at its tuned nprobe), each pair once."""
    found_a, found_b = [], []
    with Progress(len(ids), "candidates", enabled=progress) as bar:
        for start in range(0, len(ids), BATCH):
            batch = ids[start : start + BATCH]
            scores, hits = searcher.nearest(vectors(batch), neighbours + 1)
            pos = np.searchsorted(ids, np.where(hits >= 0, hits, ids[0]))
            own = np.arange(start, start + len(batch))[:, None]
            keep = (hits >= 0) & (scores >= floor) & (pos != own)
            if chosen is not None:
                keep &= chosen[own] & chosen[np.minimum(pos, len(ids) - 1)]
            rows, cols = np.nonzero(keep)
            found_a.append(own[rows, 0])
            found_b.append(pos[rows, cols])
            bar.update(len(batch))
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


MAX_WORKERS = 16  # verifying processes by default at most (about 80 MiB each before the features they keep)


def default_verify_workers() -> int:
    """One verifying process per core (verification is all CPU, and nothing else runs meanwhile), at most
    MAX_WORKERS."""
    return min(MAX_WORKERS, os.cpu_count() or 1)


def verify_pairs(
    paths: list[str], a: np.ndarray, b: np.ndarray, progress: bool | None = None, workers: int | None = None
) -> list[Verdict]:
    """The verdict of each pair (paths[a[i]], paths[b[i]]), in order, checked in the order of their first image
    so that its features are computed once while they are needed. `workers`: processes (default: one per core,
    at most 16: default_verify_workers); 0 checks them in this process."""
    workers = default_verify_workers() if workers is None else workers
    order = np.lexsort((b, a))
    verdicts: list[Verdict | None] = [None] * len(a)
    chunks = [order[i : i + CHUNK] for i in range(0, len(order), CHUNK)]
    tasks = [[(paths[a[i]], paths[b[i]]) for i in chunk.tolist()] for chunk in chunks]
    with Progress(len(a), "verify", enabled=progress, unit="pairs") as bar, ExitStack() as stack:
        if workers == 0 or len(chunks) <= 1:
            kept = _kept_features(KEPT)
            found: Iterable[list[Verdict]] = (_verdicts(task, kept) for task in tasks)
        else:
            opencv()  # the missing extra said once, here, not by every worker
            # spawn: never fork a process that may hold ONNX Runtime or OpenMP threads
            pool = stack.enter_context(
                ProcessPoolExecutor(
                    workers, mp.get_context("spawn"), initializer=_start_worker, initargs=(max(64, KEPT // workers),)
                )
            )
            found = pool.map(verify_chunk, tasks)
        for chunk, chunk_verdicts in zip(chunks, found, strict=True):
            for i, verdict in zip(chunk.tolist(), chunk_verdicts, strict=True):
                verdicts[i] = verdict
            bar.update(len(chunk))
    return [v for v in verdicts if v is not None]


def _kept_features(size: int) -> Callable[[str], LocalFeatures]:
    """An image's local features (its mirror's too) from its file, the last `size` images' kept."""
    return functools.lru_cache(maxsize=size)(functools.partial(local_features, mirrored=True))


def _verdicts(pairs: list[tuple[str, str]], features: Callable[[str], LocalFeatures]) -> list[Verdict]:
    return [verify_pair(features(p), features(q)) for p, q in pairs]


_worker_features = _kept_features(KEPT)  # a verifying process's (_start_worker sizes it)


def _start_worker(kept: int) -> None:
    """A verifying process: one OpenCV thread and one faiss thread (the processes are the parallelism: threads
    of their own would spin against the other processes'), `kept` images' features."""
    global _worker_features
    opencv().setNumThreads(1)
    faiss.omp_set_num_threads(1)
    _worker_features = _kept_features(kept)


def verify_chunk(pairs: list[tuple[str, str]]) -> list[Verdict]:
    """The verdicts of (path, path) pairs, in a verifying process (its features kept for its next chunks)."""
    return _verdicts(pairs, _worker_features)


def join_verified(
    parent: np.ndarray, a: np.ndarray, b: np.ndarray, verdicts: list[Verdict], report: VerifyReport
) -> None:
    """Join the verified pairs in `parent` (surest first), two groups of two or more only with a second pair
    between them or a STRONG_INLIERS pair (module docstring)."""
    inliers = np.array([v.inliers for v in verdicts], np.int64)
    ok = np.array([v.verified for v in verdicts], bool)
    report.candidates, report.verified = len(verdicts), int(ok.sum())
    reasons = Counter(v.reason for v in verdicts if v.reason)
    report.unreadable = sum(reasons.values())
    for reason, n in reasons.most_common(5):
        LOG.warning("duplicates --verify: %d pair(s) not checked: %s", n, reason)
    size = np.ones(len(parent), np.int64)
    links: Counter[tuple[int, int]] = Counter()
    for i in np.argsort(-inliers, kind="stable"):
        if not ok[i]:
            continue
        ra, rb = root_of(parent, int(a[i])), root_of(parent, int(b[i]))
        if ra == rb:
            continue
        if size[ra] >= 2 and size[rb] >= 2 and inliers[i] < STRONG_INLIERS:
            link = (min(ra, rb), max(ra, rb))
            links[link] += 1
            if links[link] < 2:
                report.held_back += 1
                continue
        union(parent, np.array([ra]), np.array([rb]))
        size[min(ra, rb)] = size[ra] + size[rb]  # (the root of a set is its smallest member)
        report.joined += 1

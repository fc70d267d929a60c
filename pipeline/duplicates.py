"""Near-duplicate groups of a whole collection, found with its published index (`pipeline duplicates`).

A group is a connected component of the graph "cosine >= threshold" over every indexed image;
byte-identical files (same content hash) are always in one group, whatever the threshold.

Pairs are found without an N x N matrix, with the index's own partition, as a range search run for
every image at once and grouped by IVF list (faiss contrib's big_batch_search idea): each vector
probes its `nprobe` nearest centroids, as a search would, and each list is then compared, by
matrix products, with all the vectors that probe it. Every pair above the threshold is kept (no k
to choose, so a large group of copies is never cut at k neighbours); memory is bounded by the block
sizes and the N x nprobe probe table, not by N^2. Why not faiss's range search with every indexed
vector as a query: at the tuned nprobe it took 1,389 s for 1M vectors on this machine against
118-395 s for the list-by-list products (docs/benchmarks.md). A pair is missed only when neither image probes the other's list. A flat
index is cut into blocks, each compared with every vector before its end.

Flat-coded indexes (Flat, IVF...,Flat) hold the exact features, so their scores are exact.
Compressed codes (SQ, PQ, or a pre-transform) are compared decoded, with a margin, and the
candidate pairs are re-ranked with the exact features of the shards the index was built from.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
from PIL import Image as PILImage

from .errors import PipelineError
from .progress import Progress
from .search import Searcher
from .features import exact_features

LOG = logging.getLogger(__name__)

# Calibrated on ../shared/eval/copies-dev (docs/quality.md, "Near-duplicate groups").
DEFAULT_THRESHOLD = 0.80
# Lists each vector probes, at least: copies at cosine 0.8 are not close in the sense the tuned nprobe
# (recall@10) is about. On 1M synthetic vectors (IVF4096) the share of planted copy-original pairs
# found was 0.986 at nprobe 3 (the tuned one), 0.9991 at 16, 0.9998 at 32 (docs/benchmarks.md).
MIN_NPROBE = 32
BLOCK_ROWS = 2048  # rows and columns per matrix product (and rows per block of a flat index)
FLUSH_PAIRS = 4_000_000  # pairs buffered before they are merged into the groups


@dataclass(frozen=True)
class DuplicateImage:
    path: str
    score_to_first: float  # cosine to the group's first (best-quality) image
    width: int | None  # None when the file cannot be read now
    height: int | None
    bytes: int | None


@dataclass(frozen=True)
class DuplicateGroup:
    group: int  # 1 for the largest group
    images: list[DuplicateImage]  # best quality first: most pixels, then most bytes

    def to_dict(self) -> dict:
        return {"group": self.group, "images": [vars(i) for i in self.images]}


def find_groups(
    index_dir: Path | str,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    min_size: int = 2,
    limit: int | None = None,
    nprobe: int | None = None,
    rerank_margin: float | None = None,
    progress: bool | None = None,
) -> list[DuplicateGroup]:
    """Every group of at least `min_size` near-duplicate images of the published index, largest first
    (at most `limit` groups). Reads only: nothing is deleted or moved.

    `nprobe`: IVF lists each vector probes (default: the index's tuned nprobe, at least MIN_NPROBE).
    `rerank_margin`: for compressed codes, pairs whose decoded score is at least threshold minus this
    are re-scored with the exact features from the shards (default: measured, see _code_error).
    """
    if not -1.0 <= threshold <= 1.0:
        raise PipelineError(f"--threshold is a cosine, in [-1, 1] (got {threshold})")
    if min_size < 2:
        raise PipelineError(f"--min-size must be at least 2 (got {min_size})")
    if limit is not None and limit < 1:
        raise PipelineError(f"--limit must be at least 1 (got {limit})")
    if nprobe is not None and nprobe < 1:
        raise PipelineError(f"--nprobe must be at least 1 (got {nprobe})")
    t0 = time.monotonic()
    searcher = Searcher(index_dir)
    ids = searcher.ids()  # sorted; ids are stable catalog ids, not positions: groups are formed over positions
    n = len(ids)
    base = searcher.index
    if isinstance(base, faiss.IndexIDMap):  # a flat index keeps its ids in an id map
        base = faiss.downcast_index(base.index)
    exact = isinstance(base, (faiss.IndexFlat, faiss.IndexIVFFlat))
    vectors = searcher.vectors if exact else exact_features(
        Path(searcher.meta["features_dir"]), searcher.meta["shards"], searcher.meta["dim"], searcher.version_dir)
    parent = np.arange(n, dtype=np.int64)
    if not exact and rerank_margin is None:
        rerank_margin = _code_error(searcher, ids, vectors)
        LOG.info("compressed codes: pairs re-ranked with exact features from %.3f below the threshold", rerank_margin)
    rerank = None if exact else (vectors, threshold)
    cut = threshold if exact else threshold - rerank_margin
    found = buffered = 0
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    with Progress(n, "duplicates", enabled=progress) as bar:
        for a, b, done in _pairs_above(searcher, ids, cut, nprobe or max(searcher.nprobe or 1, MIN_NPROBE)):
            pending.append((np.searchsorted(ids, a), np.searchsorted(ids, b)))
            buffered += len(a)
            bar.update(done)
            if buffered >= FLUSH_PAIRS:
                found += _merge(parent, pending, rerank, ids)
                pending, buffered = [], 0
    found += _merge(parent, pending, rerank, ids)
    for same in searcher.same_content_ids():
        pos = np.searchsorted(ids, same)
        _union(parent, np.full(len(pos) - 1, pos[0]), pos[1:])
    roots = _roots(parent)
    sizes = np.bincount(roots, minlength=n)
    members = np.flatnonzero(sizes[roots] >= min_size)
    order = np.lexsort((members, roots[members], -sizes[roots[members]]))  # largest first, then by smallest id
    members = members[order]
    splits = np.flatnonzero(np.diff(roots[members])) + 1
    groups = [ids[g] for g in np.split(members, splits)] if len(members) else []
    LOG.info("duplicates: %d pairs at cosine >= %.3f, %d groups of >= %d images (%s, %.1f s)", found, threshold,
             len(groups), min_size, searcher.meta.get("factory"), time.monotonic() - t0)
    groups = groups[:limit]
    wanted = np.sort(np.concatenate(groups)) if groups else np.zeros(0, np.int64)
    features = dict(zip(wanted.tolist(), vectors(wanted)))  # one read for all groups (shards: one pass)
    return [_describe(searcher, features, g + 1, ids) for g, ids in enumerate(groups)]


def _pairs_above(searcher: Searcher, ids: np.ndarray, cut: float, nprobe: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(ids a, ids b, rows done) of the pairs with score >= cut, by matrix products of at most
    BLOCK_ROWS x BLOCK_ROWS; `rows done` counts the rows whose comparisons are all done (for progress)."""
    for a_ids, a, b_ids, b, once, done in _comparisons(searcher, ids, nprobe):
        for r in range(0, len(a_ids), BLOCK_ROWS):
            for c in range(0, len(b_ids), BLOCK_ROWS):
                ra, cb = a_ids[r:r + BLOCK_ROWS], b_ids[c:c + BLOCK_ROWS]
                hit = a[r:r + BLOCK_ROWS] @ b[c:c + BLOCK_ROWS].T >= cut
                # never an image with itself; where both orders are compared, each pair once
                hit &= (ra[:, None] < cb[None, :]) if once else (ra[:, None] != cb[None, :])
                i, j = np.nonzero(hit)
                yield ra[i], cb[j], 0
        yield a_ids[:0], b_ids[:0], done


def _comparisons(searcher: Searcher, ids: np.ndarray, nprobe: int) -> Iterator[tuple]:
    """The blocks to compare: (ids a, vectors a, ids b, vectors b, each pair compared in both orders,
    rows done), vectors in the space the index compares them in (decoded for compressed codes).

    Flat index: blocks of BLOCK_ROWS ids, each against itself and every later block. IVF: each
    vector probes its `nprobe` nearest centroids, as a search would (looked for among the 4 x nprobe
    centroids nearest to its own list's: a vector's nearest centroids are next to the one it is in),
    and the vectors of each list are compared with every list they probe."""
    index = searcher.index
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        blocks = [ids[s:s + BLOCK_ROWS] for s in range(0, len(ids), BLOCK_ROWS)]
        for p, block in enumerate(blocks):
            a = searcher.vectors(block)
            for m in range(p, len(blocks)):
                yield block, a, blocks[m], a if m == p else searcher.vectors(blocks[m]), True, len(block) * (m + 1 == len(blocks))
        return
    lists = ivf.invlists
    lists_ids = [faiss.rev_swig_ptr(lists.get_ids(l), lists.list_size(l)).copy() if lists.list_size(l) else
                 np.zeros(0, np.int64) for l in range(ivf.nlist)]
    if isinstance(index, faiss.IndexIVFFlat):
        def list_vectors(m: int) -> np.ndarray:  # the list's codes are the features: a view, no copy
            size = lists.list_size(m)
            return faiss.rev_swig_ptr(lists.get_codes(m), size * ivf.code_size).view(np.float32).reshape(size, ivf.d)
    else:
        def list_vectors(m: int) -> np.ndarray:
            return searcher.vectors(lists_ids[m])
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    nprobe = min(nprobe, ivf.nlist)
    _, near = ivf.quantizer.search(centroids, min(ivf.nlist, 4 * nprobe))
    for l, list_ids in enumerate(lists_ids):
        if not len(list_ids):
            continue
        a = list_vectors(l)
        cand = near[l][near[l] >= 0]
        probes = cand[np.argsort(-(a @ centroids[cand].T), axis=1)[:, :nprobe]]
        targets = [int(m) for m in np.unique(probes) if len(lists_ids[m])]
        for k, m in enumerate(targets):
            rows = np.flatnonzero((probes == m).any(axis=1))
            yield list_ids[rows], a[rows], lists_ids[m], list_vectors(m), False, len(list_ids) * (k + 1 == len(targets))


def _code_error(searcher: Searcher, ids: np.ndarray, vectors, sample: int = 1000, seed: int = 0) -> float:
    """How far scores of decoded codes stray from exact ones: 1.5 x the largest error over all pairs
    of a seeded sample of indexed vectors (decoded from the index vs exact from the shards)."""
    ids = np.sort(np.random.default_rng(seed).choice(ids, min(sample, len(ids)), replace=False))
    decoded, exact = searcher.vectors(ids), vectors(ids)
    return 1.5 * float(np.abs(decoded @ decoded.T - exact @ exact.T).max())


def _merge(parent: np.ndarray, pending: list[tuple[np.ndarray, np.ndarray]], rerank, ids: np.ndarray) -> int:
    """Join the groups of the pending pairs (positions into `ids`; first re-scored with exact features
    when `rerank` is (vectors by id, threshold)); returns how many pairs were joined."""
    if not pending:
        return 0
    a = np.concatenate([p[0] for p in pending])
    b = np.concatenate([p[1] for p in pending])
    if rerank is not None and len(a):
        vectors, threshold = rerank
        involved, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
        v = vectors(ids[involved])
        ia, ib = inverse[:len(a)], inverse[len(a):]
        keep = np.einsum("ij,ij->i", v[ia], v[ib]) >= threshold
        a, b = a[keep], b[keep]
    _union(parent, a, b)
    return len(a)


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the sets of a[i] and b[i] in the forest `parent` (vectorised union-find). Links always
    point to the smaller id, so there are no cycles; each round hooks every root to the smallest root
    it is paired with, and pairs already joined drop out."""
    while len(a):
        ra, rb = _find(parent, a), _find(parent, b)
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Roots of x; their paths are shortened to point at the root directly."""
    r = parent[x]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            parent[x] = r
            return r
        r = up


def _roots(parent: np.ndarray) -> np.ndarray:
    """The root of every element (pointer jumping over the whole forest)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up


def _describe(searcher: Searcher, features: dict[int, np.ndarray], number: int, ids: np.ndarray) -> DuplicateGroup:
    """A group's images with their file facts, best quality first, and their cosine to the first."""
    facts = searcher.rows(ids)
    files = sorted(((facts[int(i)][0], int(i), *_file_facts(facts[int(i)][0])) for i in ids),
                   key=lambda f: (-(f[2] or 0) * (f[3] or 0), -(f[4] or 0), f[0]))
    v = np.stack([features[f[1]] for f in files])
    scores = v @ v[0]
    return DuplicateGroup(number, [DuplicateImage(path, round(float(s), 4), w, h, size)
                                   for (path, _, w, h, size), s in zip(files, scores)])


def _file_facts(path: str) -> tuple[int | None, int | None, int | None]:
    """Width, height (from the header: no decode) and bytes of a file; None for what cannot be read."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return None, None, None
    try:
        with PILImage.open(path) as im:
            return im.width, im.height, size
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError):
        return None, None, size

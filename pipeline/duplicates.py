"""Near-duplicate groups of a whole collection, found with its published index (`pipeline duplicates`).

A group is a connected component of the graph "cosine >= threshold" over every indexed image;
byte-identical files (same content hash) are always in one group, whatever the threshold.

Pairs are found without an N x N matrix, with the index's own partition, as a range search by
blocks: each IVF inverted list is compared, by one matrix product, with itself and with the
lists whose centroids are among the `nprobe` nearest to its centroid (each pair of lists once);
a flat index is cut into blocks of rows, each compared with itself and every later block. Every
pair above the threshold in the compared lists is kept (no k to choose, so a large group of
copies is never cut at k neighbours), and memory is bounded by the block sizes, not by N. Why not
faiss's range search with every indexed vector as a query: on this machine, 1M IVF queries at
~1,000 queries/s take 16 minutes; one matrix product per list runs at BLAS speed
(docs/benchmarks.md). A pair is missed only when its two images fall in lists that are not
within `nprobe` of each other; near-duplicates are far closer than the 10th neighbour the
tuned nprobe was chosen for, so the tuned nprobe is the default.

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
from .shards import read_rows, read_shard

LOG = logging.getLogger(__name__)

# Calibrated on ../shared/eval/copies-dev (docs/quality.md, "Near-duplicate groups").
DEFAULT_THRESHOLD = 0.80
FLAT_BLOCK = 4096  # rows per block of a flat index
MAX_COLUMNS = 16384  # columns per matrix product: a block is at most rows x 16384 floats
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

    `nprobe`: IVF lists compared with each list (default: the index's tuned nprobe).
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
    n = searcher.count
    exact = isinstance(searcher.index, (faiss.IndexFlat, faiss.IndexIVFFlat))
    vectors = searcher.vectors if exact else _shard_vectors(searcher)
    parent = np.arange(n, dtype=np.int64)
    if not exact and rerank_margin is None:
        rerank_margin = _code_error(searcher, vectors)
        LOG.info("compressed codes: pairs re-ranked with exact features from %.3f below the threshold", rerank_margin)
    rerank = None if exact else (vectors, threshold)
    cut = threshold if exact else threshold - rerank_margin
    found = buffered = 0
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    with Progress(n, "duplicates", enabled=progress) as bar:
        for a, b, done in _pairs_above(searcher, cut, nprobe or searcher.nprobe or 1):
            pending.append((a, b))
            buffered += len(a)
            bar.update(done)
            if buffered >= FLUSH_PAIRS:
                found += _merge(parent, pending, rerank)
                pending, buffered = [], 0
    found += _merge(parent, pending, rerank)
    for ids in searcher.same_content_ids():
        _union(parent, np.full(len(ids) - 1, ids[0]), ids[1:])
    roots = _roots(parent)
    sizes = np.bincount(roots, minlength=n)
    members = np.flatnonzero(sizes[roots] >= min_size)
    order = np.lexsort((members, roots[members], -sizes[roots[members]]))  # largest first, then by smallest id
    members = members[order]
    splits = np.flatnonzero(np.diff(roots[members])) + 1
    groups = np.split(members, splits) if len(members) else []
    LOG.info("duplicates: %d pairs at cosine >= %.3f, %d groups of >= %d images (%s, %.1f s)", found, threshold,
             len(groups), min_size, searcher.meta.get("factory"), time.monotonic() - t0)
    groups = groups[:limit]
    wanted = np.sort(np.concatenate(groups)) if groups else np.zeros(0, np.int64)
    features = dict(zip(wanted.tolist(), vectors(wanted)))  # one read for all groups (shards: one pass)
    return [_describe(searcher, features, g + 1, ids) for g, ids in enumerate(groups)]


def _pairs_above(searcher: Searcher, cut: float, nprobe: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(ids a, ids b, rows done) of every pair with score >= cut among the compared blocks; `rows done`
    counts the rows whose comparisons are complete (for progress), 0 until the last part of a block."""
    parts, neighbours, decode = _partition(searcher, nprobe)
    for p, ids in enumerate(parts):
        if not len(ids):
            continue
        a = decode(p)
        chunk: list[int] = []
        todo = neighbours[p]
        for k, q in enumerate(todo):
            chunk.append(q)
            if sum(len(parts[c]) for c in chunk) < MAX_COLUMNS and k + 1 < len(todo):
                continue
            b = np.concatenate([decode(c) for c in chunk])
            hit = a @ b.T >= cut
            if chunk[0] == p:  # the block against itself: each pair once, never an image with itself
                hit[:, :len(ids)] = np.triu(hit[:, :len(ids)], 1)
            i, j = np.nonzero(hit)
            b_ids = np.concatenate([parts[c] for c in chunk])
            yield ids[i], b_ids[j], len(ids) if k + 1 == len(todo) else 0
            chunk = []


def _partition(searcher: Searcher, nprobe: int):
    """The blocks to compare: ids per part, the later parts each part is compared with (itself first),
    and a function decoding a part's vectors."""
    index = searcher.index
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is None:
        n = index.ntotal
        parts = [np.arange(s, min(s + FLAT_BLOCK, n)) for s in range(0, n, FLAT_BLOCK)]
        return parts, [list(range(p, len(parts))) for p in range(len(parts))], lambda p: searcher.vectors(parts[p])
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(l), lists.list_size(l)).copy() if lists.list_size(l) else
             np.zeros(0, np.int64) for l in range(ivf.nlist)]
    _, probe = ivf.quantizer.search(ivf.quantizer.reconstruct_n(0, ivf.nlist), min(nprobe, ivf.nlist))
    near = np.concatenate([np.column_stack([np.repeat(np.arange(ivf.nlist), probe.shape[1]), probe.ravel()]),
                           np.column_stack([np.arange(ivf.nlist)] * 2)])  # every list with itself, always
    near = near[near[:, 1] >= 0]
    near = np.unique(np.sort(near, axis=1), axis=0)  # a pair of lists once, in either direction
    neighbours: list[list[int]] = [[] for _ in range(ivf.nlist)]
    for l, m in near:
        neighbours[l].append(int(m))  # sorted, so each list comes first in its own row
    if not isinstance(index, faiss.IndexIVFFlat):
        return parts, neighbours, lambda p: searcher.vectors(parts[p])  # decoded, in the features' space

    def decode(p: int) -> np.ndarray:  # the list's codes are the features: a view, no copy
        size = lists.list_size(p)
        return faiss.rev_swig_ptr(lists.get_codes(p), size * ivf.code_size).view(np.float32).reshape(size, ivf.d)
    return parts, neighbours, decode


def _code_error(searcher: Searcher, vectors, sample: int = 1000, seed: int = 0) -> float:
    """How far scores of decoded codes stray from exact ones: 1.5 x the largest error over all pairs
    of a seeded sample of indexed vectors (decoded from the index vs exact from the shards)."""
    n = searcher.count
    ids = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    decoded, exact = searcher.vectors(ids), vectors(ids)
    return 1.5 * float(np.abs(decoded @ decoded.T - exact @ exact.T).max())


def _merge(parent: np.ndarray, pending: list[tuple[np.ndarray, np.ndarray]], rerank) -> int:
    """Join the groups of the pending pairs (first re-scored with exact features when `rerank` is
    (vectors, threshold)); returns how many pairs were joined."""
    if not pending:
        return 0
    a = np.concatenate([p[0] for p in pending])
    b = np.concatenate([p[1] for p in pending])
    if rerank is not None and len(a):
        vectors, threshold = rerank
        involved, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
        v = vectors(involved)
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


def _shard_vectors(searcher: Searcher):
    """Exact features by id, read from the shards the index was built from (for compressed codes).
    Ids count the indexed rows of meta.json's shards in order; rows are matched by path and hash."""
    meta = searcher.meta
    features_dir = Path(meta["features_dir"])
    starts = np.cumsum([0] + [s["count"] for s in meta["shards"]])

    def vectors(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), meta["dim"]), np.float32)
        facts = searcher.rows(ids)
        for s, shard in enumerate(meta["shards"]):
            sel = np.flatnonzero((ids >= starts[s]) & (ids < starts[s + 1]))
            if not len(sel):
                continue
            path = features_dir / shard["name"]
            try:
                data = read_shard(path, features=False)
            except PipelineError:
                data = None
            row_of = {} if data is None else {key: r for r, key in enumerate(zip(data.paths, data.hashes))}
            rows = [row_of.get(facts[int(i)]) for i in ids[sel]]
            if None in rows:
                raise PipelineError(f"the features behind {searcher.version_dir} changed since it was built "
                                    f"({path} is gone or rewritten): rebuild the index to re-rank its compressed codes")
            rows = np.asarray(rows)
            order = np.argsort(rows)
            out[sel[order]] = read_rows(path, rows[order])
        return out

    return vectors


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

"""Near-duplicate groups of a whole collection, found with its published index (`pipeline duplicates`).

A group is a connected component of the graph "cosine >= threshold" over every indexed image;
byte-identical files (same content hash) are always in one group, whatever the threshold.

Pairs are found without an N x N matrix, with the index's own partition, as a range search run for
every image at once and grouped by IVF list (faiss contrib's big_batch_search idea): each vector
probes its own list and every list whose centroid is nearly as near (PROBE_GAP: as many as a pair
at the threshold may need, more for vectors between many centroids; one table for all vectors,
inverted), and each list is then compared with all the vectors that probe it in a few large matrix
products. Every pair above the threshold is kept (no k to choose, so a large group of copies is
never cut at k neighbours); memory is bounded by the block sizes and the (vector, probed list)
table, not by N^2. Why not faiss's range search with every indexed vector as a query: for 1M
vectors on this machine it took 1,389 s at the tuned nprobe (3) and 5,954 s at 32
(docs/benchmarks.md). A pair is missed only when neither image probes the other's list. The cost
is the number of (vector, probed list member) pairs: on the 1M benchmark a few large lists that
most vectors probe make it ~2,100 members per probed list, not the mean list size (244). A flat
index is cut into blocks, each compared with every vector before its end.

Flat-coded indexes (Flat, IVF...,Flat) hold the exact features, so their scores are exact.
Compressed codes with a vector store (the default for them, index/store.py) are compared with the
stored features (float16); without one (--rerank 0), decoded, with a margin, and the candidate
pairs are re-ranked with the exact features of the shards the index was built from.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import faiss
import numpy as np
from PIL import Image as PILImage

from .errors import PipelineError
from .features import exact_features
from .index import recorded_model
from .model import POOLINGS
from .progress import Progress
from .search import Searcher
from .features import list_shards, shard_model

LOG = logging.getLogger(__name__)

# The cosine at or above which two images are one picture, per pooling of the index's recipe: each the
# best F0.5 on ../shared/eval/copies-dev (docs/quality.md, "Near-duplicate groups"). Recipes score alike
# pairs differently: at 0.80, block4 + block5 R-MAC groups 942 pairs of copies-dev at precision 0.37.
THRESHOLDS = {POOLINGS["rmac"]: 0.80, POOLINGS["rmac45"]: 0.86}
DEFAULT_THRESHOLD = 0.80  # a recipe not calibrated: that of block5 R-MAC, the nearest
# Lists each vector probes (unless --nprobe fixes a number): its own, those a search would probe
# (the tuned nprobe), and every further list whose centroid scores within PROBE_GAP x e of its
# nearest centroid's, where e = sqrt(2 - 2 cut) is the distance between two unit vectors at the cut,
# at most MAX_PROBES. Why: x in list A, y at cosine >= cut in list B (y prefers c_B):
# x.c_A - x.c_B <= (x - y).(c_A - c_B) <= e |c_A - c_B|, a bound too loose to use (most lists), but
# x - y is nearly orthogonal to c_A - c_B: on 20,000 copies at cosine 0.80-0.97 of vectors of the 1M
# benchmark (not its planted ones) the largest gap a pair needed was 0.031 e; 0.04 leaves a margin.
# A fixed count is the wrong shape: at 1M (IVF4096) 32 lists per vector still missed a planted pair
# that needed 43, while the gap rule probes 20.6 lists on average (p99 178), compares 0.57x the
# pairs of 32 fixed ones and misses none (docs/benchmarks.md): vectors near many centroids get more.
# Real copies (copies-dev, held-out) among those centroids: 32 fixed lists miss 7 of 184 pairs, the
# gap rule 1 (it needed 0.072 e; scripts/check_probing.py).
PROBE_GAP = 0.04
MAX_PROBES = 256
BLOCK_ROWS = 2048  # rows and columns per matrix product (and rows per block of a flat index)
PROBE_ROWS = 8192  # rows per product of an IVF list with the vectors that probe it
PASS_PROBES = 4_000_000  # entries of the probe table inverted per pass
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


def default_threshold(searcher: Searcher) -> float:
    """The threshold calibrated for the recipe of the index's features (THRESHOLDS), as its meta.json
    records it. A version written before meta.json kept the whole recipe: read from the first readable
    shard of its features folder, if the index's model made it (the shards the index lists may have been
    compacted away since; a folder holds one model's shards)."""
    recorded = recorded_model(searcher.meta)
    if recorded is not None:
        return THRESHOLDS.get(recorded.pooling, DEFAULT_THRESHOLD)
    made_by = searcher.meta["model"].get("checksum")
    for path in list_shards(Path(searcher.meta.get("features_dir", ""))):
        try:
            info = shard_model(path)[0]
        except (OSError, PipelineError):
            continue
        if made_by in (None, info.checksum):
            return THRESHOLDS.get(info.pooling, DEFAULT_THRESHOLD)
        break
    LOG.warning("the recipe of %s cannot be read from its features folder: threshold %.2f", searcher.version_dir,
                DEFAULT_THRESHOLD)
    return DEFAULT_THRESHOLD


def find_groups(
    index_dir: Path | str,
    threshold: float | None = None,
    *,
    min_size: int = 2,
    limit: int | None = None,
    nprobe: int | None = None,
    rerank_margin: float | None = None,
    progress: bool | None = None,
) -> list[DuplicateGroup]:
    """Every group of at least `min_size` near-duplicate images of the published index, largest first
    (at most `limit` groups). Reads only: nothing is deleted or moved.

    `threshold`: cosine (default: the one calibrated for the index's recipe, default_threshold).

    `nprobe`: IVF lists each vector probes (default: by score gap to its nearest centroid, PROBE_GAP).
    `rerank_margin`: for compressed codes, pairs whose decoded score is at least threshold minus this
    are re-scored with the exact features from the shards (default: measured, see _code_error).
    """
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise PipelineError(f"--threshold is a cosine, in [-1, 1] (got {threshold})")
    if min_size < 2:
        raise PipelineError(f"--min-size must be at least 2 (got {min_size})")
    if limit is not None and limit < 1:
        raise PipelineError(f"--limit must be at least 1 (got {limit})")
    if nprobe is not None and nprobe < 1:
        raise PipelineError(f"--nprobe must be at least 1 (got {nprobe})")
    t0 = time.monotonic()
    searcher = Searcher(index_dir)
    if threshold is None:
        threshold = default_threshold(searcher)
    if searcher.meta.get("codes"):
        raise PipelineError(f"{searcher.version_dir} holds binary codes (build-index --codes), which `duplicates` "
                            "cannot scan list by list; build an index without --codes for it")
    ids = searcher.ids()  # sorted; ids are stable catalog ids, not positions: groups are formed over positions
    n = len(ids)
    base = searcher.index
    if isinstance(base, faiss.IndexIDMap):  # a flat index keeps its ids in an id map
        base = faiss.downcast_index(base.index)
    # Full vectors: in the index itself (flat), or in the version's vector store (float16: scores
    # within ~1e-3 of float32, no margin needed); otherwise decoded codes, checked against the shards.
    exact = isinstance(base, (faiss.IndexFlat, faiss.IndexIVFFlat)) or searcher.store is not None
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
        probing = (Probing(nprobe, nprobe) if nprobe else
                   Probing(searcher.nprobe or 1, MAX_PROBES, PROBE_GAP * float(np.sqrt(max(0.0, 2 - 2 * cut)))))
        for a, b, done in _pairs_above(searcher, ids, cut, probing):
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


@dataclass(frozen=True)
class Probing:
    """Which IVF lists a vector probes: its `least` nearest centroids, and further ones up to the
    `most` nearest whose score is within `gap` of the nearest's (in inner product of unit vectors;
    None: exactly `least`)."""

    least: int
    most: int
    gap: float | None = None


def _pairs_above(searcher: Searcher, ids: np.ndarray, cut: float, probing: Probing) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(ids a, ids b, rows done) of the pairs with score >= cut, in the space the index compares
    vectors in (decoded for compressed codes), by matrix products of at most BLOCK_ROWS x BLOCK_ROWS
    (IVF: PROBE_ROWS x BLOCK_ROWS); `rows done` counts the rows whose comparisons are all done (for
    progress). A pair may come more than once (from both of its lists); never an image with itself.

    Flat index: blocks of BLOCK_ROWS ids, each against itself and every later block."""
    try:
        ivf = faiss.extract_index_ivf(searcher.index)
    except RuntimeError:
        blocks = [ids[s:s + BLOCK_ROWS] for s in range(0, len(ids), BLOCK_ROWS)]
        for p, block in enumerate(blocks):
            a = searcher.vectors(block)
            for m in range(p, len(blocks)):
                b = a if m == p else searcher.vectors(blocks[m])
                i, j = _above(a @ b.T, cut)
                i, j = (i, j) if m > p else (i[i < j], j[i < j])  # within a block, each pair once
                yield block[i], blocks[m][j], 0
            yield ids[:0], ids[:0], len(block)
        return
    yield from _ivf_pairs_above(searcher, ivf, cut, probing)


def _ivf_pairs_above(searcher: Searcher, ivf: faiss.IndexIVF, cut: float, probing: Probing) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """The IVF case of _pairs_above: each vector probes the lists `probing` says, its nearest
    centroids asked of the quantizer as a search asks it; then each list is compared with every
    vector that probes it, in a few large products (not one small product per pair of lists: at 1M
    vectors and nprobe 32 call overhead made that run take over 45 minutes). Vectors are numbered by slot: their place in the lists, list after list.
    A pair is compared from both of its lists when each vector probes the other's: comparing it
    once saves only 3.4% of the products at 1M, about what planning it costs (docs/benchmarks.md)."""
    lists = ivf.invlists
    sizes = np.array([lists.list_size(l) for l in range(ivf.nlist)], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    slot_ids = np.concatenate([faiss.rev_swig_ptr(lists.get_ids(l), int(sizes[l])) for l in np.flatnonzero(sizes).tolist()]
                              or [np.zeros(0, np.int64)])
    if isinstance(searcher.index, faiss.IndexIVFFlat):  # the lists' codes are the features: views, no copy
        views = [faiss.rev_swig_ptr(lists.get_codes(m), int(sizes[m]) * ivf.code_size).view(np.float32).reshape(-1, ivf.d)
                 if sizes[m] else np.zeros((0, ivf.d), np.float32) for m in range(ivf.nlist)]

        def list_vectors(m: int) -> np.ndarray:
            return views[m]

        def slot_vectors(slots: np.ndarray) -> np.ndarray:  # ascending slots: a few runs of each list
            source = np.searchsorted(starts, slots, side="right") - 1
            runs = np.flatnonzero(np.diff(source)) + 1
            return np.concatenate([views[m][run - starts[m]] for m, run in
                                   zip(source[np.r_[0, runs]].tolist(), np.split(slots, runs))])
    elif searcher.store is not None:  # compressed codes with a vector store: compare the stored features
        def list_vectors(m: int) -> np.ndarray:
            return searcher.store.get(slot_ids[starts[m]:starts[m + 1]])

        def slot_vectors(slots: np.ndarray) -> np.ndarray:
            return searcher.store.get(slot_ids[slots])

        def ivf_vectors(slots: np.ndarray) -> np.ndarray:  # stored features are in the input space, the centroids after OPQ/RR
            return _pre_transform(searcher.index, slot_vectors(slots))
    else:  # decoded by the IVF itself: in its centroids' space, after any pre-transform (OPQ's rotation keeps cosines)
        if ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # ids are sparse (the catalog's)

        def list_vectors(m: int) -> np.ndarray:
            return ivf.reconstruct_batch(slot_ids[starts[m]:starts[m + 1]])

        def slot_vectors(slots: np.ndarray) -> np.ndarray:
            return ivf.reconstruct_batch(slot_ids[slots])
    probers, probed = _probes(ivf, slot_vectors if searcher.store is None else ivf_vectors, int(starts[-1]), probing)
    LOG.info("duplicates: %.1f lists probed per vector (%s)", len(probed) / max(1, int(starts[-1])), probing)
    for m, slots in _probers(probers, probed, ivf.nlist):
        if not sizes[m]:
            continue
        b, b_ids = list_vectors(m), slot_ids[starts[m]:starts[m + 1]]
        for r in range(0, len(slots), PROBE_ROWS):
            a_ids, a = slot_ids[slots[r:r + PROBE_ROWS]], slot_vectors(slots[r:r + PROBE_ROWS])
            for c in range(0, len(b_ids), BLOCK_ROWS):
                i, j = _above(a @ b[c:c + BLOCK_ROWS].T, cut)
                i, j = a_ids[i], b_ids[c + j]
                yield i[i != j], j[i != j], 0
        yield slot_ids[:0], slot_ids[:0], int(sizes[m])


def _above(scores: np.ndarray, cut: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the scores >= cut. Hits are rare: np.nonzero on the 2-D mask costs ~10x the
    matrix's compare (it walks it by index), the 1-D flatnonzero about 2x."""
    return np.divmod(np.flatnonzero(scores >= cut), scores.shape[1])


def _pre_transform(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """x as the index's IVF sees it: through its pre-transform chain (OPQ, RR), if it has one."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = faiss.downcast_VectorTransform(index.chain.at(i)).apply(x)
    return x


def _probes(ivf: faiss.IndexIVF, slot_vectors: Callable[[np.ndarray], np.ndarray], n: int,
            probing: Probing) -> tuple[np.ndarray, np.ndarray]:
    """(slots, lists): every (slot, list it probes), slot after slot, each slot's lists nearest first:
    its nearest centroids asked of the IVF's own quantizer as a search asks it, PROBE_ROWS slots at a
    time, kept as `probing` says. Not guessed among the centroids nearest to its own list's: that
    found 26 of a vector's 32 lists on average, and missed 22 of 8,167 planted copy pairs at 1M where
    a search's lists miss 1 (docs/benchmarks.md)."""
    most = min(probing.most, ivf.nlist)
    least = min(probing.least, most)
    slots, lists = [], []
    for lo in range(0, n, PROBE_ROWS):
        hi = min(n, lo + PROBE_ROWS)
        score, near = ivf.quantizer.search(np.ascontiguousarray(slot_vectors(np.arange(lo, hi)), np.float32), most)
        assert (near[:, :least] >= 0).all(), "the quantizer found fewer centroids than it holds"
        keep = near >= 0
        if probing.gap is not None:  # distances of an L2 quantizer: squared, twice the gap in inner product
            gap = score[:, :1] - score if ivf.metric_type == faiss.METRIC_INNER_PRODUCT else (score - score[:, :1]) / 2
            keep &= gap <= probing.gap
        keep[:, :least] = True
        rows, cols = np.nonzero(keep)
        slots.append((rows + lo).astype(np.int32))
        lists.append(near[rows, cols].astype(np.int32))
    return np.concatenate(slots or [np.zeros(0, np.int32)]), np.concatenate(lists or [np.zeros(0, np.int32)])


def _probers(slots: np.ndarray, lists: np.ndarray, nlist: int) -> Iterator[tuple[int, np.ndarray]]:
    """(list, the slots that probe it, ascending) for every list: the (slot, list) table inverted in
    passes over about PASS_PROBES of its entries each, so memory stays a fraction of the table's."""
    counts = np.bincount(lists, minlength=nlist)
    first = np.cumsum(counts) - counts  # the first entry of each list in the inverted table
    edges = np.concatenate([[0], np.flatnonzero(np.diff(first // PASS_PROBES)) + 1, [nlist]])
    for lo, hi in zip(edges[:-1], edges[1:]):
        entries = np.flatnonzero((lists >= lo) & (lists < hi))
        entries = entries[np.argsort(lists[entries], kind="stable")]
        yield from zip(range(lo, hi), np.split(slots[entries], np.cumsum(counts[lo:hi])[:-1]))


def _code_error(searcher: Searcher, ids: np.ndarray, vectors, sample: int = 1000, seed: int = 0) -> float:
    """How far scores of decoded codes stray from exact ones: 1.5 x the largest error over all pairs
    of a seeded sample of indexed vectors (decoded from the index vs exact from the shards)."""
    ids = np.sort(np.random.default_rng(seed).choice(ids, min(sample, len(ids)), replace=False))
    decoded, exact = searcher.decoded(ids), vectors(ids)
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

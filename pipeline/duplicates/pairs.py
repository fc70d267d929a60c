"""Candidate pairs: every pair of indexed vectors whose score reaches a cut, found with the index's own
partition and without an N x N matrix.

For an IVF index this is a range search run for every image at once and grouped by IVF list (faiss
contrib's big_batch_search idea): each vector probes its own list and every list whose centroid is nearly
as near (PROBE_GAP: as many as a pair at the threshold may need, more for vectors between many centroids;
one table for all vectors, inverted), and each list is then compared with all the vectors that probe it in
a few large matrix products. Every pair above the cut is kept (no k to choose, so a large group of copies
is never cut at k neighbours); memory is bounded by the block sizes and the (vector, probed list) table,
not by N^2. Why not faiss's range search with every indexed vector as a query: for 1M vectors on this
machine it took 1,389 s at the tuned nprobe (3) and 5,954 s at 32 (docs/history/benchmarks-log-before-2026-12.md).
A pair is missed only when neither image probes the other's list. The cost is the number of (vector, probed list member)
pairs: on the 1M benchmark a few large lists that most vectors probe make it ~2,100 members per probed
list, not the mean list size (244). A flat index is cut into blocks, each compared with every vector
before its end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from ..errors import PipelineError
from ..search import Searcher

LOG = logging.getLogger(__name__)

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
# gap rule 1 (it needed 0.072 e; scripts/benchmarks/check_probing.py, docs/benchmarks.md).
PROBE_GAP = 0.04
MAX_PROBES = 256
BLOCK_ROWS = 2048  # rows and columns per matrix product (and rows per block of a flat index)
PROBE_ROWS = 8192  # rows per product of an IVF list with the vectors that probe it
PASS_PROBES = 4_000_000  # entries of the probe table inverted per pass

# (ids a, ids b, rows done): a batch of pairs, and how many rows have all their comparisons done (progress)
PairBatch = tuple[np.ndarray, np.ndarray, int]
SlotVectors = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Probing:
    """Which IVF lists a vector probes: its `least` nearest centroids, and further ones up to the
    `most` nearest whose score is within `gap` of the nearest's (in inner product of unit vectors;
    None: exactly `least`)."""

    least: int
    most: int
    gap: float | None = None


def probing_for(cut: float, nprobe: int | None = None, tuned_nprobe: int | None = None) -> Probing:
    """The lists each vector probes for pairs at `cut`: exactly `nprobe` when given (--nprobe); else the
    gap rule (PROBE_GAP x e, e the distance of two unit vectors at the cut), at least the lists a search
    probes (the index's tuned nprobe), at most MAX_PROBES."""
    if nprobe:
        return Probing(nprobe, nprobe)
    return Probing(tuned_nprobe or 1, MAX_PROBES, PROBE_GAP * float(np.sqrt(max(0.0, 2 - 2 * cut))))


def pairs_above(searcher: Searcher, ids: np.ndarray, cut: float, probing: Probing) -> Iterator[PairBatch]:
    """(ids a, ids b, rows done) of the pairs with score >= cut, in the space the index compares
    vectors in (decoded for compressed codes without a vector store), by matrix products of at most
    BLOCK_ROWS x BLOCK_ROWS (IVF: PROBE_ROWS x BLOCK_ROWS); `rows done` counts the rows whose
    comparisons are all done (for progress; they add up to len(ids)). A pair may come more than once
    (from both of its lists); never an image with itself.

    Flat index: every pair. IVF index: exactly the pairs in which either vector probes the other's
    list, as `probing` says (probe_table)."""
    ivf = faiss.try_extract_index_ivf(_faiss_index(searcher))
    if ivf is None:
        yield from _flat_pairs_above(searcher, ids, cut)
    else:
        yield from _ivf_pairs_above(searcher, ivf, cut, probing)


def _faiss_index(searcher: Searcher) -> faiss.Index:
    """The searcher's faiss index. Binary codes (build-index --codes) have no float vectors to compare."""
    index = searcher.index
    if not isinstance(index, faiss.Index):
        raise PipelineError(f"{searcher.version_dir} holds binary codes (build-index --codes): no candidate pairs")
    return index


def _flat_pairs_above(searcher: Searcher, ids: np.ndarray, cut: float) -> Iterator[PairBatch]:
    """The flat case of pairs_above: blocks of BLOCK_ROWS ids, each against itself and every later block."""
    blocks = [ids[s : s + BLOCK_ROWS] for s in range(0, len(ids), BLOCK_ROWS)]
    for p, block in enumerate(blocks):
        a = searcher.vectors(block)
        for m in range(p, len(blocks)):
            b = a if m == p else searcher.vectors(blocks[m])
            i, j = _above(a @ b.T, cut)
            i, j = (i, j) if m > p else (i[i < j], j[i < j])  # within a block, each pair once
            yield block[i], blocks[m][j], 0
        yield ids[:0], ids[:0], len(block)


def _ivf_pairs_above(searcher: Searcher, ivf: faiss.IndexIVF, cut: float, probing: Probing) -> Iterator[PairBatch]:
    """The IVF case of pairs_above: each vector probes the lists `probing` says, its nearest
    centroids asked of the quantizer as a search asks it; then each list is compared with every
    vector that probes it, in a few large products (not one small product per pair of lists: at 1M
    vectors and nprobe 32 call overhead made that run take over 45 minutes). Vectors are numbered by
    slot: their place in the lists, list after list. A pair is compared from both of its lists when
    each vector probes the other's: comparing it once saves only 3.4% of the products at 1M, about
    what planning it costs (docs/benchmarks.md)."""
    lists = ivf.invlists
    assert lists is not None, "an IVF index read from a file has its lists"
    sizes = np.array([lists.list_size(m) for m in range(ivf.nlist)], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    slot_ids = np.concatenate(
        [faiss.rev_swig_ptr(lists.get_ids(m), int(sizes[m])) for m in np.flatnonzero(sizes).tolist()]
        or [np.zeros(0, np.int64)]
    )
    list_vectors, slot_vectors, probe_vectors = _readers(searcher, ivf, sizes, starts, slot_ids)
    probers, probed = probe_table(ivf, probe_vectors, int(starts[-1]), probing)
    LOG.info("duplicates: %.1f lists probed per vector (%s)", len(probed) / max(1, int(starts[-1])), probing)
    for m, slots in probers_by_list(probers, probed, ivf.nlist):
        if not sizes[m]:
            continue
        b, b_ids = list_vectors(m), slot_ids[starts[m] : starts[m + 1]]
        for r in range(0, len(slots), PROBE_ROWS):
            a_ids, a = slot_ids[slots[r : r + PROBE_ROWS]], slot_vectors(slots[r : r + PROBE_ROWS])
            for c in range(0, len(b_ids), BLOCK_ROWS):
                i, j = _above(a @ b[c : c + BLOCK_ROWS].T, cut)
                i, j = a_ids[i], b_ids[c + j]
                yield i[i != j], j[i != j], 0
        yield slot_ids[:0], slot_ids[:0], int(sizes[m])


def _readers(
    searcher: Searcher, ivf: faiss.IndexIVF, sizes: np.ndarray, starts: np.ndarray, slot_ids: np.ndarray
) -> tuple[Callable[[int], np.ndarray], SlotVectors, SlotVectors]:
    """(vectors of list m, vectors of slots to compare, vectors of slots to ask the quantizer about):
    the features the index compares, from wherever they are cheapest to read."""
    if isinstance(searcher.index, faiss.IndexIVFFlat):  # the lists' codes are the features: views, no copy
        invlists = ivf.invlists
        assert invlists is not None, "an IVF index has inverted lists"

        def view(m: int) -> np.ndarray:
            codes = faiss.rev_swig_ptr(invlists.get_codes(m), int(sizes[m]) * ivf.code_size)
            return codes.view(np.float32).reshape(-1, ivf.d)

        views = [view(m) if sizes[m] else np.zeros((0, ivf.d), np.float32) for m in range(ivf.nlist)]

        def slot_views(slots: np.ndarray) -> np.ndarray:  # ascending slots: a few runs of each list
            source = np.searchsorted(starts, slots, side="right") - 1
            runs = np.flatnonzero(np.diff(source)) + 1
            return np.concatenate(
                [
                    views[m][run - starts[m]]
                    for m, run in zip(source[np.r_[0, runs]].tolist(), np.split(slots, runs), strict=True)
                ]
            )

        return views.__getitem__, slot_views, slot_views
    store = searcher.store
    if store is not None:  # compressed codes with a vector store: compare the stored features

        def stored(slots: np.ndarray) -> np.ndarray:
            return store.get(slot_ids[slots])

        def stored_in_ivf_space(slots: np.ndarray) -> np.ndarray:  # the centroids are after OPQ/RR, the store before
            return pre_transform(_faiss_index(searcher), stored(slots))

        return lambda m: store.get(slot_ids[starts[m] : starts[m + 1]]), stored, stored_in_ivf_space
    # decoded by the IVF itself: in its centroids' space, after any pre-transform (OPQ's rotation keeps cosines)
    direct_map = faiss.DirectMap  # type: ignore[attr-defined]  # missing from faiss's type stubs
    if ivf.direct_map.type == direct_map.NoMap:
        ivf.set_direct_map_type(direct_map.Hashtable)  # ids are sparse (the catalog's)

    def decoded(slots: np.ndarray) -> np.ndarray:
        return ivf.reconstruct_batch(slot_ids[slots])

    return lambda m: ivf.reconstruct_batch(slot_ids[starts[m] : starts[m + 1]]), decoded, decoded


def _above(scores: np.ndarray, cut: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the scores >= cut. Hits are rare: np.nonzero on the 2-D mask costs ~10x the
    matrix's compare (it walks it by index), the 1-D flatnonzero about 2x."""
    return np.divmod(np.flatnonzero(scores >= cut), scores.shape[1])


def pre_transform(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """x as the index's IVF sees it: through its pre-transform chain (OPQ, RR), if it has one; x itself
    otherwise. Stored features are in the input space, the IVF's centroids after the chain."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        chain = index.chain  # a SWIG vector: faiss's stubs call it a list
        for i in range(chain.size()):  # type: ignore[attr-defined]
            x = faiss.downcast_VectorTransform(chain.at(i)).apply(x)  # type: ignore[attr-defined]
    return x


def probe_table(
    ivf: faiss.IndexIVF, slot_vectors: SlotVectors, n: int, probing: Probing
) -> tuple[np.ndarray, np.ndarray]:
    """(slots, lists), both int32: every (slot, list it probes) for slots 0..n-1, slot after slot, each
    slot's lists nearest first. `slot_vectors(slots)` gives the slots' vectors in the IVF's space; their
    nearest centroids are asked of the IVF's own quantizer as a search asks it, PROBE_ROWS slots at a
    time, and kept as `probing` says. Not guessed among the centroids nearest to its own list's: that
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


def probers_by_list(slots: np.ndarray, lists: np.ndarray, nlist: int) -> Iterator[tuple[int, np.ndarray]]:
    """(list, the slots that probe it, ascending) for every list 0..nlist-1, in order: the probe_table
    (slots, lists) inverted, in passes over about PASS_PROBES of its entries each, so memory stays a
    fraction of the table's."""
    counts = np.bincount(lists, minlength=nlist)
    first = np.cumsum(counts) - counts  # the first entry of each list in the inverted table
    edges = np.concatenate([[0], np.flatnonzero(np.diff(first // PASS_PROBES)) + 1, [nlist]])
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        entries = np.flatnonzero((lists >= lo) & (lists < hi))
        entries = entries[np.argsort(lists[entries], kind="stable")]
        yield from zip(range(lo, hi), np.split(slots[entries], np.cumsum(counts[lo:hi])[:-1]), strict=True)

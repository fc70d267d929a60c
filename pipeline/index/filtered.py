"""Search within a selection of ids (a filter's), planned by the selection's size so that recall holds at any
selectivity and the cost stays near an unfiltered search's:

  * "exact" (small selections): every selected vector scored, from the selection's vectors gathered once
    (Gathered) or, over its budget, read block by block.
  * "codes" (up to a large share of the collection): the selection's 4-bit product-quantizer codes (faiss
    fast-scan, one code per two dimensions: 1/16 of float32), made once per selection with one codebook per
    searcher (Codebook), propose RERANK candidates, which are ranked exactly from the version's vectors (the
    IVF-Flat lists or the re-rank store). Probing the version's lists instead costs the lists whatever the
    selection, and needs many more of them as the selection thins.
  * "lists" (most of the collection): faiss probes the version's own lists with the selection's id selector
    (IDSelectorBitmap: unselected vectors skipped by id, before any distance), at an nprobe raised for the
    selection's share f (nprobe / f**ALPHA); compressed versions re-rank the candidates from their store.
  * Flat versions: faiss's exact search with the id selector.
The crossovers, RERANK and ALPHA are measured by scripts/benchmarks/bench_filters.py (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import faiss
import numpy as np

# Measured at 1M 1024-d by scripts/benchmarks/bench_filters.py (docs/benchmarks.md, "Filtered search"):
EXACT_BELOW = 10_000  # selected images up to which an uncompressed version ranks them all exactly
STORE_EXACT_BELOW = 20_000  # the same for compressed versions (their vectors read from the store)
PROBE_ABOVE = 0.5  # share of the collection from which the version's own lists are probed (uncompressed)
STORE_PROBE_ABOVE = 0.5  # the same for compressed versions
RERANK = 500  # candidates a selection's codes propose for exact ranking (recall@10 >= 0.99 at 10% and 30%)
ALPHA = 1.0  # probing "lists": nprobe grows as f ** -ALPHA for a selection of share f (recall@10 >= 0.96)
EXACT_BLOCK = 4096  # vectors scored at a time by exact ranking: its memory is bounded whatever the selection
GATHER_BYTES = 512 << 20  # selections' vectors and codes a Searcher keeps, over all its kept selections
TRAIN_SAMPLE = 30_000  # vectors the codebook is trained on (once per searcher, at the first selection needing it)
ENCODE_BLOCK = 16_384  # vectors read at a time while a selection is encoded

Route = Literal["exact", "codes", "lists"]


@dataclass
class Selection:
    """The ids a filter selected (sorted) out of `total`, with what searches derive from them, made once."""

    ids: np.ndarray
    total: int
    _bitmap: np.ndarray | None = field(default=None, repr=False)
    _selector: faiss.IDSelector | None = field(default=None, repr=False)
    _lists: np.ndarray | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def share(self) -> float:
        return len(self.ids) / max(self.total, 1)

    def selector(self) -> faiss.IDSelector:
        """An IDSelectorBitmap over the selected ids (it keeps the bitmap alive with it)."""
        with self._lock:
            if self._selector is None:
                top = int(self.ids[-1]) + 1 if len(self.ids) else 1
                bits = np.zeros(top, bool)
                bits[self.ids] = True
                self._bitmap = np.packbits(bits, bitorder="little")
                self._selector = faiss.IDSelectorBitmap(len(self._bitmap), faiss.swig_ptr(self._bitmap))  # n: bytes
            return self._selector

    def lists(self, list_map: ListMap) -> np.ndarray:
        """The IVF lists holding at least one selected vector."""
        with self._lock:
            if self._lists is None:
                self._lists = np.unique(list_map.list_of(self.ids))
            return self._lists


class ListMap:
    """Which IVF list holds each id, read once from the index's inverted lists (12 bytes an image)."""

    def __init__(self, ivf: faiss.IndexIVF) -> None:
        invlists = ivf.invlists
        assert invlists is not None, "an IVF index has inverted lists"
        ids, lists = [], []
        for list_no in range(ivf.nlist):
            n = invlists.list_size(list_no)
            if n:
                ids.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), n).copy())
                lists.append(np.full(n, list_no, np.int32))
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        order = np.argsort(all_ids)
        self.ids, self.lists = all_ids[order], (np.concatenate(lists) if lists else np.zeros(0, np.int32))[order]

    def list_of(self, ids: np.ndarray) -> np.ndarray:
        return self.lists[np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))]


class Centroids:
    """An IVF index's centroids, read from its quantizer once: the coarse scores of the lists a filtered search
    may probe."""

    def __init__(self, ivf: faiss.IndexIVF) -> None:
        self.matrix = ivf.quantizer.reconstruct_n(0, ivf.nlist)

    def scores(self, queries: np.ndarray, lists: np.ndarray) -> np.ndarray:
        """Inner products of the queries with the centroids of `lists` (all scored: no copy of the matrix)."""
        return (queries @ self.matrix.T)[:, lists]


def route(selection: Selection, compressed: bool) -> Route:
    """How a selection is ranked (the module's docstring says why): "exact" when small, "lists" when it is
    most of the collection, "codes" between."""
    if len(selection.ids) <= _exact_at_most(compressed):
        return "exact"
    return "lists" if selection.share >= (STORE_PROBE_ABOVE if compressed else PROBE_ABOVE) else "codes"


def codes_possible(count: int, compressed: bool) -> bool:
    """Whether a version of `count` images may rank a selection by its codes (a larger one than is ranked
    exactly)."""
    return count > _exact_at_most(compressed)


def _exact_at_most(compressed: bool) -> int:
    """The largest selection ranked exactly (read at call time: the benchmark sets the constants)."""
    return STORE_EXACT_BELOW if compressed else EXACT_BELOW


def filtered_nprobe(nprobe: int, selection: Selection, holding: int) -> int:
    """Lists to probe for a selection: nprobe raised for its share, at most the lists holding one of it."""
    return min(holding, max(nprobe, math.ceil(nprobe * selection.share**-ALPHA)))


def ivf_search(
    ivf: faiss.IndexIVF,
    centroids: Centroids,
    list_map: ListMap,
    queries: np.ndarray,
    k: int,
    probe: int,
    selection: Selection,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k among the selected vectors of an IVF index: the nearest `probe` lists of those holding one (all of
    them when fewer; filtered_nprobe says how many), searched with the selection's id selector (faiss
    search_preassigned)."""
    lists = selection.lists(list_map)
    probe = max(1, min(probe, len(lists)))
    scores = centroids.scores(queries, lists)
    if probe < len(lists):
        top = np.argpartition(-scores, probe - 1, axis=1)[:, :probe]
    else:
        top = np.broadcast_to(np.arange(len(lists)), (len(queries), len(lists)))
    assign = lists[top]
    coarse = np.take_along_axis(scores, top, axis=1)
    return search_preassigned(ivf, queries, k, coarse, assign, selection.selector())


def search_preassigned(
    ivf: faiss.IndexIVF,
    queries: np.ndarray,
    k: int,
    coarse: np.ndarray,
    assign: np.ndarray,
    selector: faiss.IDSelector | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of an IVF index in the lists `assign` names for each query (their coarse scores `coarse`, as the
    quantizer's search gives them), skipping ids the selector refuses: the probes chosen once, searched in one
    index or in several sharing a quantizer (a version and its live part)."""
    assign = np.ascontiguousarray(assign, np.int64)
    coarse = np.ascontiguousarray(coarse, np.float32)
    params = faiss.SearchParametersIVF()
    params.nprobe = assign.shape[1]
    if selector is not None:
        params.sel = selector
    n = len(queries)
    distances, labels = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    x = np.ascontiguousarray(queries, np.float32)
    # search_preassigned's Python wrapper refuses params (faiss 1.15): the C call takes them, selector included
    ivf.search_preassigned_c(  # type: ignore[attr-defined]  # faiss stub: no search_preassigned_c
        n,
        faiss.swig_ptr(x),
        k,
        faiss.swig_ptr(assign),
        faiss.swig_ptr(coarse),
        faiss.swig_ptr(distances),
        faiss.swig_ptr(labels),
        False,
        params,
        None,
    )
    return distances, labels


class Codebook:
    """A 4-bit product quantizer for a version's vectors (faiss fast-scan, one code per two dimensions),
    trained once, at the first selection that needs it, on a fixed sample of them: every large selection of
    the version is encoded with it. Thread-safe."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.code_bytes = (self.subquantizers + 1) // 2  # per vector
        self._trained: faiss.IndexPQFastScan | None = None
        self._lock = threading.Lock()

    @property
    def subquantizers(self) -> int:
        return self.dim // 2 if self.dim % 2 == 0 else self.dim

    @property
    def trained(self) -> bool:
        return self._trained is not None

    def train(self, ids: Callable[[], np.ndarray], vectors_of: Callable[[np.ndarray], np.ndarray]) -> faiss.Index:
        """The trained, empty index of codes: trained now, if not yet, on a sample of the version's `ids()`."""
        with self._lock:
            if self._trained is None:
                rng = np.random.default_rng(0)
                every = ids()
                sample = np.sort(rng.choice(every, min(len(every), TRAIN_SAMPLE), replace=False))
                index = faiss.IndexPQFastScan(self.dim, self.subquantizers, 4, faiss.METRIC_INNER_PRODUCT)
                index.train(np.ascontiguousarray(vectors_of(sample), np.float32))
                self._trained = index
            return self._trained

    def encode(
        self,
        selection: Selection,
        version_ids: Callable[[], np.ndarray],
        vectors_of: Callable[[np.ndarray], np.ndarray],
    ) -> faiss.Index:
        """The selection's codes, labelled by position in its ids; its vectors read ENCODE_BLOCK at a time."""
        codes = faiss.clone_index(self.train(version_ids, vectors_of))
        for start in range(0, len(selection.ids), ENCODE_BLOCK):
            codes.add(np.ascontiguousarray(vectors_of(selection.ids[start : start + ENCODE_BLOCK]), np.float32))
        return codes


class Gathered:
    """What ranking a selection reads, made once per selection and kept for its next searches: the vectors of a
    small one in one float32 matrix (one pass, not list by list nor row by row from a store), the codes of a
    larger one (Codebook); at most GATHER_BYTES over all selections, the least recently used dropped first.
    Thread-safe."""

    def __init__(self, budget: int = GATHER_BYTES) -> None:
        self.budget, self.used = budget, 0
        self._kept: OrderedDict[tuple[int, str], tuple[Selection, np.ndarray | faiss.Index, int]] = OrderedDict()
        self._lock = threading.Lock()

    def _kept_or_made(
        self, selection: Selection, kind: str, nbytes: int, make: Callable[[], np.ndarray | faiss.Index]
    ) -> np.ndarray | faiss.Index | None:
        if nbytes > self.budget:
            return None
        key = (id(selection), kind)  # (the selection is kept with it: its id is not reused meanwhile)
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept[0] is selection:
                self._kept.move_to_end(key)
                return kept[1]
        made = make()
        with self._lock:
            if key in self._kept:
                self.used -= self._kept.pop(key)[2]
            self._kept[key] = (selection, made, nbytes)
            self.used += nbytes
            while self.used > self.budget:
                self.used -= self._kept.popitem(last=False)[1][2]
        return made

    def matrix(
        self, selection: Selection, vectors_of: Callable[[np.ndarray], np.ndarray], dim: int
    ) -> np.ndarray | None:
        """The selection's vectors (rows in the order of its ids), gathered now or before; None when they alone
        would take over the budget."""
        made = self._kept_or_made(
            selection,
            "matrix",
            len(selection.ids) * dim * 4,
            lambda: np.ascontiguousarray(vectors_of(selection.ids), np.float32),
        )
        assert made is None or isinstance(made, np.ndarray)
        return made

    def codes(
        self,
        selection: Selection,
        codebook: Codebook,
        version_ids: Callable[[], np.ndarray],
        vectors_of: Callable[[np.ndarray], np.ndarray],
    ) -> faiss.Index | None:
        """The selection's codes (Codebook.encode), made now or before; None when they alone would take over
        the budget."""
        made = self._kept_or_made(
            selection,
            "codes",
            len(selection.ids) * codebook.code_bytes,
            lambda: codebook.encode(selection, version_ids, vectors_of),
        )
        assert not isinstance(made, np.ndarray)
        return made


def codes_search(
    codes: faiss.Index,
    ids: np.ndarray,
    queries: np.ndarray,
    k: int,
    vectors_of: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k among `ids` (labelled by position in `codes`): the RERANK best by their codes, ranked exactly from
    their vectors (read by id)."""
    _, positions = codes.search(np.ascontiguousarray(queries, np.float32), min(RERANK, len(ids)))
    scores = np.full((len(queries), k), -np.inf, np.float32)
    labels = np.full((len(queries), k), -1, np.int64)
    for row, (query, pos) in enumerate(zip(queries, positions, strict=True)):
        candidates = ids[pos[pos >= 0]]
        best_scores, best_ids = ranked(vectors_of(candidates), candidates, query[None], k)
        scores[row], labels[row] = best_scores[0], best_ids[0]
    return scores, labels


def ranked(matrix: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by exact inner product of the queries with the rows of `matrix` (the vectors of `ids`, in order),
    padded as faiss pads (-inf, -1) where fewer."""
    scores = queries @ matrix.T
    take = min(k, scores.shape[1])
    if take < scores.shape[1]:
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
    else:
        top = np.broadcast_to(np.arange(scores.shape[1]), (len(queries), scores.shape[1]))
    top_scores = np.take_along_axis(scores, top, 1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    best = np.take_along_axis(top, order, 1)
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    out_s[:, :take] = np.take_along_axis(top_scores, order, 1)
    out_i[:, :take] = ids[best]
    return out_s, out_i


def exact_search(
    vectors_of: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by exact inner product among `ids`, their vectors read EXACT_BLOCK at a time."""
    n = len(queries)
    best_s = np.full((n, 0), -np.inf, np.float32)
    best_i = np.full((n, 0), -1, np.int64)
    for start in range(0, len(ids), EXACT_BLOCK):
        block = ids[start : start + EXACT_BLOCK]
        s = queries @ vectors_of(block).T
        best_s = np.concatenate([best_s, s.astype(np.float32)], axis=1)
        best_i = np.concatenate([best_i, np.broadcast_to(block, s.shape)], axis=1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    scores, labels = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    if scores.shape[1] < k:  # fewer selected than k: pad as faiss does
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        labels = np.pad(labels, ((0, 0), (0, pad)), constant_values=-1)
    return scores, labels

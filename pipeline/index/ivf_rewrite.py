"""An IVF index's next version written straight from the published, memory-mapped file (rewrite_ivf).

The riskiest code of the index, isolated here behind rewrite_ivf and its check (streamable); the file
it writes is faiss's own format.

faiss would read the whole file into memory (2 GB at 1M IVF-Flat: seconds of page faults and copying),
remove and add there, and write it all out again. Here the published file is only memory-mapped and
each list of the new file is its kept entries, copied from the map, followed by the added ones, so every
byte is copied once. The header is faiss's serialisation of the same index with empty lists (quantizer,
parameters, the new ntotal); the lists follow as faiss writes ArrayInvertedLists (tests/test_update.py
checks the bytes against faiss.serialize_index), and faiss reads the file back before it is tuned and
published. If a faiss serialises lists otherwise, rewrite_ivf says so and the caller lets faiss edit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np

from .plan import stored_ids

LOG = logging.getLogger(__name__)


def streamable(index: faiss.Index) -> bool:
    """An IVF index, unwrapped, whose lists are faiss ArrayInvertedLists (Flat, SQ or PQ codes; not
    fast-scan blocks) and which keeps no direct map: what rewrite_ivf can write from a memory map."""
    top = faiss.downcast_index(index)
    return (
        isinstance(top, faiss.IndexIVF)
        and top.direct_map.type == faiss.DirectMap.NoMap  # type: ignore[attr-defined]  # faiss stub: no DirectMap
        and top.invlists is not None
        and isinstance(faiss.downcast_InvertedLists(top.invlists), faiss.ArrayInvertedLists)
    )


def rewrite_ivf(index: faiss.Index, path: Path, removed: np.ndarray, added: list[tuple]) -> IvfRewrite | None:
    """The next version of `index` (streamable, memory-mapped from the published file `path`): without the
    ids `removed`, with the `added` blocks (features, ids, ...), ready to be written. None, with a warning,
    when this faiss serialises IVF lists otherwise than this module writes them: then let faiss edit
    the index, read into memory (the slower way, still right)."""
    assert streamable(index), "rewrite_ivf needs an IVF index with plain lists and no direct map"
    try:
        return IvfRewrite(index, path, removed, added)
    except _FormatChanged as exc:
        LOG.warning("%s; the update reads the published index into memory instead", exc)
        return None


class _FormatChanged(Exception):
    """This faiss serialises IVF lists otherwise than IvfRewrite writes them."""


class IvfRewrite:
    """The next version of a streamable IVF index (made by rewrite_ivf): write(path) writes it."""

    def __init__(self, index: faiss.Index, path: Path, removed: np.ndarray, added: list[tuple]) -> None:
        self.index = index  # owns what the downcast views below point into
        ivf = faiss.downcast_index(index)
        assert isinstance(ivf, faiss.IndexIVF) and ivf.invlists is not None, "rewrite_ivf checked it streamable"
        self.ivf = ivf
        self.old = faiss.downcast_InvertedLists(ivf.invlists)
        nlist, self.code_size = self.ivf.nlist, self.ivf.code_size
        self.old_sizes = np.array([self.old.list_size(i) for i in range(nlist)], np.int64)
        old_ids = stored_ids(index)  # in list order
        self.keep = ~np.isin(old_ids, removed)
        # The added vectors are encoded and assigned by a copy of the index with empty lists.
        new = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)  # owned here; read_index gives the concrete class
        assert isinstance(new, faiss.IndexIVF), "the published file holds the index rewrite_ivf checked streamable"
        self.new = new
        empty = faiss.ArrayInvertedLists(nlist, self.code_size)
        self.new.replace_invlists(empty, True)
        empty.this.disown()  # type: ignore[attr-defined]  # faiss stub: SWIG's `this` (the index owns it now)
        n_added = sum(len(a[1]) for a in added)
        self.new.ntotal = int(self.keep.sum()) + n_added
        serialised = faiss.serialize_index(self.new).tobytes()
        lists = b"ilar" + np.array([nlist, self.code_size], np.uint64).tobytes()
        empty_lists = lists + b"sprs" + np.zeros(1, np.uint64).tobytes()  # how faiss writes no entries
        if not serialised.endswith(empty_lists):
            raise _FormatChanged(f"faiss {faiss.__version__} writes an IVF index's lists otherwise")
        self.new.ntotal = 0
        for feats, new_ids, *_ in added:
            self.new.add_with_ids(feats, new_ids)
        assert self.new.invlists is not None, "an IVF index has inverted lists"
        self.added = faiss.downcast_InvertedLists(self.new.invlists)
        self.new_sizes = np.array([self.added.list_size(i) for i in range(nlist)], np.int64)
        kept = np.concatenate([[0], np.cumsum(self.keep)])
        self.starts = np.concatenate([[0], np.cumsum(self.old_sizes)])
        self.sizes = kept[self.starts[1:]] - kept[self.starts[:-1]] + self.new_sizes
        self.head = (
            serialised[: -len(empty_lists)]
            + lists
            + b"full"
            + np.array([nlist], np.uint64).tobytes()
            + self.sizes.astype(np.uint64).tobytes()
        )
        # Each stored id's list, for recall read from list membership (probed_truth).
        self.list_ids = np.concatenate([old_ids[self.keep], stored_ids(self.new)])
        self.list_of = np.concatenate(
            [np.repeat(np.arange(nlist), self.old_sizes)[self.keep], np.repeat(np.arange(nlist), self.new_sizes)]
        )

    def write(self, path: Path) -> None:
        """Write the new index file and fsync it."""
        cs = self.code_size
        with open(path, "wb") as fh:
            fh.write(self.head)
            for i in np.flatnonzero(self.sizes):
                n, m = int(self.old_sizes[i]), int(self.new_sizes[i])
                keep = self.keep[self.starts[i] : self.starts[i + 1]]
                if n:
                    codes = faiss.rev_swig_ptr(self.old.get_codes(int(i)), n * cs).reshape(n, cs)
                    ids = faiss.rev_swig_ptr(self.old.get_ids(int(i)), n)
                    fh.write((codes[keep] if not keep.all() else codes).data)  # .data: the array's buffer, not copied
                if m:
                    fh.write(faiss.rev_swig_ptr(self.added.get_codes(int(i)), m * cs).data)
                if n:
                    fh.write((ids[keep] if not keep.all() else ids).data)
                if m:
                    fh.write(faiss.rev_swig_ptr(self.added.get_ids(int(i)), m).data)
            fh.flush()
            os.fsync(fh.fileno())

    def exact_probes(self) -> bool:
        """IVF-Flat with an exact (flat) quantizer: a search at nprobe p finds exactly the true
        neighbours in the query's p nearest lists, so recall can be read from list membership."""
        return isinstance(self.ivf, faiss.IndexIVFFlat) and isinstance(
            faiss.downcast_index(self.ivf.quantizer), faiss.IndexFlat
        )

    def probed_truth(self, queries: np.ndarray, truth: np.ndarray) -> _ProbedTruth:
        """What an IVF-Flat search of the new index finds of each query's true neighbours at any nprobe,
        searchable like an index (for tune_nprobe) without scanning a list."""
        order = np.argsort(self.list_ids)
        pos = np.minimum(np.searchsorted(self.list_ids, truth, sorter=order), len(order) - 1)
        lists = np.where(self.list_ids[order[pos]] == truth, self.list_of[order[pos]], -1)
        return _ProbedTruth(self.ivf.quantizer, self.ivf.nlist, queries, truth, lists)


class _ProbedTruth:
    """What an IVF-Flat search of `queries` finds of their true neighbours at any nprobe, from which
    list holds each neighbour and the order in which each query probes the lists: searches like a
    faiss index (search(x, k, params)), for tune_nprobe, without scanning a list. The neighbours a
    search finds beyond the true ones do not count in recall_at, so they are left out (-1)."""

    def __init__(
        self, quantizer: faiss.Index, nlist: int, queries: np.ndarray, truth: np.ndarray, lists: np.ndarray
    ) -> None:
        _, probes = quantizer.search(queries, nlist)
        rank = np.empty_like(probes)
        np.put_along_axis(rank, probes, np.arange(nlist)[None, :], axis=1)
        self.truth = truth
        self.rank = np.where(lists >= 0, np.take_along_axis(rank, np.maximum(lists, 0), axis=1), nlist)

    def search(self, x: np.ndarray, k: int, params: faiss.SearchParameters | None = None) -> tuple[None, np.ndarray]:
        assert isinstance(params, faiss.SearchParametersIVF), "tune_nprobe searches at an nprobe"
        return None, np.where(self.rank[:, :k] < params.nprobe, self.truth[:, :k], -1)

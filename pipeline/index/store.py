"""The re-rank store: every indexed feature of an index version, float16 on disk, read memory-mapped.

A compressed index (PQ, SQ codes) ranks by approximate scores; the coarse-to-fine search asks it
for a few hundred candidates and ranks those again by the exact inner product of their full
features, read from here. The store lives on disk and is memory-mapped, so it costs no RAM of its
own: only the pages of the candidates read come in (as page cache, shared and reclaimable).

Files, in an index version folder:
  vectors.npy     float16 [n, dim]  the features, rows in ascending id order
  vector_ids.npy  int64 [n]         the ids of those rows, sorted ascending

API:
  write_store(version_dir, parts, n, dim)   parts: iterable of (ids, float32 features) blocks
  StoreWriter(version_dir, n, dim)          the same, block by block: .add(ids, feats), .close()
  update_store(old_dir, new_dir, removed, added_ids, added)   a new version's store from an old one's
  VectorStore.open(version_dir)             .get(ids) -> float32 [len(ids), dim]
                                            .rerank(queries, candidate_ids, k) -> (scores, ids)
  has_store(version_dir)
  Reranked(index, store, candidates)        a faiss-like .search(x, k, params) over both stages

Writing streams: blocks are appended to a temporary file as float16 (never all of N in float32 RAM)
that is renamed into place when complete; blocks that arrive out of id order are put in order at
close, a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import PipelineError, cause
from ..fsutil import publish, temp_path

if TYPE_CHECKING:
    import faiss

VECTORS_FILE, VECTOR_IDS_FILE = "vectors.npy", "vector_ids.npy"
_CHUNK = 65_536  # rows per step when reordering a store


def has_store(version_dir: Path | str) -> bool:
    return (Path(version_dir) / VECTORS_FILE).is_file()


class StoreWriter:
    """Write a store of `n` vectors of `dim` block by block; `close()` publishes it (both files or none).

    Rows are appended with plain writes, not through a memory map, so the pages written never count
    in the writer's resident memory."""

    def __init__(self, version_dir: Path | str, n: int, dim: int) -> None:
        self.dir, self.n, self.dim = Path(version_dir), n, dim
        self._tmp = temp_path(self.dir / VECTORS_FILE)
        self._fh = open(self._tmp, "wb")
        np.lib.format.write_array_header_1_0(
            self._fh,
            {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": (n, dim)},
        )
        self._ids = np.empty(n, np.int64)
        self._at = 0

    def add(self, ids: np.ndarray, feats: np.ndarray) -> None:
        assert len(ids) == len(feats) and self._at + len(ids) <= self.n, "more rows than the store was made for"
        assert feats.shape[1:] == (self.dim,), f"features of shape {feats.shape}, the store holds {self.dim}-d"
        self._fh.write(np.ascontiguousarray(feats, np.float16).tobytes())
        self._ids[self._at : self._at + len(ids)] = ids
        self._at += len(ids)

    def close(self) -> None:
        """Put the rows in id order if they came otherwise, then rename both files into place."""
        assert self._at == self.n, f"store holds {self._at} rows, expected {self.n}"
        self._fh.close()
        if self.n and (np.diff(self._ids) <= 0).any():
            order = np.argsort(self._ids, kind="stable")
            if (np.diff(self._ids[order]) == 0).any():
                raise PipelineError("the same id was given twice to the vector store")
            unsorted, self._tmp = self._tmp, temp_path(self.dir / VECTORS_FILE)
            rows = np.load(unsorted, mmap_mode="r")
            with open(self._tmp, "wb") as fh:
                np.lib.format.write_array_header_1_0(fh, np.lib.format.header_data_from_array_1_0(rows))
                for start in range(0, self.n, _CHUNK):
                    fh.write(rows[order[start : start + _CHUNK]].tobytes())
            del rows
            unsorted.unlink()
            self._ids = self._ids[order]
        ids_tmp = temp_path(self.dir / VECTOR_IDS_FILE)
        with open(ids_tmp, "wb") as fh:
            np.save(fh, self._ids)
        publish(self._tmp, self.dir / VECTORS_FILE)
        publish(ids_tmp, self.dir / VECTOR_IDS_FILE)

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


def write_store(version_dir: Path | str, parts: Iterable[tuple[np.ndarray, np.ndarray]], n: int, dim: int) -> None:
    """Write the store of `n` vectors from (ids, features) blocks, streaming."""
    writer = StoreWriter(version_dir, n, dim)
    try:
        for ids, feats in parts:
            writer.add(ids, feats)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def update_store(
    old_dir: Path | str, new_dir: Path | str, removed: np.ndarray, added_ids: np.ndarray, added: np.ndarray
) -> None:
    """Write new_dir's store: old_dir's rows (only read) without the `removed` ids, plus the `added`
    features of `added_ids`, in ascending id order. Rows stream a chunk at a time from the old
    memory-mapped file, so they are copied, never converted back from float32, and in order (no sort
    at close); an index update changes a few percent of them."""
    old = VectorStore.open(old_dir)
    kept = np.flatnonzero(~np.isin(old.ids, removed))
    ids = np.concatenate([old.ids[kept], added_ids])
    order = np.argsort(ids, kind="stable")
    writer = StoreWriter(new_dir, len(ids), old.vectors.shape[1])
    try:
        for start in range(0, len(order), _CHUNK):
            src = order[start : start + _CHUNK]
            from_old = src < len(kept)
            rows = np.empty((len(src), old.vectors.shape[1]), np.float16)
            rows[from_old] = old.vectors[kept[src[from_old]]]
            rows[~from_old] = added[src[~from_old] - len(kept)]
            writer.add(ids[src], rows)
        writer.close()
    except BaseException:
        writer.abort()
        raise


class VectorStore:
    """A store opened memory-mapped: full features by id, and exact re-ranking of candidates."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.vectors, self.ids = vectors, ids

    @classmethod
    def open(cls, version_dir: Path | str) -> VectorStore:
        version_dir = Path(version_dir)
        try:
            vectors = np.load(version_dir / VECTORS_FILE, mmap_mode="r")
            ids = np.load(version_dir / VECTOR_IDS_FILE, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise PipelineError(
                f"the vector store in {version_dir} is missing or corrupt ({cause(exc)}); "
                "rebuild the index with `pipeline build-index`"
            ) from None
        if vectors.ndim != 2 or ids.shape != (len(vectors),):
            raise PipelineError(
                f"the vector store in {version_dir} is corrupt: {vectors.shape} vectors "
                f"for {ids.shape} ids; rebuild the index with `pipeline build-index`"
            )
        return cls(vectors, ids)

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """The features of `ids` as float32, in the order given; an id not stored is a PipelineError."""
        ids = np.asarray(ids, np.int64).ravel()
        pos = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        if len(ids) and (not len(self.ids) or (self.ids[pos] != ids).any()):
            missing = ids[~np.isin(ids, self.ids)]
            raise PipelineError(f"{len(missing)} ids are not in the vector store (first: {missing[0]})")
        return self.vectors[pos].astype(np.float32)

    def rerank(self, queries: np.ndarray, candidate_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query among its candidates (-1 = none) by exact inner product with the
        stored features: scores (nq, k) float32 best first, ids (nq, k) int64; rows with fewer
        than k candidates end with -inf / -1, as faiss pads. Ties go to the smaller id."""
        nq = len(queries)
        scores = np.full((nq, k), -np.inf, np.float32)
        out = np.full((nq, k), -1, np.int64)
        for j in range(nq):
            cand = np.unique(candidate_ids[j][candidate_ids[j] >= 0])  # sorted: ties resolve by id
            if not len(cand):
                continue
            s = self.get(cand) @ np.asarray(queries[j], np.float32)
            top = np.argsort(-s, kind="stable")[:k]
            scores[j, : len(top)], out[j, : len(top)] = s[top], cand[top]
        return scores, out


class Reranked:
    """Coarse to fine: `index` (compressed) proposes `candidates` per query, `store` ranks them
    exactly. Searches like a faiss index (`search(x, k, params=...)`), so tuning and Searcher
    measure and use the whole path."""

    def __init__(self, index: faiss.Index, store: VectorStore, candidates: int) -> None:
        self.index, self.store, self.candidates = index, store, candidates

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, x: np.ndarray, k: int, params: faiss.SearchParameters | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        _, cand = self.index.search(x, max(k, self.candidates), params=params)
        return self.store.rerank(x, cand, k)

"""The full features of an index version, memory-mapped, for exact re-ranking of compressed-index candidates.

  vectors.npy      float16 (n, dim), one row per image in ascending id order
  vector_ids.npy   int64 (n,), those ids, sorted
float16 halves the disk and page-cache cost of float32 and keeps cosines to about 1e-3, far below
the gaps between neighbours that re-ranking must order. Only the candidates' rows are paged in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import PipelineError

VECTORS_FILE, VECTOR_IDS_FILE = "vectors.npy", "vector_ids.npy"


class VectorStore:
    """Read side: rows by id (ids are sparse catalog ids: found by binary search in the sorted ids)."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        assert len(vectors) == len(ids), "one vector per id"
        self.vectors, self.ids = vectors, ids

    @classmethod
    def open(cls, version_dir: Path | str) -> VectorStore:
        version_dir = Path(version_dir)
        try:
            return cls(np.load(version_dir / VECTORS_FILE, mmap_mode="r"), np.load(version_dir / VECTOR_IDS_FILE))
        except (OSError, ValueError) as exc:
            raise PipelineError(f"the vector store of {version_dir} is missing or corrupt ({exc}); rebuild the index "
                                "with `pipeline build-index`") from None

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (every id must be stored)."""
        pos = np.searchsorted(self.ids, ids)
        if (pos >= len(self.ids)).any() or (self.ids[np.minimum(pos, len(self.ids) - 1)] != ids).any():
            raise PipelineError("an id asked of the vector store is not in it")
        return pos

    def get(self, ids) -> np.ndarray:
        """float32 vectors of `ids`, in the order given."""
        ids = np.asarray(ids, np.int64)
        return np.asarray(self.vectors[self.positions(ids)], np.float32)

    def rerank(self, queries: np.ndarray, candidate_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of each query with its candidates (-1: none), the best k first: (scores, ids),
        padded with -inf / -1 when a query has fewer than k candidates."""
        nq, c = candidate_ids.shape
        scores = np.full((nq, c), -np.inf, np.float32)
        valid = candidate_ids >= 0
        pos = np.zeros(candidate_ids.shape, np.int64)
        pos[valid] = self.positions(candidate_ids[valid])
        for start in range(0, nq, 64):  # bounded memory: 64 x c x dim gathered at a time
            sl = slice(start, start + 64)
            rows = np.asarray(self.vectors[pos[sl].ravel()], np.float32).reshape(-1, c, self.vectors.shape[1])
            scores[sl] = np.where(valid[sl], np.einsum("qcd,qd->qc", rows, queries[sl]), -np.inf)
        k = min(k, c)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, order, axis=1)
        return top, np.where(np.isfinite(top), np.take_along_axis(candidate_ids, order, axis=1), -1)


class StoreWriter:
    """Write side, streamed: rows arrive in any order with their ids and land at their sorted position."""

    def __init__(self, version_dir: Path, ids: np.ndarray, dim: int) -> None:
        self.ids = np.sort(ids)
        np.save(version_dir / VECTOR_IDS_FILE, self.ids)
        self.vectors = np.lib.format.open_memmap(version_dir / VECTORS_FILE, mode="w+", dtype=np.float16,
                                                 shape=(len(ids), dim))

    def add(self, feats: np.ndarray, ids: np.ndarray) -> None:
        self.vectors[np.searchsorted(self.ids, ids)] = feats

    def close(self) -> VectorStore:
        """Flush and reopen read-only."""
        self.vectors.flush()
        return VectorStore(np.load(self.vectors.filename, mmap_mode="r"), self.ids)

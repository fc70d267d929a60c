"""The re-rank store: float16 round trip in id order, exact re-ranking of candidates."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import clustered_vectors
from pipeline.errors import PipelineError
from pipeline.index import VECTOR_IDS_FILE, VECTORS_FILE, VectorStore, has_store, write_store


def test_round_trip_in_id_order(tmp_path):
    vecs = clustered_vectors(1000, dim=64)
    ids = np.random.default_rng(1).permutation(5000)[:1000].astype(np.int64)  # sparse, out of order
    write_store(tmp_path, ((ids[s : s + 300], vecs[s : s + 300]) for s in range(0, 1000, 300)), 1000, 64)
    assert has_store(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == [VECTOR_IDS_FILE, VECTORS_FILE]
    store = VectorStore.open(tmp_path)
    assert len(store) == 1000 and (np.diff(store.ids) > 0).all() and store.vectors.dtype == np.float16
    assert isinstance(store.vectors, np.memmap)
    want = ids[[7, 3, 999, 3]]
    got = store.get(want)
    assert got.dtype == np.float32 and np.allclose(got, vecs[[7, 3, 999, 3]], atol=1e-3)
    with pytest.raises(PipelineError, match="not in the vector store"):
        store.get([5001])


def test_rerank_is_exact_over_candidates(tmp_path):
    vecs = clustered_vectors(2000, dim=64)
    ids = np.arange(2000, dtype=np.int64) * 3
    write_store(tmp_path, [(ids, vecs)], 2000, 64)
    store = VectorStore.open(tmp_path)
    queries = clustered_vectors(20, dim=64, seed=5)
    rng = np.random.default_rng(2)
    cand = np.stack([rng.choice(ids, 150, replace=False) for _ in queries])
    cand[0, 100:] = -1  # padding as faiss returns it
    scores, found = store.rerank(queries, cand, 10)
    stored = vecs.astype(np.float16).astype(np.float32)
    for q, c, s, f in zip(queries, cand, scores, found, strict=True):
        c = c[c >= 0]
        exact = stored[c // 3] @ q
        assert set(f) == set(c[np.argsort(-exact)[:10]])
        assert np.allclose(s, np.sort(exact)[::-1][:10], atol=1e-5)
    few, pad = store.rerank(queries[:1], np.array([[3, -1, 6]]), 5)
    assert list(pad[0]) == sorted([3, 6], key=lambda i: -float(stored[i // 3] @ queries[0])) + [-1] * 3
    assert np.isinf(few[0, 2:]).all()


def test_missing_or_corrupt_store_is_one_error(tmp_path):
    with pytest.raises(PipelineError, match="missing or corrupt"):
        VectorStore.open(tmp_path)
    write_store(tmp_path, [(np.arange(4), np.ones((4, 8), np.float32))], 4, 8)
    (tmp_path / VECTOR_IDS_FILE).write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="missing or corrupt"):
        VectorStore.open(tmp_path)

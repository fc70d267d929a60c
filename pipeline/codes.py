"""Coarse-to-fine search with learned binary codes (Lin et al., CVPR-W 2015, "Deep Learning of Binary
Hash Codes for Fast Image Retrieval"): compact codes find a candidate pool by Hamming distance, then
the full features (the version's vector store, memory-mapped) re-rank that pool by exact cosine.

The codes are learned without labels from the collection's own features: centre, project on the
top BITS principal components, then rotate them by ITQ (Gong & Lazebnik, "Iterative Quantization",
CVPR 2011) so that their signs lose as little as possible; bit j is the sign of rotated component j.
faiss.ITQTransform does the same but took 3x longer here (16 s against 5 s for 256 bits from 5,120
vectors, one thread) and cannot leave the rotation out, which the tests compare against.

Files of a binary version, beside ids.sqlite, meta.json and recall.npz:
  codes.faiss                  faiss binary index over the codes; its positions are the store's rows
  itq.npz                      the learned centre and projection (PCA then rotation), dim x BITS
  vectors.npy, vector_ids.npy  the vector store (vectorstore.py)
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from . import __version__
from .errors import PipelineError, write_error
from .index import (IDS_FILE, META_FILE, META_SCHEMA, MIN_POINTS_PER_LIST, NPROBE_GRID, RECALL_FILE, TRUTH_DEPTH,
                    IndexReport, _fill, _made_from, _new_version, _publish, _rows_by_id, lower_bound, recall_at)
from .shards import ShardInfo
from .vectorstore import StoreWriter, VectorStore

LOG = logging.getLogger(__name__)

CODES_FILE, ITQ_FILE = "codes.faiss", "itq.npz"
DEFAULT_BITS = 256
ITQ_TRAIN = 10_000  # vectors to learn PCA + rotation from (20 per dimension): 256 bits take seconds
ITQ_ITERATIONS = 50  # as in the ITQ paper; the quantisation loss flattens well before
FLAT_CODES_BELOW = 2_000_000  # an exhaustive Hamming scan stays within a few ms per query below this (docs/benchmarks.md)
POOL_GRID = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)  # candidates re-ranked (flat codes: the tuned setting); capped
DEFAULT_POOL = 100  # candidates re-ranked when the tuned setting is nprobe or efSearch
EF_GRID = (100, 128, 192, 256, 384, 512, 768, 1024)


def parse_codes(text: str, dim: int) -> int:
    """'binary' or 'binary:BITS' -> BITS (a multiple of 8 up to the feature dimension)."""
    kind, _, bits = text.partition(":")
    if kind != "binary":
        raise PipelineError(f"--codes {text!r}: the only kind is binary[:BITS], e.g. binary:{DEFAULT_BITS}")
    try:
        b = int(bits) if bits else DEFAULT_BITS
    except ValueError:
        b = -1
    if b < 8 or b % 8 or b > dim:
        raise PipelineError(f"--codes {text!r}: BITS must be a multiple of 8 from 8 to the feature dimension {dim}")
    return b


def learn_itq(sample: np.ndarray, bits: int, iterations: int = ITQ_ITERATIONS, seed: int = 0,
              rotate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(centre, projection dim x bits) learned from `sample`: PCA, then the ITQ rotation (none when
    not `rotate`: plain PCA sign codes). ITQ alternates codes B = sign(V R) with the orthogonal R
    closest to mapping V onto B (Procrustes: the SVD of V^T B)."""
    x = sample.astype(np.float64)
    centre = x.mean(axis=0)
    x -= centre
    _, vecs = np.linalg.eigh(x.T @ x)
    pca = vecs[:, ::-1][:, :bits]  # eigh sorts eigenvalues ascending
    v = (x @ pca).astype(np.float32)
    r = np.linalg.qr(np.random.default_rng(seed).normal(size=(bits, bits)))[0].astype(np.float32) if rotate \
        else np.eye(bits, dtype=np.float32)
    for _ in range(iterations if rotate else 0):
        u, _, wt = np.linalg.svd(v.T @ np.where(v @ r >= 0, np.float32(1), np.float32(-1)))
        r = u @ wt
    return centre.astype(np.float32), (pca @ r).astype(np.float32)


def quantisation_error(projected: np.ndarray) -> float:
    """Mean share of each projected vector its sign code cannot express, 1 - cos^2(y, sign(y)): scale-free,
    0 when every component has the same magnitude. ITQ's rotation lowers it."""
    y = projected.astype(np.float64)
    return float(np.mean(1 - np.abs(y).sum(axis=1) ** 2 / (y.shape[1] * (y ** 2).sum(axis=1))))


def encode(x: np.ndarray, centre: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Binary codes of x, 8 bits per byte (bit j of byte j // 8 at j % 8, as faiss's binary indexes read them)."""
    return np.packbits((x - centre) @ projection >= 0, axis=1, bitorder="little")


def binary_factory(n: int, bits: int, factory: str | None = None) -> tuple[str, str]:
    """The faiss binary index for n codes (and why): an exhaustive Hamming scan below FLAT_CODES_BELOW,
    else an IVF over codes with nlist ~ 4 sqrt(n). `factory` (e.g. 'BHNSW32', 'BIVF4096') overrides."""
    if factory:
        try:
            faiss.index_binary_factory(bits, factory)
        except RuntimeError as exc:
            raise PipelineError(f"faiss cannot build binary factory {factory!r}: {str(exc).strip().splitlines()[-1]}") from None
        return factory, f"binary factory {factory!r} given with --factory"
    if n < FLAT_CODES_BELOW:
        return "BFlat", f"{n} codes < {FLAT_CODES_BELOW}: an exhaustive Hamming scan"
    nlist = min(2 ** math.ceil(math.log2(4 * math.sqrt(n))), n // MIN_POINTS_PER_LIST)
    return f"BIVF{nlist}", f"{n} codes: IVF over codes with nlist {nlist} (about 4*sqrt(N))"


class CoarseToFine:
    """Hamming candidates from the binary index, re-ranked by exact inner product from the vector store.

    `setting` is what the build tuned: nprobe (IVF over codes), efSearch (HNSW) or, for an exhaustive
    scan, the pool size itself; the pool is `pool` candidates (at least k)."""

    def __init__(self, index, centre: np.ndarray, projection: np.ndarray, store: VectorStore, pool: int,
                 setting: int | None = None) -> None:
        self.index, self.centre, self.projection, self.store = index, centre, projection, store
        self.pool, self.setting = pool, setting
        b = faiss.downcast_IndexBinary(index)
        self.setting_name = ("nprobe" if isinstance(b, faiss.IndexBinaryIVF) else
                             "efSearch" if isinstance(b, faiss.IndexBinaryHNSW) else "pool")

    @classmethod
    def open(cls, version_dir: Path, meta: dict) -> CoarseToFine:
        codes = meta["codes"]
        with np.load(version_dir / ITQ_FILE) as itq:
            centre, projection = itq["centre"], itq["projection"]
        if _checksum(centre, projection) != codes["rotation_sha256"]:
            raise PipelineError(f"{version_dir / ITQ_FILE} does not match its meta.json (rotation checksum)")
        return cls(faiss.read_index_binary(str(version_dir / CODES_FILE)), centre, projection,
                   VectorStore.open(version_dir), codes["pool"], codes["setting"])

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, setting: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top k by exact inner product among each query's Hamming candidates."""
        setting = setting or self.setting
        pool = setting if self.setting_name == "pool" and setting else self.pool
        params = (faiss.SearchParametersIVF(nprobe=int(setting)) if self.setting_name == "nprobe" else
                  faiss.SearchParametersHNSW(efSearch=int(setting)) if self.setting_name == "efSearch" else None)
        queries = np.ascontiguousarray(queries, np.float32)
        _, pos = self.index.search(encode(queries, self.centre, self.projection), min(max(pool, k), self.ntotal),
                                   params=params)
        return self.store.rerank(queries, np.where(pos >= 0, self.store.ids[pos], -1), k)

    def vectors(self, ids) -> np.ndarray:
        return self.store.get(ids)


def _checksum(centre: np.ndarray, projection: np.ndarray) -> str:
    return hashlib.sha256(centre.tobytes() + projection.tobytes()).hexdigest()


class _Sink:
    """What the streamed fill adds each shard's rows to: the vector store, and their codes at the
    store's positions (ascending id order)."""

    def __init__(self, store: StoreWriter, ids: np.ndarray, centre: np.ndarray, projection: np.ndarray) -> None:
        self.store, self.centre, self.projection = store, centre, projection
        self.sorted_ids = np.sort(ids)
        self.codes = np.zeros((len(ids), projection.shape[1] // 8), np.uint8)
        self.ntotal = 0

    def add_with_ids(self, feats: np.ndarray, ids: np.ndarray) -> None:
        self.store.add(ids, feats)
        self.codes[np.searchsorted(self.sorted_ids, ids)] = encode(feats, self.centre, self.projection)
        self.ntotal += len(ids)


def tune(engine: CoarseToFine, queries: np.ndarray, q_ids: np.ndarray, truth: np.ndarray, target: float,
         setting: int | None = None, k: int = 10) -> dict:
    """The smallest setting (pool, nprobe or efSearch) whose recall@k through the whole path (codes,
    Hamming search, re-rank) reaches `target` with 95% confidence, or just the given `setting`."""
    n = engine.ntotal
    grid = ([setting] if setting else
            [p for p in POOL_GRID if p < n] + [n] * (n <= POOL_GRID[-1]) if engine.setting_name == "pool" else
            [p for p in NPROBE_GRID if p < engine.index.nlist] + [engine.index.nlist] if engine.setting_name == "nprobe"
            else list(EF_GRID))
    tried = []
    for value in grid:
        t0 = time.perf_counter()
        _, found = engine.search(queries, k + 1, value)
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        per_query = recall_at(found, truth, q_ids, k)
        tried.append({engine.setting_name: value, "recall": round(float(per_query.mean()), 4),
                      "recall_lower_bound": round(lower_bound(per_query), 4), "ms_per_query": round(ms, 4)})
        if lower_bound(per_query) >= target:
            break
    best = tried[-1]
    if best["recall_lower_bound"] < target:  # the pool is capped: past POOL_GRID re-ranking costs more than it is worth
        LOG.warning("binary codes: recall@10 %.3f at the largest %s tried, below the target %g: use more --codes bits "
                    "or another index kind", best["recall"], engine.setting_name, target)
    engine.setting = best[engine.setting_name]
    LOG.info("binary codes: %s %s: recall@10 %.3f, %.3f ms/query (%d queries)", engine.setting_name, engine.setting,
             best["recall"], best["ms_per_query"], len(q_ids))
    return {"recall_at_10": best["recall"], "target_recall": target, "recall_queries": len(q_ids),
            "query_ms": best["ms_per_query"], "setting_sweep": tried}


def build_binary(features_dir: Path, out_dir: Path, parts: list[tuple[ShardInfo, np.ndarray]], ids: np.ndarray,
                 digest: str | None, model: dict, dim: int, *, bits: int, factory: str | None, setting: int | None,
                 target_recall: float, recall_queries: int, keep: int, seed: int, progress: bool | None) -> IndexReport:
    """Learn the codes on a sample, stream every shard into the vector store and the codes, fill the
    binary index, tune its setting on held-out queries through the whole path, publish (the caller
    holds the index folder's lock)."""
    n = len(ids)
    fac, reason = binary_factory(n, bits, factory)
    LOG.info("index plan: ITQ%d + %s, re-ranked from the vector store (%s)", bits, fac, reason)
    rng = np.random.default_rng(seed)
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    # Recall queries are held out of the ITQ sample (the codes fit their training vectors better).
    n_q = min(recall_queries, n)
    q_pos = np.sort(rng.choice(n, size=n_q, replace=False))
    rest = np.setdiff1d(np.arange(n), q_pos, assume_unique=True)
    train_pos = np.sort(rng.choice(rest, size=min(ITQ_TRAIN, len(rest)), replace=False)) if len(rest) else q_pos
    t0 = time.monotonic()
    sample = _rows_by_id(parts, train_pos)
    centre, projection = learn_itq(sample, bits, seed=seed)
    error = quantisation_error((sample - centre) @ projection)
    del sample
    queries, q_ids = _rows_by_id(parts, q_pos), ids[q_pos]
    timings["train_s"] = time.monotonic() - t0
    with _new_version(out_dir) as (tmp, version):
        t0 = time.monotonic()
        sink = _Sink(StoreWriter(tmp, n, dim), ids, centre, projection)
        try:
            truth, ids_writer = _fill(sink, parts, ids, tmp / IDS_FILE, queries, progress)
            sink.store.close()
        except BaseException:
            sink.store.abort()
            raise
        store = VectorStore.open(tmp)
        index = faiss.index_binary_factory(bits, fac)
        if not index.is_trained:  # IVF over codes: 64 training codes per list
            size = min(n, 64 * faiss.downcast_IndexBinary(index).nlist)
            index.train(sink.codes[np.sort(rng.choice(n, size=size, replace=False))])
        for start in range(0, n, 1_000_000):
            index.add(sink.codes[start:start + 1_000_000])
        del sink
        timings["add_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        engine = CoarseToFine(index, centre, projection, store, DEFAULT_POOL)
        tuning = tune(engine, queries, q_ids, truth[0], target_recall, setting)
        np.savez(tmp / RECALL_FILE, ids=q_ids, queries=queries, truth=truth[0], scores=truth[1],
                 depth=np.full(len(q_ids), TRUTH_DEPTH))
        timings["tune_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            faiss.write_index_binary(index, str(tmp / CODES_FILE))
        except RuntimeError as exc:
            raise write_error(out_dir, exc, "`pipeline build-index`") from None
        np.savez(tmp / ITQ_FILE, centre=centre, projection=projection)
        ids_writer.join()
        timings["write_s"] = time.monotonic() - t0
        meta = {
            "schema_version": META_SCHEMA,
            "pipeline_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": version,
            "model": model,
            "count": n,
            "dim": dim,
            "metric": "inner_product",
            "factory": f"ITQ{bits},{fac}",
            "kind": f"binary/{type(faiss.downcast_IndexBinary(index)).__name__}/{bits}",
            "ids": "catalog" if digest is not None else "positions",
            "made_by": "build",
            "trained_count": n,
            "changes_since_training": 0,
            "base_version": None,
            "bytes_estimate": n * bits // 8,
            "nlist": 0,  # no float IVF layer: the binary index's own lists are in "codes"
            "nprobe": None,
            "reason": f"--codes binary:{bits}; {reason}",
            "train_size": len(train_pos),
            "codes": {"bits": bits, "index": fac, "rotation_sha256": _checksum(centre, projection),
                      "itq_train_size": len(train_pos), "itq_iterations": ITQ_ITERATIONS,
                      "quantisation_error": round(error, 4), "pool": DEFAULT_POOL,
                      "setting_name": engine.setting_name, "setting": engine.setting},
            **tuning,
            "recall_queries_held_out_from_training": bool(len(rest)),
            **_made_from(features_dir, parts, digest, t_start, timings),
        }
        final = _publish(out_dir, tmp, meta, keep)
    LOG.info("published %s: %d vectors, ITQ%d + %s, %s %s", final, n, bits, fac, engine.setting_name, engine.setting)
    return IndexReport(str(final), meta)

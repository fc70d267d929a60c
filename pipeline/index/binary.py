"""Building a binary-codes version (build_index(codes=...)), tuned through its coarse-to-fine search (codes.py).

Learn the codes, fill the binary index and the vector store, tune the search through its whole path,
publish. Never updated in place: the codes are learned from the whole collection.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ..errors import PipelineError, write_error
from .annotate import make_metadata
from .codes import (
    CODES_FILE,
    DEFAULT_POOL,
    EF_GRID,
    ITQ_FILE,
    ITQ_ITERATIONS,
    ITQ_TRAIN,
    POOL_GRID,
    CoarseToFine,
    encode,
    learn_itq,
    quantisation_error,
    rotation_checksum,
)
from .fill import TRUTH_DEPTH, Truth, fill_index, rows_at
from .idtable import IDS_FILE
from .plan import MIN_POINTS_PER_LIST
from .store import StoreWriter, VectorStore
from .tune import NPROBE_GRID, lower_bound, recall_at
from .versions import (
    RECALL_FILE,
    Collection,
    IndexReport,
    asked_for,
    built_fields,
    made_from,
    new_version,
    publish_version,
)

LOG = logging.getLogger(__name__)

FLAT_CODES_BELOW = 2_000_000  # binary codes: an exhaustive Hamming scan below this (docs/benchmarks.md)


def binary_factory(n: int, bits: int, factory: str | None = None) -> tuple[str, str]:
    """The faiss binary index for n codes (and why): an exhaustive Hamming scan below FLAT_CODES_BELOW,
    else an IVF over codes with nlist ~ 4 sqrt(n). `factory` (e.g. 'BHNSW32', 'BIVF4096') overrides."""
    if factory:
        try:
            faiss.index_binary_factory(bits, factory)
        except RuntimeError as exc:
            raise PipelineError(
                f"faiss cannot build binary factory {factory!r}: {str(exc).strip().splitlines()[-1]}"
            ) from None
        return factory, f"binary factory {factory!r} given with --factory"
    if n < FLAT_CODES_BELOW:
        return "BFlat", f"{n} codes < {FLAT_CODES_BELOW}: an exhaustive Hamming scan"
    nlist = min(2 ** math.ceil(math.log2(4 * math.sqrt(n))), n // MIN_POINTS_PER_LIST)
    return f"BIVF{nlist}", f"{n} codes: IVF over codes with nlist {nlist} (about 4*sqrt(N))"


class _Codes:
    """What the streamed fill adds each shard's rows to for a binary version: their codes, at the
    vector store's positions (ascending id order), which are the binary index's positions."""

    def __init__(self, ids: np.ndarray, centre: np.ndarray, projection: np.ndarray) -> None:
        self.centre, self.projection = centre, projection
        self.sorted_ids = np.sort(ids)
        self.codes = np.zeros((len(ids), projection.shape[1] // 8), np.uint8)
        self.ntotal = 0

    def add_with_ids(self, feats: np.ndarray, ids: np.ndarray) -> None:
        self.codes[np.searchsorted(self.sorted_ids, ids)] = encode(feats, self.centre, self.projection)
        self.ntotal += len(ids)


def tune_codes(
    engine: CoarseToFine,
    queries: np.ndarray,
    q_ids: np.ndarray,
    truth: np.ndarray,
    target: float,
    setting: int | None = None,
    k: int = 10,
) -> dict:
    """The smallest setting (pool, nprobe or efSearch) whose recall@k through the whole path (codes,
    Hamming search, re-rank) reaches `target` with 95% confidence, or just the given `setting`."""
    n = engine.ntotal
    if setting:
        grid = [setting]
    elif engine.setting_name == "pool":
        grid = [p for p in POOL_GRID if p < n] + [n] * (n <= POOL_GRID[-1])
    elif engine.setting_name == "nprobe":
        nlist = _nlist(engine.index)
        grid = [p for p in NPROBE_GRID if p < nlist] + [nlist]
    else:
        grid = list(EF_GRID)
    tried = []
    for value in grid:
        t0 = time.perf_counter()
        _, found = engine.search(queries, k + 1, value)
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        per_query = recall_at(found, truth, q_ids, k)
        tried.append(
            {
                engine.setting_name: value,
                "recall": round(float(per_query.mean()), 4),
                "recall_lower_bound": round(lower_bound(per_query), 4),
                "ms_per_query": round(ms, 4),
            }
        )
        if lower_bound(per_query) >= target:
            break
    best = tried[-1]
    if best["recall_lower_bound"] < target:  # the pool is capped: past POOL_GRID re-ranking costs more than it is worth
        LOG.warning(
            "binary codes: recall@10 %.3f at the largest %s tried, below the target %g: use more --codes bits "
            "or another index kind",
            best["recall"],
            engine.setting_name,
            target,
        )
    engine.setting = int(best[engine.setting_name])  # a grid value (the dict's other values are floats)
    LOG.info(
        "binary codes: %s %s: recall@10 %.3f, %.3f ms/query (%d queries)",
        engine.setting_name,
        engine.setting,
        best["recall"],
        best["ms_per_query"],
        len(q_ids),
    )
    return {
        "recall_at_10": best["recall"],
        "target_recall": target,
        "recall_queries": len(q_ids),
        "query_ms": best["ms_per_query"],
        "setting_sweep": tried,
    }


def build_binary(
    source: Collection,
    out_dir: Path,
    *,
    bits: int,
    factory: str | None,
    setting: int | None,
    target_recall: float,
    recall_queries: int,
    keep: int,
    seed: int,
    progress: bool | None,
    pool: Executor,
) -> IndexReport:
    """Learn the codes on a sample, stream every shard into the vector store and the codes, fill the
    binary index, tune its setting on held-out queries through the whole path, publish (the caller
    holds the index folder's lock)."""
    n = len(source.ids)
    fac, reason = binary_factory(n, bits, factory)
    LOG.info("index plan: ITQ%d + %s, re-ranked from the vector store (%s)", bits, fac, reason)
    rng = np.random.default_rng(seed)
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    q_pos, train_pos = _recall_split(rng, n, recall_queries)
    t0 = time.monotonic()
    learned = _learn_codes(source, q_pos, train_pos, bits, seed)
    timings["train_s"] = time.monotonic() - t0
    with new_version(out_dir) as (tmp, version):
        t0 = time.monotonic()
        index, truth = _fill_codes(source, tmp, learned, bits, fac, rng, progress, pool)
        timings["add_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        engine = CoarseToFine(index, learned.centre, learned.projection, VectorStore.open(tmp), DEFAULT_POOL)
        tuning = tune_codes(engine, learned.queries, learned.q_ids, truth.ids, target_recall, setting)
        _save_recall(tmp, learned, truth)
        timings["tune_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        _write_codes(out_dir, tmp, index, learned)
        timings["write_s"] = time.monotonic() - t0
        asked = asked_for(codes=f"binary:{bits}", factory=factory, nprobe=setting)
        meta = {
            **_binary_fields(version, source, asked, bits, fac, reason, index, learned, engine),
            **tuning,
            "recall_queries_held_out_from_training": learned.held_out,
            **made_from(source, t_start, timings),
        }
        meta["metadata"] = make_metadata(tmp, source, source.metadata_files, out_dir)
        report = publish_version(out_dir, tmp, meta, keep)
    LOG.info(
        "published %s: %d vectors, ITQ%d + %s, %s %s",
        report.version_dir,
        n,
        bits,
        fac,
        engine.setting_name,
        engine.setting,
    )
    return report


@dataclass(frozen=True)
class _Learned:
    """The ITQ rotation of a binary version, how it was learned, and the recall queries held out of it."""

    centre: np.ndarray
    projection: np.ndarray
    train_size: int
    error: float  # quantisation error on the training sample
    queries: np.ndarray
    q_ids: np.ndarray
    held_out: bool  # the recall queries were left out of the training sample


def _recall_split(rng: np.random.Generator, n: int, recall_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the recall queries and of the ITQ sample, drawn apart: codes fit their training vectors better."""
    n_q = min(recall_queries, n)
    q_pos = np.sort(rng.choice(n, size=n_q, replace=False))
    rest = np.setdiff1d(np.arange(n), q_pos, assume_unique=True)
    train_pos = np.sort(rng.choice(rest, size=min(ITQ_TRAIN, len(rest)), replace=False)) if len(rest) else q_pos
    return q_pos, train_pos


def _learn_codes(source: Collection, q_pos: np.ndarray, train_pos: np.ndarray, bits: int, seed: int) -> _Learned:
    """Learn the rotation on its sample and read the recall queries, before the version's folder exists."""
    sample = rows_at(source.parts, train_pos)
    centre, projection = learn_itq(sample, bits, seed=seed)
    error = quantisation_error((sample - centre) @ projection)
    del sample
    queries, q_ids = rows_at(source.parts, q_pos), source.ids[q_pos]
    return _Learned(centre, projection, len(train_pos), error, queries, q_ids, len(q_pos) < len(source.ids))


def _fill_codes(
    source: Collection,
    tmp: Path,
    learned: _Learned,
    bits: int,
    factory: str,
    rng: np.random.Generator,
    progress: bool | None,
    pool: Executor,
) -> tuple[faiss.IndexBinary, Truth]:
    """Stream every shard into the vector store and the codes in one pass, then build the binary index over them."""
    sink = _Codes(source.ids, learned.centre, learned.projection)
    store = StoreWriter(tmp, len(source.ids), source.dim)
    truth, ids_writer = fill_index(
        sink, source.parts, source.ids, tmp / IDS_FILE, learned.queries, progress, pool, store
    )
    assert truth is not None, "a fill given queries returns their exact neighbours"
    ids_writer.result()
    store.close()
    return _binary_index(sink, bits, factory, rng), truth  # the codes (sink) are freed on return


def _save_recall(tmp: Path, learned: _Learned, truth: Truth) -> None:
    """Keep the recall queries and their exact neighbours with the version (recall.npz), as a full build does."""
    np.savez(
        tmp / RECALL_FILE,
        ids=learned.q_ids,
        queries=learned.queries,
        truth=truth.ids,
        scores=truth.scores,
        depth=np.full(len(learned.q_ids), TRUTH_DEPTH),
    )


def _write_codes(out_dir: Path, tmp: Path, index: faiss.IndexBinary, learned: _Learned) -> None:
    """Write the binary index and the rotation a search needs to encode its queries, with faiss's error as one line."""
    try:
        faiss.write_index_binary(index, str(tmp / CODES_FILE))
    except RuntimeError as exc:
        raise write_error(out_dir, exc, "`pipeline build-index`") from None
    np.savez(tmp / ITQ_FILE, centre=learned.centre, projection=learned.projection)


def _binary_fields(
    version: str,
    source: Collection,
    asked: dict,
    bits: int,
    factory: str,
    reason: str,
    index: faiss.IndexBinary,
    learned: _Learned,
    engine: CoarseToFine,
) -> dict:
    """The meta.json fields that say what a binary build made, up to its tuning: what a search reopens the codes by."""
    n = len(source.ids)
    return {
        **built_fields(
            version,
            source,
            f"ITQ{bits},{factory}",
            f"binary/{type(faiss.downcast_IndexBinary(index)).__name__}/{bits}",
            asked,
        ),
        "bytes_estimate": n * bits // 8,
        "nlist": 0,  # no float IVF layer: the binary index's own lists are in "codes"
        "nprobe": None,
        "reason": f"--codes binary:{bits}; {reason}",
        "train_size": learned.train_size,
        "codes": {
            "bits": bits,
            "index": factory,
            "rotation_sha256": rotation_checksum(learned.centre, learned.projection),
            "itq_train_size": learned.train_size,
            "itq_iterations": ITQ_ITERATIONS,
            "quantisation_error": round(learned.error, 4),
            "pool": DEFAULT_POOL,
            "setting_name": engine.setting_name,
            "setting": engine.setting,
        },
    }


def _binary_index(sink: _Codes, bits: int, factory: str, rng: np.random.Generator) -> faiss.IndexBinary:
    """The binary index of `factory` over the codes (trained first when it is an IVF over codes: 64
    training codes per list); its positions are the codes' (the vector store's rows)."""
    n = len(sink.codes)
    index = faiss.index_binary_factory(bits, factory)
    if not index.is_trained:
        size = min(n, 64 * _nlist(index))
        index.train(sink.codes[np.sort(rng.choice(n, size=size, replace=False))])
    for start in range(0, n, 1_000_000):
        index.add(sink.codes[start : start + 1_000_000])
    return index


def _nlist(index: faiss.IndexBinary) -> int:
    """The number of lists of an IVF over codes."""
    ivf = faiss.downcast_IndexBinary(index)
    assert isinstance(ivf, faiss.IndexBinaryIVF), f"{type(ivf).__name__} is not an IVF over codes"
    return int(ivf.nlist)

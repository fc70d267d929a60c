"""The index stage: shards -> a FAISS inner-product index, tuned, saved and published atomically.

Layout of an index folder:
  CURRENT                 name of the published version (replaced by rename)
  versions/<version>/     index.faiss, ids.sqlite (id -> path, content hash), meta.json,
                          recall.npz (IVF: the recall queries and their exact neighbours)
Readers resolve CURRENT once and keep that version; a build never touches a published version.

Ids are the catalog's stable image ids (sparse int64, never reused; positions are not ids), so a
version can be made from the published one by removing and adding ids (an update) instead of
training and filling a new index, and an id names the same image in every version.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np

from .version import __version__
from .codes import (CODES_FILE, DEFAULT_POOL, EF_GRID, ITQ_FILE, ITQ_ITERATIONS, ITQ_TRAIN, POOL_GRID, CoarseToFine,
                    encode, learn_itq, parse_codes, quantisation_error, rotation_checksum)
from .errors import PipelineError, cause, write_error
from .fsutil import atomic_write_text, exclusive_lock, fsync_path
from .features import live_parts
from .progress import Progress
from .features import ShardInfo, check_model, read_rows, read_shard
from .vectorstore import Reranked, StoreWriter, VectorStore, update_store

LOG = logging.getLogger(__name__)

INDEX_FILE, IDS_FILE, META_FILE, CURRENT_FILE, VERSIONS_DIR = "index.faiss", "ids.sqlite", "meta.json", "CURRENT", "versions"
RECALL_FILE = "recall.npz"
META_SCHEMA = 1
MIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid
DEFAULT_FLAT_BELOW = 20_000  # under this, exact search over 512-d is about a millisecond: IVF buys nothing
# An update keeps the trained quantizer while the images added and removed since its training stay
# under this share of the trained count; beyond it the centroids drift from the data and lists grow
# unbalanced (README: rebuild), so a full build trains again.
DEFAULT_RETRAIN_ABOVE = 0.2
# An update tunes nprobe until its mean recall@10 on the recall queries is back at what the version
# reached when its quantizer was trained, less this: the same queries, so at the same nprobe only
# the changes move it (a thousandth or two at 1% new); drift of the centroids from the data raises
# nprobe, that noise does not.
HOLD_SLACK = 0.002
FLAT_CODES_BELOW = 2_000_000  # binary codes: an exhaustive Hamming scan below this (docs/benchmarks.md)
TRUTH_DEPTH = 32  # exact neighbours kept per recall query: updates drop removed ones and stay exact to depth k+1
# Candidates a compressed index proposes for exact re-ranking (vectorstore.py). Measured with bench
# vectors at the density of 10M (1,000 per cluster; scratch experiment, docs/benchmarks.md): the
# share of the true top-10 among the top-c candidates of PQ256x4fs codes is 0.66 / 0.95 / 0.997 /
# 1.0 at c = 50 / 200 / 500 / 1000 (PQ128x4fs: 0.37 / 0.73 / 0.95 / 1.0; SQ4: 0.96 / 0.9995 at 50 /
# 200, but it scans 50x slower than fast-scan). 500 float16 rows re-rank in well under a millisecond.
DEFAULT_RERANK = 500
# An exact (flat) coarse quantizer up to this many lists: at 4096 lists it costs 4 MFLOP a query (about
# 0.05 ms) and ranks the lists exactly. An HNSW quantizer at its default efSearch (16) probed the wrong
# lists at 10M: with 64 lists probed only 0.84 of the true top-10 were in them (0.95 at efSearch 256),
# where an exact quantizer had 0.99 at 8 lists (docs/benchmarks.md, "Compressed indexes at 10M").
HNSW_QUANTIZER_FROM = 16384
SAMPLE_READS = 4096  # reads a training sample is drawn in (sample_runs)
HNSW_QUANTIZER_EF = 256  # efSearch given to an HNSW coarse quantizer (its lists, at add and search)


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    nlist: int  # 0 when the index has no IVF layer
    train_size: int
    reason: str
    bytes_estimate: int = 0  # memory of the filled index, estimated before building it
    rerank: int = 0  # candidates re-ranked exactly from the version's vector store (compressed codes); 0: none


def parse_size(text: str) -> int:
    """'16G', '500M', '2.5GB', '1024' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(float(t))
    except ValueError:
        raise PipelineError(f"cannot read memory size {text!r}: use e.g. 500M or 16G") from None


def factory_facts(factory: str, dim: int) -> tuple[int, int]:
    """(nlist, bytes per stored vector) of a factory string, asked of the faiss object it builds
    (never parsed by hand: 'IVF65536_HNSW32,Flat' has nlist 65536). IVF lists store an 8-byte id
    beside each code."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise PipelineError(f"faiss cannot build factory {factory!r}: {str(exc).strip().splitlines()[-1]}") from None
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # no IVF layer
        try:
            return 0, int(index.sa_code_size())
        except RuntimeError:
            return 0, 4 * dim
    return int(ivf.nlist), int(ivf.code_size) + 8


def plan_index(n: int, dim: int = 512, *, factory: str | None = None, nlist: int | None = None,
               flat_below: int = DEFAULT_FLAT_BELOW, train_per_list: int = 64,
               max_memory: int | str | None = None, rerank: int | None = None) -> IndexPlan:
    """Choose the index for n vectors of `dim`, with the reasoning.

    Exact (Flat) below `flat_below`; else IVF with nlist the power of two >= 4 sqrt(n) (faiss
    guidance: 4..16 sqrt(n)), capped so each list has >= 39 training points. With `max_memory`
    (bytes), the vectors are compressed until the index fits: SQ8, then 4-bit PQ codes scanned with
    fast-scan (PQ{dim/2}x4fs, then fewer bytes). Compressed codes are followed by exact re-ranking of
    `rerank` candidates (default DEFAULT_RERANK) from a float16 store on disk, memory-mapped, which
    the budget does not count: it is page cache, not the index's memory. PQ codes scan so fast that
    a finer IVF buys little and costs training time quadratic in nlist (2 cores: hours at 65k
    lists): they get nlist the power of two >= sqrt(n), and an HNSW quantizer only from
    HNSW_QUANTIZER_FROM lists on (with its efSearch raised: quantizer_search_depth).
    """
    if n < 1:
        raise PipelineError("no features to index: the shards hold no images")
    if isinstance(max_memory, str):
        max_memory = parse_size(max_memory)
    if rerank is not None and rerank < 0:
        raise PipelineError(f"--rerank must be at least 0 (got {rerank})")
    if factory:
        nl, per_vector = factory_facts(factory, dim)
        compressed = per_vector - (8 if nl else 0) < 4 * dim
        train = min(n, max(max(MIN_POINTS_PER_LIST, train_per_list) * nl, 20_000 if compressed else 0) or 100_000)
        return IndexPlan(factory, nl, train, f"factory {factory!r} given with --factory",
                         n * per_vector + nl * dim * 4, _rerank(compressed, rerank))
    auto_nlist = nlist is None
    if nlist is None and n < flat_below:
        ivf, nlist, reason = "", 0, (f"{n} vectors < {flat_below}: exact inner-product search is fast at this "
                                      "size, so no IVF")
    else:
        if nlist is None:
            nlist = min(2 ** math.ceil(math.log2(4 * math.sqrt(n))), n // MIN_POINTS_PER_LIST)
            reason = (f"{n} vectors: nlist {nlist} (about 4*sqrt(N) = {4 * math.sqrt(n):.0f}, "
                      f"at least {MIN_POINTS_PER_LIST} training points per list)")
        else:
            reason = f"nlist {nlist} given with --nlist"
        if nlist < 1 or nlist * MIN_POINTS_PER_LIST > n:
            raise PipelineError(f"nlist {nlist} needs at least {max(nlist, 1) * MIN_POINTS_PER_LIST} vectors to train; have {n}")
        ivf = f"IVF{nlist},"
    codes = ["Flat", "SQ8"] + [f"PQ{m}x4fs" for m in (dim // 2, dim // 4, dim // 8, dim // 16) if m and dim % m == 0]
    for code in codes:
        if code.startswith("PQ") and auto_nlist and ivf:
            nlist = min(2 ** math.ceil(math.log2(math.sqrt(n))), n // MIN_POINTS_PER_LIST)
            ivf = f"IVF{nlist}_HNSW32," if nlist >= HNSW_QUANTIZER_FROM else f"IVF{nlist},"
        fac = ivf + code
        need = n * factory_facts(fac, dim)[1] + nlist * dim * 4
        if max_memory is None or need <= max_memory:
            break
    else:
        raise PipelineError(f"{n} vectors do not fit in {max_memory / 2**20:.0f} MiB even as {fac} "
                            f"({need / 2**20:.0f} MiB); raise --max-memory")
    compressed = code != "Flat"
    rerank = _rerank(compressed, rerank)
    if compressed:
        how = ("given with --nlist" if not auto_nlist else "the power of two >= sqrt(N)" if code.startswith("PQ")
               else "about 4*sqrt(N)")
        reason = (f"{n} vectors as flat floats need {n * 4 * dim / 2**20:.0f} MiB > --max-memory, so {fac} "
                  f"({need / 2**20:.0f} MiB: codes, ids and quantizer), {nlist} lists (nlist {how})")
        if rerank:
            reason += (f"; the top {rerank} candidates re-ranked exactly from a float16 store on disk "
                       f"({n * 2 * dim / 2**20:.0f} MiB, memory-mapped, not resident)")
    train = min(n, max(max(MIN_POINTS_PER_LIST, train_per_list) * nlist, 20_000 if compressed else 0))
    return IndexPlan(fac, nlist, train, reason, need, rerank)


def _rerank(compressed: bool, rerank: int | None) -> int:
    """Candidates to re-rank: compressed codes rank approximately, so DEFAULT_RERANK unless told."""
    return 0 if not compressed else DEFAULT_RERANK if rerank is None else rerank


@dataclass
class IndexReport:
    version_dir: str
    meta: dict


def recall_at(found: np.ndarray, truth: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Per query, the fraction of its true top-k neighbours found (the query itself left out of both)."""
    out = np.empty(len(query_ids))
    for j, (q, f, t) in enumerate(zip(query_ids, found, truth)):
        t = [x for x in t if x != q and x >= 0][:k]
        f = {x for x in f if x != q and x >= 0}
        out[j] = len(f.intersection(t)) / max(1, len(t))
    return out


def lower_bound(per_query: np.ndarray) -> float:
    """One-sided 95% lower confidence bound of mean recall (normal approximation)."""
    return float(per_query.mean() - 1.645 * per_query.std(ddof=1) / np.sqrt(len(per_query))) if len(per_query) > 1 else float(per_query.mean())


# Every nprobe to 8, then steps of a quarter or less: at the few lists a large IVF index settles on, one
# step of (4, 6, 8) moved recall@10 by 0.005-0.01 at 1M, so builds of the same data landed that far apart.
NPROBE_GRID = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192,
               224, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


def tune_nprobe(index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, nlist: int,
                k: int = 10, target: float = 0.95, nprobe: int | None = None,
                start: int | None = None, hold: float | None = None) -> tuple[int, float, float, list[dict]]:
    """Smallest nprobe whose recall@k reaches `target` with 95% confidence (or just the given `nprobe`).

    "With confidence": the lower bound of the mean over the sampled queries must reach the
    target, so that new queries get the target recall too, not just these. Returns nprobe, its
    mean recall, ms per query and every setting tried. The index is not modified (parameters
    are passed per call), so it may be serialised at the same time. With `start` (the nprobe an
    update's base version chose), the search walks down from there while the target holds, or up
    until it does: two or three settings instead of the grid up to it. With `hold` (an update: the
    mean recall its quantizer reached when it was trained, measured on these same queries), the mean
    must reach it too, so nprobe rises as the kept centroids drift from the data instead of letting
    recall slide down to the target's bound.
    """
    grid = [nprobe] if nprobe else [p for p in NPROBE_GRID if p < nlist] + [nlist]
    results: dict[int, tuple[float, float, float]] = {}  # grid position -> mean recall, lower bound, ms

    def reaches(j: int) -> bool:
        t0 = time.perf_counter()
        _, found = index.search(queries, k + 1, params=faiss.SearchParametersIVF(nprobe=grid[j]))
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        per_query = recall_at(found, truth, query_ids, k)
        results[j] = (float(per_query.mean()), lower_bound(per_query), ms)
        return results[j][1] >= target and (hold is None or results[j][0] >= hold)

    j = next((i for i, p in enumerate(grid) if p >= start), len(grid) - 1) if start and not nprobe else 0
    if reaches(j):
        while j > 0 and reaches(j - 1):
            j -= 1
    else:
        while j < len(grid) - 1 and not reaches(j + 1):
            j += 1
        j = min(j + 1, len(grid) - 1)
    tried = [{"nprobe": grid[i], "recall": round(rec, 4), "recall_lower_bound": round(lb, 4), "ms_per_query": round(ms, 4)}
             for i, (rec, lb, ms) in sorted(results.items())]
    return grid[j], results[j][0], results[j][2], tried


def build_index(
    features_dir: Path | str,
    out_dir: Path | str,
    *,
    factory: str | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    flat_below: int = DEFAULT_FLAT_BELOW,
    train_per_list: int = 64,
    target_recall: float = 0.95,
    recall_queries: int = 1000,
    max_memory: int | str | None = None,
    keep: int = 3,
    seed: int = 0,
    ray: str | None = None,
    progress: bool | None = None,
    update: bool = False,
    retrain_above: float = DEFAULT_RETRAIN_ABOVE,
    rerank: int | None = None,
    codes: str | None = None,
) -> IndexReport:
    """Build an index from every shard in `features_dir` and publish it as the current version of `out_dir`.

    With `update`, the new version is made from the published one (remove the ids no longer live,
    add the new ones, keep the trained quantizer, re-tune nprobe) when it was made by the same
    model and kind of index and the changes since its training stay within `retrain_above` of
    the count it was trained on; otherwise (and without `update`) a full build trains again.
    ray: the address of a Ray cluster ('auto', 'local', host:port) whose workers fill parts of an
    IVF index in parallel, merged here into the index a local build makes (distributed.py).
    rerank: candidates re-ranked exactly from the version's float16 vector store (vectorstore.py);
    None: DEFAULT_RERANK for compressed codes, none for exact ones; 0: no store, no re-ranking.
    codes: 'binary[:BITS]' builds the coarse-to-fine kind instead (codes.py): learned binary codes
    searched by Hamming distance, candidates re-ranked from the full features; `factory` may then
    name a faiss binary index ('BHNSW32') and `nprobe` fix its setting. Never updated in place.
    """
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    if codes is not None and (ray is not None or max_memory is not None or nlist is not None):
        raise PipelineError("--codes binary builds its own index: it takes neither --ray, --max-memory nor --nlist")
    fill = _fill
    if ray is not None:
        from .distributed import connect, fill_on_ray

        connect(ray)  # before any work: a cluster that cannot be reached is a one-line error at once
        fill = partial(fill_on_ray, address=ray)
    if not features_dir.is_dir():
        raise PipelineError(f"features folder not found: {features_dir}")
    if keep < 1:
        raise PipelineError(f"--keep must be at least 1 (got {keep})")
    if not 0 < target_recall <= 1:
        raise PipelineError(f"--target-recall must be in (0, 1] (got {target_recall})")
    if retrain_above < 0:
        raise PipelineError(f"--retrain-above must be at least 0 (got {retrain_above})")
    # An update reads the published index (GBs) meanwhile, in a thread: faiss releases the GIL.
    prefetch = _Background(_read_published, out_dir) if update and codes is None else None
    all_infos, parts, ids, digest = live_parts(features_dir)
    if not all_infos:
        raise PipelineError(f"no shards in {features_dir}: run `pipeline extract` first")
    check_model(all_infos)
    n = sum(len(rows) for _, rows in parts)
    dim = all_infos[0].dim
    model = {"name": all_infos[-1].model_name, "checksum": all_infos[-1].model_sha256, "path": all_infos[-1].model_path}
    asked = asked_for(factory=factory, nlist=nlist, nprobe=nprobe, max_memory=max_memory, rerank=rerank, codes=codes)
    if codes is not None:
        bits = parse_codes(codes, dim)
        if update:
            LOG.info("index: full build, not an update: binary codes are learned from the whole collection")
        with exclusive_lock(out_dir, "pipeline build-index"):
            return _build_binary(features_dir, out_dir, parts, ids, digest, model, dim, bits=bits, factory=factory,
                                setting=nprobe, target_recall=target_recall, recall_queries=recall_queries, keep=keep,
                                seed=seed, progress=progress)
    plan = plan_index(n, dim, factory=factory, nlist=nlist, flat_below=flat_below, train_per_list=train_per_list,
                      max_memory=max_memory, rerank=rerank)
    LOG.info("index plan: %s (%s)", plan.factory, plan.reason)
    try:
        index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise PipelineError(f"faiss cannot build factory {plan.factory!r}: {str(exc).strip().splitlines()[-1]}") from None
    quantizer_search_depth(index)
    kind = index_kind(index)
    if not plan.nlist:
        index = faiss.IndexIDMap2(index)  # IVF stores ids itself; other indexes need the map
    rng = np.random.default_rng(seed)
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    stable = digest is not None  # catalog ids; without a catalog, ids are positions and cannot be updated

    with exclusive_lock(out_dir, "pipeline build-index"):
        base = _update_base(out_dir, model["checksum"], kind, factory, nlist, rerank, ids, retrain_above, prefetch) \
            if update and stable else None
        prefetch = None  # a full build does not keep the published index in memory
        if base is not None:
            return _update(base, out_dir, parts, ids, model, features_dir, digest, nprobe, target_recall, keep, t_start)
        t0 = time.monotonic()
        queries = q_ids = None
        held_out = False
        if not index_is_flat(plan):
            n_q = min(recall_queries, n)
            train_ids = sample_runs(rng, n, 0 if index.is_trained else plan.train_size)
            # Recall queries: vectors the quantizer was not trained on (k-means fits its own training
            # points better, which would flatter the recall), unless training used nearly all of them.
            rest = np.setdiff1d(np.arange(n), train_ids, assume_unique=True)
            held_out = len(rest) >= n_q
            q_ids = np.sort(rng.choice(rest if held_out else np.arange(n), size=n_q, replace=False))
            queries = _rows_by_id(parts, q_ids)
            q_ids = ids[q_ids]  # positions -> the ids the index returns
            if not index.is_trained:
                LOG.info("training on %d vectors", len(train_ids))
                index.train(_rows_by_id(parts, train_ids))
        timings["train_s"] = time.monotonic() - t0

        with _new_version(out_dir) as (tmp, version):
            t0 = time.monotonic()
            store = StoreWriter(tmp, n, dim) if plan.rerank else None
            truth, ids_writer = fill(index, parts, ids, tmp / IDS_FILE, queries, progress, store=store)
            timings["add_s"] = time.monotonic() - t0
            assert index.ntotal == n, f"index holds {index.ntotal} vectors, expected {n}"
            searched = index
            if store is not None:  # tuning measures the whole path: compressed candidates, exact re-ranking
                ids_writer.join()
                store.close()
                searched = Reranked(index, VectorStore.open(tmp), plan.rerank)

            t0 = time.monotonic()
            index_writer = _Background(faiss.write_index, index, str(tmp / INDEX_FILE))
            if queries is None:
                tuning = {"nprobe": None, "recall_at_10": 1.0, "recall_note": "exact search"}
            else:
                tuning = {**_tune(searched, plan.nlist, queries, q_ids, truth[0], nprobe, target_recall),
                          "recall_queries_held_out_from_training": held_out}
                np.savez(tmp / RECALL_FILE, ids=q_ids, queries=queries, truth=truth[0], scores=truth[1],
                         depth=np.full(len(q_ids), TRUTH_DEPTH))
            timings["tune_s"] = time.monotonic() - t0
            try:
                index_writer.join()
            except RuntimeError as exc:  # faiss: the file could not be written
                raise write_error(out_dir, exc, "`pipeline build-index`") from None
            ids_writer.join()
            timings["write_s"] = time.monotonic() - t0
            meta = {
                **_built(version, model, n, dim, plan.factory, kind, stable, asked),
                "bytes_estimate": plan.bytes_estimate,
                "nlist": plan.nlist,
                "reason": plan.reason,
                "train_size": 0 if index_is_flat(plan) or plan.train_size == 0 else plan.train_size,
                "rerank": plan.rerank,
                **tuning,
                "trained_recall_at_10": tuning["recall_at_10"],  # what updates of this version must hold
                **_made_from(features_dir, parts, digest, t_start, timings),
            }
            final = _publish(out_dir, tmp, meta, keep)
    LOG.info("published %s: %d vectors, %s, nprobe %s", final, n, plan.factory, meta.get("nprobe"))
    return IndexReport(str(final), meta)


def asked_for(**options) -> dict:
    """The index options a build was given (None: not given, left to the plan). Recorded in meta.json
    so that the nightly rebuild, which takes no index options, builds the same kind again: a collection
    indexed with --max-memory or --codes must not turn into a plain IVF-Flat at its next retraining."""
    return {k: v for k, v in options.items() if v is not None}


def _built(version: str, model: dict, n: int, dim: int, factory: str, kind: str, stable: bool, asked: dict) -> dict:
    """The meta.json fields that say what a full build made, from what model, and what kind of index
    was asked for (`asked`: the options given, which the nightly rebuild asks for again)."""
    return {"schema_version": META_SCHEMA, "pipeline_version": __version__, "asked": asked,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": version, "model": model,
            "count": n, "dim": dim, "metric": "inner_product", "factory": factory, "kind": kind,
            "ids": "catalog" if stable else "positions", "made_by": "build", "trained_count": n,
            "changes_since_training": 0, "base_version": None}


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


def tune_codes(engine: CoarseToFine, queries: np.ndarray, q_ids: np.ndarray, truth: np.ndarray, target: float,
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


def _build_binary(features_dir: Path, out_dir: Path, parts: list[tuple[ShardInfo, np.ndarray]], ids: np.ndarray,
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
        sink, store = _Codes(ids, centre, projection), StoreWriter(tmp, n, dim)
        truth, ids_writer = _fill(sink, parts, ids, tmp / IDS_FILE, queries, progress, store=store)
        ids_writer.join()
        store.close()
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
        tuning = tune_codes(engine, queries, q_ids, truth[0], target_recall, setting)
        np.savez(tmp / RECALL_FILE, ids=q_ids, queries=queries, truth=truth[0], scores=truth[1],
                 depth=np.full(len(q_ids), TRUTH_DEPTH))
        timings["tune_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            faiss.write_index_binary(index, str(tmp / CODES_FILE))
        except RuntimeError as exc:
            raise write_error(out_dir, exc, "`pipeline build-index`") from None
        np.savez(tmp / ITQ_FILE, centre=centre, projection=projection)
        timings["write_s"] = time.monotonic() - t0
        meta = {
            **_built(version, model, n, dim, f"ITQ{bits},{fac}",
                     f"binary/{type(faiss.downcast_IndexBinary(index)).__name__}/{bits}", digest is not None,
                     asked_for(codes=f"binary:{bits}", factory=factory, nprobe=setting)),
            "bytes_estimate": n * bits // 8,
            "nlist": 0,  # no float IVF layer: the binary index's own lists are in "codes"
            "nprobe": None,
            "reason": f"--codes binary:{bits}; {reason}",
            "train_size": len(train_pos),
            "codes": {"bits": bits, "index": fac, "rotation_sha256": rotation_checksum(centre, projection),
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


def quantizer_search_depth(index, ef: int = HNSW_QUANTIZER_EF) -> None:
    """Give an HNSW coarse quantizer an efSearch deep enough for the lists it must rank (the value is
    saved with the index, so adding and every later search use it): at faiss's default (16) it
    returns approximate nearest lists, and the vectors they miss are lost to any nprobe."""
    try:
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    except RuntimeError:  # no IVF layer
        return
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, ef)


def index_kind(index) -> str:
    """What an update must keep of the published index (asked of faiss): its classes and the code
    size of its vectors. The number of IVF lists may differ from what a new plan would choose."""
    top = type(faiss.downcast_index(index)).__name__
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return top
    return f"{top}/{type(faiss.downcast_index(ivf)).__name__}/{ivf.code_size}"


def _stored_ids(index) -> np.ndarray:
    """The ids an index holds, asked of the index itself (its inverted lists, or its id map): an
    update needs no pass over the id table."""
    try:
        invlists = faiss.extract_index_ivf(index).invlists
    except RuntimeError:  # no IVF layer: an IndexIDMap2
        return faiss.vector_to_array(faiss.downcast_index(index).id_map)
    return np.concatenate([faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i))
                           for i in range(invlists.nlist)] + [np.zeros(0, np.int64)])


@contextmanager
def _new_version(out_dir: Path) -> Iterator[tuple[Path, str]]:
    """A temporary folder for a new version and the version's name; removed if the block fails."""
    version = datetime.now(timezone.utc).strftime("v%Y%m%dT%H%M%S%fZ")
    tmp = out_dir / VERSIONS_DIR / f".tmp-{version}-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        yield tmp, version
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, sqlite3.Error)):  # unwritable folder, full disk
            raise write_error(out_dir, exc, "`pipeline build-index`") from None
        raise


def _made_from(features_dir: Path, parts: list[tuple[ShardInfo, np.ndarray]], digest: str | None, t_start: float,
               timings: dict[str, float]) -> dict:
    """The meta.json fields that say from what and how fast a version was made."""
    return {"build_seconds": round(time.monotonic() - t_start, 3),
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "features_dir": str(features_dir.resolve()),
            "shards": [{"name": i.path.name, "count": len(rows), "created": i.created} for i, rows in parts],
            "live_digest": digest}


def _publish(out_dir: Path, tmp: Path, meta: dict, keep: int) -> Path:
    """Write meta.json, make the version durable under its name, point CURRENT at it, prune old ones."""
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    for f in tmp.iterdir():
        fsync_path(f)
    final = out_dir / VERSIONS_DIR / meta["version"]
    os.rename(tmp, final)
    fsync_path(final.parent)
    atomic_write_text(out_dir / CURRENT_FILE, meta["version"] + "\n")
    prune_versions(out_dir, keep)
    return final


def index_is_flat(plan: IndexPlan) -> bool:
    """Exact search: nothing to train, recall 1 by construction."""
    return plan.factory == "Flat"


class _Background(threading.Thread):
    """Run fn(*args) in a thread (faiss and sqlite release the GIL); join() re-raises its error."""

    def __init__(self, fn, *args) -> None:
        super().__init__(daemon=True)
        self.fn, self.args, self.error, self.value = fn, args, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args)
        except BaseException as exc:  # handed to the joining thread
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error

    def get(self):
        """fn's return value (handed over once: the thread keeps no reference), or its error."""
        self.join()
        value, self.value = self.value, None
        return value


@dataclass
class _Base:
    """The published version an update starts from, and the ids to remove from and add to it."""

    dir: Path
    meta: dict
    index: faiss.Index  # memory-mapped or read into memory (_read_for_update): the published file stays as it is
    added: np.ndarray
    removed: np.ndarray


def _read_published(out_dir: Path) -> tuple[Path, faiss.Index]:
    """The published version and its index (_read_for_update)."""
    version = current_version(out_dir)
    return version, _read_for_update(version / INDEX_FILE)


def _read_for_update(path: Path) -> faiss.Index:
    """The index at `path` as an update needs it: memory-mapped when its lists are plain arrays (the
    update then only reads them: _NextLists), else read into memory, where faiss removes and adds."""
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
        if _plain_lists(index):
            return index
    except RuntimeError:  # faiss cannot memory-map this kind
        pass
    return faiss.read_index(str(path))


def _plain_lists(index) -> bool:
    """An IVF index, unwrapped, whose lists are faiss ArrayInvertedLists (Flat, SQ or PQ codes; not
    fast-scan blocks) and which keeps no direct map: what _NextLists can stream."""
    top = faiss.downcast_index(index)
    return (isinstance(top, faiss.IndexIVF) and top.direct_map.type == faiss.DirectMap.NoMap
            and isinstance(faiss.downcast_InvertedLists(top.invlists), faiss.ArrayInvertedLists))


class _FormatChanged(Exception):
    """This faiss serialises IVF lists otherwise than _NextLists writes them: let faiss edit the index."""


class _NextLists:
    """The next version of an IVF index with plain lists, written straight from the published file.

    faiss would read the whole file into memory (2 GB at 1M IVF-Flat: seconds of page faults and
    copying), remove and add there, and write it all out again. Here the published file is only
    memory-mapped and each list of the new file is its kept entries, copied from the map, followed by
    the added ones, so every byte is copied once. The file is faiss's own format: the header is faiss's
    serialisation of the same index with empty lists (quantizer, parameters, the new ntotal), the
    lists follow as faiss writes ArrayInvertedLists (tests/test_update.py checks the bytes against
    faiss.serialize_index), and faiss reads it back before it is tuned and published.
    """

    def __init__(self, index, path: Path, removed: np.ndarray, added: list[tuple]) -> None:
        self.index = index  # owns what the downcast views below point into
        self.ivf = faiss.downcast_index(index)
        self.old = faiss.downcast_InvertedLists(self.ivf.invlists)
        nlist, self.code_size = self.ivf.nlist, self.ivf.code_size
        self.old_sizes = np.array([self.old.list_size(i) for i in range(nlist)], np.int64)
        old_ids = _stored_ids(index)  # in list order
        self.keep = ~np.isin(old_ids, removed)
        # The added vectors are encoded and assigned by a copy of the index with empty lists.
        self.new = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)  # an IVF (_plain_lists), owned here
        empty = faiss.ArrayInvertedLists(nlist, self.code_size)
        self.new.replace_invlists(empty, True)
        empty.this.disown()  # the index owns it now
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
        self.added = faiss.downcast_InvertedLists(self.new.invlists)
        self.new_sizes = np.array([self.added.list_size(i) for i in range(nlist)], np.int64)
        kept = np.concatenate([[0], np.cumsum(self.keep)])
        self.starts = np.concatenate([[0], np.cumsum(self.old_sizes)])
        self.sizes = kept[self.starts[1:]] - kept[self.starts[:-1]] + self.new_sizes
        self.head = serialised[:-len(empty_lists)] + lists + b"full" + np.array([nlist], np.uint64).tobytes() \
            + self.sizes.astype(np.uint64).tobytes()
        # Each stored id's list, for recall read from list membership (probed_truth).
        self.list_ids = np.concatenate([old_ids[self.keep], _stored_ids(self.new)])
        self.list_of = np.concatenate([np.repeat(np.arange(nlist), self.old_sizes)[self.keep],
                                       np.repeat(np.arange(nlist), self.new_sizes)])

    def write(self, path: Path) -> None:
        """Write the new index file and fsync it."""
        cs = self.code_size
        with open(path, "wb") as fh:
            fh.write(self.head)
            for i in np.flatnonzero(self.sizes):
                n, m = int(self.old_sizes[i]), int(self.new_sizes[i])
                keep = self.keep[self.starts[i]:self.starts[i + 1]]
                if n:
                    codes = faiss.rev_swig_ptr(self.old.get_codes(int(i)), n * cs).reshape(n, cs)
                    ids = faiss.rev_swig_ptr(self.old.get_ids(int(i)), n)
                    fh.write(codes[keep] if not keep.all() else codes)
                if m:
                    fh.write(faiss.rev_swig_ptr(self.added.get_codes(int(i)), m * cs))
                if n:
                    fh.write(ids[keep] if not keep.all() else ids)
                if m:
                    fh.write(faiss.rev_swig_ptr(self.added.get_ids(int(i)), m))
            fh.flush()
            os.fsync(fh.fileno())

    def exact_probes(self) -> bool:
        """IVF-Flat with an exact (flat) quantizer: a search at nprobe p finds exactly the true
        neighbours in the query's p nearest lists, so recall can be read from list membership."""
        return isinstance(self.ivf, faiss.IndexIVFFlat) and isinstance(faiss.downcast_index(self.ivf.quantizer),
                                                                       faiss.IndexFlat)

    def probed_truth(self, queries: np.ndarray, truth: np.ndarray) -> _ProbedTruth:
        order = np.argsort(self.list_ids)
        pos = np.minimum(np.searchsorted(self.list_ids, truth, sorter=order), len(order) - 1)
        lists = np.where(self.list_ids[order[pos]] == truth, self.list_of[order[pos]], -1)
        return _ProbedTruth(self.ivf.quantizer, self.ivf.nlist, queries, truth, lists)


class _ProbedTruth:
    """What an IVF-Flat search of `queries` finds of their true neighbours at any nprobe, from which
    list holds each neighbour and the order in which each query probes the lists: searches like a
    faiss index (search(x, k, params)), for tune_nprobe, without scanning a list. The neighbours a
    search finds beyond the true ones do not count in recall_at, so they are left out (-1)."""

    def __init__(self, quantizer, nlist: int, queries: np.ndarray, truth: np.ndarray, lists: np.ndarray) -> None:
        _, probes = quantizer.search(queries, nlist)
        rank = np.empty_like(probes)
        np.put_along_axis(rank, probes, np.arange(nlist)[None, :], axis=1)
        self.truth = truth
        self.rank = np.where(lists >= 0, np.take_along_axis(rank, np.maximum(lists, 0), axis=1), nlist)

    def search(self, x: np.ndarray, k: int, params) -> tuple[None, np.ndarray]:
        return None, np.where(self.rank[:, :k] < params.nprobe, self.truth[:, :k], -1)


def _index_of(version: Path, prefetch: _Background | None) -> faiss.Index:
    """The index of `version`: the one `prefetch` read (_read_published, started before the lock was
    taken) if that was this version, else read now. Versions never change once published, so an index
    read before the lock is that version's as long as CURRENT still names it."""
    if prefetch is not None:
        try:
            read, index = prefetch.get()
            if read == version:
                return index
        except (PipelineError, RuntimeError):  # read again below, now under the lock
            pass
    return _read_for_update(version / INDEX_FILE)


def _update_base(out_dir: Path, checksum: str, kind: str, factory: str | None, nlist: int | None, rerank: int | None,
                 ids: np.ndarray, retrain_above: float, prefetch: _Background | None = None) -> _Base | None:
    """The published version when an update can make the next one from it, else None (and the log
    says why: a full build follows). `prefetch`: its index, being read since the build started."""
    try:
        published = current_version(out_dir)
        meta = json.loads((published / META_FILE).read_text())
    except (PipelineError, OSError, ValueError):
        LOG.info("index: no published version to update: full build")
        return None
    why = ("it has no stable ids (an older format)" if meta.get("ids") != "catalog" else
           "another model made it" if meta.get("model", {}).get("checksum") != checksum else
           f"it is {meta.get('kind')}, the plan is {kind}" if meta.get("kind") != kind else
           f"--factory {factory} is not its {meta['factory']}" if factory and factory != meta["factory"] else
           f"--nlist {nlist} is not its {meta['nlist']}" if nlist and nlist != meta["nlist"] else
           f"--rerank {rerank} is not its {meta.get('rerank', 0)}" if rerank is not None and rerank != meta.get("rerank", 0) else
           "its recall sample is missing" if meta["factory"] != "Flat" and not (published / RECALL_FILE).is_file() else
           _store_fault(published, meta))
    if why is None:
        try:
            db = sqlite3.connect(f"file:{published / IDS_FILE}?mode=ro", uri=True)
            try:
                (listed,) = db.execute("SELECT count(*) FROM images").fetchone()
            finally:
                db.close()
            why = f"its id table lists {listed} images, not its {meta['count']}" if listed != meta["count"] else None
        except sqlite3.Error as exc:
            why = f"its id table cannot be read ({exc})"
    if why is None:
        try:
            index = _index_of(published, prefetch)
        except RuntimeError as exc:  # damaged or missing: the full build replaces it
            why = f"its index file cannot be read ({cause(exc)})"
    if why is None:
        old = _stored_ids(index)
        why = f"its index holds {len(old)} vectors, not its {meta['count']}" if len(old) != meta["count"] else None
    if why is not None:
        LOG.info("index: full build, not an update of %s: %s", published.name, why)
        return None
    # Both sides are unique ids: assume_unique keeps numpy off the sort path (1.8 s -> 10 ms at 1M).
    added, removed = np.setdiff1d(ids, old, assume_unique=True), np.setdiff1d(old, ids, assume_unique=True)
    changes = meta["changes_since_training"] + len(added) + len(removed)
    if changes > retrain_above * meta["trained_count"]:
        LOG.info("index: full build: %d images added or removed since the index was trained on %d "
                 "(over --retrain-above %g)", changes, meta["trained_count"], retrain_above)
        return None
    return _Base(published, meta, index, added, removed)


def _store_fault(version: Path, meta: dict) -> str | None:
    """Why the re-rank vector store of a version that re-ranks cannot be updated, or None."""
    if not meta.get("rerank"):
        return None
    try:
        stored = len(VectorStore.open(version))
    except PipelineError as exc:
        return str(exc)
    return f"its vector store holds {stored} vectors, not its {meta['count']}" if stored != meta["count"] else None


def _update(base: _Base, out_dir: Path, parts: list[tuple[ShardInfo, np.ndarray]], ids: np.ndarray, model: dict,
            features_dir: Path, digest: str, nprobe: int | None, target: float, keep: int,
            t_start: float) -> IndexReport:
    """Publish a version made from `base`: its index without the removed ids and with the added ones
    (the trained quantizer kept), its id table and vector store likewise, nprobe tuned again on its
    recall queries, whose exact neighbours are updated by the same changes (no pass over the whole
    collection). The new index file is written and made durable while the rest goes on.
    t_start: when the build began (reading the published version is part of the update)."""
    timings = {"read_s": time.monotonic() - t_start}
    LOG.info("index: updating %s (%d added, %d removed)", base.dir.name, len(base.added), len(base.removed))
    index, nlist, rerank = base.index, base.meta["nlist"], base.meta.get("rerank", 0)
    measured = base.meta["factory"] != "Flat"  # exact search needs no recall queries
    if measured:
        with np.load(base.dir / RECALL_FILE) as recall:
            q_ids, queries, depth, truth, scores = (recall[k] for k in ("ids", "queries", "depth", "truth", "scores"))
        # Removed neighbours leave the lists; each list stays exact down to `depth` (the removed ones above it less).
        gone = np.isin(truth, base.removed)
        depth = depth - (gone & (np.arange(gone.shape[1]) < depth[:, None])).sum(axis=1)
        heap = faiss.ResultHeap(len(q_ids), TRUTH_DEPTH, keep_max=True)
        heap.add_result(np.where(gone, -np.inf, scores).astype(np.float32), np.where(gone, -1, truth))
    with _new_version(out_dir) as (tmp, version):
        t0 = time.monotonic()
        added = list(_rows_with_ids(parts, ids, base.added))
        id_table = _Background(_update_ids, base.dir / IDS_FILE, tmp / IDS_FILE, base.removed, added)
        if measured:
            for feats, new_ids, _, _ in added:
                _add_truth(heap, queries, feats, new_ids)
        lists = None
        if _plain_lists(index):
            try:
                lists = _NextLists(index, base.dir / INDEX_FILE, base.removed, added)
            except _FormatChanged as exc:  # a faiss newer than this code: the slower way, still right
                LOG.warning("%s; the update reads the published index into memory instead", exc)
                index = faiss.read_index(str(base.dir / INDEX_FILE))
        if lists is not None:
            index_writer = _Background(lists.write, tmp / INDEX_FILE)
        else:  # fast-scan blocks, id maps, or faiss's own editing: the index read into memory
            index.remove_ids(base.removed)
            for feats, new_ids, _, _ in added:
                index.add_with_ids(feats, new_ids)
            index_writer = _Background(_write_durably, index, tmp / INDEX_FILE)
        timings["add_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        if rerank:  # the store first: tuning measures the whole path, as the full build's does
            added_ids = np.concatenate([a[1] for a in added] + [np.zeros(0, np.int64)])
            update_store(base.dir, tmp, base.removed, added_ids,
                         np.concatenate([a[0] for a in added] + [np.zeros((0, base.meta["dim"]), np.float32)]))
        if measured:
            heap.finalize()
            # A query still counts if it is live and its first k+1 neighbours are still known exactly.
            ok = (depth >= 11) & ~np.isin(q_ids, base.removed)
            truth, scores, q_ids, queries, depth = heap.I[ok], heap.D[ok], q_ids[ok], queries[ok], depth[ok]
            np.savez(tmp / RECALL_FILE, ids=q_ids, queries=queries, truth=truth, scores=scores, depth=depth)
        # IVF-Flat is tuned from list membership while its file is written; other kinds search the new file.
        probed = lists is not None and measured and not rerank and lists.exact_probes()
        if not probed:
            index = _written(index_writer, out_dir, tmp / INDEX_FILE, lists is not None, index, len(ids))
        if measured:
            trained = base.meta.get("trained_recall_at_10")  # absent from versions made before it was kept
            searched = (lists.probed_truth(queries, truth) if probed else
                        Reranked(index, VectorStore.open(tmp), rerank) if rerank else index)
            tuning = _tune(searched, nlist, queries, q_ids, truth, nprobe, target, base.meta["nprobe"],
                           None if trained is None else trained - HOLD_SLACK)
        else:
            tuning = {"nprobe": None, "recall_at_10": 1.0, "recall_note": "exact search"}
        timings["tune_s"] = time.monotonic() - t0
        if probed:
            index = _written(index_writer, out_dir, tmp / INDEX_FILE, True, index, len(ids))
            tuning = _timed(index, queries, tuning)
        id_table.join()
        timings["write_s"] = time.monotonic() - t0
        meta = {
            **base.meta,
            **tuning,
            "pipeline_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": version,
            "model": model,
            "count": len(ids),
            "made_by": "update",
            "base_version": base.meta["version"],
            "added": len(base.added),
            "removed": len(base.removed),
            "changes_since_training": base.meta["changes_since_training"] + len(base.added) + len(base.removed),
            **_made_from(features_dir, parts, digest, t_start, timings),
        }
        final = _publish(out_dir, tmp, meta, keep)
    LOG.info("published %s: %d vectors, updated from %s, nprobe %s", final, len(ids), base.meta["version"],
             meta.get("nprobe"))
    return IndexReport(str(final), meta)


def _written(writer: _Background, out_dir: Path, path: Path, streamed: bool, index, n: int):
    """The new index once `writer` has written it to `path`: read back memory-mapped if it was
    streamed (faiss reading it whole is the check), else `index`, the one in memory it wrote."""
    try:
        writer.join()
    except (RuntimeError, OSError) as exc:  # the file could not be written
        raise write_error(out_dir, exc, "`pipeline build-index`") from None
    if streamed:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    assert index.ntotal == n, f"index holds {index.ntotal} vectors, expected {n}"
    return index


def _timed(index, queries: np.ndarray, tuning: dict, sample: int = 200) -> dict:
    """`tuning` with the ms per query of a real search at its nprobe, on the first `sample` recall
    queries: tuning from list membership searched nothing, so its sweep's times are dropped."""
    t0 = time.perf_counter()
    index.search(queries[:sample], 11, params=faiss.SearchParametersIVF(nprobe=tuning["nprobe"]))
    ms = (time.perf_counter() - t0) * 1000 / len(queries[:sample])
    LOG.info("nprobe %s: %.3f ms/query (%d queries searched)", tuning["nprobe"], ms, len(queries[:sample]))
    return {**tuning, "query_ms": round(ms, 4),
            "nprobe_sweep": [{k: v for k, v in s.items() if k != "ms_per_query"} for s in tuning["nprobe_sweep"]],
            "recall_note": "nprobe tuned from the lists that hold each query's true neighbours (IVF-Flat: exact)"}


def _write_durably(index, path: Path) -> None:
    """Write the index file and fsync it, so that publishing finds it on disk already."""
    faiss.write_index(index, str(path))
    fsync_path(path)


def _update_ids(old: Path, new: Path, removed: np.ndarray, added: list[tuple]) -> None:
    """Write the id table `new`: a copy of `old` (only read) without the `removed` ids and with the
    `added` rows (_rows_with_ids' blocks), durable when it returns."""
    shutil.copyfile(old, new)
    db = sqlite3.connect(new)
    try:
        db.execute("PRAGMA journal_mode=OFF")  # a failed update discards the whole version folder
        db.executemany("DELETE FROM images WHERE id = ?", ((i,) for i in removed.tolist()))
        for _, new_ids, paths, hashes in added:
            db.executemany("INSERT INTO images VALUES (?, ?, ?)", zip(new_ids.tolist(), paths, hashes))
        db.commit()
    finally:
        db.close()
    fsync_path(new)


def _rows_with_ids(parts: list[tuple[ShardInfo, np.ndarray]], ids: np.ndarray, wanted: np.ndarray):
    """Features, ids, paths and content hashes of the indexed rows whose id is in `wanted`, shard by shard."""
    take = np.isin(ids, wanted)
    offset = 0
    for info, rows in parts:
        mine = take[offset:offset + len(rows)]
        if mine.any():
            data = read_shard(info.path)
            sel = rows[mine]
            yield (np.ascontiguousarray(data.features[sel], dtype=np.float32), ids[offset:offset + len(rows)][mine],
                   [data.paths[r] for r in sel], [data.hashes[r] for r in sel])
        offset += len(rows)


def write_ids(parts: list[tuple[ShardInfo, np.ndarray]], ids: np.ndarray, ids_path: Path,
              features: queue.Queue | None = None, store: StoreWriter | None = None) -> None:
    """Write the id table: `ids` are the stable ids of the shards' live rows, in order. With
    `features`, put each shard's live feature rows there on the way (None after an error); with
    `store`, add them to that vector store (closed by the caller)."""
    db = sqlite3.connect(ids_path)
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL, hash TEXT NOT NULL)")
        offset = 0
        for info, rows in parts:
            data = read_shard(info.path, features=features is not None or store is not None)
            if features is not None:
                features.put(data.features[rows])
            if store is not None:
                store.add(ids[offset:offset + len(rows)], data.features[rows])
            db.executemany("INSERT INTO images VALUES (?, ?, ?)",
                           zip(ids[offset:offset + len(rows)].tolist(), (data.paths[r] for r in rows),
                               (data.hashes[r] for r in rows)))
            offset += len(rows)
        db.execute("CREATE INDEX images_path ON images(path)")
        db.commit()
    except BaseException:
        if features is not None:
            features.put(None)  # unblock the consumer; join() re-raises
        raise
    finally:
        db.close()


def _fill(index, parts: list[tuple[ShardInfo, np.ndarray]], ids: np.ndarray, ids_path: Path,
          queries: np.ndarray | None, progress: bool | None,
          store: StoreWriter | None = None) -> tuple[tuple[np.ndarray, np.ndarray] | None, _Background]:
    """Add every shard to the index under `ids`, streaming; meanwhile a thread reads the next shard and
    writes the id table (and the vector `store`, if given). With `queries`, the exact top-TRUTH_DEPTH of
    each query is gathered on the way (for recall). Returns the exact neighbours' ids and scores, and the id-table thread (join it
    before publishing)."""
    features: queue.Queue = queue.Queue(maxsize=2)  # at most two shards in memory beyond the index
    reader = _Background(write_ids, parts, ids, ids_path, features, store)
    heap = faiss.ResultHeap(len(queries), TRUTH_DEPTH, keep_max=True) if queries is not None else None
    offset = 0
    with Progress(sum(len(rows) for _, rows in parts), "index", enabled=progress) as bar:
        for _ in parts:
            feats = features.get()
            if feats is None:
                reader.join()
            feats = np.ascontiguousarray(feats, dtype=np.float32)
            block = ids[offset:offset + len(feats)]
            index.add_with_ids(feats, block)
            if heap is not None:
                _add_truth(heap, queries, feats, block)
            offset += len(feats)
            bar.update(len(feats))
    if heap is None:
        return None, reader
    heap.finalize()
    return (heap.I, heap.D), reader


def _add_truth(heap, queries: np.ndarray, feats: np.ndarray, ids: np.ndarray) -> None:
    """Offer the exact neighbours of `queries` among `feats` (which have `ids`) to `heap`."""
    d, i = faiss.knn(queries, feats, min(heap.k, len(feats)), metric=faiss.METRIC_INNER_PRODUCT)
    heap.add_result(d, np.where(i >= 0, ids[i], -1))


def _tune(index, nlist: int, queries: np.ndarray, q_ids: np.ndarray, truth: np.ndarray,
          nprobe: int | None, target: float, start: int | None = None, hold: float | None = None) -> dict:
    """Recall@10 against exact search, and the nprobe that reaches `target` (and `hold`: tune_nprobe)."""
    k = 10
    if nlist:
        nprobe, rec, ms, tried = tune_nprobe(index, queries, q_ids, truth, nlist, k, target, nprobe, start, hold)
    else:
        t0 = time.perf_counter()
        _, found = index.search(queries, k + 1)
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        rec, tried = float(recall_at(found, truth, q_ids, k).mean()), []
    LOG.info("nprobe %s: recall@10 %.3f, %.3f ms/query (%d queries)", nprobe, rec, ms, len(q_ids))
    return {"nprobe": nprobe, "recall_at_10": round(rec, 4), "target_recall": target,
            "recall_queries": len(q_ids), "query_ms": round(ms, 4), "nprobe_sweep": tried}


def sample_runs(rng: np.random.Generator, n: int, size: int, reads: int = SAMPLE_READS) -> np.ndarray:
    """`size` distinct positions of `n`, sorted, drawn at random as runs of consecutive positions, so that
    reading them from the shards costs about `reads` reads, not one per row: on this project's disk a
    random read costs ~6 ms, and 262,144 rows one by one took minutes of a 10M build. Positions
    follow the extraction order (a folder's images are neighbours); runs of 64 among 4,096 spread
    over the whole collection keep the k-means sample representative."""
    if size >= n:
        return np.arange(n)
    run = -(-size // reads)
    if run == 1:
        return np.sort(rng.choice(n, size=size, replace=False))
    starts = np.sort(rng.choice(n // run, size=-(-size // run), replace=False)) * run
    return (starts[:, None] + np.arange(run)).ravel()[:size]


def _rows_by_id(parts: list[tuple[ShardInfo, np.ndarray]], ids: np.ndarray) -> np.ndarray:
    """Feature rows by global id (sorted; ids count the indexed rows in order), read shard by shard
    (whole shards when many of their rows are wanted)."""
    starts = np.concatenate([[0], np.cumsum([len(rows) for _, rows in parts])])
    out = []
    for s, (info, rows) in enumerate(parts):
        wanted = rows[ids[(ids >= starts[s]) & (ids < starts[s + 1])] - starts[s]]
        if len(wanted) > info.count // 8:
            out.append(read_shard(info.path).features[wanted])
        elif len(wanted):
            out.append(read_rows(info.path, wanted))
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def current_version(index_dir: Path) -> Path:
    """The published version folder (resolve once and keep it: later publishes don't affect it)."""
    pointer = index_dir / CURRENT_FILE
    if not index_dir.is_dir():
        raise PipelineError(f"index folder not found: {index_dir}")
    fix = (f"run `pipeline build-index` (or `pipeline rebuild`) to publish a new version, or write the name "
           f"of one of {index_dir / VERSIONS_DIR}/* into it")
    try:
        version = pointer.read_text().strip()
    except FileNotFoundError:
        raise PipelineError(f"{index_dir} holds no published index (no {CURRENT_FILE} file); run `pipeline build-index`") from None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8
        raise PipelineError(f"{pointer} is damaged ({cause(exc)}); {fix}") from None
    if not version or not version.isprintable() or version != Path(version).name or version.startswith("."):
        raise PipelineError(f"{pointer} is damaged: it names {version[:40]!r}, not a version folder; {fix}")
    path = index_dir / VERSIONS_DIR / version
    if not path.is_dir():
        raise PipelineError(f"{pointer} names version {version}, which does not exist; {fix}")
    return path


def prune_versions(index_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` versions (never the current one) and stale temporaries."""
    versions = index_dir / VERSIONS_DIR
    current = (index_dir / CURRENT_FILE).read_text().strip()
    names = sorted(p.name for p in versions.iterdir() if p.is_dir() and not p.name.startswith("."))
    doomed = [v for v in names[:-keep] if v != current]
    doomed += [p.name for p in versions.iterdir() if p.name.startswith(".tmp-")]  # left by killed builds
    for name in doomed:
        shutil.rmtree(versions / name, ignore_errors=True)
    return doomed

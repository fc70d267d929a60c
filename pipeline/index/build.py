"""build_index: shards -> a FAISS inner-product index, tuned and published atomically as a new version.

A full build trains, fills and tunes; with `update`, the published version is edited instead when it
allows it (update.py); binary codes are built by binary.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np

from ..errors import PipelineError, write_error
from ..features import check_model, live_parts, shard_model
from ..fsutil import exclusive_lock
from .annotate import make_metadata, metadata_files
from .binary import build_binary
from .codes import parse_codes
from .fill import TRUTH_DEPTH, FillDistributor, Truth, fill_index, rows_at, sample_runs
from .idtable import IDS_FILE
from .plan import DEFAULT_FLAT_BELOW, IndexPlan, index_is_flat, new_index, plan_index
from .store import Reranked, StoreWriter, VectorStore
from .tune import DEFAULT_TARGET_RECALL, Searchable, exact_tuning, tune
from .update import DEFAULT_RETRAIN_ABOVE, read_published, update_base, update_version
from .versions import (
    DEFAULT_KEEP,
    INDEX_FILE,
    RECALL_FILE,
    Collection,
    IndexReport,
    asked_for,
    built_fields,
    made_from,
    model_record,
    new_version,
    publish_version,
)

LOG = logging.getLogger(__name__)


def build_index(
    features_dir: Path | str,
    out_dir: Path | str,
    *,
    factory: str | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    flat_below: int = DEFAULT_FLAT_BELOW,
    train_per_list: int = 64,
    target_recall: float = DEFAULT_TARGET_RECALL,
    recall_queries: int = 1000,
    max_memory: int | str | None = None,
    keep: int = DEFAULT_KEEP,
    seed: int = 0,
    distributor: FillDistributor | None = None,
    progress: bool | None = None,
    update: bool = False,
    retrain_above: float = DEFAULT_RETRAIN_ABOVE,
    rerank: int | None = None,
    codes: str | None = None,
    metadata: Sequence[Path | str] = (),
) -> IndexReport:
    """Build an index from every shard in `features_dir` and publish it as the current version of `out_dir`.

    With `update`, the new version is made from the published one (remove the ids no longer live,
    add the new ones, keep the trained quantizer, re-tune nprobe) when it was made by the same
    model and kind of index and the changes since its training stay within `retrain_above` of
    the count it was trained on; otherwise (and without `update`) a full build trains again.
    distributor: fills an IVF index on workers of its own (fill.FillDistributor, e.g. a Ray cluster:
    distributed.RayDistributor), into the index a local build trains here, with the same result.
    rerank: candidates re-ranked exactly from the version's float16 vector store (store.py);
    None: DEFAULT_RERANK for compressed codes, none for exact ones; 0: no store, no re-ranking.
    codes: 'binary[:BITS]' builds the coarse-to-fine kind instead (codes.py, binary.py): learned binary
    codes searched by Hamming distance, candidates re-ranked from the full features; `factory` may then
    name a faiss binary index ('BHNSW32') and `nprobe` fix its setting. Never updated in place.
    metadata: the user's metadata files (index.userfields: CSV or JSON lines keyed by path), stored with the
    version as fields to filter on; none given: those the published version was made with.
    """
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    _check_codes_options(codes, distributor=distributor, max_memory=max_memory, nlist=nlist)
    _check_options(features_dir, keep=keep, target_recall=target_recall, retrain_above=retrain_above)
    tuning = _Tuning(nprobe, target_recall, recall_queries, seed)
    asked = asked_for(factory=factory, nlist=nlist, nprobe=nprobe, max_memory=max_memory, rerank=rerank, codes=codes)
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="build-index") as pool:
        # An update reads the published index (GBs) meanwhile, in a thread: faiss releases the GIL.
        prefetch = pool.submit(read_published, out_dir) if update and codes is None else None
        source = replace(_collection(features_dir), metadata_files=metadata_files(out_dir, metadata, features_dir))
        if codes is not None:
            return _build_codes(source, out_dir, codes, factory, tuning, update, keep, progress, pool)
        plan, index, kind = _planned_index(source, factory, nlist, flat_below, train_per_list, max_memory, rerank)
        t_start = time.monotonic()
        with exclusive_lock(out_dir, "pipeline build-index"):
            base = None
            if update and source.stable:
                base = update_base(
                    out_dir, source.model["checksum"], kind, factory, nlist, rerank, source.ids, retrain_above, prefetch
                )
            prefetch = None  # a full build does not keep the published index in memory
            if base is not None:
                return update_version(base, source, out_dir, nprobe, target_recall, keep, t_start, pool)
            return _full_build(
                index, plan, kind, source, out_dir, tuning, asked, keep, progress, distributor, pool, t_start
            )


def _build_codes(
    source: Collection,
    out_dir: Path,
    codes: str,
    factory: str | None,
    tuning: _Tuning,
    update: bool,
    keep: int,
    progress: bool | None,
    pool: Executor,
) -> IndexReport:
    """The binary-codes kind is built by binary.py, always in full: its codes are learned from the whole collection."""
    bits = parse_codes(codes, source.dim)
    if update:
        LOG.info("index: full build, not an update: binary codes are learned from the whole collection")
    with exclusive_lock(out_dir, "pipeline build-index"):
        return build_binary(
            source,
            out_dir,
            bits=bits,
            factory=factory,
            setting=tuning.nprobe,
            target_recall=tuning.target,
            recall_queries=tuning.queries,
            keep=keep,
            seed=tuning.seed,
            progress=progress,
            pool=pool,
        )


def _planned_index(
    source: Collection,
    factory: str | None,
    nlist: int | None,
    flat_below: int,
    train_per_list: int,
    max_memory: int | str | None,
    rerank: int | None,
) -> tuple[IndexPlan, faiss.Index, str]:
    """The plan for the collection and its empty index, made before the lock: planning errors need no lock."""
    plan = plan_index(
        len(source.ids),
        source.dim,
        factory=factory,
        nlist=nlist,
        flat_below=flat_below,
        train_per_list=train_per_list,
        max_memory=max_memory,
        rerank=rerank,
    )
    LOG.info("index plan: %s (%s)", plan.factory, plan.reason)
    index, kind = new_index(plan, source.dim)
    return plan, index, kind


def _check_codes_options(
    codes: str | None, *, distributor: FillDistributor | None, max_memory: int | str | None, nlist: int | None
) -> None:
    """A one-line error for float-index options given with --codes, checked first: they would be ignored."""
    if codes is not None and (distributor is not None or max_memory is not None or nlist is not None):
        raise PipelineError("--codes binary builds its own index: it takes neither --ray, --max-memory nor --nlist")


def _check_options(features_dir: Path, *, keep: int, target_recall: float, retrain_above: float) -> None:
    """One-line errors for options that cannot work, before any work."""
    if not features_dir.is_dir():
        raise PipelineError(f"features folder not found: {features_dir}")
    if keep < 1:
        raise PipelineError(f"--keep must be at least 1 (got {keep})")
    if not 0 < target_recall <= 1:
        raise PipelineError(f"--target-recall must be in (0, 1] (got {target_recall})")
    if retrain_above < 0:
        raise PipelineError(f"--retrain-above must be at least 0 (got {retrain_above})")


def _collection(features_dir: Path) -> Collection:
    """What to index: the features folder's live rows (features.live_parts), all made by one model,
    whose whole recipe meta.json records (read from the newest shard)."""
    all_infos, parts, ids, digest, roots = live_parts(features_dir)
    if not all_infos:
        raise PipelineError(f"no shards in {features_dir}: run `pipeline extract` first")
    check_model(all_infos)
    newest = all_infos[-1]
    info, model_path = shard_model(newest.path)
    model = model_record(info, model_path, newest.model_sha256)
    return Collection(features_dir, parts, ids, digest, model, all_infos[0].dim, tuple(roots))


@dataclass(frozen=True)
class _Tuning:
    """How a full build measures recall and chooses nprobe."""

    nprobe: int | None  # given: used as it is
    target: float
    queries: int  # recall queries drawn
    seed: int  # of the training sample and the recall queries


@dataclass(frozen=True)
class _Sample:
    """The recall queries of a build: their features and ids, and whether training left them out."""

    queries: np.ndarray
    ids: np.ndarray
    held_out: bool


def _train(index: faiss.Index, plan: IndexPlan, source: Collection, tuning: _Tuning) -> _Sample | None:
    """Draw the recall queries and train the index on its sample (None for an exact index: no queries).
    The queries are vectors the quantizer was not trained on (k-means fits its own training points
    better, which would flatter the recall), unless training used nearly all of them."""
    if index_is_flat(plan):
        return None
    rng = np.random.default_rng(tuning.seed)
    n = len(source.ids)
    n_q = min(tuning.queries, n)
    train_pos = sample_runs(rng, n, 0 if index.is_trained else plan.train_size)
    rest = np.setdiff1d(np.arange(n), train_pos, assume_unique=True)
    held_out = len(rest) >= n_q
    q_pos = np.sort(rng.choice(rest if held_out else np.arange(n), size=n_q, replace=False))
    sample = _Sample(rows_at(source.parts, q_pos), source.ids[q_pos], held_out)  # positions -> the index's ids
    if not index.is_trained:
        LOG.info("training on %d vectors", len(train_pos))
        index.train(rows_at(source.parts, train_pos))
    return sample


def _full_build(
    index: faiss.Index,
    plan: IndexPlan,
    kind: str,
    source: Collection,
    out_dir: Path,
    tuning: _Tuning,
    asked: dict,
    keep: int,
    progress: bool | None,
    distributor: FillDistributor | None,
    pool: Executor,
    t_start: float,
) -> IndexReport:
    """Train, fill, tune and publish a new version (the caller holds the index folder's lock)."""
    n = len(source.ids)
    t0 = time.monotonic()
    sample = _train(index, plan, source, tuning)
    timings = {"train_s": time.monotonic() - t0}
    with new_version(out_dir) as (tmp, version):
        t0 = time.monotonic()
        store = StoreWriter(tmp, n, source.dim) if plan.rerank else None
        truth, ids_writer = fill_index(
            index,
            source.parts,
            source.ids,
            tmp / IDS_FILE,
            None if sample is None else sample.queries,
            progress,
            pool,
            store,
            distributor,
        )
        timings["add_s"] = time.monotonic() - t0
        assert index.ntotal == n, f"index holds {index.ntotal} vectors, expected {n}"
        searched: Searchable = index
        if store is not None:  # tuning measures the whole path: compressed candidates, exact re-ranking
            ids_writer.result()
            store.close()
            searched = Reranked(index, VectorStore.open(tmp), plan.rerank)
        t0 = time.monotonic()
        index_writer = pool.submit(faiss.write_index, index, str(tmp / INDEX_FILE))
        tuned = _tuned(searched, plan, sample, truth, tuning, tmp)
        timings["tune_s"] = time.monotonic() - t0
        try:
            index_writer.result()
        except RuntimeError as exc:  # faiss: the file could not be written
            raise write_error(out_dir, exc, "`pipeline build-index`") from None
        ids_writer.result()
        timings["write_s"] = time.monotonic() - t0
        meta = {
            **built_fields(version, source, plan.factory, kind, asked),
            "bytes_estimate": plan.bytes_estimate,
            "nlist": plan.nlist,
            "reason": plan.reason,
            "train_size": 0 if index_is_flat(plan) or plan.train_size == 0 else plan.train_size,
            "rerank": plan.rerank,
            **tuned,
            "trained_recall_at_10": tuned["recall_at_10"],  # what updates of this version must hold
            **made_from(source, t_start, timings),
        }
        meta["metadata"] = make_metadata(tmp, source, source.metadata_files, out_dir)
        report = publish_version(out_dir, tmp, meta, keep)
    LOG.info("published %s: %d vectors, %s, nprobe %s", report.version_dir, n, plan.factory, meta.get("nprobe"))
    return report


def _tuned(
    searched: Searchable, plan: IndexPlan, sample: _Sample | None, truth: Truth | None, tuning: _Tuning, new_dir: Path
) -> dict:
    """The tuning fields of meta.json, and the recall queries with their exact neighbours saved for
    updates of this version (recall.npz)."""
    if sample is None:
        return exact_tuning()
    assert truth is not None, "a fill given queries returns their exact neighbours"
    np.savez(
        new_dir / RECALL_FILE,
        ids=sample.ids,
        queries=sample.queries,
        truth=truth.ids,
        scores=truth.scores,
        depth=np.full(len(sample.ids), TRUTH_DEPTH),
    )
    return {
        **tune(searched, plan.nlist, sample.queries, sample.ids, truth.ids, tuning.nprobe, tuning.target),
        "recall_queries_held_out_from_training": sample.held_out,
    }

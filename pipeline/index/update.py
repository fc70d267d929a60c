"""The nightly update: the next version made from the published one, without training again.

Its ids removed and added, its quantizer kept, nprobe tuned again on its recall queries, when the
published version allows it (update_base says why not, and a full build follows).

Ids are the catalog's stable image ids (sparse int64, never reused; positions are not ids), so an id names
the same image in every version and a version can be edited instead of filled again.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ..errors import PipelineError, cause, write_error
from ..fsutil import fsync_path
from .annotate import make_metadata
from .fill import TRUTH_DEPTH, ExactNeighbours, Truth, rows_with_ids
from .idtable import IDS_FILE, AddedRows, IdTable, update_ids
from .ivf_rewrite import IvfRewrite, rewrite_ivf, streamable
from .plan import stored_ids
from .store import Reranked, VectorStore, update_store
from .tune import exact_tuning, tune, with_search_time
from .versions import (
    INDEX_FILE,
    RECALL_FILE,
    Collection,
    IndexReport,
    current_version,
    made_from,
    new_version,
    publish_version,
    read_meta,
    updated_fields,
)

LOG = logging.getLogger(__name__)

# An update keeps the trained quantizer while the images added and removed since its training stay
# under this share of the trained count; beyond it the centroids drift from the data and lists grow
# unbalanced (README: rebuild), so a full build trains again.
DEFAULT_RETRAIN_ABOVE = 0.2
# An update tunes nprobe until its mean recall@10 on the recall queries is back at what the version
# reached when its quantizer was trained, less this: the same queries, so at the same nprobe only
# the changes move it (a thousandth or two at 1% new); drift of the centroids from the data raises
# nprobe, that noise does not.
HOLD_SLACK = 0.002


@dataclass
class UpdateBase:
    """The published version an update starts from, and the ids to remove from and add to it."""

    dir: Path
    meta: dict
    index: faiss.Index  # memory-mapped or read into memory (_read_for_update): the published file stays as it is
    added: np.ndarray
    removed: np.ndarray


def read_published(out_dir: Path) -> tuple[Path, faiss.Index]:
    """The published version and its index as an update needs it: started in a thread before the build
    takes its lock (update_base's `prefetch`), since reading a large index takes seconds."""
    version = current_version(out_dir)
    return version, _read_for_update(version / INDEX_FILE)


def _read_for_update(path: Path) -> faiss.Index:
    """The index at `path` as an update needs it: memory-mapped when rewrite_ivf can stream its lists
    (the update then only reads them), else read into memory, where faiss removes and adds."""
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
        if streamable(index):
            return index
    except RuntimeError:  # faiss cannot memory-map this kind
        pass
    return faiss.read_index(str(path))


def _index_of(version: Path, prefetch: Future | None) -> faiss.Index:
    """The index of `version`: the one `prefetch` read (read_published, started before the lock was
    taken) if that was this version, else read now. Versions never change once published, so an index
    read before the lock is that version's as long as CURRENT still names it."""
    if prefetch is not None:
        try:
            read, index = prefetch.result()
            if read == version:
                return index
        except (PipelineError, RuntimeError):  # read again below, now under the lock
            pass
    return _read_for_update(version / INDEX_FILE)


def update_base(
    out_dir: Path,
    checksum: str,
    kind: str,
    factory: str | None,
    nlist: int | None,
    rerank: int | None,
    ids: np.ndarray,
    retrain_above: float,
    prefetch: Future | None = None,
) -> UpdateBase | None:
    """The published version when an update can make the next one from it, else None (and the log
    says why: a full build follows). `prefetch`: its index, being read since the build started."""
    try:
        published = current_version(out_dir)
        meta = read_meta(published)
    except PipelineError:
        LOG.info("index: no published version to update: full build")
        return None
    why = _unlike(published, meta, checksum, kind, factory, nlist, rerank)
    if why is None:
        try:
            index = _index_of(published, prefetch)
        except RuntimeError as exc:  # damaged or missing: the full build replaces it
            why = f"its index file cannot be read ({cause(exc)})"
    if why is None:
        old = stored_ids(index)
        why = f"its index holds {len(old)} vectors, not its {meta['count']}" if len(old) != meta["count"] else None
    if why is not None:
        LOG.info("index: full build, not an update of %s: %s", published.name, why)
        return None
    # Both sides are unique ids: assume_unique keeps numpy off the sort path (1.8 s -> 10 ms at 1M).
    added, removed = np.setdiff1d(ids, old, assume_unique=True), np.setdiff1d(old, ids, assume_unique=True)
    changes = meta["changes_since_training"] + len(added) + len(removed)
    if changes > retrain_above * meta["trained_count"]:
        LOG.info(
            "index: full build: %d images added or removed since the index was trained on %d (over --retrain-above %g)",
            changes,
            meta["trained_count"],
            retrain_above,
        )
        return None
    return UpdateBase(published, meta, index, added, removed)


def _unlike(
    published: Path, meta: dict, checksum: str, kind: str, factory: str | None, nlist: int | None, rerank: int | None
) -> str | None:
    """Why the published version cannot be the base of an update asked for these options, or None."""
    why = (
        "it has no stable ids (an older format)"
        if meta.get("ids") != "catalog"
        else "another model made it"
        if meta.get("model", {}).get("checksum") != checksum
        else f"it is {meta.get('kind')}, the plan is {kind}"
        if meta.get("kind") != kind
        else f"--factory {factory} is not its {meta['factory']}"
        if factory and factory != meta["factory"]
        else f"--nlist {nlist} is not its {meta['nlist']}"
        if nlist and nlist != meta["nlist"]
        else f"--rerank {rerank} is not its {meta.get('rerank', 0)}"
        if rerank is not None and rerank != meta.get("rerank", 0)
        else "its recall sample is missing"
        if meta["factory"] != "Flat" and not (published / RECALL_FILE).is_file()
        else _store_fault(published, meta)
    )
    if why is not None:
        return why
    try:
        with IdTable(published / IDS_FILE) as table:
            listed = table.count()
    except PipelineError as exc:
        return f"its id table cannot be read: {exc}"
    return f"its id table lists {listed} images, not its {meta['count']}" if listed != meta["count"] else None


def _store_fault(version: Path, meta: dict) -> str | None:
    """Why the re-rank vector store of a version that re-ranks cannot be updated, or None."""
    if not meta.get("rerank"):
        return None
    try:
        stored = len(VectorStore.open(version))
    except PipelineError as exc:
        return str(exc)
    return f"its vector store holds {stored} vectors, not its {meta['count']}" if stored != meta["count"] else None


class _Recall:
    """An update's recall queries: the base version's, with their exact neighbours updated by the same
    changes (no pass over the whole collection). Removed neighbours leave each query's list, which stays
    exact down to its depth (the removed ones above it less); added rows are offered to it."""

    truth: np.ndarray  # once saved: the exact neighbour ids of the queries kept

    def __init__(self, base: UpdateBase) -> None:
        with np.load(base.dir / RECALL_FILE) as recall:
            self.ids, self.queries, depth, truth, scores = (
                recall[k] for k in ("ids", "queries", "depth", "truth", "scores")
            )
        gone = np.isin(truth, base.removed)
        self.depth = depth - (gone & (np.arange(gone.shape[1]) < depth[:, None])).sum(axis=1)
        self.near = ExactNeighbours(self.queries, TRUTH_DEPTH)
        self.near.offer(Truth(np.where(gone, -1, truth), np.where(gone, -np.inf, scores).astype(np.float32)))

    def save(self, path: Path, removed: np.ndarray) -> None:
        """Keep the queries that still count (live, and their first k+1 neighbours still known exactly)
        and write them with their neighbours to `path`."""
        found = self.near.result()
        ok = (self.depth >= 11) & ~np.isin(self.ids, removed)
        self.truth, scores = found.ids[ok], found.scores[ok]
        self.ids, self.queries, self.depth = self.ids[ok], self.queries[ok], self.depth[ok]
        np.savez(path, ids=self.ids, queries=self.queries, truth=self.truth, scores=scores, depth=self.depth)


def update_version(
    base: UpdateBase,
    source: Collection,
    out_dir: Path,
    nprobe: int | None,
    target: float,
    keep: int,
    t_start: float,
    pool: Executor,
) -> IndexReport:
    """Publish a version made from `base`: its index without the removed ids and with the added ones
    (the trained quantizer kept), its id table and vector store likewise, nprobe tuned again on its
    recall queries. The new index file is written and made durable in a thread of `pool` while the rest
    goes on. t_start: when the build began (reading the published version is part of the update)."""
    timings = {"read_s": time.monotonic() - t_start}
    LOG.info("index: updating %s (%d added, %d removed)", base.dir.name, len(base.added), len(base.removed))
    n, rerank = len(source.ids), base.meta.get("rerank", 0)
    recall = _Recall(base) if base.meta["factory"] != "Flat" else None  # exact search needs no recall queries
    with new_version(out_dir) as (tmp, version):
        t0 = time.monotonic()
        added = list(rows_with_ids(source.parts, source.ids, base.added))
        id_table = pool.submit(update_ids, base.dir / IDS_FILE, tmp / IDS_FILE, base.removed, added)
        if recall is not None:
            for feats, new_ids, _, _ in added:
                recall.near.offer_rows(feats, new_ids)
        rewrite, index, index_writer = _edit_index(base, added, tmp / INDEX_FILE, pool)
        timings["add_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        if rerank:  # the store first: tuning measures the whole path, as the full build's does
            _update_store(base, tmp, added)
        if recall is not None:
            recall.save(tmp / RECALL_FILE, base.removed)
        # IVF-Flat is tuned from list membership while its file is written; other kinds search the new file.
        exact_probes = recall is not None and not rerank and rewrite is not None and rewrite.exact_probes()
        probed = rewrite if exact_probes else None
        if probed is None:
            index = _written(index_writer, out_dir, tmp / INDEX_FILE, rewrite is not None, index, n)
        tuning = _tuned(base, recall, probed, index, tmp, nprobe, target)
        timings["tune_s"] = time.monotonic() - t0
        if probed is not None:
            assert recall is not None, "only a version with recall queries is tuned from list membership"
            index = _written(index_writer, out_dir, tmp / INDEX_FILE, True, index, n)
            tuning = with_search_time(index, recall.queries, tuning)
        id_table.result()
        timings["write_s"] = time.monotonic() - t0
        changes = updated_fields(version, source, base.meta, len(base.added), len(base.removed))
        meta = {**base.meta, **tuning, **changes, **made_from(source, t_start, timings)}
        meta["metadata"] = make_metadata(tmp, source, source.metadata_files, out_dir)
        report = publish_version(out_dir, tmp, meta, keep)
    LOG.info(
        "published %s: %d vectors, updated from %s, nprobe %s",
        report.version_dir,
        n,
        base.meta["version"],
        meta.get("nprobe"),
    )
    return report


def _edit_index(
    base: UpdateBase, added: list[AddedRows], path: Path, pool: Executor
) -> tuple[IvfRewrite | None, faiss.Index, Future]:
    """Start writing the new index to `path`: rewritten from the published file's lists (rewrite_ivf) when
    they can be streamed, else edited by faiss in memory (fast-scan blocks, id maps, or a faiss that
    writes lists otherwise). Returns the rewrite (if so), the index in memory or mapped, and the writer."""
    index = base.index
    rewrite = rewrite_ivf(index, base.dir / INDEX_FILE, base.removed, added) if streamable(index) else None
    if rewrite is not None:
        return rewrite, index, pool.submit(rewrite.write, path)
    if streamable(index):  # memory-mapped, which faiss cannot edit: read it whole
        index = faiss.read_index(str(base.dir / INDEX_FILE))
    index.remove_ids(faiss.IDSelectorBatch(base.removed))
    for feats, new_ids, _, _ in added:
        index.add_with_ids(feats, new_ids)
    return None, index, pool.submit(_write_durably, index, path)


def _update_store(base: UpdateBase, new_dir: Path, added: list[AddedRows]) -> None:
    """The new version's vector store: the base's without the removed rows, with the added ones."""
    added_ids = np.concatenate([a[1] for a in added] + [np.zeros(0, np.int64)])
    update_store(
        base.dir,
        new_dir,
        base.removed,
        added_ids,
        np.concatenate([a[0] for a in added] + [np.zeros((0, base.meta["dim"]), np.float32)]),
    )


def _tuned(
    base: UpdateBase,
    recall: _Recall | None,
    probed: IvfRewrite | None,
    index: faiss.Index,
    new_dir: Path,
    nprobe: int | None,
    target: float,
) -> dict:
    """nprobe tuned again from the base's (tune_nprobe's `start`), held at the recall the quantizer reached
    when it was trained: on list membership when `probed`, else searching the new index (re-ranked
    from the new vector store when the version re-ranks)."""
    if recall is None:
        return exact_tuning()
    rerank = base.meta.get("rerank", 0)
    trained = base.meta.get("trained_recall_at_10")  # absent from versions made before it was kept
    searched = (
        probed.probed_truth(recall.queries, recall.truth)
        if probed is not None
        else Reranked(index, VectorStore.open(new_dir), rerank)
        if rerank
        else index
    )
    return tune(
        searched,
        base.meta["nlist"],
        recall.queries,
        recall.ids,
        recall.truth,
        nprobe,
        target,
        base.meta["nprobe"],
        None if trained is None else trained - HOLD_SLACK,
    )


def _written(writer: Future, out_dir: Path, path: Path, streamed: bool, index: faiss.Index, n: int) -> faiss.Index:
    """The new index once `writer` has written it to `path`: read back memory-mapped if it was
    streamed (faiss reading it whole is the check), else `index`, the one in memory it wrote."""
    try:
        writer.result()
    except (RuntimeError, OSError) as exc:  # the file could not be written
        raise write_error(out_dir, exc, "`pipeline build-index`") from None
    if streamed:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    assert index.ntotal == n, f"index holds {index.ntotal} vectors, expected {n}"
    return index


def _write_durably(index: faiss.Index, path: Path) -> None:
    """Write the index file and fsync it, so that publishing finds it on disk already."""
    faiss.write_index(index, str(path))
    fsync_path(path)

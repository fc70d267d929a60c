"""The index stage: shards -> a FAISS inner-product index, tuned, saved and published atomically.

Layout of an index folder:
  CURRENT                 name of the published version (replaced by rename)
  versions/<version>/     index.faiss, ids.sqlite (id -> path, content hash), meta.json
Readers resolve CURRENT once and keep that version; a build never touches a published version.
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
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import faiss
import numpy as np

from . import __version__
from .errors import PipelineError, cause, write_error
from .fsutil import atomic_write_text, exclusive_lock, fsync_dir
from .catalog import CATALOG_FILE, Catalog
from .progress import Progress
from .shards import ShardInfo, check_model, list_shards, read_rows, read_shard, shard_info

LOG = logging.getLogger(__name__)

INDEX_FILE, IDS_FILE, META_FILE, CURRENT_FILE, VERSIONS_DIR = "index.faiss", "ids.sqlite", "meta.json", "CURRENT", "versions"
META_SCHEMA = 1
MIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid
DEFAULT_FLAT_BELOW = 20_000  # under this, exact search over 512-d is about a millisecond: IVF buys nothing


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    nlist: int  # 0 when the index has no IVF layer
    train_size: int
    reason: str
    bytes_estimate: int = 0  # memory of the filled index, estimated before building it


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
               max_memory: int | str | None = None) -> IndexPlan:
    """Choose the index for n vectors of `dim`, with the reasoning.

    Exact (Flat) below `flat_below`; else IVF with nlist the power of two >= 4 sqrt(n) (faiss
    guidance: 4..16 sqrt(n)), capped so each list has >= 39 training points. With `max_memory`
    (bytes), the vectors are compressed (SQ8, then OPQ+PQ with fewer bytes) until the index fits.
    """
    if n < 1:
        raise PipelineError("no features to index: the shards hold no images")
    if isinstance(max_memory, str):
        max_memory = parse_size(max_memory)
    if factory:
        nl, per_vector = factory_facts(factory, dim)
        compressed = per_vector - (8 if nl else 0) < 4 * dim
        train = min(n, max(max(MIN_POINTS_PER_LIST, train_per_list) * nl, 20_000 if compressed else 0) or 100_000)
        return IndexPlan(factory, nl, train, f"factory {factory!r} given with --factory",
                         n * per_vector + nl * dim * 4)
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
    codes = ["Flat", "SQ8"] + [f"PQ{m}" for m in (64, 32, 16, 8) if dim % m == 0]
    for code in codes:
        fac = (f"OPQ{code[2:]}," if code.startswith("PQ") else "") + ivf + code
        need = n * factory_facts(fac, dim)[1] + nlist * dim * 4
        if max_memory is None or need <= max_memory:
            break
    else:
        raise PipelineError(f"{n} vectors do not fit in {max_memory / 2**20:.0f} MiB even as {fac} "
                            f"({need / 2**20:.0f} MiB); raise --max-memory")
    compressed = code != "Flat"
    if compressed:
        reason += f"; flat vectors need {n * 4 * dim / 2**20:.0f} MiB > --max-memory, so {code} codes ({need / 2**20:.0f} MiB)"
    train = min(n, max(max(MIN_POINTS_PER_LIST, train_per_list) * nlist, 20_000 if compressed else 0))
    return IndexPlan(fac, nlist, train, reason, need)


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


NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def tune_nprobe(index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, nlist: int,
                k: int = 10, target: float = 0.95, nprobe: int | None = None) -> tuple[int, float, float, list[dict]]:
    """Smallest nprobe whose recall@k reaches `target` with 95% confidence (or just the given `nprobe`).

    "With confidence": the lower bound of the mean over the sampled queries must reach the
    target, so that new queries get the target recall too, not just these. Returns nprobe, its
    mean recall, ms per query and every setting tried. The index is not modified (parameters
    are passed per call), so it may be serialised at the same time.
    """
    grid = [nprobe] if nprobe else [p for p in NPROBE_GRID if p < nlist] + [nlist]
    tried = []
    for probe in grid:
        t0 = time.perf_counter()
        _, found = index.search(queries, k + 1, params=faiss.SearchParametersIVF(nprobe=probe))
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        per_query = recall_at(found, truth, query_ids, k)
        tried.append({"nprobe": probe, "recall": round(float(per_query.mean()), 4),
                      "recall_lower_bound": round(lower_bound(per_query), 4), "ms_per_query": round(ms, 4)})
        if lower_bound(per_query) >= target:
            break
    return probe, float(per_query.mean()), ms, tried


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
) -> IndexReport:
    """Build an index from every shard in `features_dir` and publish it as the current version of `out_dir`.

    ray: the address of a Ray cluster ('auto', 'local', host:port) whose workers fill parts of an
    IVF index in parallel, merged here into the index a local build makes (distributed.py).
    """
    features_dir, out_dir = Path(features_dir), Path(out_dir)
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
    all_infos, parts, digest = _live_parts(features_dir)
    if not all_infos:
        raise PipelineError(f"no shards in {features_dir}: run `pipeline extract` first")
    check_model(all_infos)
    n = sum(len(rows) for _, rows in parts)
    dim = all_infos[0].dim
    plan = plan_index(n, dim, factory=factory, nlist=nlist, flat_below=flat_below, train_per_list=train_per_list,
                      max_memory=max_memory)
    LOG.info("index plan: %s (%s)", plan.factory, plan.reason)
    try:
        index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise PipelineError(f"faiss cannot build factory {plan.factory!r}: {str(exc).strip().splitlines()[-1]}") from None
    rng = np.random.default_rng(seed)
    t_start = time.monotonic()
    timings: dict[str, float] = {}

    with exclusive_lock(out_dir, "pipeline build-index"):
        t0 = time.monotonic()
        queries = q_ids = None
        held_out = False
        if not index_is_flat(plan):
            n_q = min(recall_queries, n)
            train_ids = np.sort(rng.choice(n, size=0 if index.is_trained else plan.train_size, replace=False))
            # Recall queries: vectors the quantizer was not trained on (k-means fits its own training
            # points better, which would flatter the recall), unless training used nearly all of them.
            rest = np.setdiff1d(np.arange(n), train_ids, assume_unique=True)
            held_out = len(rest) >= n_q
            q_ids = np.sort(rng.choice(rest if held_out else np.arange(n), size=n_q, replace=False))
            queries = _rows_by_id(parts, q_ids)
            if not index.is_trained:
                LOG.info("training on %d vectors", len(train_ids))
                index.train(_rows_by_id(parts, train_ids))
        timings["train_s"] = time.monotonic() - t0

        versions = out_dir / VERSIONS_DIR
        version = datetime.now(timezone.utc).strftime("v%Y%m%dT%H%M%S%fZ")
        tmp = versions / f".tmp-{version}-{os.getpid()}"
        try:
            tmp.mkdir(parents=True)
            t0 = time.monotonic()
            truth, ids_writer = fill(index, parts, tmp / IDS_FILE, queries, 10, progress)
            timings["add_s"] = time.monotonic() - t0
            assert index.ntotal == n, f"index holds {index.ntotal} vectors, expected {n}"

            t0 = time.monotonic()
            index_writer = _Background(faiss.write_index, index, str(tmp / INDEX_FILE))
            if queries is None:
                tuning = {"nprobe": None, "recall_at_10": 1.0, "recall_note": "exact search"}
            else:
                tuning = {**_tune(index, plan, queries, q_ids, truth, nprobe, target_recall),
                          "recall_queries_held_out_from_training": held_out}
            timings["tune_s"] = time.monotonic() - t0
            try:
                index_writer.join()
            except RuntimeError as exc:  # faiss: the file could not be written
                raise write_error(out_dir, exc, "`pipeline build-index`") from None
            ids_writer.join()
            timings["write_s"] = time.monotonic() - t0
            meta = {
                "schema_version": META_SCHEMA,
                "pipeline_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "version": version,
                "model": {"name": all_infos[-1].model_name, "checksum": all_infos[-1].model_sha256,
                          "path": all_infos[-1].model_path},
                "count": n,
                "dim": dim,
                "metric": "inner_product",
                "factory": plan.factory,
                "bytes_estimate": plan.bytes_estimate,
                "nlist": plan.nlist,
                "reason": plan.reason,
                "train_size": 0 if index_is_flat(plan) or plan.train_size == 0 else plan.train_size,
                **tuning,
                "build_seconds": round(time.monotonic() - t_start, 3),
                "timings": {k: round(v, 3) for k, v in timings.items()},
                "features_dir": str(features_dir.resolve()),
                "shards": [{"name": i.path.name, "count": len(rows), "created": i.created} for i, rows in parts],
                "live_digest": digest,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            final = versions / version
            os.rename(tmp, final)
            fsync_dir(versions)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise write_error(out_dir, exc, "`pipeline build-index`") from None
            raise
        atomic_write_text(out_dir / CURRENT_FILE, version + "\n")
        prune_versions(out_dir, keep)
    LOG.info("published %s: %d vectors, %s, nprobe %s", final, n, plan.factory, meta.get("nprobe"))
    return IndexReport(str(final), meta)


def index_is_flat(plan: IndexPlan) -> bool:
    """Exact search: nothing to train, recall 1 by construction."""
    return plan.factory == "Flat"


class _Background(threading.Thread):
    """Run fn(*args) in a thread (faiss and sqlite release the GIL); join() re-raises its error."""

    def __init__(self, fn, *args) -> None:
        super().__init__(daemon=True)
        self.fn, self.args, self.error = fn, args, None
        self.start()

    def run(self) -> None:
        try:
            self.fn(*self.args)
        except BaseException as exc:  # handed to the joining thread
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


def _live_parts(features_dir: Path) -> tuple[list[ShardInfo], list[tuple[ShardInfo, np.ndarray]], str | None]:
    """Every shard, and the rows to index per shard: the catalog's live rows (deleted, changed and
    moved-away images left out), or every row when the folder has no catalog. Also the catalog's
    live digest.

    An extract may be writing meanwhile (build-index does not wait for it): the live rows and the
    digest are read in one transaction and before the shards are listed, so every shard they name
    is listed and whatever the extract records later is wholly left out (the digest says so, and the
    next rebuild builds again).
    """
    live = digest = None
    if (features_dir / CATALOG_FILE).exists():
        with Catalog(features_dir) as catalog:
            live, digest = catalog.live_snapshot()
    infos = [shard_info(p) for p in list_shards(features_dir)]
    if live is None:
        return infos, [(i, np.arange(i.count)) for i in infos if i.count], None
    lost = sorted(set(live) - {i.path.name for i in infos})
    if lost:
        raise PipelineError(f"the catalog of {features_dir} records images in {lost[0]}, which is missing; "
                            "run `pipeline extract` to reconcile it")
    return infos, [(i, live[i.path.name]) for i in infos if len(live.get(i.path.name, ()))], digest


def write_ids(parts: list[tuple[ShardInfo, np.ndarray]], ids_path: Path, features: queue.Queue | None = None) -> None:
    """Write the id table: id = position in the index (shards in order, their live rows in order).
    With `features`, put each shard's live feature rows there on the way (None after an error)."""
    db = sqlite3.connect(ids_path)
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL, hash TEXT NOT NULL)")
        next_id = 0
        for info, rows in parts:
            data = read_shard(info.path, features=features is not None)
            if features is not None:
                features.put(data.features[rows])
            db.executemany("INSERT INTO images VALUES (?, ?, ?)",
                           zip(range(next_id, next_id + len(rows)), (data.paths[r] for r in rows),
                               (data.hashes[r] for r in rows)))
            next_id += len(rows)
        db.execute("CREATE INDEX images_path ON images(path)")
        db.commit()
    except BaseException:
        if features is not None:
            features.put(None)  # unblock the consumer; join() re-raises
        raise
    finally:
        db.close()


def _fill(index, parts: list[tuple[ShardInfo, np.ndarray]], ids_path: Path, queries: np.ndarray | None, k: int,
          progress: bool | None) -> tuple[np.ndarray | None, _Background]:
    """Add every shard to the index, streaming; meanwhile a thread reads the next shard and writes the
    id table. With `queries`, the exact top-(k+1) of each query is gathered on the way (for recall).
    Returns the exact neighbour ids and the id-table thread (join it before publishing)."""
    features: queue.Queue = queue.Queue(maxsize=2)  # at most two shards in memory beyond the index
    reader = _Background(write_ids, parts, ids_path, features)
    heap = faiss.ResultHeap(len(queries), k + 1, keep_max=True) if queries is not None else None
    offset = 0
    with Progress(sum(len(rows) for _, rows in parts), "index", enabled=progress) as bar:
        for _ in parts:
            feats = features.get()
            if feats is None:
                reader.join()
            feats = np.ascontiguousarray(feats, dtype=np.float32)
            index.add(feats)
            if heap is not None:
                d, i = faiss.knn(queries, feats, min(k + 1, len(feats)), metric=faiss.METRIC_INNER_PRODUCT)
                heap.add_result(d, np.where(i >= 0, i + offset, -1))
            offset += len(feats)
            bar.update(len(feats))
    if heap is None:
        return None, reader
    heap.finalize()
    return heap.I, reader


def _tune(index, plan: IndexPlan, queries: np.ndarray, q_ids: np.ndarray, truth: np.ndarray,
          nprobe: int | None, target: float) -> dict:
    """Recall@10 against exact search, and the nprobe that reaches `target` (IVF indexes)."""
    k = 10
    if plan.nlist:
        nprobe, rec, ms, tried = tune_nprobe(index, queries, q_ids, truth, plan.nlist, k, target, nprobe)
    else:
        t0 = time.perf_counter()
        _, found = index.search(queries, k + 1)
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        rec, tried = float(recall_at(found, truth, q_ids, k).mean()), []
    LOG.info("nprobe %s: recall@10 %.3f, %.3f ms/query (%d queries)", nprobe, rec, ms, len(q_ids))
    return {"nprobe": nprobe, "recall_at_10": round(rec, 4), "target_recall": target,
            "recall_queries": len(q_ids), "query_ms": round(ms, 4), "nprobe_sweep": tried}


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

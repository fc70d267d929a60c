"""The heavy stages on a Ray cluster: extraction and index filling, with the local run's results.

Extraction: the driver (extract.py) scans and compares with the catalog as in a local run, then
hands the files to decode here. They are cut into tasks of `shard_size` files, each given a shard
number up front; one actor per node keeps an ONNX Runtime session and a decode pool across tasks,
and writes its task's shard atomically (temporary name, rename) into the shared features folder.
Known contents run no model, as in a local run: each task carries the recorded features of the
contents of its files' sizes, and a file waits while a file of its size is in flight elsewhere.
The driver alone writes the catalog: it records each shard as its task completes (ray.wait), so
a killed driver loses at most the tasks in flight (a shard written but not recorded is imported by
the next run's Catalog.reconcile()) and a rerun does only the rest. A task whose worker dies is
retried once on a restarted actor (same shard name: a retry replaces, never duplicates); if it
fails again while its actor had other tasks (any of them may be to blame), it runs again alone
there, under the same shard name; if it fails alone, it is split in halves, each run alone, down
to single files (its shard, if written before its reply was lost, is deleted first), and a single
file that kills its worker twice is recorded as failed (transient), like a crashed decoder in a
local run.

Index: the driver trains the quantizer exactly as a local build does (same sample); Ray tasks add
contiguous ranges of shards to copies of the trained empty index with the ids a local build gives
(their position), and the driver merges the partial indexes in id order (merge_from), which gives
the same inverted lists in the same order as adding everything in one process.

Features are bitwise equal to a local run's: same model file, same decode, and ONNX Runtime's CPU
kernels give the same bits whatever the batch composition (checked: batches of 1, 8, 3+13 agree).
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from itertools import chain
from pathlib import Path

import faiss
import numpy as np

from .features import Catalog
from .decode_pool import DecodePool, DecodeSettings, decode_one
from .errors import ImageError, PipelineError, cause
from .extract import ExtractReport
from .features import ShardWriter
from .model import FeatureModel, ModelInfo
from .progress import Progress
from .features import ShardInfo, next_shard_number, read_shard, shard_name

LOG = logging.getLogger(__name__)
TASKS_PER_ACTOR = 2  # queued on each actor, so it starts its next task as soon as one ends
KNOWN_PER_TASK = 100_000  # recorded features offered to a task at most (~10 MB): beyond, a content is embedded again


def require_ray():
    """The ray module, or the one-line error that says how to get it."""
    try:
        import ray
    except ImportError:
        raise PipelineError("--ray needs the ray package: pip install 'pipeline[ray]'") from None
    return ray


def connect(address: str):
    """Join the cluster at `address` ('auto': the one `ray start` runs here; 'local': start one in
    this process), unless this process is connected already. Returns the ray module."""
    ray = require_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "local" else address, log_to_driver=False, include_dashboard=False)
        except ConnectionError as exc:
            raise PipelineError(f"cannot reach a Ray cluster at {address!r} ({exc}); start one with "
                                "`ray start --head`, or use --ray local") from None
    return ray


class RayDistributor:
    """The Ray cluster at `address`, handed to extract(), build_index() and rebuild() (the CLI's --ray):
    it runs their public per-task functions there, where a local run calls them in-process."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ray = connect(address)  # at once: a cluster that cannot be reached is a one-line error before any work

    # extraction: the method extract() calls (see extract.py's distributor protocol) goes here

    # index filling: the method build_index() calls (see pipeline/index/fill.py's protocol) goes here


def _get(ray, ref):
    """ray.get, with our own one-line errors raised on a worker (a damaged shard, a full disk) as they are."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        raise exc.cause if isinstance(exc.cause, PipelineError) else exc


class _Records:
    """Stands in for the catalog in a ShardWriter on a worker: keeps what the driver will record."""

    def __init__(self) -> None:
        self.shards: list[tuple[str, list, list]] = []

    def record_shard(self, name: str, rows, errors) -> None:
        self.shards.append((name, list(rows), list(errors)))


class Extractor:
    """A Ray actor (one per node): an ONNX Runtime session and a decode pool, kept across tasks."""

    def __init__(self, model_path: str, info: ModelInfo, threads: int, device: str, workers: int,
                 settings: DecodeSettings, decode=decode_one) -> None:
        self.model_path, self.info = model_path, info
        self.fm = FeatureModel(model_path, threads=threads, device=device)
        assert self.fm.info.checksum == info.checksum, f"{model_path} changed since the driver read it"
        self.pool = DecodePool(workers, settings, decode=decode)

    def pid(self) -> int:
        return os.getpid()

    def extract(self, out: str, number: int, files: list[tuple], batch_size: int,
                known: dict[str, tuple[str, int, str]]) -> dict:
        """Decode `files` (path, kind, size, mtime, ctime), embed each content once, write them as
        shard `number` of `out`. A content in `known` (hash -> shard, row, path of a recorded feature)
        reuses that feature, read from its shard. Returns what the driver records and counts."""
        records = _Records()
        writer = ShardWriter(Path(out), self.info, self.model_path, len(files), records)
        writer.number = number
        # input shape -> (batch, (path, Decoded) of its rows): one batch per shape of an aspect-kept model
        batches: dict[tuple[int, ...], tuple[np.ndarray, list[tuple[str, object]]]] = {}
        waiting: dict[str, list[tuple[str, object]]] = {}  # hash -> copies of an image in a current batch
        fresh: dict[str, tuple[str, int]] = {}  # hash -> (shard, row) of contents embedded in this task
        counts = {"extracted": 0, "duplicates": 0}
        reused: list[tuple[str, str]] = []  # (path, path of the recorded feature it reuses)

        def run_batch(shape: tuple[int, ...]) -> None:
            batch, items = batches[shape]
            if not items:
                return
            feats = self.fm.embed(batch[:len(items)])
            where = writer.add([p for p, _ in items], feats, [d for _, d in items])
            counts["extracted"] += len(items)
            for j, (_, d) in enumerate(items):
                fresh[d.content_hash] = where[j]
                for copy_path, copy in waiting.pop(d.content_hash, []):
                    writer.add([copy_path], feats[j][None], [copy])
                    counts["duplicates"] += 1
            items.clear()

        failures = []
        for i, decoded, error in self.pool.imap([f[0] for f in files]):
            path, _, *stat = files[i]
            if error is not None:
                writer.add_error(path, error, tuple(stat))
                failures.append((path, str(error)))
                continue
            h = decoded.content_hash
            if h in fresh:
                writer.add([path], writer.row(*fresh[h])[None], [decoded])
                counts["duplicates"] += 1
            elif h in known:
                shard, row, source = known[h]
                writer.add([path], writer.row(shard, row)[None], [decoded])
                reused.append((path, source))
            elif h in waiting:
                waiting[h].append((path, decoded))
            else:
                waiting[h] = []
                shape = decoded.pixels.shape
                if shape not in batches:
                    batches[shape] = np.empty((batch_size, *shape), np.uint8), []
                batch, items = batches[shape]
                batch[len(items)] = decoded.pixels
                items.append((path, decoded))
                if len(items) == batch_size:
                    run_batch(shape)
        for shape in batches:
            run_batch(shape)
        writer.flush()
        return {"shards": records.shards, "failures": failures, "reused": reused, **counts}


def extract_on_ray(todo: int, catalog: Catalog, out: Path, model_path: Path, info: ModelInfo, report: ExtractReport, *,
                   address: str, scan_chunk: int, workers: int, batch_size: int, shard_size: int, threads: int,
                   device: str, settings: DecodeSettings, progress: bool | None) -> None:
    """What extract._run does, on the Ray cluster at `address`: the catalog's scanned_todo() cut into
    tasks of `shard_size` files, one shard each, recorded by this (the driver) process as they end.

    As in a local run, known contents run no model. A task is given the recorded features of every
    content whose file size is that of one of its files (equal contents have equal sizes): a moved
    or copied file reuses its feature. A file whose size is that of a file in a task in flight waits
    for that task's shard to be recorded (up to `shard_size` files wait; more go at once), so a
    content found twice in one run is embedded once.
    """
    ray = connect(address)
    from ray.exceptions import RayActorError, WorkerCrashedError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    actor = ray.remote(max_restarts=-1, max_task_retries=1)(Extractor)
    actors = [actor.options(num_cpus=n["Resources"]["CPU"], scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=True)).remote(str(model_path), info, threads, device, workers, settings, decode_one)
        for n in nodes]
    try:
        ray.get([a.pid.remote() for a in actors])  # a model that does not load there fails here, not per file
    except RayActorError as exc:
        for a in actors:
            ray.kill(a)
        raise PipelineError(f"the Ray workers cannot start the extraction ({cause(exc)}); the model file and the "
                            "features folder must be at the same path on every node (a shared filesystem)") from None
    LOG.info("extracting on Ray: %d node(s), one actor each, tasks of %d files", len(actors), shard_size)
    files = chain.from_iterable(catalog.scanned_todo(scan_chunk))
    retry: deque[tuple[list[tuple], int | None]] = deque()  # (files, shard number) of tasks to run alone
    held: deque[tuple] = deque()  # files waiting for a task in flight with a file of their size
    flying: Counter[int] = Counter()  # sizes of the files of the tasks in flight
    number = next_shard_number(out)
    pending: dict = {}  # ObjectRef -> (actor, files, shard number, weight)
    load = {a: 0 for a in actors}
    crashed: list[tuple] = []  # (path, kind, size, mtime, ctime) of files that killed their worker

    def cut() -> list[tuple]:
        """The next task's files: the held ones whose sizes no longer fly, then new ones."""
        task: list[tuple] = []
        for _ in range(len(held)):
            f = held.popleft()
            if f[2] in flying or len(task) == shard_size:
                held.append(f)
            else:
                task.append(f)
        while len(task) < shard_size and (f := next(files, None)) is not None:
            (held if f[2] in flying and len(held) < shard_size else task).append(f)
        return task

    def submit() -> bool:
        nonlocal number
        a = min(load, key=load.get)
        weight = TASKS_PER_ACTOR if retry else 1  # a task run again runs alone: if its actor dies, it is to blame
        if load[a] + weight > TASKS_PER_ACTOR:
            return False
        task, n = retry.popleft() if retry else (cut(), None)
        if not task:
            return False
        if n is None:
            n, number = number, number + 1
        sizes = [f[2] for f in task if f[2] is not None]
        known = catalog.live_features_of_size(sizes, KNOWN_PER_TASK)
        pending[a.extract.remote(str(out), n, task, batch_size, known)] = (a, task, n, weight)
        flying.update(sizes)
        load[a] += weight
        return True

    try:
        with Progress(todo, "extract", enabled=progress) as bar:
            while True:
                while submit():
                    pass
                if not pending:
                    break
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                a, task, n, weight = pending.pop(ref)
                load[a] -= weight
                flying -= Counter(f[2] for f in task if f[2] is not None)  # (keeps only the sizes still in flight)
                try:
                    result = _get(ray, ref)
                except (RayActorError, WorkerCrashedError) as exc:
                    if weight < TASKS_PER_ACTOR:
                        LOG.warning("a Ray worker died twice with a task of %d files; running it alone", len(task))
                        retry.append((task, n))
                        continue
                    (out / shard_name(n)).unlink(missing_ok=True)  # a new task (or none) does its files now
                    if len(task) > 1:
                        LOG.warning("a Ray worker died twice during a task of %d files; splitting it", len(task))
                        retry.extend([(task[:len(task) // 2], None), (task[len(task) // 2:], None)])
                    else:
                        LOG.warning("%s killed its Ray worker twice (%s)", task[0][0], type(exc).__name__)
                        crashed += task
                    continue
                _record(catalog, result, {path: kind for path, kind, *_ in task}, report, bar)
            if crashed:  # recorded like a local run's failures: in a shard of their own, after the others
                writer = ShardWriter(out, info, model_path, shard_size, catalog)
                error = ImageError("the Ray worker extracting it died, twice", transient=True)
                for path, kind, *stat in crashed:
                    writer.add_error(path, error, tuple(stat))
                    report.failures.append((path, str(error)))
                    report.failed += 1
                    report.still_failing += kind == "retried"
                    bar.update(1, failed=1)
                writer.flush()
                report.shards_written += writer.written
    finally:  # a raised error too: the actors hold a model session each
        for a in actors:
            ray.kill(a)


def _record(catalog: Catalog, result: dict, kinds: dict[str, str], report: ExtractReport, bar) -> None:
    """Record a finished task's shard in the catalog and count it in the report (`kinds`: of its files)."""
    for path, source in result["reused"]:  # counted as a local run counts them
        if kinds[path] == "new" and catalog.note_moved(source):
            report.moved += 1
        else:
            report.duplicates += 1
    for name, rows, errors in result["shards"]:
        catalog.record_shard(name, rows, errors)
        report.shards_written.append(name)
    for path, reason in result["failures"]:
        report.failures.append((path, reason))
        report.failed += 1
        report.still_failing += kinds[path] == "retried"
    report.extracted += result["extracted"]
    report.duplicates += result["duplicates"]
    bar.update(sum(len(rows) for _, rows, _ in result["shards"]) + len(result["failures"]),
               failed=len(result["failures"]))


def fill_part(trained: np.ndarray, parts: list[tuple[str, np.ndarray]], ids: np.ndarray, queries: np.ndarray | None,
              k: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A Ray task: add the live rows of these shards, under their stable `ids` (in order), to a copy of
    the trained empty index (faiss.serialize_index). Returns the serialized partial index and, with
    `queries`, the exact top-k distances and ids of each query among these rows (for recall)."""
    index = faiss.deserialize_index(trained)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True) if queries is not None else None
    offset = 0
    for path, rows in parts:
        feats = np.ascontiguousarray(read_shard(Path(path)).features[rows], dtype=np.float32)
        block = ids[offset:offset + len(feats)]
        index.add_with_ids(feats, block)
        if heap is not None:
            d, i = faiss.knn(queries, feats, min(k, len(feats)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(d, np.where(i >= 0, block[i], -1))
        offset += len(feats)
    if heap is None:
        return faiss.serialize_index(index), None, None
    heap.finalize()
    return faiss.serialize_index(index), heap.D, heap.I


def fill_on_ray(index, parts: list[tuple[ShardInfo, np.ndarray]], ids: np.ndarray, ids_path: Path,
                queries: np.ndarray | None, progress: bool | None, store=None, *, address: str):
    """What index._fill does, with the adding spread over the Ray cluster at `address`: the shards cut
    into contiguous ranges (one per CPU of the cluster), each added to a partial IVF index by a task,
    the partials merged here in id order (IndexIVF.merge_from keeps the ids), which gives the inverted
    lists a local build gives, entry for entry. An exact (Flat) index has nothing to spread (under
    20,000 vectors by default): it is filled here. Returns the exact neighbour ids of `queries` and
    the thread writing the id table (and the vector `store`, when given)."""
    from .index import TRUTH_DEPTH, _Background, _fill, write_ids

    if faiss.try_extract_index_ivf(index) is None:
        LOG.info("an exact index is filled here: it has no inverted lists to build in parallel")
        return _fill(index, parts, ids, ids_path, queries, progress, store)
    ray = connect(address)
    ids_writer = _Background(write_ids, parts, ids, ids_path, None, store)
    n_tasks = max(1, min(len(parts), int(ray.cluster_resources().get("CPU", 1))))
    bounds = np.linspace(0, len(parts), n_tasks + 1).astype(int)
    starts = np.concatenate([[0], np.cumsum([len(rows) for _, rows in parts])])
    trained, q = ray.put(faiss.serialize_index(index)), ray.put(queries)
    task = ray.remote(fill_part)
    refs = [task.remote(trained, [(str(i.path), rows) for i, rows in parts[lo:hi]], ids[starts[lo]:starts[hi]], q,
                        TRUTH_DEPTH)
            for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    LOG.info("filling the index on Ray: %d partial indexes over %d shards", len(refs), len(parts))
    heap = faiss.ResultHeap(len(queries), TRUTH_DEPTH, keep_max=True) if queries is not None else None
    with Progress(int(starts[-1]), "index", enabled=progress) as bar:
        for ref in refs:  # in id order: the merged lists keep the order of a local build
            blob, d, i = _get(ray, ref)
            partial_index = faiss.deserialize_index(blob)
            bar.update(partial_index.ntotal)
            index.merge_from(partial_index, 0)
            if heap is not None:
                heap.add_result(d, i)
    if heap is None:
        return None, ids_writer
    heap.finalize()
    return (heap.I, heap.D), ids_writer

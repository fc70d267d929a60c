"""The heavy stages on a Ray cluster: extraction and index filling, with the local run's results.

Extraction (RayDistributor.embed_shards, which extract() calls): the driver scans and compares with
the catalog as in a local run, then hands the files to decode here. They are cut into tasks of
`shard_size` files, each given a shard number up front; one actor per node keeps extract's
ShardEmbedder (an ONNX Runtime session and a decode pool) across tasks and runs extract's per-task
function, which writes the task's shard atomically (temporary name, rename) into the shared
features folder; the driver records its result with extract's record_task.
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

Index (RayDistributor.fill, which build_index() calls): the driver trains the quantizer exactly as a
local build does (same sample); Ray tasks run the index's per-task function (fill_range) on contiguous
ranges of shards, into copies of the trained empty index, with the ids a local build gives, and the
driver merges the partial indexes in id order (merge_from), which gives the same inverted lists in the
same order as adding everything in one process.

Features are bitwise equal to a local run's: same model file, same decode, and ONNX Runtime's CPU
kernels give the same bits whatever the batch composition (checked: batches of 1, 8, 3+13 agree).
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from itertools import chain
from types import ModuleType
from typing import TypeAlias, cast

import faiss
import numpy as np

from .decode_pool import DecodeFn, decode_one
from .errors import ImageError, PipelineError, cause
from .extract import ExtractJob, ExtractReport, FileRow, ShardEmbedder, TaskResult, failed_task, record_task
from .features import Catalog, ShardInfo, next_shard_number, remove_shard
from .index import ExactNeighbours, Truth, fill_range
from .progress import Progress

LOG = logging.getLogger(__name__)
# A ray.ObjectRef, opaque here (ray.get, ray.wait, a dict key): ray is an optional dependency, not imported to type.
Ref: TypeAlias = object
TASKS_PER_ACTOR = 2  # queued on each actor, so it starts its next task as soon as one ends
KNOWN_PER_TASK = 100_000  # recorded features offered to a task at most (~10 MB): beyond, a content is embedded again


def require_ray() -> ModuleType:
    """The ray module, or the one-line error that says how to get it."""
    try:
        import ray
    except ImportError:
        raise PipelineError("--ray needs the ray package: pip install 'pipeline[ray]'") from None
    return ray


def connect(address: str) -> ModuleType:
    """Join the cluster at `address` ('auto': the one `ray start` runs here; 'local': start one in
    this process), unless this process is connected already. Returns the ray module."""
    ray = require_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "local" else address, log_to_driver=False, include_dashboard=False)
        except ConnectionError as exc:
            raise PipelineError(
                f"cannot reach a Ray cluster at {address!r} ({exc}); start one with "
                "`ray start --head`, or use --ray local"
            ) from None
    return ray


class RayDistributor:
    """The Ray cluster at `address`, handed to extract(), build_index() and rebuild() (the CLI's --ray):
    it runs their public per-task functions there, where a local run calls them in-process."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ray = connect(address)  # at once: a cluster that cannot be reached is a one-line error before any work

    def embed_shards(
        self, job: ExtractJob, files: Iterable[list[FileRow]], catalog: Catalog, report: ExtractReport, bar: Progress
    ) -> None:
        """extract()'s tasks on the cluster (extract.ShardDistributor): cut into tasks of job.shard_size
        files, each run by extract's per-task function (ShardEmbedder) on an actor, recorded here
        (record_task) as it ends.

        As in a local run, known contents run no model. A task is offered the recorded features of every
        content whose file size is that of one of its files (equal contents have equal sizes): a moved
        or copied file reuses its feature. A file whose size is that of a file in a task in flight waits
        for that task's shard to be recorded (up to `shard_size` files wait; more go at once), so a
        content found twice in one run is embedded once.
        """
        actors = _start_extractors(self.ray, job)
        try:
            _Tasks(self.ray, actors, job, chain.from_iterable(files), catalog).run(report, bar)
        finally:  # a raised error too: the actors hold a model session each
            for a in actors:
                self.ray.kill(a)

    def fill(
        self,
        index: faiss.Index,
        parts: list[tuple[ShardInfo, np.ndarray]],
        ids: np.ndarray,
        queries: np.ndarray | None,
        k: int,
        progress: bool | None,
    ) -> Truth | None:
        """build_index()'s fill on the cluster (index.FillDistributor): the shards cut into contiguous ranges
        (one per CPU of the cluster), each added by a task (index.fill_range) to a copy of the trained empty
        IVF index, the partials merged here in id order (IndexIVF.merge_from keeps the ids), which gives the
        inverted lists a local build gives, entry for entry; likewise the exact top-k of the `queries`. An
        exact (Flat) index has nothing to spread (under 20,000 vectors by default): it is filled here."""
        starts = np.concatenate([[0], np.cumsum([len(rows) for _, rows in parts])])
        with Progress(int(starts[-1]), "index", enabled=progress) as bar:
            if faiss.try_extract_index_ivf(index) is None:
                LOG.info("an exact index is filled here: it has no inverted lists to build in parallel")
                return fill_range(index, parts, ids, queries, k, advance=bar.update)
            n_tasks = max(1, min(len(parts), int(self.ray.cluster_resources().get("CPU", 1))))
            bounds = np.linspace(0, len(parts), n_tasks + 1).astype(int)
            trained, q = self.ray.put(faiss.serialize_index(index)), self.ray.put(queries)
            task = self.ray.remote(RayDistributor._fill_part)
            refs = [
                task.remote(trained, parts[lo:hi], ids[starts[lo] : starts[hi]], q, k)
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
                if hi > lo
            ]
            LOG.info("filling the index on Ray: %d partial indexes over %d shards", len(refs), len(parts))
            near = ExactNeighbours(queries, k) if queries is not None else None
            for ref in refs:  # in id order: the merged lists keep the order of a local build
                blob, found = cast("tuple[np.ndarray, Truth | None]", _get(self.ray, ref))  # what _fill_part returns
                partial = faiss.deserialize_index(blob)
                bar.update(partial.ntotal)
                index.merge_from(partial, 0)
                if near is not None:
                    assert found is not None, "fill_range returns the queries' neighbours when given queries"
                    near.offer(found)
        return None if near is None else near.result()

    @staticmethod
    def _fill_part(
        trained: np.ndarray,
        parts: list[tuple[ShardInfo, np.ndarray]],
        ids: np.ndarray,
        queries: np.ndarray | None,
        k: int,
    ) -> tuple[np.ndarray, Truth | None]:
        """A Ray task: index.fill_range into a copy of the trained empty index (faiss.serialize_index).
        Returns the partial index, serialized, and the exact top-k of the queries among its rows."""
        index = faiss.deserialize_index(trained)
        found = fill_range(index, parts, ids, queries, k)
        return faiss.serialize_index(index), found


def _get(ray: ModuleType, ref: Ref) -> object:
    """ray.get, with our own one-line errors raised on a worker (a damaged shard, a full disk) as they are."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, PipelineError):
            raise exc.cause from exc
        raise


class Extractor:
    """A Ray actor (one per node): extract's ShardEmbedder (an ONNX Runtime session and a decode pool),
    kept across tasks."""

    def __init__(self, job: ExtractJob, decode: DecodeFn) -> None:
        self.embedder = ShardEmbedder(job, decode)

    def pid(self) -> int:
        return os.getpid()

    def extract(self, number: int, files: list[FileRow], known: dict[str, tuple[str, int, str]]) -> TaskResult:
        """A task: `files` as shard `number`; a content in `known` (hash -> shard, row, path of a recorded
        feature: the driver's offers) reuses that feature."""
        return self.embedder.embed_files(number, files, known.get)


def _start_extractors(ray: ModuleType, job: ExtractJob) -> list:
    """One Extractor per node with a CPU (all its CPUs), each checked started before any task: a model
    that does not load there is one error here, not one per file."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    actor = ray.remote(max_restarts=-1, max_task_retries=1)(Extractor)
    actors = [
        actor.options(
            num_cpus=n["Resources"]["CPU"], scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=True)
        ).remote(job, decode_one)
        for n in nodes
    ]
    try:
        ray.get([a.pid.remote() for a in actors])
    except ray.exceptions.RayActorError as exc:
        for a in actors:
            ray.kill(a)
        raise PipelineError(
            f"the Ray workers cannot start the extraction ({cause(exc)}); the model file and the "
            "features folder must be at the same path on every node (a shared filesystem)"
        ) from None
    LOG.info("extracting on Ray: %d node(s), one actor each, tasks of %d files", len(actors), job.shard_size)
    return actors


class _Tasks:
    """One extraction's tasks on the actors: cut, offered known contents, run, recorded or run again."""

    def __init__(
        self, ray: ModuleType, actors: list, job: ExtractJob, files: Iterator[FileRow], catalog: Catalog
    ) -> None:
        self.ray, self.job, self.files, self.catalog = ray, job, files, catalog
        self.retry: deque[tuple[list[FileRow], int | None]] = deque()  # (files, shard number) of tasks to run alone
        self.held: deque[FileRow] = deque()  # files waiting for a task in flight with a file of their size
        self.flying: Counter[int] = Counter()  # sizes of the files of the tasks in flight
        self.number = next_shard_number(job.out)
        self.pending: dict = {}  # ObjectRef -> (actor, files, shard number, weight)
        self.load = dict.fromkeys(actors, 0)
        self.crashed: list[FileRow] = []  # files that killed their worker

    def run(self, report: ExtractReport, bar: Progress) -> None:
        while True:
            while self.submit():
                pass
            if not self.pending:
                break
            (ref,), _ = self.ray.wait(list(self.pending), num_returns=1)
            result = self.collect(ref)
            if result is not None:
                self.record(result, report, bar)
        if self.crashed:  # recorded like a local run's failures: in a shard of their own, after the others
            error = ImageError("the Ray worker extracting it died, twice", transient=True)
            self.record(failed_task(self.job, self.number, self.crashed, error), report, bar)

    def record(self, result: TaskResult, report: ExtractReport, bar: Progress) -> None:
        record_task(self.catalog, result, report)
        bar.update(result.files, failed=len(result.failures))

    def cut(self) -> list[FileRow]:
        """The next task's files: the held ones whose sizes no longer fly, then new ones."""
        task: list[FileRow] = []
        for _ in range(len(self.held)):
            f = self.held.popleft()
            if f[2] in self.flying or len(task) == self.job.shard_size:
                self.held.append(f)
            else:
                task.append(f)
        while len(task) < self.job.shard_size and (new := next(self.files, None)) is not None:
            (self.held if new[2] in self.flying and len(self.held) < self.job.shard_size else task).append(new)
        return task

    def submit(self) -> bool:
        """Give the least loaded actor the next task, with the known contents of its files' sizes; whether
        one went."""
        a = min(self.load, key=self.load.__getitem__)
        weight = TASKS_PER_ACTOR if self.retry else 1  # a task run again runs alone: if its actor dies, it is to blame
        if self.load[a] + weight > TASKS_PER_ACTOR:
            return False
        task, n = self.retry.popleft() if self.retry else (self.cut(), None)
        if not task:
            return False
        if n is None:
            n, self.number = self.number, self.number + 1
        sizes = [f[2] for f in task if f[2] is not None]
        known = self.catalog.live_features_of_size(sizes, KNOWN_PER_TASK)
        self.pending[a.extract.remote(n, task, known)] = (a, task, n, weight)
        self.flying.update(sizes)
        self.load[a] += weight
        return True

    def collect(self, ref: Ref) -> TaskResult | None:
        """The result of a task that ended, or None when its worker died: then it runs again alone, under
        its shard name; if it died alone, it is halved (its shard, if written, deleted first), down to
        single files, and a single file is recorded as crashed."""
        a, task, n, weight = self.pending.pop(ref)
        self.load[a] -= weight
        self.flying -= Counter(f[2] for f in task if f[2] is not None)  # (keeps only the sizes still in flight)
        try:
            return cast(TaskResult, _get(self.ray, ref))  # what Extractor.extract returns
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError) as exc:
            if weight < TASKS_PER_ACTOR:
                LOG.warning("a Ray worker died twice with a task of %d files; running it alone", len(task))
                self.retry.append((task, n))
                return None
            remove_shard(self.job.out, n)  # a new task (or none) does its files now
            if len(task) > 1:
                LOG.warning("a Ray worker died twice during a task of %d files; splitting it", len(task))
                self.retry.extend([(task[: len(task) // 2], None), (task[len(task) // 2 :], None)])
            else:
                LOG.warning("%s killed its Ray worker twice (%s)", task[0][0], type(exc).__name__)
                self.crashed += task
            return None

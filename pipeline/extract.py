"""The extraction stage: image folders -> decode workers -> feature model -> HDF5 shards.

Incremental and resumable: the catalog (pipeline.features) remembers every image's size, mtime,
content hash and where its feature lives, so a rerun decodes only new and changed files, runs
the model only on contents it has never seen (moved, renamed and duplicate files reuse their
feature), and marks deleted files gone. A lock keeps two runs from writing to one folder at once.

The work is cut into tasks of `shard_size` files, one shard each: ShardEmbedder.embed_shard is the
one loop that embeds a task (decoded files -> batches per input shape -> shard), and record_task
the one way its result enters the catalog and the report. Where the tasks run is a distributor's
business (ShardDistributor): LocalDistributor here, distributed.RayDistributor on a Ray cluster.
Shards are written atomically and recorded right after their task ends; a run killed at any point
loses at most the shards in progress.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Protocol

import numpy as np

from .decode_pool import DecodeFn, DecodePool, DecodeSettings, decode_one
from .errors import ImageError, PipelineError
from .features import (
    DEFAULT_SHARD_SIZE,
    ERRORS_FILE,
    Catalog,
    ShardWriter,
    check_model,
    ingest_folder,
    list_shards,
    next_shard_number,
    shard_info,
    write_errors_file,
    writing,
)
from .images import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, Decoded, iter_images
from .model import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEVICE,
    DEFAULT_THREADS,
    FeatureModel,
    ModelInfo,
    read_model_info,
    resolve_model_path,
)
from .progress import Progress

LOG = logging.getLogger(__name__)
MAX_ATTEMPTS = 6  # a transient failure is tried at most this often (over 31 runs: 1, 2, 4, 8, 16 runs apart)
SCAN_CHUNK = 10_000  # files stat'ed, compared and decoded per step: what memory holds of the file list

FileRow = tuple[str, str, int | None, float | None, float | None]  # path, kind, size, mtime, ctime (scanned_todo)
Decoding = tuple[FileRow, Decoded | None, ImageError | None]  # a file and its decode: the image, or why not
Known = Callable[[str], tuple[str, int, str] | None]  # content hash -> (shard, row, path) of a recorded feature


def default_workers() -> int:
    """Decoding costs ~1/30 of inference per image, so one worker per two cores keeps the model fed."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass
class ExtractReport:
    features_dir: str
    found: int = 0
    unchanged: int = 0  # same size and mtime as recorded (or a failure not due for a retry): not even decoded
    new: int = 0
    changed: int = 0
    moved: int = 0  # new paths whose content was recorded under a path that is gone: feature kept
    deleted: int = 0  # recorded paths that are gone (and whose content did not move)
    extracted: int = 0  # images run through the model
    duplicates: int = 0  # images whose identical content was already extracted: feature reused
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    failed_total: int = 0  # every current file of the folder that could not be used
    retried: int = 0  # files that had failed in an earlier run, tried again
    still_failing: int = 0  # of those, the ones that failed again
    # (folder, reason) of folders that could not be listed: their images kept as they were
    unreadable_folders: list[tuple[str, str]] = field(default_factory=list)
    shards_written: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k not in ("failures", "unreadable_folders")}
        d["seconds"] = round(self.seconds, 3)
        d["images_per_second"] = round(self.images_per_second, 2)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        d["unreadable_folders"] = [{"path": p, "reason": r} for p, r in self.unreadable_folders]
        return d


@dataclass(frozen=True)
class ExtractJob:
    """What every task of one run shares, wherever it runs: where shards go, the model, decoding, batching."""

    out: Path
    model_path: Path
    info: ModelInfo
    settings: DecodeSettings
    workers: int  # decode processes per embedder (0: decode in its own process)
    batch_size: int
    shard_size: int  # images per shard: the files of a Ray task, the images of a local one (failures ride along)
    threads: int
    device: str


@dataclass
class TaskResult:
    """What a task hands the driver to record (record_task): its shard as Catalog.record_shard takes it,
    and what the report counts. Small and picklable: a Ray task returns it."""

    shard: tuple[str, list, list] | None = None  # (name, rows, errors); None for a task of no files
    files: int = 0
    extracted: int = 0
    duplicates: int = 0  # copies of a content embedded in this very task
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (path, reason, kind)
    reused: list[tuple[str, str, str]] = field(default_factory=list)  # (path, path of the known feature, kind)


class _KeptShard:
    """Stands in for the catalog in a task's ShardWriter: keeps the shard for the driver to record."""

    def __init__(self) -> None:
        self.shard: tuple[str, list, list] | None = None

    def record_shard(self, name: str, rows: Iterable, errors: Iterable) -> None:
        assert self.shard is None, "a task writes one shard"
        self.shard = (name, list(rows), list(errors))


class ShardEmbedder:
    """An ONNX Runtime session and a decode pool, kept across tasks: loading a model costs seconds, a
    task should not. A local run uses one in this process, a Ray cluster one per node (an actor)."""

    def __init__(self, job: ExtractJob, decode: DecodeFn = decode_one) -> None:
        self.job = job
        self.pool = DecodePool(job.workers, job.settings, decode=decode)  # workers start while the session loads
        try:
            self.model = FeatureModel(job.model_path, threads=job.threads, device=job.device)
            if self.model.info.checksum != job.info.checksum:
                raise PipelineError(f"{job.model_path} changed during the run; run it again")
        except BaseException:
            self.pool.close()
            raise

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> ShardEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def decode(self, files: list[FileRow]) -> Iterator[Decoding]:
        """The files decoded in the pool, in the order their decodes end."""
        for i, decoded, error in self.pool.imap([f[0] for f in files]):
            yield files[i], decoded, error

    def embed_files(self, number: int, files: list[FileRow], known: Known) -> TaskResult:
        """One task from its files: decode them, then embed_shard (a Ray task)."""
        return self.embed_shard(number, self.decode(files), known)

    def embed_shard(self, number: int, decodings: Iterable[Decoding], known: Known) -> TaskResult:
        """Embed each content of a task's decoded files once, in batches of one input shape each (an
        aspect-kept model has a few), and write them as shard `number`, failures included.

        A content met earlier in the task, or `known` (recorded before: the catalog locally, the
        offers of a Ray task), reuses that feature; copies of a content in a batch wait for it.
        """
        kept = _KeptShard()
        writer = ShardWriter(self.job.out, self.job.info, self.job.model_path, self.job.shard_size, kept, number=number)
        result = TaskResult()
        batches: dict[tuple[int, ...], tuple[np.ndarray, list[tuple[FileRow, Decoded]]]] = {}  # shape -> rows
        waiting: dict[str, list[tuple[FileRow, Decoded]]] = {}  # hash -> copies of an image in a batch
        fresh: dict[str, tuple[str, int]] = {}  # hash -> (shard, row) of contents embedded in this task

        def run_batch(shape: tuple[int, ...]) -> None:
            batch, items = batches[shape]
            if not items:
                return
            feats = self.model.embed(batch[: len(items)])
            where = writer.add([f[0] for f, _ in items], feats, [d for _, d in items])
            result.extracted += len(items)
            for j, (_, d) in enumerate(items):
                fresh[d.content_hash] = where[j]
                for copy_file, copy in waiting.pop(d.content_hash, []):
                    writer.add([copy_file[0]], feats[j][None], [copy])
                    result.duplicates += 1
            items.clear()

        for file, decoded, error in decodings:
            result.files += 1
            path, kind, size, mtime, ctime = file
            if error is not None:
                writer.add_error(path, error, (size, mtime, ctime))
                result.failures.append((path, str(error), kind))
                continue
            assert decoded is not None, "a decode gives the image or why not"
            h = decoded.content_hash
            if h in fresh:
                writer.add([path], writer.row(*fresh[h])[None], [decoded])
                result.duplicates += 1
            elif h in waiting:
                waiting[h].append((file, decoded))
            elif (hit := known(h)) is not None:
                shard, row, source = hit
                writer.add([path], writer.row(shard, row)[None], [decoded])
                result.reused.append((path, source, kind))
            else:
                waiting[h] = []
                shape = decoded.pixels.shape
                if shape not in batches:
                    batches[shape] = np.empty((self.job.batch_size, *shape), np.uint8), []
                batch, items = batches[shape]
                batch[len(items)] = decoded.pixels
                items.append((file, decoded))
                if len(items) == self.job.batch_size:
                    run_batch(shape)
        for shape in batches:
            run_batch(shape)
        writer.flush()
        result.shard = kept.shard
        return result


def failed_task(job: ExtractJob, number: int, files: list[FileRow], error: ImageError) -> TaskResult:
    """Files no task could embed (each killed its worker), written as shard `number` of failures only:
    recorded as a local run records a file that crashed its decoder."""
    kept = _KeptShard()
    writer = ShardWriter(job.out, job.info, job.model_path, max(1, len(files)), kept, number=number)
    for path, _, size, mtime, ctime in files:
        writer.add_error(path, error, (size, mtime, ctime))
    writer.flush()
    return TaskResult(kept.shard, len(files), failures=[(path, str(error), kind) for path, kind, *_ in files])


def record_task(catalog: Catalog, result: TaskResult, report: ExtractReport) -> None:
    """Record a finished task's shard in the catalog and count it in the report, as the task ends: a
    killed run loses only the tasks in flight. A reused feature whose source path is gone (missing from
    the scan) makes its new file a move, anything else a duplicate."""
    for _, source, kind in result.reused:
        if kind == "new" and catalog.note_moved(source):  # changed or retried files are never moves
            report.moved += 1
        else:
            report.duplicates += 1
    if result.shard is not None:
        catalog.record_shard(*result.shard)
        report.shards_written.append(result.shard[0])
    for path, reason, kind in result.failures:
        report.failures.append((path, reason))
        report.failed += 1
        report.still_failing += kind == "retried"
    report.extracted += result.extracted
    report.duplicates += result.duplicates


class ShardDistributor(Protocol):
    """Where extract() has its tasks run: LocalDistributor (this process) or distributed.RayDistributor."""

    def embed_shards(
        self, job: ExtractJob, files: Iterable[list[FileRow]], catalog: Catalog, report: ExtractReport, bar: Progress
    ) -> None:
        """Embed `files` (Catalog.scanned_todo's chunks) as tasks of at most job.shard_size files, one
        shard each, numbered from next_shard_number(job.out); record each with record_task in this
        process as it ends, and count its files on `bar`. Known contents must run no model."""


class LocalDistributor:
    """This process: one ShardEmbedder. The files stream through its decode pool and tasks are cut
    from the stream of decodes, so the pool never waits for a shard to end; a task ends at its
    `shard_size`-th image (failures ride along), so a shard holds shard_size images."""

    def embed_shards(
        self, job: ExtractJob, files: Iterable[list[FileRow]], catalog: Catalog, report: ExtractReport, bar: Progress
    ) -> None:
        number = next_shard_number(job.out)
        with ShardEmbedder(job) as embedder:
            decoded = _counted(chain.from_iterable(map(embedder.decode, files)), bar)
            known = catalog.live_feature  # contents recorded before, this run's earlier tasks included
            while (result := embedder.embed_shard(number, _images(decoded, job.shard_size), known)).files:
                record_task(catalog, result, report)
                number += 1


def _counted(decoded: Iterator[Decoding], bar: Progress) -> Iterator[Decoding]:
    """The decodes, each counted on the bar as it comes (its batch follows within batch_size images)."""
    for item in decoded:
        bar.update(1, failed=int(item[2] is not None))
        yield item


def _images(decoded: Iterator[Decoding], n: int) -> Iterator[Decoding]:
    """The next decodes, up to the n-th image decoded."""
    for item in decoded:
        yield item
        n -= item[1] is not None
        if not n:
            return


def _validate(batch_size: int, shard_size: int, workers: int, threads: int, timeout: float, scan_chunk: int) -> None:
    if batch_size < 1:
        raise PipelineError(f"--batch-size must be at least 1 (got {batch_size})")
    if shard_size < 1:
        raise PipelineError(f"--shard-size must be at least 1 (got {shard_size})")
    if workers < 0:
        raise PipelineError(f"--workers must be 0 (decode in-process) or more (got {workers})")
    if threads < 0:
        raise PipelineError(f"--threads must be 0 (one per core) or more (got {threads})")
    if timeout <= 0:
        raise PipelineError(f"--timeout must be positive (got {timeout})")
    if scan_chunk < 1:
        raise PipelineError(f"scan_chunk must be at least 1 (got {scan_chunk})")


def _stat(path: Path) -> tuple[int | None, float | None, float | None]:
    """size, mtime, ctime (a chmod or chown changes only ctime)."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime, st.st_ctime
    except OSError:
        return None, None, None


def extract(
    roots: Sequence[Path | str],
    out: Path | str,
    model: Path | str | None = None,
    *,
    workers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    threads: int = DEFAULT_THREADS,
    device: str = DEFAULT_DEVICE,
    timeout: float = DEFAULT_DECODE_TIMEOUT,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    retry_failed: bool = False,
    scan_chunk: int = SCAN_CHUNK,
    distributor: ShardDistributor | None = None,
    progress: bool | None = None,
) -> ExtractReport:
    """Bring the shards in `out` up to date with the images under `roots`, doing only new work.

    workers: decode processes (0 decodes in this process); threads: ONNX Runtime intra-op
    threads (0 = one per core); progress: a bar (None = only when stderr is a terminal).
    Files that failed before are tried again when they changed, or when the failure was transient
    (ImageError.transient) and its back-off is over; `retry_failed` tries all of them now.
    Recorded images under `roots` that no longer exist are marked gone; images recorded under
    other roots, or under folders that cannot be listed (report.unreadable_folders), are left alone.
    The folders are walked, stat'ed, compared with the catalog and decoded `scan_chunk` files at a
    time; the comparison itself runs in SQLite, so memory does not grow with the number of files.
    distributor: where the decoding and embedding run (distributed.RayDistributor: a Ray cluster;
    None: this process); this process still scans and writes the catalog.
    """
    workers = default_workers() if workers is None else workers
    _validate(batch_size, shard_size, workers, threads, timeout, scan_chunk)
    out = Path(out)
    model_path = resolve_model_path(model)
    info = read_model_info(model_path)
    job = ExtractJob(
        out,
        model_path,
        info,
        DecodeSettings(info.resize_to, max_pixels, timeout),
        workers,
        batch_size,
        shard_size,
        threads,
        device,
    )
    unreadable: list[tuple[str, str]] = []
    start = time.monotonic()
    report = ExtractReport(features_dir=str(out), unreadable_folders=unreadable)
    # The ingest folder of the additions (features.Journal) is the fold's: never scanned, nothing there is gone.
    owned = [journal_ingest] if (journal_ingest := ingest_folder(out)) is not None else []
    with writing(out) as catalog:
        catalog.add_roots(str(Path(r).absolute()) for r in roots)
        report.found = _scan(catalog, roots, unreadable, scan_chunk, owned)
        check_model([shard_info(p) for p in list_shards(out)], info.checksum)
        catalog.reconcile()
        missing = _compare(catalog, roots, [*unreadable, *((str(f), "") for f in owned)], retry_failed, report)
        todo = report.found - report.unchanged
        LOG.info(
            "%d images found: %d unchanged, %d to decode (%d failed before), %d recorded ones missing (%.1f s)",
            report.found,
            report.unchanged,
            todo,
            report.retried,
            missing,
            time.monotonic() - start,
        )
        if todo:
            with Progress(todo, "extract", enabled=progress) as bar:
                (distributor or LocalDistributor()).embed_shards(
                    job, catalog.scanned_todo(scan_chunk), catalog, report, bar
                )
        report.deleted = catalog.mark_missing_gone()
        report.new = todo - report.changed - report.retried - report.moved
        report.failed_total = write_errors_file(out, catalog, unreadable)
    report.seconds = time.monotonic() - start
    return report


def _scan(
    catalog: Catalog,
    roots: Sequence[Path | str],
    unreadable: list[tuple[str, str]],
    scan_chunk: int,
    skip: Sequence[Path] = (),
) -> int:
    """Walk the roots (not entering `skip`) into the catalog's scan, `scan_chunk` files at a time; returns the
    files found (none is an error). Folders that cannot be listed are added to `unreadable`."""
    images = iter_images(roots, unreadable, skip)
    catalog.begin_scan()
    while chunk := list(islice(images, scan_chunk)):
        catalog.add_scanned([(str(p), *_stat(p)) for p in chunk])
    for folder, reason in unreadable:
        LOG.warning("cannot list folder %s (%s): the images recorded under it keep their state", folder, reason)
    found = catalog.scanned()
    if not found:
        if unreadable:
            raise PipelineError(f"no image files found: cannot list {unreadable[0][0]} ({unreadable[0][1]})")
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise PipelineError(f"no image files found under {', '.join(map(str, roots))} (looked for {exts})")
    return found


def _compare(
    catalog: Catalog,
    roots: Sequence[Path | str],
    unreadable: list[tuple[str, str]],
    retry_failed: bool,
    report: ExtractReport,
) -> int:
    """Compare the scan with the record (counted in the report); returns the recorded files missing.
    A root that holds nothing now but had images is an error: an unmounted disk must not read as
    "all its images were deleted"."""
    run = catalog.begin_run()
    scopes = [str(Path(r).absolute()) for r in roots]
    unseen = [folder for folder, _ in unreadable]  # what they hold is unknown: nothing there is gone
    kinds = catalog.compare_scan(scopes, unseen, run=run, retry_failed=retry_failed, max_attempts=MAX_ATTEMPTS)
    for scope in scopes:
        if not catalog.scanned_under(scope):
            recorded = catalog.live_under(scope)
            if recorded:
                raise PipelineError(
                    f"{scope} holds no images now but {recorded} were recorded there; "
                    "is it unmounted? (delete its images one by one, or use another features folder)"
                )
    report.unchanged, report.changed, report.retried = kinds["unchanged"], kinds["changed"], kinds["retried"]
    return kinds["missing"]


def summary_lines(report: ExtractReport, max_failures: int = 50) -> list[str]:
    """The end-of-run summary a person reads: counts, speed, and every failure with its reason."""
    r = report
    lines = [
        f"{r.found} images found: {r.new} new, {r.changed} changed, {r.moved} moved, {r.unchanged} unchanged; "
        f"{r.deleted} deleted",
        f"{r.extracted} run through the model ({r.images_per_second:.1f} img/s), {r.duplicates} duplicates reused, "
        f"{r.failed} failed; {len(r.shards_written)} shards written to {r.features_dir} in {r.seconds:.1f} s",
    ]
    if r.unreadable_folders:
        lines.append(
            f"{len(r.unreadable_folders)} folders could not be listed; the images recorded under them keep their state:"
        )
        lines += [f"  {p}: {reason}" for p, reason in r.unreadable_folders]
    if r.retried:
        lines.append(
            f"{r.retried} files that had failed before were tried again: {r.retried - r.still_failing} "
            f"recovered, {r.still_failing} still failing"
        )
    if r.failed_total:
        lines.append(
            f"{r.failed_total} files could not be used ({r.failed} in this run), "
            f"all listed in {Path(r.features_dir) / ERRORS_FILE}"
        )
    if r.failures:
        lines += [f"  {p}: {reason}" for p, reason in r.failures[:max_failures]]
        if r.failed > max_failures:
            lines.append(f"  ... and {r.failed - max_failures} more")
    return lines

"""The extraction stage: image folders -> decode workers -> feature model -> HDF5 shards.

Incremental and resumable: the catalog (catalog.py) remembers every image's size, mtime,
content hash and where its feature lives, so a rerun decodes only new and changed files, runs
the model only on contents it has never seen (moved, renamed and duplicate files reuse their
feature), and marks deleted files gone. Shards are written atomically and recorded in the
catalog right after; a run killed at any point loses at most the shard in progress. A lock keeps
two runs from writing to one folder at once.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np

from .features import Catalog
from .decode_pool import DecodePool, DecodeSettings
from .errors import PipelineError
from .features import ERRORS_FILE, ShardWriter, write_errors_file, writing
from .images import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, iter_images
from .model import FeatureModel, ModelInfo, read_model_info, resolve_model_path
from .progress import Progress
from .features import check_model, list_shards, shard_info, shard_name

LOG = logging.getLogger(__name__)
MAX_ATTEMPTS = 6  # a transient failure is tried at most this often (over 31 runs: 1, 2, 4, 8, 16 runs apart)
SCAN_CHUNK = 10_000  # files stat'ed, compared and decoded per step: what memory holds of the file list


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
    unreadable_folders: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason): images kept as they were
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
    roots: list[Path | str],
    out: Path | str,
    model: Path | str | None = None,
    *,
    workers: int | None = None,
    batch_size: int = 8,
    shard_size: int = 512,
    threads: int = 0,
    device: str = "cpu",
    timeout: float = DEFAULT_DECODE_TIMEOUT,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    retry_failed: bool = False,
    scan_chunk: int = SCAN_CHUNK,
    ray: str | None = None,
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
    ray: the address of a Ray cluster ('auto', 'local', host:port) that decodes and embeds the files
    instead of this process (distributed.py); this process still scans and writes the catalog.
    """
    workers = default_workers() if workers is None else workers
    _validate(batch_size, shard_size, workers, threads, timeout, scan_chunk)
    if ray is not None:
        from .distributed import connect, extract_on_ray

        connect(ray)  # before any work: a cluster that cannot be reached is a one-line error at once
    out = Path(out)
    model_path = resolve_model_path(model)
    info = read_model_info(model_path)
    unreadable: list[tuple[str, str]] = []
    images = iter_images(roots, unreadable)
    start = time.monotonic()
    report = ExtractReport(features_dir=str(out), unreadable_folders=unreadable)
    with writing(out) as catalog:
        catalog.begin_scan()
        while chunk := list(islice(images, scan_chunk)):
            catalog.add_scanned([(str(p), *_stat(p)) for p in chunk])
        for folder, reason in unreadable:
            LOG.warning("cannot list folder %s (%s): the images recorded under it keep their state", folder, reason)
        report.found = catalog.scanned()
        if not report.found:
            if unreadable:
                raise PipelineError(f"no image files found: cannot list {unreadable[0][0]} ({unreadable[0][1]})")
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise PipelineError(f"no image files found under {', '.join(map(str, roots))} (looked for {exts})")
        check_model([shard_info(p) for p in list_shards(out)], info.checksum)
        catalog.reconcile()
        run = catalog.begin_run()
        scopes = [str(Path(r).absolute()) for r in roots]
        unseen = [folder for folder, _ in unreadable]  # what they hold is unknown: nothing there is gone
        kinds = catalog.compare_scan(scopes, unseen, run=run, retry_failed=retry_failed, max_attempts=MAX_ATTEMPTS)
        for scope in scopes:  # an unmounted disk must not read as "all its images were deleted"
            if not catalog.scanned_under(scope):
                recorded = catalog.live_under(scope)
                if recorded:
                    raise PipelineError(f"{scope} holds no images now but {recorded} were recorded there; "
                                        "is it unmounted? (delete its images one by one, or use another features folder)")
        report.unchanged, report.changed, report.retried = kinds["unchanged"], kinds["changed"], kinds["retried"]
        todo = report.found - report.unchanged
        LOG.info("%d images found: %d unchanged, %d to decode (%d failed before), %d recorded ones missing (%.1f s)",
                 report.found, report.unchanged, todo, report.retried, kinds["missing"], time.monotonic() - start)
        if todo:
            embed = _run if ray is None else partial(extract_on_ray, address=ray)
            embed(todo, catalog, out, model_path, info, report, scan_chunk=scan_chunk, workers=workers,
                  batch_size=batch_size, shard_size=shard_size, threads=threads, device=device,
                  settings=DecodeSettings(info.resize_to, max_pixels, timeout), progress=progress)
        report.deleted = catalog.mark_missing_gone()
        report.new = todo - report.changed - report.retried - report.moved
        report.failed_total = write_errors_file(out, catalog, unreadable)
    report.seconds = time.monotonic() - start
    return report


def _run(todo: int, catalog: Catalog, out: Path, model_path: Path, info: ModelInfo, report: ExtractReport, *,
         scan_chunk: int, workers: int, batch_size: int, shard_size: int, threads: int, device: str,
         settings: DecodeSettings, progress: bool | None) -> None:
    """Decode the catalog's scanned_todo() in workers, run the model in batches (one per input shape:
    an aspect-kept model takes a few), write shards; known contents run no model."""
    pool = DecodePool(workers, settings)  # workers start while the session loads
    try:
        fm = FeatureModel(model_path, threads=threads, device=device)
    except BaseException:
        pool.close()
        raise
    writer = ShardWriter(out, info, model_path, shard_size, catalog)
    # input shape -> (batch, (path, recorded before, Decoded) of its rows), filled up to batch_size
    batches: dict[tuple[int, ...], tuple[np.ndarray, list[tuple[str, bool, object]]]] = {}
    waiting: dict[str, list[tuple[str, bool, object]]] = {}  # hash -> copies of an image in a current batch
    # content hash -> (shard, row, path) of features extracted in this run, for those whose shard is not
    # recorded yet (the catalog answers for the others, missing paths included): under two shards' worth
    fresh: dict[str, tuple[str, int, str]] = {}

    def known(content_hash: str) -> tuple[str, int, str] | None:
        hit = fresh.get(content_hash)
        return hit if hit is not None and hit[0] == shard_name(writer.number) else catalog.live_feature(content_hash)

    def add_copy(path: str, recorded: bool, decoded, feature: np.ndarray, source: str) -> None:
        writer.add([path], feature[None], [decoded])
        if not recorded and catalog.note_moved(source):
            report.moved += 1
        else:
            report.duplicates += 1
        bar.update(1)

    def run_batch(shape: tuple[int, ...]) -> None:
        batch, batch_items = batches[shape]
        n = len(batch_items)
        if not n:
            return
        feats = fm.embed(batch[:n])
        where = writer.add([p for p, _, _ in batch_items], feats, [d for _, _, d in batch_items])
        if len(fresh) >= 2 * shard_size:  # most are in recorded shards, which the catalog answers for
            for h in [h for h, (shard, _, _) in fresh.items() if shard != shard_name(writer.number)]:
                del fresh[h]
        report.extracted += n
        bar.update(n)
        for j, (path, _, d) in enumerate(batch_items):
            fresh[d.content_hash] = (*where[j], path)
            for copy_path, recorded, copy in waiting.pop(d.content_hash, []):
                add_copy(copy_path, recorded, copy, feats[j], path)
        batch_items.clear()

    with pool, Progress(todo, "extract", enabled=progress) as bar:
        for chunk in catalog.scanned_todo(scan_chunk):
            for i, decoded, error in pool.imap([path for path, *_ in chunk]):
                path, kind, *stat = chunk[i]
                recorded = kind != "new"  # changed or retried: never counted as moved
                if error is not None:
                    writer.add_error(path, error, tuple(stat))
                    report.failures.append((path, str(error)))
                    report.failed += 1
                    report.still_failing += kind == "retried"
                    bar.update(1, failed=1)
                    continue
                h = decoded.content_hash
                if (hit := known(h)) is not None:
                    shard, row, source = hit
                    add_copy(path, recorded, decoded, writer.row(shard, row), source)
                elif h in waiting:
                    waiting[h].append((path, recorded, decoded))
                else:
                    waiting[h] = []
                    shape = decoded.pixels.shape
                    if shape not in batches:
                        batches[shape] = np.empty((batch_size, *shape), np.uint8), []
                    batch, batch_items = batches[shape]
                    batch[len(batch_items)] = decoded.pixels
                    batch_items.append((path, recorded, decoded))
                    if len(batch_items) == batch_size:
                        run_batch(shape)
        for shape in batches:
            run_batch(shape)
    writer.flush()
    report.shards_written = writer.written


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
        lines.append(f"{len(r.unreadable_folders)} folders could not be listed; the images recorded under them "
                     "keep their state:")
        lines += [f"  {p}: {reason}" for p, reason in r.unreadable_folders]
    if r.retried:
        lines.append(f"{r.retried} files that had failed before were tried again: {r.retried - r.still_failing} "
                     f"recovered, {r.still_failing} still failing")
    if r.failed_total:
        lines.append(f"{r.failed_total} files could not be used ({r.failed} in this run), "
                     f"all listed in {Path(r.features_dir) / ERRORS_FILE}")
    if r.failures:
        lines += [f"  {p}: {reason}" for p, reason in r.failures[:max_failures]]
        if r.failed > max_failures:
            lines.append(f"  ... and {r.failed - max_failures} more")
    return lines

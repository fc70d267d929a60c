"""The extraction stage: image folders -> decode workers -> feature model -> HDF5 shards.

Resumable and incremental by construction: the features folder is a list of completed shards;
every path already in a shard (as features or as a recorded failure) is skipped, so a rerun
after a crash, or after new images arrive, does only the missing work. A lock keeps two runs
from writing to one folder at once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .decode_pool import DecodePool, DecodeSettings
from .errors import PipelineError
from .fsutil import atomic_write_text, exclusive_lock
from .images import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, find_images
from .model import FeatureModel, ModelInfo, read_model_info, resolve_model_path
from .progress import Progress
from .shards import (ShardData, check_model, list_shards, next_shard_number, read_rows, read_shard, shard_info,
                     shard_name, write_shard)

LOG = logging.getLogger(__name__)
ERRORS_FILE = "errors.jsonl"


def default_workers() -> int:
    """Decoding costs ~1/30 of inference per image, so one worker per two cores keeps the model fed."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass
class ExtractReport:
    features_dir: str
    found: int = 0
    already_done: int = 0
    extracted: int = 0  # images run through the model
    duplicates: int = 0  # images whose identical content was already extracted: feature reused
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    failed_total: int = 0  # every file of the folder that could not be used, this run or earlier
    shards_written: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "features_dir": self.features_dir, "found": self.found, "already_done": self.already_done,
            "extracted": self.extracted, "duplicates": self.duplicates, "failed": self.failed, "failed_total": self.failed_total, "shards_written": self.shards_written,
            "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 2),
            "failures": [{"path": p, "reason": r} for p, r in self.failures],
        }


class _ShardWriter:
    """Accumulates rows and failures; writes a shard each time `shard_size` images are ready."""

    def __init__(self, out: Path, model: ModelInfo, model_path: Path, shard_size: int) -> None:
        self.out, self.model, self.model_path, self.shard_size = out, model, str(model_path), shard_size
        self.number = next_shard_number(out)
        self.written: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self.features: list[np.ndarray] = []
        self.paths: list[str] = []
        self.hashes: list[str] = []
        self.sizes: list[int] = []
        self.mtimes: list[float] = []
        self.error_paths: list[str] = []
        self.error_reasons: list[str] = []

    def add(self, paths: list[str], features: np.ndarray, decoded: list) -> list[tuple[str, int]]:
        """Queue rows (a shard never exceeds shard_size); returns (shard name, row) of each."""
        where: list[tuple[str, int]] = []
        start = 0
        while start < len(paths):
            take = min(self.shard_size - len(self.paths), len(paths) - start)
            rows = slice(start, start + take)
            where += [(shard_name(self.number), len(self.paths) + j) for j in range(take)]
            self.features.append(features[rows])
            self.paths += paths[rows]
            self.hashes += [d.content_hash for d in decoded[rows]]
            self.sizes += [d.size for d in decoded[rows]]
            self.mtimes += [d.mtime for d in decoded[rows]]
            start += take
            if len(self.paths) >= self.shard_size:
                self.flush()
        return where

    def row(self, name: str, row: int) -> np.ndarray:
        """A feature row already given to this writer, pending or written."""
        if name != shard_name(self.number):
            return read_rows(self.out / name, np.array([row]))[0]
        for block in self.features:
            if row < len(block):
                return block[row]
            row -= len(block)
        raise AssertionError(f"row {row} is not pending in {name}")

    def add_error(self, path: str, reason: str) -> None:
        self.error_paths.append(path)
        self.error_reasons.append(reason)

    def flush(self) -> None:
        if not self.paths and not self.error_paths:
            return
        features = np.concatenate(self.features) if self.features else np.zeros((0, self.model.dim), np.float32)
        data = ShardData(features, self.paths, self.hashes, np.array(self.sizes, np.int64),
                         np.array(self.mtimes, np.float64), self.error_paths, self.error_reasons)
        path = self.out / shard_name(self.number)
        write_shard(path, data, self.model, self.model_path)
        LOG.debug("wrote %s (%d images, %d failures)", path, len(self.paths), len(self.error_paths))
        self.written.append(path.name)
        self.number += 1
        self._reset()


def _validate(batch_size: int, shard_size: int, workers: int, threads: int, timeout: float) -> None:
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


def scan_done(features_dir: Path, model_sha256: str) -> tuple[set[str], dict[str, tuple[str, int]]]:
    """Paths already recorded in a shard (as features or failures), and content hash -> (shard, row)."""
    shards = list_shards(features_dir)
    check_model([shard_info(p) for p in shards], model_sha256)
    done: set[str] = set()
    known: dict[str, tuple[str, int]] = {}
    for p in shards:
        data = read_shard(p, features=False)
        done.update(data.paths)
        done.update(data.error_paths)
        for row, h in enumerate(data.hashes):
            known.setdefault(h, (p.name, row))
    return done, known


def write_errors_file(features_dir: Path) -> int:
    """Rewrite errors.jsonl beside the shards: every file that could not be used, with its reason."""
    lines = []
    for p in list_shards(features_dir):
        data = read_shard(p, features=False)
        lines += [json.dumps({"path": ep, "reason": er, "shard": p.name}, ensure_ascii=False)
                  for ep, er in zip(data.error_paths, data.error_reasons)]
    atomic_write_text(features_dir / ERRORS_FILE, "".join(line + "\n" for line in lines))
    return len(lines)


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
    progress: bool | None = None,
) -> ExtractReport:
    """Extract features of every image under `roots` into shards in `out`, skipping finished work.

    workers: decode processes (0 decodes in this process); threads: ONNX Runtime intra-op
    threads (0 = one per core); progress: a bar (None = only when stderr is a terminal).
    """
    workers = default_workers() if workers is None else workers
    _validate(batch_size, shard_size, workers, threads, timeout)
    out = Path(out)
    model_path = resolve_model_path(model)
    info = read_model_info(model_path)
    images = find_images(roots)
    if not images:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise PipelineError(f"no image files found under {', '.join(map(str, roots))} (looked for {exts})")
    start = time.monotonic()
    report = ExtractReport(features_dir=str(out), found=len(images))
    with exclusive_lock(out, "pipeline extract"):
        done, known = scan_done(out, info.weights_sha256)
        todo = [str(p) for p in images if str(p) not in done]
        report.already_done = len(images) - len(todo)
        LOG.info("%d images found, %d already done, %d to extract", len(images), report.already_done, len(todo))
        if todo:
            _run(todo, known, out, model_path, info, report, workers=workers, batch_size=batch_size,
                 shard_size=shard_size, threads=threads, device=device,
                 settings=DecodeSettings(info.input_size, max_pixels, timeout), progress=progress)
        report.failed_total = write_errors_file(out)
    report.seconds = time.monotonic() - start
    return report


def _run(todo: list[str], known: dict[str, tuple[str, int]], out: Path, model_path: Path, info: ModelInfo,
         report: ExtractReport, *, workers: int, batch_size: int, shard_size: int, threads: int, device: str,
         settings: DecodeSettings, progress: bool | None) -> None:
    """Decode `todo` in workers, run the model in batches, write shards; identical files run once."""
    pool = DecodePool(workers, settings)  # workers start while the session loads
    try:
        fm = FeatureModel(model_path, threads=threads, device=device)
    except BaseException:
        pool.close()
        raise
    writer = _ShardWriter(out, info, model_path, shard_size)
    size = info.input_size
    batch = np.empty((batch_size, size, size, 3), np.uint8)
    batch_items: list[tuple[str, object]] = []  # (path, Decoded) of the rows of `batch`
    waiting: dict[str, list[tuple[str, object]]] = {}  # hash -> copies of an image in the current batch

    def add_copy(path: str, decoded, feature: np.ndarray) -> None:
        writer.add([path], feature[None], [decoded])
        report.duplicates += 1
        bar.update(1)

    def run_batch() -> None:
        n = len(batch_items)
        if not n:
            return
        feats = fm.embed(batch[:n])
        where = writer.add([p for p, _ in batch_items], feats, [d for _, d in batch_items])
        report.extracted += n
        bar.update(n)
        for j, (_, d) in enumerate(batch_items):
            known[d.content_hash] = where[j]
            for path, copy in waiting.pop(d.content_hash, []):
                add_copy(path, copy, feats[j])
        batch_items.clear()

    with pool, Progress(len(todo), "extract", enabled=progress) as bar:
        for i, decoded, error in pool.imap(todo):
            path = todo[i]
            if error is not None:
                writer.add_error(path, error)
                report.failures.append((path, error))
                report.failed += 1
                bar.update(1, failed=1)
                continue
            h = decoded.content_hash
            if h in known:
                add_copy(path, decoded, writer.row(*known[h]))
            elif h in waiting:
                waiting[h].append((path, decoded))
            else:
                waiting[h] = []
                batch[len(batch_items)] = decoded.pixels
                batch_items.append((path, decoded))
                if len(batch_items) == batch_size:
                    run_batch()
        run_batch()
    writer.flush()
    report.shards_written = writer.written


def summary_lines(report: ExtractReport, max_failures: int = 50) -> list[str]:
    """The end-of-run summary a person reads: counts, speed, and every failure with its reason."""
    lines = [
        f"{report.found} images found, {report.already_done} already done, {report.extracted} extracted, "
        f"{report.duplicates} duplicates of extracted files, "
        f"{report.failed} failed, {len(report.shards_written)} shards written to {report.features_dir} "
        f"in {report.seconds:.1f} s ({report.images_per_second:.1f} img/s)"
    ]
    if report.failed_total:
        lines.append(f"{report.failed_total} files could not be used ({report.failed} in this run), "
                     f"all listed in {Path(report.features_dir) / ERRORS_FILE}")
    if report.failures:
        lines += [f"  {p}: {r}" for p, r in report.failures[:max_failures]]
        if report.failed > max_failures:
            lines.append(f"  ... and {report.failed - max_failures} more")
    return lines


"""The nightly job in one call: scrub -> fold the additions -> incremental extract -> compact shards -> build
index -> publish.

Layout of a workdir: features/ (shards, catalog.sqlite, errors.jsonl, live.sqlite: the journal of additions
and removals), index/ (CURRENT, versions/), ingest/ (the files added through the service or `pipeline add`).
A lock on the workdir makes a second run exit at once (BusyError, exit 75); a run killed at any moment
leaves the published index untouched and the next run picks up the work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from .errors import PipelineError
from .extract import ExtractReport, extract
from .features import (
    DEFAULT_COMPACT_BELOW,
    DEFAULT_SHARD_SIZE,
    FoldReport,
    compact,
    fold_live,
    live_digest,
    scrub,
)
from .fsutil import atomic_write_text, exclusive_lock
from .index import (
    CURRENT_FILE,
    DEFAULT_FLAT_BELOW,
    DEFAULT_KEEP,
    DEFAULT_RETRAIN_ABOVE,
    DEFAULT_TARGET_RECALL,
    build_index,
    metadata_changed,
    metadata_files,
    republish_metadata,
)
from .search import Searcher

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.11; only type checkers read it here

    from .distributed import RayDistributor

LOG = logging.getLogger(__name__)


class ExtractOptions(TypedDict, total=False):
    """The keywords of extract() that rebuild() passes on (its `distributor` is rebuild's own)."""

    workers: int | None
    batch_size: int
    shard_size: int
    threads: int
    device: str
    timeout: float
    max_pixels: int
    retry_failed: bool
    scan_chunk: int
    progress: bool | None


@dataclass
class RebuildReport:
    extract: ExtractReport
    damaged: list[tuple[str, str]]  # shards found damaged (deleted; their images extracted again), and why
    folded: FoldReport  # the journal's additions and removals folded into the shards and the catalog
    compacted: list[str]
    index_built: bool
    index_meta: dict
    seconds: float

    def to_dict(self) -> dict:
        return {
            "extract": self.extract.to_dict(),
            "damaged_shards": [{"shard": name, "why": why} for name, why in self.damaged],
            "folded": self.folded.to_dict(),
            "compacted_shards": self.compacted,
            "index_built": self.index_built,
            "index": self.index_meta,
            "seconds": round(self.seconds, 3),
        }


def rebuild(
    roots: Sequence[Path | str],
    workdir: Path | str,
    model: Path | str | None = None,
    *,
    keep: int = DEFAULT_KEEP,
    compact_below: float = DEFAULT_COMPACT_BELOW,
    target_recall: float = DEFAULT_TARGET_RECALL,
    flat_below: int = DEFAULT_FLAT_BELOW,
    distributor: RayDistributor | None = None,
    retrain: bool = False,
    retrain_above: float = DEFAULT_RETRAIN_ABOVE,
    scrub_shards: bool = True,
    metadata: Sequence[Path | str] = (),
    **extract_options: Unpack[ExtractOptions],
) -> RebuildReport:
    """Bring workdir's features and published index up to date with the images under `roots`.

    distributor: runs the extraction and the index filling on workers of its own (distributed.RayDistributor).
    The index is updated from the published version (build_index's `update`) unless `retrain`,
    or the changes since its training exceed `retrain_above` of its trained count. With `scrub_shards`, every
    shard is read through its checksums first and a damaged one is deleted, so that its images are
    extracted again (features.scrub: a shard's bytes read, about 2 KB an image). `metadata`: the user's
    metadata files (build_index's); when only they changed, the next version is the published one with new
    fields (index.republish_metadata: no model run, no training). The images added and removed since the last run
    (features.Journal) are folded in first, with the ids they were given and no model run (features.fold_live): the
    ingest folder is part of the collection without being named in `roots`."""
    if not 0 <= compact_below <= 1:
        raise PipelineError(f"--compact-below must be between 0 and 1 (got {compact_below})")
    workdir = Path(workdir)
    features, index_dir = workdir / "features", workdir / "index"
    start = time.monotonic()
    with exclusive_lock(workdir, "pipeline rebuild"):
        LOG.info("rebuild started: %s -> %s", ", ".join(map(str, roots)), workdir)
        t = time.monotonic()
        damaged = scrub(features) if scrub_shards else []
        if scrub_shards:
            LOG.info("scrub: %d damaged shard(s) deleted (%.1f s)", len(damaged), time.monotonic() - t)
        folded = fold_live(features, extract_options.get("shard_size", DEFAULT_SHARD_SIZE))  # before the scan
        t = time.monotonic()
        ex = extract(roots, features, model, distributor=distributor, **extract_options)
        LOG.info(
            "extract: %d new, %d changed, %d moved, %d deleted, %d unchanged; %d through the model, "
            "%d failed; %d earlier failures retried, %d still failing (%.1f s)",
            ex.new,
            ex.changed,
            ex.moved,
            ex.deleted,
            ex.unchanged,
            ex.extracted,
            ex.failed,
            ex.retried,
            ex.still_failing,
            time.monotonic() - t,
        )
        for path, reason in ex.failures:
            LOG.warning("could not use %s: %s", path, reason)
        compacted = compact(features, compact_below, extract_options.get("shard_size", DEFAULT_SHARD_SIZE))
        digest = live_digest(features)
        published = _published_meta(index_dir)
        files = metadata_files(index_dir, metadata, features)  # (the additions' own fields last)
        if published.get("live_digest") == digest and metadata_changed(published, files):
            t = time.monotonic()
            meta = republish_metadata(index_dir, files, keep).meta
            built = True
            LOG.info("published index %s: new metadata only (%.1f s)", meta["version"], time.monotonic() - t)
        elif published.get("live_digest") == digest:
            LOG.info("index is up to date (%s): nothing to build", published.get("version"))
            built, meta = False, published
        else:
            t = time.monotonic()
            # The kind of index asked for at its first build (--factory, --max-memory, --codes, ...) is asked again.
            asked = published.get("asked") or {}
            meta = build_index(
                features,
                index_dir,
                keep=keep,
                target_recall=target_recall,
                flat_below=flat_below,
                distributor=distributor,
                progress=False,
                update=not retrain,
                retrain_above=retrain_above,
                metadata=files,
                **asked,
            ).meta
            built = True
            LOG.info(
                "published index %s: %d images, %s, %s (%.1f s)",
                meta["version"],
                meta["count"],
                meta["factory"],
                "updated" if meta["made_by"] == "update" else "built",
                time.monotonic() - t,
            )
    report = RebuildReport(ex, damaged, folded, compacted, built, meta, time.monotonic() - start)
    LOG.info("rebuild finished in %.1f s", report.seconds)
    return report


def _published_meta(index_dir: Path) -> dict:
    """The published version's meta; {} when there is none or it does not open (a damaged index is
    replaced by a new build even when the features did not change)."""
    try:
        return Searcher(index_dir).meta
    except PipelineError as exc:
        if (index_dir / CURRENT_FILE).exists():
            LOG.warning("the published index cannot be used, building a new one: %s", exc)
        return {}


LAST_SUCCESS = "pipeline_rebuild_last_success_timestamp_seconds"


def write_metrics_file(path: Path | str, report: RebuildReport | None, exit_status: int, finished: float) -> None:
    """A node_exporter textfile (Prometheus text format, written atomically) about the run that just ended:
    its exit status, when, how long, what it did; and when a run last succeeded, kept from the previous file
    when this one failed (`report` None), so that an alert can fire on "no success for 36 hours"."""
    path = Path(path)
    last_success = finished if exit_status == 0 else _previous_success(path)
    lines: list[str] = []

    def gauge(name: str, help_text: str, values: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} gauge"])
        lines.extend(f"{name}{labels} {float(value)!r}" for labels, value in values)

    gauge("pipeline_rebuild_last_run_timestamp_seconds", "When the last rebuild ended (Unix time)", [("", finished)])
    gauge("pipeline_rebuild_last_run_exit_status", "Exit status of the last rebuild (0: success)", [("", exit_status)])
    gauge(LAST_SUCCESS, "When a rebuild last succeeded (Unix time; 0: never)", [("", last_success)])
    if report is not None:
        ex = report.extract
        gauge("pipeline_rebuild_last_run_duration_seconds", "Seconds the last rebuild took", [("", report.seconds)])
        images = [("new", ex.new), ("changed", ex.changed), ("deleted", ex.deleted), ("unchanged", ex.unchanged)]
        images += [("embedded", ex.extracted), ("failed", ex.failed)]
        gauge(
            "pipeline_rebuild_images",
            "Images of the last rebuild, by what happened to them",
            [(f'{{state="{state}"}}', n) for state, n in images],
        )
        gauge(
            "pipeline_rebuild_damaged_shards",
            "Shards the last rebuild found damaged and extracted again",
            [("", len(report.damaged))],
        )
        gauge(
            "pipeline_rebuild_index_built",
            "1 if the last rebuild published a new index version",
            [("", float(report.index_built))],
        )
        gauge(
            "pipeline_rebuild_index_images",
            "Images in the published index version",
            [("", float(report.index_meta.get("count", 0)))],
        )
    atomic_write_text(path, "\n".join(lines) + "\n")


def _previous_success(path: Path) -> float:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return 0.0
    for line in text.splitlines():
        if line.startswith(LAST_SUCCESS + " "):
            try:
                return float(line.split()[1])
            except ValueError:
                return 0.0
    return 0.0

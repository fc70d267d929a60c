"""The journal's additions and removals folded into the shards and the catalog: the nightly job's first step.

An addition becomes a shard row and a catalog row with the id it was given when added (the journal kept its
feature: no model runs), so the index built next holds it under the same id and searchers stop reading it
from the journal. A removal marks its catalog row gone. Every step can be killed and rerun: an addition
already in the catalog with its id is only marked folded, a deletion a crash interrupted is finished.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelMismatchError, PipelineError
from ..fsutil import atomic_write_text, fsync_path
from .catalog import Catalog
from .folder import DEFAULT_SHARD_SIZE, RowMeta, ShardWriter, writing
from .live import Journal, LiveImage
from .shards import list_shards, shard_model

LOG = logging.getLogger(__name__)
ADDED_FIELDS_FILE = "added-fields.jsonl"  # the folded additions' metadata: a metadata file of every build
ORPHAN_AGE_S = 3600.0  # an ingest file no addition names, older than this, is deleted (a killed addition's)


@dataclass
class FoldReport:
    folded: int = 0  # additions written into shards and the catalog
    gone: int = 0  # removed additions (or added files deleted by hand) marked gone in the catalog
    deleted: int = 0  # added files whose removal a crash had interrupted, deleted now
    orphans: int = 0  # ingest files no addition names (an addition killed before its row), deleted

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))


def fold_live(features_dir: Path | str, shard_size: int = DEFAULT_SHARD_SIZE) -> FoldReport:
    """Fold the journal of `features_dir` into its shards and catalog, under the folder's lock (BusyError while
    an extract runs). Additions whose files are gone are dropped. A folder without a journal: nothing to do."""
    features_dir = Path(features_dir)
    report = FoldReport()
    if not Journal.exists(features_dir):
        return report
    with Journal(features_dir) as journal, writing(features_dir) as catalog:
        catalog.reconcile()
        ingest = journal.ingest
        todo = journal.live(unfolded=True)
        recorded = catalog.live_of([a.path for a in todo])
        done = [a.id for a in todo if recorded.get(a.path) == (a.id, a.content_hash)]  # a fold killed midway
        if done:
            journal.mark_folded(done, "")
        todo = [a for a in todo if a.id not in set(done)]
        vanished = [a for a in todo if not os.path.isfile(a.path)]
        for a in vanished:
            LOG.warning("added image %d: its file %s is gone; it is dropped", a.id, a.path)
            journal.remove(a.path)
        todo = [a for a in todo if a not in vanished]
        if todo:
            report.folded = _write(features_dir, journal, catalog, todo, shard_size)
        removed = journal.removed()
        places = catalog.live_of([p for _, p, _ in removed])
        for idx, path, _ in removed:
            if places.get(path, (None,))[0] == idx:
                catalog.mark_gone([path])
                report.gone += 1
        if ingest is not None:
            lost = [p for p in catalog.live_paths_under(str(ingest)) if not os.path.isfile(p)]
            catalog.mark_gone(lost)
            report.gone += len(lost)
            catalog.add_roots([str(ingest)])
            # files a removal left (killed before its unlink) and files no addition names (killed before its row):
            # found without the journal's lock, each deleted under it after checking again that no row names it
            left = {p for _, p, _ in removed if _inside(p, ingest)}
            cutoff = time.time() - ORPHAN_AGE_S
            named = set(journal.live_paths())
            for path in sorted(_files(ingest)):
                if path in named or (path not in left and _mtime(path) >= cutoff):
                    continue
                with journal.locked():  # (milliseconds: no addition of the same bytes comes in between)
                    if not journal.live_at(path) and os.path.exists(path):
                        os.unlink(path)
                        fsync_path(Path(path).parent)
                        if path in left:
                            report.deleted += 1
                        else:
                            report.orphans += 1
        _write_fields(features_dir, journal)
    if report.folded or report.gone:
        LOG.info("folded the journal: %d addition(s) into shards, %d removal(s) recorded", report.folded, report.gone)
    return report


def _write(features_dir: Path, journal: Journal, catalog: Catalog, todo: list[LiveImage], shard_size: int) -> int:
    shards = list_shards(features_dir)
    if not shards:
        raise PipelineError(f"{features_dir} has no shards to fold its additions beside: run `pipeline extract` first")
    info, model_path = shard_model(shards[-1])
    want = journal.info().get("model")
    if want != info.checksum:
        raise ModelMismatchError(
            f"the additions in {journal.path} were embedded by model {str(want)[:12]}, the shards of {features_dir} "
            f"by {info.short()}; rebuild with the model that made them"
        )
    writer = ShardWriter(features_dir, info, model_path, shard_size, catalog)
    placed: dict[str, list[int]] = {}
    for start in range(0, len(todo), shard_size):
        chunk = todo[start : start + shard_size]
        where = writer.add(
            [a.path for a in chunk],
            np.stack([a.feature for a in chunk]),
            [RowMeta(a.content_hash, a.size, a.mtime, a.width, a.height, a.id) for a in chunk],
        )
        for a, (shard, _) in zip(chunk, where, strict=True):
            placed.setdefault(shard, []).append(a.id)
    writer.flush()
    for shard, ids in placed.items():  # recorded in the catalog first: a kill in between is repaired above
        journal.mark_folded(ids, shard)
    return len(todo)


def _write_fields(features_dir: Path, journal: Journal) -> None:
    """ADDED_FIELDS_FILE (JSON lines: path and fields) of the folded additions that carry metadata, rewritten when
    it would change: the build reads it after the user's metadata files, so an addition keeps its fields."""
    lines = "".join(
        json.dumps({"path": a.path, **a.fields}, ensure_ascii=False, sort_keys=True) + "\n"
        for a in journal.live(folded=True)
        if a.fields
    )
    path = features_dir / ADDED_FIELDS_FILE
    if lines or path.exists():
        if not path.exists() or path.read_text("utf-8") != lines:
            atomic_write_text(path, lines)


def added_fields_file(features_dir: Path | str) -> Path | None:
    """The folded additions' metadata file of a features folder, if any addition carried metadata."""
    path = Path(features_dir) / ADDED_FIELDS_FILE
    return path if path.exists() else None


def _inside(path: str, folder: Path) -> bool:
    return path.startswith(str(folder).rstrip(os.sep) + os.sep)


def _files(folder: Path) -> list[str]:
    return [os.path.join(d, name) for d, _dirs, names in os.walk(folder) for name in names]


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return float("inf")  # gone meanwhile: nothing to delete

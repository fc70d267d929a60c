"""Index versions: the version folder and its meta.json, the CURRENT pointer, publishing and pruning.

Layout of an index folder:
  CURRENT                 name of the published version (replaced by rename)
  versions/<version>/     index.faiss, ids.sqlite (idtable.py), meta.json, recall.npz (IVF: the recall
                          queries and their exact neighbours), and for some kinds a vector store
                          (store.py) or binary codes (codes.py); meta.json's "files" gives the size
                          and sha256 of every other file, recorded when the version is published
Readers resolve CURRENT once and keep that version; a build never touches a published version.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import PipelineError, cause, write_error
from ..features import ShardInfo
from ..fsutil import atomic_write_text, fsync_path, sha256_file
from ..model import ModelInfo
from ..version import __version__

INDEX_FILE, META_FILE, CURRENT_FILE, VERSIONS_DIR = "index.faiss", "meta.json", "CURRENT", "versions"
RECALL_FILE = "recall.npz"
META_SCHEMA = 1
DEFAULT_KEEP = 3  # published versions kept: older ones are pruned when a new one is published


@dataclass
class IndexReport:
    version_dir: str
    meta: dict


@dataclass(frozen=True)
class Collection:
    """What a version is made from: the live rows of a features folder's shards, their ids, and the model
    that made them (as meta.json records it: model_record)."""

    features_dir: Path
    parts: list[tuple[ShardInfo, np.ndarray]]  # each shard and the rows of it to index
    ids: np.ndarray  # the stable id of each of those rows, in order
    digest: str | None  # the catalog's live digest; None: no catalog, the ids are positions
    model: dict
    dim: int
    roots: tuple[str, ...] = ()  # the folders the collection is scanned from (Catalog.roots)
    metadata_files: tuple[Path, ...] = ()  # the user's metadata files (--metadata) its versions read

    @property
    def stable(self) -> bool:
        """Catalog ids: a later version can be made from this one by an update."""
        return self.digest is not None


def damaged(path: Path, why: Exception | str) -> PipelineError:
    """The one-line error for a file of a published version that cannot be read."""
    why = cause(why) if isinstance(why, Exception) else why
    return PipelineError(
        f"{path} is missing or corrupt ({why}); rebuild the index with `pipeline build-index` (or `pipeline rebuild`)"
    )


def published_name(index_dir: Path) -> str:
    """The version CURRENT names right now, unchecked (OSError: unreadable; ValueError: not UTF-8): for
    readers that poll it; current_version() checks it."""
    return (index_dir / CURRENT_FILE).read_text().strip()


def current_version(index_dir: Path) -> Path:
    """The published version folder (resolve once and keep it: later publishes don't affect it)."""
    pointer = index_dir / CURRENT_FILE
    if not index_dir.is_dir():
        raise PipelineError(f"index folder not found: {index_dir}")
    fix = (
        f"run `pipeline build-index` (or `pipeline rebuild`) to publish a new version, or write the name "
        f"of one of {index_dir / VERSIONS_DIR}/* into it"
    )
    try:
        version = published_name(index_dir)
    except FileNotFoundError:
        raise PipelineError(
            f"{index_dir} holds no published index (no {CURRENT_FILE} file); run `pipeline build-index`"
        ) from None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8
        raise PipelineError(f"{pointer} is damaged ({cause(exc)}); {fix}") from None
    if not version or not version.isprintable() or version != Path(version).name or version.startswith("."):
        raise PipelineError(f"{pointer} is damaged: it names {version[:40]!r}, not a version folder; {fix}")
    path = index_dir / VERSIONS_DIR / version
    if not path.is_dir():
        raise PipelineError(f"{pointer} names version {version}, which does not exist; {fix}")
    return path


def read_meta(version_dir: Path) -> dict:
    """A version's meta.json; a damaged one is a one-line error (damaged)."""
    path = version_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
        raise damaged(path, exc) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise damaged(path, "not an index description")
    return meta


def model_record(info: ModelInfo, path: str, checksum: str) -> dict:
    """meta.json's "model": the whole recipe of the indexed features (ModelInfo), so that readers learn it
    from the version, not from the shards; its checksum as the shards recorded it (what every "same
    model" check compares) and where the model file was."""
    return {**asdict(info), "checksum": checksum, "path": path}


def recorded_model(meta: dict) -> ModelInfo | None:
    """The recipe of a version's features, from its meta.json; None for a version written before meta.json
    kept the whole recipe (only name, checksum and path), or whose recipe does not give its checksum."""
    recorded = meta.get("model") or {}
    try:
        info = ModelInfo(**{f.name: recorded[f.name] for f in fields(ModelInfo)})
    except (KeyError, TypeError):
        return None
    return info if info.checksum == recorded.get("checksum") else None


def asked_for(**options: object) -> dict:
    """The index options a build was given (None: not given, left to the plan). Recorded in meta.json
    so that the nightly rebuild, which takes no index options, builds the same kind again: a collection
    indexed with --max-memory or --codes must not turn into a plain IVF-Flat at its next retraining."""
    return {k: v for k, v in options.items() if v is not None}


def built_fields(version: str, source: Collection, factory: str, kind: str, asked: dict) -> dict:
    """The meta.json fields that say what a full build made, from what model, and what kind of index
    was asked for (`asked`: the options given, which the nightly rebuild asks for again)."""
    n = len(source.ids)
    return {
        "schema_version": META_SCHEMA,
        "pipeline_version": __version__,
        "asked": asked,
        "created": _now(),
        "version": version,
        "model": source.model,
        "count": n,
        "dim": source.dim,
        "metric": "inner_product",
        "factory": factory,
        "kind": kind,
        "ids": "catalog" if source.stable else "positions",
        "made_by": "build",
        "trained_count": n,
        "changes_since_training": 0,
        "base_version": None,
    }


def updated_fields(version: str, source: Collection, base: dict, added: int, removed: int) -> dict:
    """The meta.json fields that say what an update changed of its `base` version's meta."""
    return {
        "pipeline_version": __version__,
        "created": _now(),
        "version": version,
        "model": source.model,
        "count": len(source.ids),
        "made_by": "update",
        "base_version": base["version"],
        "added": added,
        "removed": removed,
        "changes_since_training": base["changes_since_training"] + added + removed,
    }


def made_from(source: Collection, t_start: float, timings: dict[str, float]) -> dict:
    """The meta.json fields that say from what and how fast a version was made."""
    return {
        "build_seconds": round(time.monotonic() - t_start, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "features_dir": str(source.features_dir.resolve()),
        "shards": [{"name": i.path.name, "count": len(rows), "created": i.created} for i, rows in source.parts],
        "live_digest": source.digest,
        "roots": list(source.roots),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def new_version(out_dir: Path) -> Iterator[tuple[Path, str]]:
    """A temporary folder for a new version and the version's name; removed if the block fails."""
    version = datetime.now(timezone.utc).strftime("v%Y%m%dT%H%M%S%fZ")
    tmp = out_dir / VERSIONS_DIR / f".tmp-{version}-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        yield tmp, version
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, sqlite3.Error)):  # unwritable folder, full disk
            raise write_error(out_dir, exc, "`pipeline build-index`") from None
        raise


def publish_version(out_dir: Path, tmp: Path, meta: dict, keep: int, known: dict | None = None) -> IndexReport:
    """Write meta.json, with every other file's size and sha256 (what `pipeline verify` checks; `known`: those
    of files linked from a published version, not read again), make the version durable under its name,
    point CURRENT at it, prune old ones."""
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    known = known or {}
    meta["files"] = {}
    for f in files:
        name = f.relative_to(tmp).as_posix()
        meta["files"][name] = known.get(name) or {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    for f in [*files, tmp / META_FILE, *(d for d in tmp.rglob("*") if d.is_dir())]:
        fsync_path(f)
    final = out_dir / VERSIONS_DIR / meta["version"]
    os.rename(tmp, final)
    fsync_path(final.parent)
    atomic_write_text(out_dir / CURRENT_FILE, meta["version"] + "\n")
    prune_versions(out_dir, keep)
    return IndexReport(str(final), meta)


def version_damage(version_dir: Path) -> list[tuple[Path, str]] | None:
    """The files of a version that differ from what its meta.json recorded when it was published (missing, of
    another size, or another sha256), each with why; [] for an intact version, None for one published before
    versions recorded their checksums (nothing to compare with). Reads every byte: a scrub, not a check to
    run before each search."""
    try:
        meta = read_meta(version_dir)
    except PipelineError as exc:
        return [(version_dir / META_FILE, str(exc))]
    files = meta.get("files")
    if not isinstance(files, dict):
        return None
    damage = []
    for name, want in sorted(files.items()):
        path = version_dir / name
        try:
            size = path.stat().st_size
            if size != want["bytes"]:
                damage.append((path, f"{size} bytes, {want['bytes']} when published"))
            elif sha256_file(path) != want["sha256"]:
                damage.append((path, "its sha256 differs from the one recorded when it was published"))
        except OSError as exc:
            damage.append((path, cause(exc)))
    return damage


def version_dirs(index_dir: Path) -> list[Path]:
    """Every published version folder of an index, oldest first (temporaries left out)."""
    versions = index_dir / VERSIONS_DIR
    if not versions.is_dir():
        return []
    return sorted(p for p in versions.iterdir() if p.is_dir() and not p.name.startswith("."))


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

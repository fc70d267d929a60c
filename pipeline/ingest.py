"""Images in and out of a workdir's collection between nightly builds: the library behind `pipeline add`,
`remove` and `unhide` and the service's POST and DELETE /api/images.

An addition's bytes are stored under the workdir's ingest folder, named by their content
(`ingest/YYYY/MM/DD/<blake2b-128>.<ext>`, written to a temporary name, fsynced, renamed, the folder
fsynced), then recorded with their feature and metadata in the features folder's journal (one durable
SQLite transaction): once `add` returns, a power loss loses nothing, and every searcher finds the image
at its next search (index.LivePart). A kill before the record leaves only a file no addition names,
which the nightly fold deletes. The nightly `rebuild` folds the journal into shards and the index with
no model run (features.fold_live).

Removal: an added file is deleted; a file of the user's own folders is never deleted by the product, only
hidden (until `unhide`). Either way the journal records it first, so that from then on no search returns
the image, across restarts and rebuilds.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BusyError, ImageError, InputError, PipelineError, write_error
from .features import Journal, LiveImage, Lookup
from .filters import KEY_RE
from .fsutil import atomic_write_bytes, fsync_path
from .images import content_hash, decode_bytes, image_suffix, read_file, upright_size
from .index import BUILTIN_FIELDS, MAX_LIVE, current_version, read_meta
from .model import FeatureModel

INGEST_DIR = "ingest"  # beside features/ and index/ in a workdir
MAX_FIELDS = 64  # metadata fields an addition may carry
MAX_FIELDS_BYTES = 16_384  # their JSON


@dataclass(frozen=True)
class Added:
    """An image added, or found already in the collection (`duplicate_of`: its id; nothing was stored)."""

    id: int
    path: str
    duplicate_of: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "duplicate_of": self.duplicate_of}


@dataclass(frozen=True)
class Removed:
    """An image removed: its additions' ids, and whether its file was deleted (an added file) or only hidden."""

    path: str
    ids: list[int]
    deleted: bool

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ids": self.ids, "deleted": self.deleted, "hidden": not self.deleted}


def check_fields(fields: Mapping[str, Any] | None) -> dict[str, str | float | int]:
    """An addition's metadata, checked: keys as filters name them (not a built-in field), values text or finite
    numbers, at most MAX_FIELDS of them in MAX_FIELDS_BYTES; InputError (exit 2, HTTP 422) with the reason."""
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        raise InputError('metadata must be a JSON object of fields, such as {"sku": "A12", "price": 40}')
    if len(fields) > MAX_FIELDS:
        raise InputError(f"metadata has {len(fields)} fields; at most {MAX_FIELDS}")
    out: dict[str, str | float | int] = {}
    for key, value in fields.items():
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise InputError(f"metadata field {str(key)[:40]!r} is not a key: keys look like sku, category or price")
        if key in BUILTIN_FIELDS:
            raise InputError(f"metadata field {key} is built in (every image has it); name yours otherwise")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise InputError(f"metadata field {key}: a value is text or a number, not {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"metadata field {key}: {value} is not a number a filter can compare")
        out[key] = value
    if len(repr(out).encode()) > MAX_FIELDS_BYTES:
        raise InputError(f"metadata is over {MAX_FIELDS_BYTES} bytes")
    return out


class Collection:
    """A workdir's collection, open for additions and removals by one process (several may open it at once:
    the journal orders them). `checksum`, `dim`: the model that embeds the additions (the index's)."""

    def __init__(self, workdir: Path | str, checksum: str, dim: int) -> None:
        self.workdir = Path(workdir).absolute()
        self.features, self.ingest = self.workdir / "features", self.workdir / INGEST_DIR
        self.dim = dim
        self.journal = Journal(self.features, create=True)
        self._catalog = Lookup(self.features)
        if "model" not in self.journal.info():  # a new journal, maybe after a lost one: above every id given out
            self.journal.reserve(self._catalog.max_id())
        self.journal.bind(checksum, dim, self.ingest)

    def close(self) -> None:
        self.journal.close()
        self._catalog.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def existing(self, digest: str) -> Added | None:
        """The image of the collection with these bytes (an addition, else one the catalog records live and not
        hidden), if any."""
        found = self.journal.find(digest)
        if found is None:
            found = self._catalog.with_hash(digest)
            if found is not None and self.journal.is_hidden(found[1]):
                found = None
        return None if found is None else Added(found[0], found[1], found[0])

    def add(
        self,
        data: bytes,
        feature: np.ndarray,
        fields: Mapping[str, Any] | None = None,
        at: float | None = None,
        digest: str | None = None,
    ) -> Added:
        """Store `data` (already decoded and embedded into `feature` by the caller, with the service's limits)
        and record it; durable when it returns. The same bytes again: the existing image (`duplicate_of`)."""
        checked = check_fields(fields)
        digest = digest or content_hash(data)  # (the caller's, where it has hashed the bytes already)
        if feature.shape != (self.dim,):
            raise PipelineError(f"a feature of shape {feature.shape}, not ({self.dim},)")
        at = time.time() if at is None else at
        day = datetime.fromtimestamp(at, timezone.utc).strftime("%Y/%m/%d")
        path = self.ingest / day / f"{digest}{image_suffix(data)}"
        width, height = upright_size(data)
        with self.journal.locked():  # the same bytes from two writers: one stores them, the other finds them
            existing = self.existing(digest)
            if existing is not None:
                return existing
            if self.journal.counts()["unfolded"] >= MAX_LIVE:
                raise BusyError(
                    f"{MAX_LIVE} images were added since the last nightly fold, the most searchers hold beside an "
                    "index: run `pipeline rebuild` to fold them in"
                )
            _make_dirs(path.parent)
            atomic_write_bytes(path, data)
            st = os.stat(path)
            idx = self.journal.add(
                LiveImage(0, str(path), digest, st.st_size, st.st_mtime, width, height, feature, checked, at)
            )
        return Added(idx, str(path), None)

    def remove(self, path: str, known: bool = False) -> Removed:
        """Never return `path` again: recorded first, then an added file is deleted (a kill between: the nightly
        fold deletes it); a file of the user's own folders stays on disk, hidden until `unhide`. InputError for a
        path the collection does not hold (a typo), unless the caller `known` it (a service, from its version)."""
        if not known and not self.holds(path):
            raise InputError(f"{path} is not in the collection of {self.workdir} (give the path it was indexed under)")
        with self.journal.locked():
            ids = self.journal.remove(path)
            deleted = self.is_added(path) and os.path.exists(path)
            if deleted:
                try:
                    os.unlink(path)
                    fsync_path(Path(path).parent)
                except OSError as exc:
                    raise write_error(path, exc, "the removal") from None
        return Removed(path, ids, deleted)

    def unhide(self, path: str) -> bool:
        """Return a hidden image of the user's folders to the results; False if it was not hidden. An added file
        was deleted by its removal: InputError (add it again)."""
        if self.is_added(path):
            raise InputError(f"{path} was an added file and was deleted when removed; add it again instead")
        return self.journal.unhide(path)

    def holds(self, path: str) -> bool:
        """Whether `path` is a live addition or a live image of the catalog."""
        return bool(self.journal.live_at(path)) or self._catalog.holds(path)

    def is_added(self, path: str) -> bool:
        """Whether `path` lies in the ingest folder (a file the product stored, and may delete)."""
        return path.startswith(str(self.ingest) + os.sep)


def _make_dirs(folder: Path) -> None:
    """mkdir -p, each new folder's entry fsynced in its parent: an acknowledged file's path survives a power loss."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir(exist_ok=True)
            fsync_path(new.parent)
        except OSError as exc:
            raise write_error(new, exc, "the addition") from None


def workdir_model(workdir: Path | str, model: Path | str | None = None) -> FeatureModel:
    """The model that embeds a workdir's additions: `model`, else the one its published index records; checked
    against the index (ModelMismatchError)."""
    meta = read_meta(current_version(Path(workdir) / "index"))
    recorded = meta["model"].get("path")
    use = model or (recorded if recorded and Path(recorded).is_file() else None)
    fm = FeatureModel(use)
    if fm.info.checksum != meta["model"].get("checksum"):
        raise PipelineError(
            f"{fm.path} is {fm.info.short()}, but the index of {workdir} was built with model "
            f"{meta['model'].get('name', '?')}: pass the index's model (--model)"
        )
    return fm


@dataclass(frozen=True)
class AddOutcome:
    """One file given to add_files: added (or a duplicate), or why not."""

    source: str
    added: Added | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source}
        d.update(self.added.to_dict() if self.added else {"error": self.error})
        return d


def add_files(
    files: Sequence[Path | str],
    workdir: Path | str,
    model: Path | str | None = None,
    fields: Mapping[str, Any] | None = None,
    batch_size: int = 8,
) -> list[AddOutcome]:
    """Add image files to a workdir's collection (copied into its ingest folder: the originals may go), each
    durable before the next batch; a file that cannot be used gets its reason and the others go on."""
    checked = check_fields(fields)
    fm = workdir_model(workdir, model)
    out: dict[int, AddOutcome] = {}
    with Collection(workdir, fm.info.checksum, fm.info.dim) as collection:
        for start in range(0, len(files), batch_size):
            batch: list[tuple[int, bytes, np.ndarray]] = []
            for i in range(start, min(start + batch_size, len(files))):
                try:
                    data, _ = read_file(Path(files[i]))
                    pixels = decode_bytes(data, fm.info.resize_to)
                except ImageError as exc:
                    out[i] = AddOutcome(str(files[i]), error=str(exc))
                    continue
                batch.append((i, data, pixels))
            if not batch:
                continue
            features = fm.embed_each([px for _, _, px in batch], batch_size)
            for (i, data, _), feature in zip(batch, features, strict=True):
                try:
                    out[i] = AddOutcome(str(files[i]), collection.add(data, feature, checked))
                except (ImageError, PipelineError) as exc:  # a full disk, the live limit: said per file
                    out[i] = AddOutcome(str(files[i]), error=str(exc))
    return [out[i] for i in range(len(files))]


def remove_paths(workdir: Path | str, paths: Sequence[Path | str]) -> list[Removed]:
    """Remove images by path (Collection.remove), all or none: every path is checked to be in the collection
    before the first is removed (InputError names the first that is not)."""
    with open_collection(workdir) as collection:
        wanted = [str(Path(p).absolute()) for p in paths]
        for path in wanted:
            if not collection.holds(path):
                raise InputError(
                    f"{path} is not in the collection of {collection.workdir} (give the path it was indexed under); "
                    "nothing was removed"
                )
        return [collection.remove(path, known=True) for path in wanted]


def open_collection(workdir: Path | str) -> Collection:
    """The collection of a workdir for removals and unhiding (no model is loaded: the index names it)."""
    meta = read_meta(current_version(Path(workdir) / "index"))
    return Collection(workdir, meta["model"]["checksum"], int(meta["dim"]))

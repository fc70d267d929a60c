"""The HDF5 shard format: one file per shard of images, written atomically, read or streamed.

Schema (version 2), file `shard-NNNNN.h5`:
  features  float16 [n, dim]   L2-normalised features, row i belongs to paths[i]; chunked, each chunk with
                               HDF5's fletcher32 checksum (half the bytes of float32 at no measured
                               loss: docs/quality.md; a damaged chunk fails its read)
  paths     utf-8 str [n]      absolute image paths
  hashes    str [n]            blake2b-128 of each file's bytes
  sizes     int64 [n]          file size in bytes (fletcher32, as features)
  mtimes    float64 [n]        file modification time (seconds since the epoch) (fletcher32)
  widths, heights uint32 [n]   the picture's own size, upright; 0 unknown (fletcher32; absent in shards
                               written before 2026-12-07: read as 0)
  errors/paths, errors/reasons utf-8 str [m]  files of this shard that could not be used
  attrs: schema_version, model_name, model_sha256 (ModelInfo.checksum: weights and recipe), model_path,
         recipe (JSON of ModelInfo), dim, count,
         error_count, created (ISO 8601 UTC), pipeline_version,
         strings_sha256 (sha256 of the four string columns: HDF5 has no checksum filter for them)
Version 1 (float32 features, no checksums) is still read.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from ..errors import ModelMismatchError, PipelineError, cause, write_error
from ..fsutil import publish, temp_path
from ..model import ModelInfo
from ..version import __version__

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
FEATURE_DTYPE = np.float16  # on disk; readers always get float32
_CHUNK_BYTES = 64 * 1024  # a feature chunk: the unit of reading and of a checksum
SHARD_RE = re.compile(r"^shard-(\d{5,})\.h5$")
_STR = h5py.string_dtype("utf-8")


@dataclass
class ShardData:
    """The rows of one shard, in memory."""

    features: np.ndarray
    paths: list[str]
    hashes: list[str]
    sizes: np.ndarray
    mtimes: np.ndarray
    error_paths: list[str]
    error_reasons: list[str]
    widths: np.ndarray | None = None  # the pictures' own sizes (0: unknown; None: the shard has none, 0 each)
    heights: np.ndarray | None = None


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    count: int
    error_count: int
    model_name: str
    model_sha256: str
    dim: int
    created: str
    model_path: str  # where the model file was when the shard was written (a hint for search)
    schema_version: int = SCHEMA_VERSION  # 1: float32 features, no checksums

    @property
    def checksummed(self) -> bool:
        """Whether damage inside the shard's data is detected when it is read (schema 2 and later)."""
        return self.schema_version >= 2


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.h5"


def list_shards(features_dir: Path) -> list[Path]:
    """Completed shards of a features folder, in order (temporary files are ignored)."""
    if not features_dir.is_dir():
        return []
    return sorted(p for p in features_dir.iterdir() if SHARD_RE.match(p.name))


def next_shard_number(features_dir: Path) -> int:
    numbers = [int(m.group(1)) for p in list_shards(features_dir) if (m := SHARD_RE.match(p.name))]
    return max(numbers, default=-1) + 1


def remove_shard(features_dir: Path, number: int) -> None:
    """Delete shard `number` if it is there: one written by a task whose result was lost, before the
    task's files are given to other tasks (a recorded shard is retired through the catalog instead)."""
    (features_dir / shard_name(number)).unlink(missing_ok=True)


def _strings_sha256(columns: list[list[str]]) -> str:
    """One digest of the string columns, each string length-prefixed so that no two layouts collide."""
    digest = hashlib.sha256()
    for column in columns:
        digest.update(len(column).to_bytes(8, "little"))
        for text in column:
            raw = text.encode("utf-8", "surrogatepass")
            digest.update(len(raw).to_bytes(8, "little") + raw)
    return digest.hexdigest()


def write_shard(path: Path, data: ShardData, model: ModelInfo, model_path: str = "") -> None:
    """Write a shard to a temporary name, fsync, then rename: a reader never sees half a shard."""
    n = len(data.paths)
    assert data.features.shape == (n, model.dim), f"features {data.features.shape} != ({n}, {model.dim})"
    try:
        tmp = temp_path(path)
    except OSError as exc:
        raise write_error(path, exc, "`pipeline extract`") from None
    try:
        with h5py.File(tmp, "w") as f:
            rows = max(1, min(n, _CHUNK_BYTES // (2 * model.dim)))
            checked = {"fletcher32": True} if n else {}  # (an empty dataset cannot be chunked)
            f.create_dataset(
                "features",
                data=data.features.astype(FEATURE_DTYPE),
                chunks=(rows, model.dim) if n else None,
                **checked,
            )
            f.create_dataset("paths", data=np.array(data.paths, dtype=object), dtype=_STR)
            f.create_dataset("hashes", data=np.array(data.hashes, dtype=object), dtype=_STR)
            f.create_dataset("sizes", data=np.asarray(data.sizes, dtype=np.int64), **checked)
            f.create_dataset("mtimes", data=np.asarray(data.mtimes, dtype=np.float64), **checked)
            for name, column in (("widths", data.widths), ("heights", data.heights)):
                values = np.zeros(n, np.uint32) if column is None else np.asarray(column, dtype=np.uint32)
                f.create_dataset(name, data=values, **checked)
            errors = f.create_group("errors")
            errors.create_dataset("paths", data=np.array(data.error_paths, dtype=object), dtype=_STR)
            errors.create_dataset("reasons", data=np.array(data.error_reasons, dtype=object), dtype=_STR)
            f.attrs.update(
                schema_version=SCHEMA_VERSION,
                model_name=model.name,
                model_sha256=model.checksum,
                model_path=model_path,
                recipe=json.dumps(asdict(model)),
                dim=model.dim,
                count=n,
                error_count=len(data.error_paths),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                pipeline_version=__version__,
                strings_sha256=_strings_sha256([data.paths, data.hashes, data.error_paths, data.error_reasons]),
            )
        publish(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc, "`pipeline extract`") from None
        raise


@contextmanager
def _open(path: Path) -> Iterator[h5py.File]:
    """A shard opened for reading. Damage (unreadable, truncated, overwritten, a dataset or attribute
    missing) raises PipelineError naming the shard and the fix, wherever in the reading it shows."""
    try:
        with h5py.File(path, "r") as f:
            version = int(f.attrs.get("schema_version", -1))
            if version not in READABLE_VERSIONS:
                raise PipelineError(
                    f"shard {path} has schema version {version}; this pipeline reads {READABLE_VERSIONS}"
                )
            yield f
    except (OSError, KeyError, ValueError, TypeError) as exc:
        # fletcher32's failure reaches h5py as a bare "filter returned failure"
        why = "a checksum of its data does not match" if "filter returned failure" in str(exc) else cause(exc)
        raise PipelineError(
            f"cannot read shard {path} ({why}): it is damaged; delete it and rerun "
            "`pipeline extract` (its images are extracted again)"
        ) from None


def _strings(ds: h5py.Dataset) -> list[str]:
    return list(ds.asstr()[()]) if len(ds) else []


def shard_info(path: Path) -> ShardInfo:
    with _open(path) as f:
        a = f.attrs
        return ShardInfo(
            path,
            int(a["count"]),
            int(a["error_count"]),
            str(a["model_name"]),
            str(a["model_sha256"]),
            int(a["dim"]),
            str(a["created"]),
            str(a.get("model_path", "")),
            int(a["schema_version"]),
        )


def shard_model(path: Path) -> tuple[ModelInfo, str]:
    """The model a shard was made with (its recipe) and the model file path it recorded."""
    with _open(path) as f:
        return ModelInfo(**json.loads(f.attrs["recipe"])), str(f.attrs.get("model_path", ""))


def read_shard(path: Path, features: bool = True) -> ShardData:
    """All rows of a shard; `features=False` skips the feature matrix (for bookkeeping)."""
    with _open(path) as f:
        data = ShardData(
            features=_float32(f["features"][()]) if features else np.zeros((0, int(f.attrs["dim"])), np.float32),
            paths=_strings(f["paths"]),
            hashes=_strings(f["hashes"]),
            sizes=f["sizes"][()],
            mtimes=f["mtimes"][()],
            error_paths=_strings(f["errors/paths"]),
            error_reasons=_strings(f["errors/reasons"]),
            widths=_optional(f, "widths"),
            heights=_optional(f, "heights"),
        )
        rows = {len(data.paths), len(data.hashes), len(data.sizes), len(data.mtimes)}
        if features:
            rows.add(len(data.features))
        if len(rows) > 1 or len(data.error_paths) != len(data.error_reasons):
            raise ValueError("its columns have different lengths")  # (_open: a damaged shard)
        recorded = f.attrs.get("strings_sha256")
        strings = [data.paths, data.hashes, data.error_paths, data.error_reasons]
        if recorded is not None and str(recorded) != _strings_sha256(strings):
            raise ValueError("its paths or hashes do not match their checksum")  # (_open: a damaged shard)
        return data


def _optional(f: h5py.File, name: str) -> np.ndarray:
    """A column added after schema 2 was first written (widths, heights): zeros (unknown) where absent."""
    return f[name][()] if name in f else np.zeros(len(f["sizes"]), np.uint32)


def read_facts(path: Path) -> dict[str, np.ndarray]:
    """The file facts of every row (size, mtime, width, height), without features or strings: the built-in
    fields of a version's metadata, read from all shards in a fraction of a second per million rows."""
    with _open(path) as f:
        return {
            "size": f["sizes"][()],
            "mtime": f["mtimes"][()],
            "width": _optional(f, "widths"),
            "height": _optional(f, "heights"),
        }


def shard_damage(path: Path) -> str | None:
    """Why a shard cannot be used, every byte of it read through its checksums, or None when it is intact.
    When the file itself cannot be read (EIO, too many open files), OSError is raised instead: the shard
    may be sound, so the caller must not delete it as damaged."""
    try:
        read_shard(path)
        return None
    except PipelineError as exc:
        with open(path, "rb", buffering=0) as f:  # the bytes read: the damage is in them
            while f.read(1 << 22):
                pass
        return str(exc)


def _float32(features: np.ndarray) -> np.ndarray:
    return features.astype(np.float32, copy=False)


def read_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """Feature rows (sorted, unique indices) of one shard, without reading the rest: one read per run
    of consecutive rows (on a disk with milliseconds of latency per read, row by row reads of a
    sample of 1,310 rows took 8 s a shard)."""
    rows = np.asarray(rows, dtype=np.int64)
    with _open(path) as f:
        features = f["features"]
        if not len(rows):
            return np.zeros((0, int(f.attrs["dim"])), np.float32)
        starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)
        ends = np.append(starts[1:], len(rows))
        if len(starts) == len(rows):
            return _float32(features[rows])
        return _float32(
            np.concatenate(
                [features[rows[a] : rows[b - 1] + 1] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
            )
        )


def check_model(infos: list[ShardInfo], model_sha256: str | None = None) -> None:
    """All shards must come from one model (and from `model_sha256` when given)."""
    if not infos:
        return
    expected = model_sha256 or infos[0].model_sha256
    for info in infos:
        if info.model_sha256 != expected:
            raise ModelMismatchError(
                f"shard {info.path.name} was made by model {info.model_name} (weights sha256 "
                f"{info.model_sha256[:12]}), expected weights sha256 {expected[:12]}; "
                "use a separate features folder per model"
            )

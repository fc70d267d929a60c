"""A scrub of a workdir (`pipeline verify`): every file read and checked against its checksums, and what to
do about each damaged one.

Shards carry HDF5 fletcher32 checksums and a sha256 of their strings (schema 2); a version's meta.json
records each of its files' size and sha256 when it is published; the catalog is checked by SQLite's full
integrity check. Files written before their format carried checksums are read but cannot be compared:
they are listed as unverifiable, not as damaged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import PipelineError
from .features import CATALOG_FILE, Catalog, catalog_damage, list_shards, shard_damage, shard_info
from .index import CURRENT_FILE, VERSIONS_DIR, current_version, version_damage, version_dirs
from .progress import Progress


@dataclass(frozen=True)
class Damage:
    """A damaged file, why, and what brings it back."""

    path: str
    why: str
    fix: str


@dataclass
class VerifyReport:
    checked: list[str] = field(default_factory=list)  # files read and found intact
    unverifiable: list[str] = field(default_factory=list)  # read, but written without checksums
    damaged: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "checked": len(self.checked),
            "unverifiable": self.unverifiable,
            "damaged": [asdict(d) for d in self.damaged],
        }


SHARD_FIX = "delete it and rerun `pipeline extract` or `pipeline rebuild` (rebuild deletes damaged shards itself)"


def folders(path: Path) -> tuple[Path | None, Path | None]:
    """The features folder and the index folder of `path`: a workdir (features/, index/), or either alone."""
    if (path / "features").is_dir() or (path / "index").is_dir():
        return (
            path / "features" if (path / "features").is_dir() else None,
            path / "index" if (path / "index").is_dir() else None,
        )
    if list_shards(path) or Catalog.exists(path):
        return path, None
    if (path / CURRENT_FILE).exists() or (path / VERSIONS_DIR).is_dir():
        return None, path
    raise PipelineError(f"{path} holds no features folder or index (a workdir has features/ and index/)")


def verify(path: Path | str, *, progress: bool | None = None) -> VerifyReport:
    """Check every shard, the catalog and every index version under `path` (a workdir, a features folder or
    an index folder). Reads every byte: on a large collection, minutes."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"not a folder: {path}")
    features, index = folders(path)
    report = VerifyReport()
    shards = list_shards(features) if features else []
    versions = version_dirs(index) if index else []
    with Progress(len(shards) + len(versions), "verify", enabled=progress, unit="files") as bar:
        for shard in shards:
            _check_shard(shard, report)
            bar.update(1)
        if features is not None:
            why = catalog_damage(features)
            if why is not None:
                fix = f"delete it (and any {CATALOG_FILE}-wal/-shm beside it) and rerun `pipeline extract`"
                report.damaged.append(Damage(str(features / CATALOG_FILE), why, fix))
            elif Catalog.exists(features):
                report.checked.append(str(features / CATALOG_FILE))
        if index is not None:
            _check_index(index, versions, report, bar)
    return report


def _check_shard(shard: Path, report: VerifyReport) -> None:
    try:
        why = shard_damage(shard)
    except OSError as exc:  # the file itself cannot be read: damaged media, or this process's limits
        report.damaged.append(Damage(str(shard), f"cannot be read ({exc.strerror or exc})", SHARD_FIX))
        return
    if why is not None:
        report.damaged.append(Damage(str(shard), why, SHARD_FIX))
    elif shard_info(shard).checksummed:
        report.checked.append(str(shard))
    else:
        report.unverifiable.append(str(shard))


def _check_index(index: Path, versions: list[Path], report: VerifyReport, bar: Progress) -> None:
    published: Path | None = None
    try:
        published = current_version(index)
        report.checked.append(str(index / CURRENT_FILE))
    except PipelineError as exc:
        intact = ", ".join(v.name for v in versions) or "none"
        fix = (
            f"write the name of an intact version ({intact}) into {index / CURRENT_FILE}, "
            "or run `pipeline build-index` (or `pipeline rebuild`)"
        )
        report.damaged.append(Damage(str(index / CURRENT_FILE), str(exc), fix))
    for version in versions:
        damage = version_damage(version)
        if version == published:
            others = [v.name for v in versions if v != version]
            fix = "publish a new version: `pipeline build-index` (or `pipeline rebuild`)" + (
                f", or roll back: write the name of an intact version ({', '.join(others)}) into {index / CURRENT_FILE}"
                if others
                else ""
            )
        else:
            fix = f"delete the folder {version} (it is not the published version)"
        if damage is None:  # read (meta.json) but published before checksums were recorded
            report.unverifiable.append(str(version))
        elif damage:
            report.damaged += [Damage(str(p), why, fix) for p, why in damage]
        else:
            report.checked.append(str(version))
        bar.update(1)

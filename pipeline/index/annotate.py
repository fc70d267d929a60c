"""A version's fields, made: the built-in ones from the shards, the user's from the metadata files (read whole,
or only where a file changed), carried over from the published version where a file cannot be read; and the
version made from a metadata change alone (republish_metadata). index.metadata writes and reads them.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PipelineError
from ..features import added_fields_file
from ..filters import FieldType
from ..fsutil import exclusive_lock, sha256_file
from .idtable import IDS_FILE, IdTable
from .metadata import Metadata, collect_facts, write_metadata
from .metatable import JSON_SUFFIXES
from .userfields import (
    BUILTIN_FIELDS,
    GLOB_CHARS,
    KnownRows,
    SourceReport,
    UserField,
    kind_of,
    read_metadata_files,
)
from .versions import META_FILE, Collection, IndexReport, current_version, new_version, publish_version, read_meta

LOG = logging.getLogger(__name__)

CHANGED_LINES_AT_MOST = 1000  # (or a tenth of the file) changed lines read one by one; more: the file whole
SAMPLE_LINES = 1000  # first lines of a large file compared first, to give up on a rewrite at once


def metadata_files(out_dir: Path, given: Sequence[Path | str], features_dir: Path | None = None) -> tuple[Path, ...]:
    """The metadata files a build reads, as absolute paths: the --metadata files given, else those the published
    version was made with (the nightly job keeps reading the files it was first given); then the additions' own
    fields of `features_dir` (features.added_fields_file), read last."""
    if given:
        files = [Path(f).absolute() for f in given]
    else:
        try:
            meta = read_meta(current_version(out_dir))
        except PipelineError:
            meta = {}
        files = [Path(s["path"]) for s in (meta.get("metadata") or {}).get("sources", [])]
    added = added_fields_file(features_dir) if features_dir is not None else None
    if added is not None:
        files = [f for f in files if f != added.absolute()] + [added.absolute()]
    return tuple(files)


def metadata_changed(meta: dict[str, Any], files: Sequence[Path]) -> bool:
    """Whether the metadata files differ from those a version was made with (other files, or other bytes)."""
    recorded = {s["path"]: s.get("sha256") for s in (meta.get("metadata") or {}).get("sources", [])}
    if set(recorded) != {str(f) for f in files}:
        return True
    for f in files:
        try:
            if sha256_file(f) != recorded[str(f)]:
                return True
        except OSError:
            continue  # a file that vanished changes nothing: the version's fields stay
    return False


def make_metadata(version_dir: Path, source: Collection, files: Sequence[Path], out_dir: Path) -> dict[str, Any]:
    """Write metadata/ of a version being made (its ids.sqlite already written): the built-in fields from the
    source's shards, the user's from `files`; fields of a file that cannot be read now are carried over from
    the published version. Returns meta.json's "metadata"."""
    order = np.argsort(source.ids, kind="stable")
    facts = {name: column[order] for name, column in collect_facts(source.parts).items()}
    return _write_with_user_fields(version_dir, np.asarray(source.ids)[order], facts, files, out_dir)


def _write_with_user_fields(
    version_dir: Path,
    ids: np.ndarray,
    facts: dict[str, np.ndarray],
    files: Sequence[Path],
    out_dir: Path,
    previous: tuple[Metadata, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`previous`: the base version's fields and meta.json, for a version of the same images: its fields are
    changed by the lines of the metadata file that changed, when that can be done surely (_changed_lines), its
    rows' images taken where a file's path column did not change, its unchanged columns linked."""
    t0 = time.monotonic()
    incremental = _changed_lines(previous, files, ids) if previous is not None else None
    if incremental is not None:
        user, reports = incremental
    else:
        known = _known_rows(*previous) if previous is not None else {}
        # the paths (in id order: row i is ids[i]) are fetched while the files are read (SQLite lets go of the GIL)
        with IdTable(version_dir / IDS_FILE) as table, ThreadPoolExecutor(1) as pool:
            paths = table.paths if all(str(f) in known for f in files) else pool.submit(table.paths).result
            user, reports = read_metadata_files(files, paths, ids, known)
    for report in reports:
        LOG.info("metadata %s", report.summary())
        for example in report.examples:
            LOG.warning("metadata %s: %s", report.path, example)
    if any(r.missing for r in reports):
        user = _carried_over(user, ids, out_dir)
    copies = [None if r.missing else r.content for r in reports]
    positions = [r.positions for r in reports]
    same_images = previous[0].folder.parent if previous is not None else None
    sources = [r.record() for r in reports]
    record = write_metadata(version_dir, ids, facts, user, sources, copies, positions, same_images)
    record["incremental"] = incremental is not None
    LOG.info(
        "metadata: %d fields of %d images written (%.1f s)", len(record["fields"]), len(ids), time.monotonic() - t0
    )
    return record


def _known_rows(metadata: Metadata, meta: dict[str, Any]) -> dict[str, KnownRows]:
    """How the rows of each metadata file of a version mapped to its images, where the version kept it."""
    out = {}
    for i, source in enumerate((meta.get("metadata") or {}).get("sources", [])):
        positions = metadata.source_positions(i) if source.get("keys_sha256") else None
        if positions is not None:
            counts = (int(source.get(k, 0)) for k in ("duplicates", "unknown", "globs"))
            out[source["path"]] = KnownRows(source["keys_sha256"], positions, *counts)
    return out


def _carried_over(user: dict[str, UserField], ids: np.ndarray, out_dir: Path) -> dict[str, UserField]:
    """`user` plus the published version's user fields it lacks (a metadata file that could not be read keeps
    what it gave before), by id."""
    try:
        version = current_version(out_dir)
    except PipelineError:
        return user
    with IdTable(version / IDS_FILE) as table:
        previous = Metadata(version, table)
        if not previous.summary:
            return user
        out = dict(user)
        for name, info in previous.summary["fields"].items():
            if info["source"] != "file" or name in out:
                continue
            values = previous.values(name)
            rows = np.minimum(np.searchsorted(previous.ids, ids), len(previous.ids) - 1)
            known = (np.asarray(previous.ids)[rows] == ids) & _present(values[rows], info["type"])
            mine = np.flatnonzero(known)
            values = values[rows[mine]]
            out[name] = UserField(info["type"], mine.astype(np.int64), values)
        return out


def republish_metadata(out_dir: Path, files: Sequence[Path], keep: int) -> IndexReport:
    """The next version of `out_dir` with new metadata only: every other file of the published version is
    linked, not copied (and its checksum reused), nothing is trained or filled; for a nightly job whose
    metadata files changed while the collection did not."""
    t_start = time.monotonic()
    with exclusive_lock(out_dir, "pipeline build-index"):
        base = current_version(out_dir)
        base_meta = read_meta(base)
        with new_version(out_dir) as (tmp, version):
            for f in base.iterdir():
                if f.is_file() and f.name != META_FILE:
                    os.link(f, tmp / f.name)
            with IdTable(base / IDS_FILE) as table:
                previous = Metadata(base, table)
                ids = np.asarray(previous.ids)
                facts = {
                    name: np.asarray(previous.column(name)) if name in previous.fields else np.zeros(len(ids))
                    for name in ("size", "mtime", "width", "height")
                }
                record = _write_with_user_fields(tmp, ids, facts, files, out_dir, (previous, base_meta))
            linked = {k for k in base_meta.get("files", {}) if (tmp / k).is_file() and (tmp / k).samefile(base / k)}
            known = {k: base_meta["files"][k] for k in linked}  # (its index, the metadata columns that did not change)
            meta = {
                **base_meta,
                "version": version,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "made_by": "metadata",
                "base_version": base_meta["version"],
                "metadata": record,
                "build_seconds": round(time.monotonic() - t_start, 3),
            }
            return publish_version(out_dir, tmp, meta, keep, known=known)


def _changed_lines(
    previous: tuple[Metadata, dict[str, Any]], files: Sequence[Path], ids: np.ndarray
) -> tuple[dict[str, UserField], list[SourceReport]] | None:
    """The fields of a version of the same images as `previous`, changed by the lines of its one CSV metadata
    file that differ from the copy kept with it; None (read the file whole) wherever that is not sure: other
    files, a changed header, a file that had glob rows or repeated paths, quotes, globs or relative paths in
    the changed lines, a new line for an image another line already gave values, a field the previous
    version does not have. Each field keeps its type."""
    metadata, meta = previous
    sources = (meta.get("metadata") or {}).get("sources", [])
    if len(files) != 1 or len(sources) != 1 or sources[0]["path"] != str(files[0]):
        return None
    if sources[0].get("duplicates") or sources[0].get("globs", 1):  # (a glob's order against the rows decides)
        return None
    copy = metadata.source_copy(0)
    if files[0].suffix.lower() in JSON_SUFFIXES or not copy.is_file():
        return None
    try:
        if _rewritten(copy, files[0]):
            return None
        old = copy.read_text(encoding="utf-8-sig").splitlines()
        data = files[0].read_bytes()  # (read once: the version keeps a copy of exactly what was read)
        new = data.decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not old or not new or old[0] != new[0]:
        return None
    names = next(csv.reader([new[0]]))
    if names[0].partition(":")[0] != "path" or any(n.partition(":")[0] in BUILTIN_FIELDS for n in names[1:]):
        return None
    known = {n.partition(":")[0]: metadata.fields.get(n.partition(":")[0]) for n in names[1:]}
    fields: dict[str, FieldType] = {name: t for name, t in known.items() if t is not None}
    if len(fields) < len(known):
        return None
    limit = max(CHANGED_LINES_AT_MOST, len(new) // 10)
    if len(new) >= len(old):  # edited in place, rows appended: compared line by line, in one pass (to the limit)
        pairs = list(islice(((a, b) for a, b in zip(old, new, strict=False) if a != b), limit + 1))
        added, removed = [b for _, b in pairs] + new[len(old) :], [a for a, _ in pairs]
    else:  # rows deleted: the lines of each that the other lacks
        old_lines, new_lines = set(old[1:]), set(new[1:])
        added, removed = sorted(new_lines - old_lines), sorted(old_lines - new_lines)
    if len(added) + len(removed) > limit:
        return None  # a large change: one whole reading is faster than a look-up per changed line
    rows = list(csv.reader(added + removed))
    if any('"' in line for line in added + removed) or any(
        not row or not row[0] or GLOB_CHARS & set(row[0]) or not os.path.isabs(row[0]) for row in rows
    ):
        return None
    columns = {name: metadata.values(name) for name in fields}
    report = SourceReport(str(files[0]), hashlib.sha256(data).hexdigest(), rows=len(new) - 1, content=data)
    counts = {k: int(sources[0].get(k, 0)) for k in ("unknown", "wrong_types", "bad_rows")}
    re_added = {row[0] for row in rows[: len(added)]}
    gone = {row[0] for row in rows[len(added) :]}
    found_ids = metadata.id_table.ids_of([row[0] for row in rows])
    for key in re_added - gone:  # a new line for an image another line already gave values: read it whole
        if key in found_ids and _has_values(metadata, fields, int(np.searchsorted(ids, found_ids[key]))):
            return None
    for sign, line_rows in ((-1, rows[len(added) :]), (1, rows[: len(added)])):
        for row in line_rows:
            found = found_ids.get(row[0])
            if found is None:
                counts["unknown"] += sign
                continue
            at = int(np.searchsorted(ids, found))
            for (name, ftype), raw in zip(fields.items(), row[1:] + [""] * len(fields), strict=False):
                kind, value = kind_of(raw) if raw != "" else (None, None)
                ok = kind is not None and (ftype == "string" or kind == ftype)
                if kind is not None and not ok:
                    counts["wrong_types"] += sign
                    if sign > 0:
                        report.problem(f"{row[0]}: {name}={raw!r} is not a {ftype}; left out")
                if sign < 0 and row[0] not in re_added:  # a line gone: its image has no value from this file now
                    columns[name][at] = None if ftype == "string" else np.nan
                elif sign > 0:
                    columns[name][at] = (
                        (raw if ftype == "string" else value) if ok else (None if ftype == "string" else np.nan)
                    )
    report.unknown, report.wrong_types, report.bad_rows = counts["unknown"], counts["wrong_types"], counts["bad_rows"]
    if len(new) == len(old) and all(a[0] == b[0] for a, b in zip(rows[: len(added)], rows[len(added) :], strict=True)):
        report.keys_sha256 = sources[0].get("keys_sha256", "")  # lines changed in place, each naming its image
        report.positions = metadata.source_positions(0) if report.keys_sha256 else None
    report.matched = report.rows - report.unknown - report.bad_rows
    user = {}
    for name, ftype in fields.items():
        keep = np.flatnonzero(_present(columns[name], ftype))
        if len(keep):
            user[name] = UserField(ftype, keep.astype(np.int64), columns[name][keep])
    LOG.info(
        "metadata %s: %d lines changed, %d gone: the previous fields changed line by line",
        files[0],
        len(added),
        len(removed),
    )
    return user, [report]


def _rewritten(old: Path, new: Path) -> bool:
    """Whether a large file (over 100 SAMPLE_LINES lines) differs from its copy in over a fifth of its first
    SAMPLE_LINES lines: a rewrite, read whole at once without decoding both files to compare them line by
    line first (a change that only looks so at its head is read whole too: slower, never wrong)."""
    with open(old, "rb") as a, open(new, "rb") as b:  # the heads first: a small change stops here
        if sum(x != y for x, y in islice(zip(a, b, strict=False), SAMPLE_LINES)) <= SAMPLE_LINES // 5:
            return False
    with open(new, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) >= 100 * SAMPLE_LINES


def _has_values(metadata: Metadata, fields: dict[str, FieldType], at: int) -> bool:
    """Whether image `at` (a position) has a value of any of the file's fields in `metadata`."""
    for name, ftype in fields.items():
        value = metadata.column(name)[at]
        if (value >= 0) if ftype == "string" else not math.isnan(value):
            return True
    return False


def _present(values: np.ndarray, ftype: FieldType) -> np.ndarray:
    """Which of Metadata.values' values are values (not None, not NaN)."""
    if ftype == "string":
        return np.array([v is not None for v in values], bool)
    return ~np.isnan(values.astype(np.float64))

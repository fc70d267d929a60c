"""metadata/ in a version: every image's fields as typed columns aligned with the id table, and the ids a
filter selects from them; the one module that writes or reads that folder.

  fields.json            {"schema": 1, "count": n, "fields": {name: {"type", "source", "present"}},
                          "sources": [userfields.SourceReport.record() of each --metadata file]}
  ids.npy                int64 [n], sorted: row i of every column is image ids[i]
  f-<name>.npy           float64 [n] for number and date fields (dates in POSIX seconds; NaN: no value),
                         int32 [n] for text fields (an index into f-<name>.json, sorted; -1: no value)
  f-<name>.json          the distinct values of a text field, sorted

Built-in fields (size, mtime, width, height) come from the shards; `path` is the id table's. A filter
condition becomes a boolean mask over the sorted ids (numpy, about a millisecond per condition at 1M
images), never SQL text; path globs are range scans of the id table's path index.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PipelineError
from ..features import ShardInfo, read_facts
from ..filters import Condition, FieldType, Filter, check_key, glob_prefix, glob_regex, typed_values
from ..fsutil import exclusive_lock
from .idtable import IDS_FILE, IdTable
from .userfields import (
    BUILTIN_FIELDS,
    GLOB_CHARS,
    JSON_SUFFIXES,
    SourceReport,
    UserField,
    file_sha256,
    kind_of,
    read_metadata_files,
)
from .versions import (
    META_FILE,
    Collection,
    IndexReport,
    current_version,
    damaged,
    new_version,
    publish_version,
    read_meta,
)

LOG = logging.getLogger(__name__)

METADATA_DIR = "metadata"
CHANGED_LINES_AT_MOST = 1000  # (or a tenth of the file) changed lines read one by one; more: the file whole
SOURCES_DIR = "sources"  # copies of the metadata files a version was made from, by their order
FIELDS_FILE = "fields.json"
SCHEMA = 1


def metadata_files(out_dir: Path, given: Sequence[Path | str]) -> tuple[Path, ...]:
    """The --metadata files a build reads: those given, else those the published version was made with (the
    nightly job keeps reading the files it was first given), as absolute paths."""
    if given:
        return tuple(Path(f).absolute() for f in given)
    try:
        meta = read_meta(current_version(out_dir))
    except PipelineError:
        return ()
    return tuple(Path(s["path"]) for s in (meta.get("metadata") or {}).get("sources", []))


def metadata_changed(meta: dict[str, Any], files: Sequence[Path]) -> bool:
    """Whether the metadata files differ from those a version was made with (other files, or other bytes)."""
    recorded = {s["path"]: s.get("sha256") for s in (meta.get("metadata") or {}).get("sources", [])}
    if set(recorded) != {str(f) for f in files}:
        return True
    for f in files:
        try:
            if file_sha256(f) != recorded[str(f)]:
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
    changed by the lines of the metadata file that changed, when that can be done surely (_changed_lines)."""
    t0 = time.monotonic()
    incremental = _changed_lines(previous, files, ids) if previous is not None else None
    if incremental is not None:
        user, reports = incremental
    else:
        with IdTable(version_dir / IDS_FILE) as table:
            paths = table.paths()  # in id order: row i is ids[i]
        user, reports = read_metadata_files(files, paths, ids)
    for report in reports:
        LOG.info("metadata %s", report.summary())
        for example in report.examples:
            LOG.warning("metadata %s: %s", report.path, example)
    if any(r.missing for r in reports):
        user = _carried_over(user, ids, out_dir)
    record = write_metadata(version_dir, ids, facts, user, [r.record() for r in reports])
    sources = version_dir / METADATA_DIR / SOURCES_DIR
    sources.mkdir()
    for i, report in enumerate(reports):  # kept, so that the next change can be read line by line
        if not report.missing:
            shutil.copyfile(report.path, sources / str(i))
    record["incremental"] = incremental is not None
    LOG.info(
        "metadata: %d fields of %d images written (%.1f s)", len(record["fields"]), len(ids), time.monotonic() - t0
    )
    return record


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
            column = np.asarray(previous.column(name))
            rows = np.searchsorted(previous.ids, ids)
            rows = np.minimum(rows, len(previous.ids) - 1)
            known = (np.asarray(previous.ids)[rows] == ids) & (
                column[rows] >= 0 if info["type"] == "string" else ~np.isnan(column[rows])
            )
            mine = np.flatnonzero(known)
            values = column[rows[mine]]
            if info["type"] == "string":
                values = previous.strings(name)[values]
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
            known = {k: v for k, v in base_meta.get("files", {}).items() if not k.startswith(METADATA_DIR + "/")}
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
    copy = metadata.folder / SOURCES_DIR / "0"
    if files[0].suffix.lower() in JSON_SUFFIXES or not copy.is_file():
        return None
    try:
        old = copy.read_text(encoding="utf-8-sig").splitlines()
        new = files[0].read_text(encoding="utf-8-sig").splitlines()
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
    if len(new) >= len(old):  # edited in place, rows appended: compared line by line, in one pass
        pairs = [(a, b) for a, b in zip(old, new, strict=False) if a != b]
        added, removed = [b for _, b in pairs] + new[len(old) :], [a for a, _ in pairs]
    else:  # rows deleted: the lines of each that the other lacks
        old_lines, new_lines = set(old[1:]), set(new[1:])
        added, removed = sorted(new_lines - old_lines), sorted(old_lines - new_lines)
    if len(added) + len(removed) > max(CHANGED_LINES_AT_MOST, len(new) // 10):
        return None  # a large change: one whole reading is faster than a look-up per changed line
    rows = list(csv.reader(added + removed))
    if any('"' in line for line in added + removed) or any(
        not row or not row[0] or GLOB_CHARS & set(row[0]) or not os.path.isabs(row[0]) for row in rows
    ):
        return None
    columns: dict[str, np.ndarray] = {}
    for name, ftype in fields.items():
        column = metadata.column(name)
        if ftype == "string":
            values = np.full(len(ids), None, object)
            present = column >= 0
            values[present] = metadata.strings(name)[column[present]]
            columns[name] = values
        else:
            columns[name] = np.array(column, np.float64)
    report = SourceReport(str(files[0]), file_sha256(files[0]), rows=len(new) - 1)
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
    report.matched = report.rows - report.unknown - report.bad_rows
    user = {}
    for name, ftype in fields.items():
        values = columns[name]
        keep = np.flatnonzero(values != None) if ftype == "string" else np.flatnonzero(~np.isnan(values))  # noqa: E711
        if len(keep):
            user[name] = UserField(ftype, keep.astype(np.int64), values[keep])
    LOG.info(
        "metadata %s: %d lines changed, %d gone: the previous fields changed line by line",
        files[0],
        len(added),
        len(removed),
    )
    return user, [report]


def _has_values(metadata: Metadata, fields: dict[str, FieldType], at: int) -> bool:
    """Whether image `at` (a position) has a value of any of the file's fields in `metadata`."""
    for name, ftype in fields.items():
        value = metadata.column(name)[at]
        if (value >= 0) if ftype == "string" else not math.isnan(value):
            return True
    return False


def collect_facts(parts: Sequence[tuple[ShardInfo, np.ndarray]]) -> dict[str, np.ndarray]:
    """The built-in fields of the live rows, in the order of `parts` (a Collection's): read from the shards'
    small columns only."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in ("size", "mtime", "width", "height")}
    for info, rows in parts:
        facts = read_facts(info.path)
        for name, column in out.items():
            column.append(facts[name][rows])
    return {name: np.concatenate(c).astype(np.float64) if c else np.zeros(0, np.float64) for name, c in out.items()}


def write_metadata(
    version_dir: Path,
    ids: np.ndarray,
    facts: dict[str, np.ndarray],
    user: dict[str, UserField],
    sources: list[dict[str, Any]],
) -> dict[str, Any]:
    """Write metadata/ into a version being made: `ids` sorted, `facts` in their order, `user` fields by
    position in them. Returns what meta.json records of it."""
    folder = version_dir / METADATA_DIR
    folder.mkdir()
    sorted_ids = np.ascontiguousarray(ids, np.int64)
    np.save(folder / "ids.npy", sorted_ids)
    fields: dict[str, dict[str, Any]] = {}
    for name, column in facts.items():
        values = np.array(column, np.float64)
        values[values <= 0] = np.nan  # 0: not known (widths in shards written before they were recorded)
        np.save(folder / f"f-{name}.npy", values)
        fields[name] = {"type": BUILTIN_FIELDS[name], "source": "builtin", "present": int(np.isfinite(values).sum())}
    for name, f in user.items():
        if f.type == "string":
            distinct = sorted(set(f.values.tolist()))
            codes = np.full(len(sorted_ids), -1, np.int32)
            codes[f.rows] = np.searchsorted(np.array(distinct, dtype=object), f.values).astype(np.int32)
            np.save(folder / f"f-{name}.npy", codes)
            (folder / f"f-{name}.json").write_text(json.dumps(distinct, ensure_ascii=False))
        else:
            numbers = np.full(len(sorted_ids), np.nan)
            numbers[f.rows] = f.values
            np.save(folder / f"f-{name}.npy", numbers)
        fields[name] = {"type": f.type, "source": "file", "present": len(f.rows)}
    summary = {"schema": SCHEMA, "count": len(sorted_ids), "fields": fields, "sources": sources}
    (folder / FIELDS_FILE).write_text(json.dumps(summary, indent=1))  # (the version folder is published whole)
    return {"fields": {name: f["type"] for name, f in fields.items()}, "sources": sources}


class Metadata:
    """A version's fields, opened read-only with the version (columns memory-mapped, so that a version pruned
    later still reads): the ids a filter selects, and the fields of hits. A version made before metadata
    existed knows `path` only."""

    def __init__(self, version_dir: Path, id_table: IdTable, expected: bool = False) -> None:
        """`expected`: the version's meta.json records metadata, so a missing folder is damage, not age."""
        self.folder, self.id_table = version_dir / METADATA_DIR, id_table
        self.fields: dict[str, FieldType] = {"path": "string"}
        self.summary: dict[str, Any] = {}
        self._columns: dict[str, np.ndarray] = {}
        self._strings: dict[str, np.ndarray] = {}
        self._ids: np.ndarray | None = None
        path = self.folder / FIELDS_FILE
        if not expected and not path.exists():
            return  # a version made before metadata existed
        try:
            self.summary = json.loads(path.read_text())
            self.fields.update({name: f["type"] for name, f in self.summary["fields"].items()})
            path = self.folder / "ids.npy"
            self._ids = np.load(path, mmap_mode="r")
            for name, ftype in self.fields.items():
                if name == "path":
                    continue
                path = self.folder / f"f-{name}.npy"
                self._columns[name] = np.load(path, mmap_mode="r")
                if len(self._columns[name]) != len(self._ids):
                    raise ValueError(f"{len(self._columns[name])} rows, not {len(self._ids)}")
                if ftype == "string":
                    path = self.folder / f"f-{name}.json"
                    self._strings[name] = np.array(json.loads(path.read_text()), dtype=object)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise damaged(path, exc) from None

    @property
    def ids(self) -> np.ndarray:
        """Every id, sorted (the rows of the columns)."""
        if self._ids is None:
            self._ids = self.id_table.ids()
        return self._ids

    def strings(self, name: str) -> np.ndarray:
        """The distinct values of a text field, sorted (its codes index them)."""
        return self._strings[name]

    def column(self, name: str) -> np.ndarray:
        """A field's column (memory-mapped): float64 for numbers and dates, int32 codes for text."""
        return self._columns[name]

    def select(self, where: Filter) -> np.ndarray | None:
        """The sorted ids `where` selects (all conditions hold); None when it selects everything (no filter).
        FilterError for an unknown field, a value of the wrong type or an operator the field cannot take."""
        if not where:
            return None
        mask = np.ones(len(self.ids), bool)
        for cond in where.conditions:
            mask &= self._mask(cond)
        return np.asarray(self.ids[mask], np.int64)

    def _mask(self, cond: Condition) -> np.ndarray:
        ftype = check_key(cond, self.fields)
        values = typed_values(cond, ftype)  # checks the operator against the type too
        if cond.key == "path":
            mask = np.zeros(len(self.ids), bool)
            mask[np.searchsorted(self.ids, self._path_ids(cond))] = True  # (the id table's ids are all in self.ids)
            return mask
        column = self.column(cond.key)
        if ftype == "string":
            strings = self._strings[cond.key]
            wanted = [str(v) for v in values if _contains(strings, str(v))]
            codes = np.searchsorted(strings, np.array(wanted, dtype=object)).astype(np.int32)
            hit = np.isin(column, codes)
            return hit if cond.op in ("=", "in") else (column >= 0) & ~hit
        numbers = np.array(values, np.float64)
        with np.errstate(invalid="ignore"):  # NaN (no value) matches nothing
            if cond.op in ("=", "in"):
                return np.isin(column, numbers)
            if cond.op in ("!=", "not in"):
                return ~np.isnan(column) & ~np.isin(column, numbers)
            op = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}[cond.op]
            return op(column, numbers[0])

    def _path_ids(self, cond: Condition) -> np.ndarray:
        if cond.op == "glob":
            return self.id_table.ids_matching(glob_prefix(cond.values[0]), glob_regex(cond.values[0]))
        found = [self.id_table.find(v) for v in cond.values]
        ids = np.array([f[0] for f in found if f is not None], np.int64)
        if cond.op in ("=", "in"):
            return ids
        return np.setdiff1d(np.asarray(self.ids), ids)

    def of(self, ids: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        """Each id's fields (no value: left out; dates as ISO 8601 UTC), for hits shown to people."""
        wanted = np.asarray(ids, np.int64)
        if not self.summary or not len(wanted):
            return [{} for _ in wanted]
        rows = np.searchsorted(self.ids, wanted)
        rows = np.minimum(rows, len(self.ids) - 1)
        out: list[dict[str, Any]] = [{} for _ in wanted]
        for name, ftype in self.fields.items():
            if name == "path":
                continue
            column = self.column(name)
            for j, r in enumerate(rows.tolist()):
                v = column[r]
                if ftype == "string":
                    if v >= 0:
                        out[j][name] = self._strings[name][v]
                elif not math.isnan(v):
                    out[j][name] = _shown(float(v), ftype)
        return out


def _contains(strings: np.ndarray, s: str) -> bool:
    i = int(np.searchsorted(strings, s))
    return i < len(strings) and strings[i] == s


def _shown(v: float, ftype: FieldType) -> float | int | str:
    if ftype == "date":
        return datetime.fromtimestamp(v, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return int(v) if v.is_integer() else v

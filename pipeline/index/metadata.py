"""metadata/ in a version: every image's fields as typed columns aligned with the id table, and the ids a
filter selects from them; the one module that writes or reads that folder.

  fields.json            {"schema": 1, "count": n, "fields": {name: {"type", "source", "present"}},
                          "sources": [userfields.SourceReport.record() of each --metadata file]}
  ids.npy                int64 [n], sorted: row i of every column is image ids[i]
  f-<name>.npy           float64 [n] for number and date fields (dates in POSIX seconds; NaN: no value),
                         int32 [n] for text fields (an index into f-<name>.json, sorted; -1: no value)
  f-<name>.json          the distinct values of a text field, sorted
  sources/<i>            a copy of the i-th metadata file read (index.annotate reads its next change line by line)

Built-in fields (size, mtime, width, height) come from the shards; `path` is the id table's. A filter
condition becomes a boolean mask over the sorted ids (numpy, about a millisecond per condition at 1M
images), never SQL text; path globs are range scans of the id table's path index.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..features import ShardInfo, read_facts
from ..filters import Condition, FieldType, Filter, check_key, glob_regex, typed_values
from ..globs import glob_prefix
from .idtable import IdTable
from .userfields import (
    BUILTIN_FIELDS,
    UserField,
)
from .versions import (
    damaged,
)

LOG = logging.getLogger(__name__)

METADATA_DIR = "metadata"
SOURCES_DIR = "sources"  # copies of the metadata files a version was made from, by their order
FIELDS_FILE = "fields.json"
POSITIONS_SUFFIX = ".positions.npy"  # beside a source's copy: the position of each of its rows' image, -1: none
SCHEMA = 1


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
    copies: Sequence[bytes | None] = (),
    positions: Sequence[np.ndarray | None] = (),
    same_images: Path | None = None,
) -> dict[str, Any]:
    """Write metadata/ into a version being made: `ids` sorted, `facts` in their order, `user` fields by
    position in them, a copy of the bytes of each metadata file read (`copies`, so that the next change of one
    can be read line by line) and the image each of its rows named (`positions`, so that the next version of
    the same images reads the values only). `same_images`: a version of these same images, whose ids and
    built-in columns are linked rather than written again. Returns what meta.json records of it."""
    folder = version_dir / METADATA_DIR
    folder.mkdir()
    linked = same_images / METADATA_DIR if same_images is not None else None

    def save(name: str, array: np.ndarray) -> None:
        if linked is not None and (linked / name).is_file():
            os.link(linked / name, folder / name)
        else:
            np.save(folder / name, array)

    sorted_ids = np.ascontiguousarray(ids, np.int64)
    save("ids.npy", sorted_ids)
    fields: dict[str, dict[str, Any]] = {}
    for name, column in facts.items():
        values = np.array(column, np.float64)
        values[values <= 0] = np.nan  # 0: not known (widths in shards written before they were recorded)
        save(f"f-{name}.npy", values)
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
    (folder / SOURCES_DIR).mkdir()
    for i, copy in enumerate(copies):  # (None: a file that could not be read)
        if copy is not None:
            (folder / SOURCES_DIR / str(i)).write_bytes(copy)
    for i, rows in enumerate(positions):
        if rows is not None:
            np.save(folder / SOURCES_DIR / f"{i}{POSITIONS_SUFFIX}", np.asarray(rows, np.int32))
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

    def values(self, name: str) -> np.ndarray:
        """A field's values as a new array: float64 (NaN: none) for numbers and dates, objects (None: none)
        for text."""
        column = self.column(name)
        if self.fields[name] != "string":
            return np.array(column, np.float64)
        out = np.full(len(column), None, object)
        present = column >= 0
        out[present] = self._strings[name][column[present]]
        return out

    def source_copy(self, i: int) -> Path:
        """The copy of the i-th metadata file this version was made from (it may not exist)."""
        return self.folder / SOURCES_DIR / str(i)

    def source_positions(self, i: int) -> np.ndarray | None:
        """The image position each row of the i-th metadata file named (-1: none); None where not kept (a
        file with a glob naming several images, a version made before they were kept)."""
        try:
            return np.load(self.folder / SOURCES_DIR / f"{i}{POSITIONS_SUFFIX}").astype(np.int64)
        except (OSError, ValueError):
            return None

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

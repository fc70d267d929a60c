"""The user's own metadata files (`--metadata`) read into typed fields of the indexed images, every bad row
reported and none fatal.

Each file is read as a table by metatable (CSV or JSON lines keyed by path or by a path glob). A relative path
is relative to the metadata file's folder; a path with `*`, `?` or `[` is a glob (pipeline.globs) and
applies to every indexed path it matches. Rows apply in order, files in the order given: the last value of a
field wins. A field's type is the kind most of its values have (text wins ties; `key:number`, `key:date` or
`key:string` in a CSV header forces it); JSON numbers are numbers, strings are text or dates; a value of another
kind in a number or date field is a wrong type, reported with its row and left out.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from ..filters import FieldType, glob_regex, parse_date, parse_number
from ..globs import glob_prefix
from .metatable import Table, read_table

LOG = logging.getLogger(__name__)

BUILTIN_FIELDS: dict[str, FieldType] = {
    "path": "string",
    "mtime": "date",
    "size": "number",
    "width": "number",
    "height": "number",
}
GLOB_CHARS = frozenset("*?[")
NUMERIC_CHARS = b"0123456789eE+-.\n"  # all a plain decimal number holds (with the line ends joining them)
KINDS: tuple[FieldType, ...] = ("string", "date", "number")  # in this order, text wins a tie
EXAMPLES = 5  # rows named per kind of problem


@dataclass
class SourceReport:
    """What one metadata file gave, and what was wrong with it (counts, and the first few rows named)."""

    path: str
    sha256: str = ""
    rows: int = 0
    matched: int = 0  # rows that named at least one indexed image
    unknown: int = 0  # rows whose path (or glob) names no indexed image
    duplicates: int = 0  # rows naming a path an earlier row named (the later one wins)
    wrong_types: int = 0  # values not of their field's type (left out)
    bad_rows: int = 0  # rows without a path, or not an object, or not parseable
    globs: int = 0  # rows keyed by a glob (a later change of the file is then read whole)
    missing: bool = False  # the file could not be read: the previous version's fields stay
    keys_sha256: str = ""  # of the file's path column: unchanged, the rows name the images they named before
    examples: list[str] = field(default_factory=list)
    positions: np.ndarray | None = field(default=None, repr=False)  # each row's image, -1: none (no glob of many)
    content: bytes | None = field(default=None, repr=False)  # the bytes read (a version keeps them, to compare)

    def problem(self, text: str) -> None:
        if len(self.examples) < EXAMPLES * 4:
            self.examples.append(text)

    def bad_row(self, text: str) -> None:
        """A row left out: counted, and named among the first few."""
        self.bad_rows += 1
        self.problem(text)

    def summary(self) -> str:
        if self.missing:
            return f"{self.path}: cannot be read; the fields it gave before are kept"
        parts = [f"{self.rows} rows", f"{self.matched} matched"]
        for name in ("unknown", "duplicates", "wrong_types", "bad_rows"):
            if getattr(self, name):
                parts.append(f"{getattr(self, name)} {name.replace('_', ' ')}")
        return f"{self.path}: " + ", ".join(parts)

    def record(self) -> dict[str, Any]:
        """What meta.json keeps of it (the sha256 tells the nightly job whether the file changed)."""
        return {k: v for k, v in vars(self).items() if k not in ("examples", "positions", "content")}


@dataclass(frozen=True)
class KnownRows:
    """Which image each row of a metadata file named in a version (SourceReport.positions), and what it found:
    a version of the same images whose file has the same path column (keys_sha256) takes them as they are,
    without reading the id table's paths or looking one up (a nightly rewrite of the values only)."""

    keys_sha256: str
    positions: np.ndarray
    duplicates: int
    unknown: int
    globs: int


@dataclass(frozen=True)
class UserField:
    """A typed field over the images it covers: `rows` index the sorted ids given to read_metadata_files."""

    type: FieldType
    rows: np.ndarray  # int64 positions
    values: np.ndarray  # float64 (number, date: POSIX seconds) or object (text)


def kind_of(value: Any) -> tuple[FieldType | None, float | str | None]:
    """A raw value's kind and its typed value (None, None: missing or unusable)."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        return "string", "true" if value else "false"
    if isinstance(value, (int, float)):
        return ("number", float(value)) if math.isfinite(value) else (None, None)
    if isinstance(value, str):
        number = parse_number(value)
        if number is not None:
            return "number", number
        date = parse_date(value)
        if date is not None:
            return "date", date
        return "string", value
    return None, None  # objects and lists


CODES: dict[FieldType | None, int] = {None: 0, "number": 1, "date": 2, "string": 3}  # kinds as small ints


def _kinds(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Each raw value's kind (CODES) and typed value (float64 where all are numbers, else an object array); a
    column of plain numbers in text (the common case at a million rows) is typed by numpy at once, anything
    else value by value."""
    try:  # (the character check keeps out what numpy reads and parse_number does not: nan, inf, 1_000)
        joined = "\n".join(values)
        plain = bool(values) and joined.isascii() and not joined.encode().translate(None, NUMERIC_CHARS)
    except TypeError:  # not all text (JSON values)
        plain = False
    if plain:
        try:
            numbers = np.array(values, dtype=np.float64)
            if np.isfinite(numbers).all():
                return np.full(len(values), CODES["number"], np.int8), numbers
        except ValueError:
            pass
    pairs = [kind_of(v) for v in values]
    typed_values = np.empty(len(pairs), object)
    typed_values[:] = [v for _, v in pairs]
    return np.array([CODES[k] for k, _ in pairs], np.int8), typed_values


@dataclass
class _Chunk:
    """Values of one field from one file: image positions, raw values, kinds (CODES), typed values, and
    where each came from (the report's index, its line)."""

    rows: np.ndarray
    raw: Sequence[Any]
    kinds: np.ndarray
    typed: np.ndarray
    source: int
    lines: np.ndarray


def read_metadata_files(
    files: Sequence[Path | str],
    indexed: Sequence[str] | Callable[[], Sequence[str]],
    ids: np.ndarray,
    known: Mapping[str, KnownRows] | None = None,
) -> tuple[dict[str, UserField], list[SourceReport]]:
    """The user's fields of the indexed images (the i-th of the `indexed` paths is image `ids[i]`; ids sorted),
    and a report per file. A file that cannot be read is reported `missing` (the caller keeps what it gave
    before). `indexed`: the paths, or a call that gives them, made when a file's rows are first looked up (so
    that an id table's query runs meanwhile: at a million images it takes about as long as reading the file).
    `known`: by file path, how its rows mapped in a version of these same images (taken where the path column
    is unchanged)."""
    paths: list[str] | None = None
    by_path: dict[str, int] = {}  # made at the first file not in the index's own order
    order: list[int] | None = None  # sorted positions, made on the first glob
    chunks: dict[str, list[_Chunk]] = {}
    forced_types: dict[str, FieldType] = {}
    reports: list[SourceReport] = []
    for file in files:
        file = Path(file)
        report = SourceReport(str(file))
        reports.append(report)
        try:
            data = file.read_bytes()
            report.sha256, report.content = hashlib.sha256(data).hexdigest(), data
            table = read_table(file, data, report.bad_row)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            report.missing = True
            LOG.warning("metadata file %s cannot be read (%s); the fields it gave before are kept", file, exc)
            continue
        forced_types.update(table.forced)
        report.rows = len(table.keys)
        report.keys_sha256 = hashlib.sha256("\0".join(table.keys).encode(errors="surrogatepass")).hexdigest()
        before = (known or {}).get(str(file))
        if before is not None and before.keys_sha256 == report.keys_sha256 and len(before.positions) == report.rows:
            _rows_as_before(table, report, before)
            single, multi = before.positions, dict[int, list[int]]()
        else:
            if paths is None:
                paths = list(indexed() if callable(indexed) else indexed)
            by_path, order, single, multi = _rows_found(file, table, report, paths, by_path, order)
            report.positions = None if multi else single
        report.matched = int((single >= 0).sum()) + len(multi)
        lines = table.lines
        targeted = single >= 0  # rows naming at least one indexed image
        targeted[list(multi)] = True
        for name, column in table.columns.items():
            if name in BUILTIN_FIELDS:
                report.bad_row(f"`{name}` is a built-in field; that column is left out")
                continue
            if name in table.sparse:
                present = np.flatnonzero(np.fromiter((v is not None for v in column), bool, len(column)) & targeted)
            else:
                present = np.flatnonzero(targeted)
            raw = column if len(present) == len(column) else [column[i] for i in present.tolist()]
            kinds, typed_values = _kinds(raw)
            rows = single[present]
            if multi:  # glob rows: the value goes to every image the glob names, rows kept in file order
                targets = [multi.get(i, [int(single[i])]) for i in present.tolist()]
                pick = np.repeat(np.arange(len(present)), [len(t) for t in targets])
                rows = np.array([r for t in targets for r in t], np.int64)
                raw = [raw[i] for i in pick.tolist()]
                kinds, typed_values, present = kinds[pick], typed_values[pick], present[pick]
            chunks.setdefault(name, []).append(_Chunk(rows, raw, kinds, typed_values, len(reports) - 1, lines[present]))
    fields = {name: _typed_field(name, c, forced_types.get(name), reports) for name, c in chunks.items()}
    return {name: f for name, f in fields.items() if f is not None}, reports


def _rows_found(
    file: Path,
    table: Table,
    report: SourceReport,
    paths: Sequence[str],
    by_path: dict[str, int],
    order: list[int] | None,
) -> tuple[dict[str, int], list[int] | None, np.ndarray, dict[int, list[int]]]:
    """Each row's image: an exact path (a dictionary look-up); else a relative path, or a glob's images.
    Returns the look-ups made (by_path: made at the first file not in the index's own order; order: sorted
    positions, made at the first glob), each row's image (-1: none or several) and the rows of several."""
    if table.keys == paths:  # a file in the index's own order (an export of it): no look-up at all
        single = np.arange(len(paths), dtype=np.int64)
        report.duplicates = 0
    elif (joined := _hash_join(table.keys, paths)) is not None:
        single, report.duplicates = joined
    else:  # (two strings of one hash: by dictionary)
        by_path = by_path or dict(zip(paths, range(len(paths)), strict=True))
        single = np.array(list(map(by_path.get, table.keys, repeat(-1))), np.int64)
        report.duplicates = len(table.keys) - len(set(table.keys))
    _name_repeats(table, report)
    multi: dict[int, list[int]] = {}
    for i in np.flatnonzero(single < 0).tolist():
        key = table.keys[i]
        if GLOB_CHARS & set(key):
            report.globs += 1
            if order is None:
                order = sorted(range(len(paths)), key=paths.__getitem__)
            found = _glob_targets(key, file.parent, paths, order)
        elif os.path.isabs(key):
            found = []
        else:
            by_path = by_path or dict(zip(paths, range(len(paths)), strict=True))
            relative = by_path.get(os.path.normpath(file.parent / key))
            found = [] if relative is None else [relative]
        if len(found) == 1:
            single[i] = found[0]
        elif found:
            multi[i] = found
        else:
            report.unknown += 1
            report.problem(f"line {table.lines[i]}: {key} is not in the index")
    return by_path, order, single, multi


def _hash_join(keys: list[str], paths: Sequence[str]) -> tuple[np.ndarray, int] | None:
    """Each key's position in `paths` (-1: none) and how many keys repeat an earlier one, joined on the
    strings' hashes by numpy (both sorted, then merged: building a dictionary of a million paths and looking
    a million up took twice as long), the matches then checked string for string; None where two different
    strings share a hash or a key holds a NUL (the caller looks up by dictionary)."""
    if not paths or not keys:
        return None
    path_hashes = np.fromiter(map(hash, paths), np.int64, len(paths))
    path_order = np.argsort(path_hashes)
    ordered = path_hashes[path_order]
    key_hashes = np.fromiter(map(hash, keys), np.int64, len(keys))
    key_order = np.argsort(key_hashes)
    ordered_keys = key_hashes[key_order]
    if (ordered[1:] == ordered[:-1]).any():
        return None  # (the paths are distinct: two of one hash)
    at = np.minimum(np.searchsorted(ordered, ordered_keys), len(ordered) - 1)
    positions = np.full(len(keys), -1, np.int64)
    found = ordered[at] == ordered_keys
    positions[key_order[found]] = path_order[at[found]]
    rows = np.flatnonzero(positions >= 0).tolist()
    # every match at once: the matched keys joined against their paths joined (no path holds a NUL)
    matched = "\0".join(map(keys.__getitem__, rows))
    if matched.count("\0") != max(len(rows) - 1, 0):
        return None
    if matched != "\0".join(map(paths.__getitem__, positions[rows].tolist())):
        return None
    again = ordered_keys[1:] == ordered_keys[:-1]
    first: dict[int, str] = {}  # a repeated hash is the same path again, unless two keys share it
    for i in key_order[1:][again].tolist() + key_order[:-1][again].tolist():
        if first.setdefault(int(key_hashes[i]), keys[i]) != keys[i]:
            return None
    return positions, int(again.sum())


def _rows_as_before(table: Table, report: SourceReport, before: KnownRows) -> None:
    """The report of a file whose rows name the images they named before (KnownRows)."""
    report.positions, report.duplicates = before.positions, before.duplicates
    report.unknown, report.globs = before.unknown, before.globs
    _name_repeats(table, report)
    for i in np.flatnonzero(before.positions < 0)[: EXAMPLES * 4].tolist():
        report.problem(f"line {table.lines[i]}: {table.keys[i]} is not in the index")


def _name_repeats(table: Table, report: SourceReport) -> None:
    """The rows that name a path an earlier row named, in the report (when it counts any)."""
    if report.duplicates:
        seen: set[str] = set()
        for line, key in zip(table.lines, table.keys, strict=True):
            if key in seen and len(report.examples) < EXAMPLES * 4:
                report.problem(f"line {line}: {key} again (this row wins)")
            seen.add(key)


def _glob_targets(key: str, base: Path, paths: Sequence[str], order: list[int]) -> list[int]:
    """Positions of the paths a glob row names (relative globs: from the metadata file's folder)."""
    glob = key if os.path.isabs(key) or key.startswith("**") else str(base / key)
    regex, prefix = glob_regex(glob), glob_prefix(glob)
    lo = bisect_left(order, prefix, key=paths.__getitem__)
    out = []
    for i in order[lo:]:
        p = paths[i]
        if not p.startswith(prefix):
            break
        if regex.fullmatch(p):
            out.append(i)
    return out


def _typed_field(
    name: str, chunks: list[_Chunk], forced: FieldType | None, reports: list[SourceReport]
) -> UserField | None:
    """A field's type (forced, else the kind most of its values have; text wins ties) and its values, the last
    given for each image."""
    kinds = np.concatenate([c.kinds for c in chunks])
    counts = np.bincount(kinds, minlength=4)
    if not counts[1:].any():
        return None
    ftype: FieldType = forced if forced is not None else max(KINDS, key=lambda t: int(counts[CODES[t]]))
    rows = np.concatenate([c.rows for c in chunks])
    typed_values = np.concatenate([c.typed for c in chunks])
    if ftype == "string":
        keep = kinds > 0
        typed_values = np.empty(len(kinds), object)
        typed_values[:] = [
            r if isinstance(r, str) else "true" if r is True else "false" if r is False else f"{r:g}"
            for c in chunks
            for r in c.raw
        ]
    else:
        keep = kinds == CODES[ftype]
        for c in chunks:
            for j in np.flatnonzero((c.kinds > 0) & (c.kinds != CODES[ftype])).tolist():
                reports[c.source].wrong_types += 1
                reports[c.source].problem(f"line {c.lines[j]}: {name}={c.raw[j]!r} is not a {ftype}; left out")
    positions, values = (rows, typed_values) if keep.all() else (rows[keep], typed_values[keep])
    if not (np.diff(positions) > 0).all():  # the last value of each image wins (unless one each, in order)
        winner = np.full(int(positions.max()) + 1, -1, np.int64)
        winner[positions] = np.arange(len(positions))  # (of repeated indices numpy assigns the last)
        last = winner[winner >= 0]
        positions, values = positions[last], values[last]
    return UserField(ftype, positions, values if ftype == "string" else values.astype(np.float64, copy=False))

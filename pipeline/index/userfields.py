"""The user's own metadata files (`--metadata`): CSV or JSON lines keyed by path or by a path glob, read
into typed fields of the indexed images, every bad row reported and none fatal.

CSV: a header row with a `path` column; other columns are fields, typed from their values (`key:number`,
`key:date` or `key:string` in the header forces a type). JSON lines (`.jsonl`, `.ndjson`, `.json`): one
object per line with a "path"; JSON numbers are numbers, strings are text or dates. A relative path is
relative to the metadata file's folder; a path with `*`, `?` or `[` is a glob (filters.glob_regex) and
applies to every indexed path it matches. Rows apply in order, files in the order given: the last value
of a field wins. A field's type is the kind most of its values have (text wins ties); a value of another
kind in a number or date field is a wrong type, reported with its row and left out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PipelineError
from ..filters import FieldType, glob_prefix, glob_regex, parse_date, parse_number

LOG = logging.getLogger(__name__)

BUILTIN_FIELDS: dict[str, FieldType] = {
    "path": "string",
    "mtime": "date",
    "size": "number",
    "width": "number",
    "height": "number",
}
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
GLOB_CHARS = frozenset("*?[")
NOT_NUMERIC = re.compile(r"[^0-9eE+\-.\n]")  # a character no plain decimal number holds
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
    examples: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.examples) < EXAMPLES * 4:
            self.examples.append(text)

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
        return {k: v for k, v in vars(self).items() if k != "examples"}


@dataclass(frozen=True)
class UserField:
    """A typed field over the images it covers: `rows` index the sorted ids given to read_metadata_files."""

    type: FieldType
    rows: np.ndarray  # int64 positions
    values: np.ndarray  # float64 (number, date: POSIX seconds) or object (text)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Table:
    """One metadata file, column by column: each row's line, its path (or glob), and each field's raw values
    (None where the row has none)."""

    lines: np.ndarray  # int64
    keys: list[str]
    columns: dict[str, list[Any]]
    forced: dict[str, FieldType]


def _read_table(path: Path, report: SourceReport) -> _Table:
    """A metadata file as columns: rows without a path are counted as bad, never fatal."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        if path.suffix.lower() in JSON_SUFFIXES:
            lines, keys, objects = [], [], []
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict) or not isinstance(obj.get("path"), str) or not obj["path"]:
                    report.bad_rows += 1
                    report.problem(f'line {line}: not a JSON object with a "path"')
                    continue
                lines.append(line)
                keys.append(obj.pop("path"))
                objects.append(obj)
            names = sorted({name for obj in objects for name in obj})
            return _Table(np.array(lines, np.int64), keys, {n: [obj.get(n) for obj in objects] for n in names}, {})
        text = f.read()
    plain = _plain_columns(text)
    if plain is not None:
        header, columns, count = plain
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, [])
        body = list(reader)
        if any(len(row) != len(header) for row in body):  # ragged rows: padded (or cut) to the header
            body = [(row + [""] * len(header))[: len(header)] for row in body]
        columns = [list(c) for c in zip(*body, strict=True)] if body else [[] for _ in header]
        count = len(body)
    if not header:
        return _Table(np.zeros(0, np.int64), [], {}, {})
    names, forced = [], {}
    for column in header:
        name, _, kind = column.strip().partition(":")
        names.append(name)
        if kind in KINDS:
            forced[name] = kind
    if "path" not in names:
        raise PipelineError(f"{path}: its header has no `path` column (found: {', '.join(names) or 'nothing'})")
    at = names.index("path")
    keep = np.arange(count)
    if "" in columns[at]:
        has_path = np.fromiter(map(bool, columns[at]), bool, count)
        for i in np.flatnonzero(~has_path).tolist():
            if any(c[i] for c in columns):
                report.bad_rows += 1
                report.problem(f"line {i + 2}: no path")
        keep = np.flatnonzero(has_path)
        columns = [[c[i] for i in keep.tolist()] for c in columns]
    return _Table(
        keep + 2,
        columns[at],
        {n: c if "" not in c else [v or None for v in c] for n, c in zip(names, columns, strict=True) if n != "path"},
        forced,
    )


def _plain_columns(text: str) -> tuple[list[str], list[list[str]], int] | None:
    """(header, columns, rows) of a CSV text that needs no CSV parser: no quotes, no blank lines, every line
    as many fields as the header (an export of a million rows is that): split at once, not row by row. None
    for any other text (the csv module reads it)."""
    if "\r" in text and text.count("\r") == text.count("\r\n"):
        text = text.replace("\r\n", "\n")  # (csv.writer's and spreadsheets' line ends)
    if '"' in text or "\r" in text:
        return None
    lines = text.split("\n")
    if lines and not lines[-1]:
        lines.pop()
    if not lines or set(map(str.count, lines, repeat(","))) != {lines[0].count(",")} or "" in lines:
        return None
    width = lines[0].count(",") + 1
    fields = ",".join(lines[1:]).split(",") if len(lines) > 1 else []
    return lines[0].split(","), [fields[i::width] for i in range(width)], len(lines) - 1


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
        plain = bool(values) and not NOT_NUMERIC.search("\n".join(values))
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
    raw: np.ndarray
    kinds: np.ndarray
    typed: np.ndarray
    source: int
    lines: np.ndarray


def read_metadata_files(
    files: Sequence[Path | str], indexed: Sequence[str] | Callable[[], Sequence[str]], ids: np.ndarray
) -> tuple[dict[str, UserField], list[SourceReport]]:
    """The user's fields of the indexed images (the i-th of the `indexed` paths is image `ids[i]`; ids sorted),
    and a report per file. A file that cannot be read is reported `missing` (the caller keeps what it gave
    before). `indexed`: the paths, or a call that gives them, made once the first file is read (so that an id
    table's query runs meanwhile: at a million images it takes about as long as reading the file)."""
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
            report.sha256 = file_sha256(file)
            table = _read_table(file, report)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            report.missing = True
            LOG.warning("metadata file %s cannot be read (%s); the fields it gave before are kept", file, exc)
            continue
        forced_types.update(table.forced)
        report.rows = len(table.keys)
        if paths is None:
            paths = list(indexed() if callable(indexed) else indexed)
        # Each row's image: an exact path (a dictionary look-up); else a relative path, or a glob's images.
        if table.keys == paths:  # a file in the index's own order (an export of it): no look-up at all
            single = np.arange(len(paths), dtype=np.int64)
            report.duplicates = 0
        else:
            by_path = by_path or dict(zip(paths, range(len(paths)), strict=True))
            single = np.array(list(map(by_path.get, table.keys, repeat(-1))), np.int64)
            report.duplicates = len(table.keys) - len(set(table.keys))
        if report.duplicates:
            seen: set[str] = set()
            for line, key in zip(table.lines, table.keys, strict=True):
                if key in seen and len(report.examples) < EXAMPLES * 4:
                    report.problem(f"line {line}: {key} again (this row wins)")
                seen.add(key)
        multi: dict[int, list[int]] = {}
        for i in np.flatnonzero(single < 0).tolist():
            key = table.keys[i]
            if GLOB_CHARS & set(key):
                report.globs += 1
                if order is None:
                    order = sorted(range(len(paths)), key=paths.__getitem__)
                found = _glob_targets(key, file.parent, paths, order)
            else:
                relative = None if os.path.isabs(key) else by_path.get(os.path.normpath(file.parent / key))
                found = [] if relative is None else [relative]
            if len(found) == 1:
                single[i] = found[0]
            elif found:
                multi[i] = found
            else:
                report.unknown += 1
                report.problem(f"line {table.lines[i]}: {key} is not in the index")
        report.matched = int((single >= 0).sum()) + len(multi)
        lines = table.lines
        targeted = single >= 0  # rows naming at least one indexed image
        targeted[list(multi)] = True
        for name, column in table.columns.items():
            if name in BUILTIN_FIELDS:
                report.bad_rows += 1
                report.problem(f"`{name}` is a built-in field; that column is left out")
                continue
            if None in column:
                present = np.flatnonzero(np.fromiter((v is not None for v in column), bool, len(column)) & targeted)
            else:
                present = np.flatnonzero(targeted)
            values = column if len(present) == len(column) else [column[i] for i in present.tolist()]
            raw = np.empty(len(present), object)
            raw[:] = values
            kinds, typed_values = _kinds(values)
            rows = single[present]
            if multi:  # glob rows: the value goes to every image the glob names, rows kept in file order
                targets = [multi.get(i, [int(single[i])]) for i in present.tolist()]
                pick = np.repeat(np.arange(len(present)), [len(t) for t in targets])
                rows = np.array([r for t in targets for r in t], np.int64)
                raw, kinds, typed_values, present = raw[pick], kinds[pick], typed_values[pick], present[pick]
            chunks.setdefault(name, []).append(_Chunk(rows, raw, kinds, typed_values, len(reports) - 1, lines[present]))
    fields = {name: _typed_field(name, c, forced_types.get(name), reports) for name, c in chunks.items()}
    return {name: f for name, f in fields.items() if f is not None}, reports


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
        raw = np.concatenate([c.raw for c in chunks])
        typed_values = np.array(
            [r if isinstance(r, str) else "true" if r is True else "false" if r is False else f"{r:g}" for r in raw],
            dtype=object,
        )
    else:
        keep = kinds == CODES[ftype]
        for c in chunks:
            for j in np.flatnonzero((c.kinds > 0) & (c.kinds != CODES[ftype])).tolist():
                reports[c.source].wrong_types += 1
                reports[c.source].problem(f"line {c.lines[j]}: {name}={c.raw[j]!r} is not a {ftype}; left out")
    positions, values = rows[keep], typed_values[keep]
    if (np.diff(positions) > 0).all():  # one value per image, in order (a file in the index's order)
        last = np.arange(len(positions))
    else:  # the last value of each image wins
        last = len(positions) - 1 - np.unique(positions[::-1], return_index=True)[1]
        last.sort()
    return UserField(ftype, positions[last], values[last] if ftype == "string" else values[last].astype(np.float64))

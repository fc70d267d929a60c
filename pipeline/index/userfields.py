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
import json
import logging
import math
import os
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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


def _rows(path: Path, report: SourceReport) -> Iterator[tuple[int, str, dict[str, Any], dict[str, str]]]:
    """(line, path, raw values, forced types) of each row of a metadata file."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        if path.suffix.lower() in JSON_SUFFIXES:
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
                yield line, obj.pop("path"), obj, {}
            return
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        names, forced = [], {}
        for column in header:
            name, _, kind = column.strip().partition(":")
            names.append(name)
            if kind in ("number", "date", "string"):
                forced[name] = kind
        if "path" not in names:
            raise PipelineError(f"{path}: its header has no `path` column (found: {', '.join(names) or 'nothing'})")
        at = names.index("path")
        for line, cells in enumerate(reader, 2):
            if len(cells) <= at or not cells[at]:
                if any(cells):
                    report.bad_rows += 1
                    report.problem(f"line {line}: no path")
                continue
            yield line, cells[at], {n: c for n, c in zip(names, cells, strict=False) if n != "path" and c != ""}, forced


def _kind(value: Any) -> tuple[FieldType | None, float | str | None]:
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


def read_metadata_files(
    files: Sequence[Path | str], paths: Sequence[str], ids: np.ndarray
) -> tuple[dict[str, UserField], list[SourceReport]]:
    """The user's fields of the indexed images (`paths[i]` is image `ids[i]`; ids sorted), and a report per
    file. A file that cannot be read is reported `missing` (the caller keeps what it gave before)."""
    order = sorted(range(len(paths)), key=paths.__getitem__)
    by_path = {p: i for i, p in enumerate(paths)}
    sorted_paths = [paths[i] for i in order]
    values: dict[str, dict[int, tuple[Any, int, int]]] = {}  # field -> row -> (raw value, report, line)
    forced_types: dict[str, FieldType] = {}
    reports = []
    for file in files:
        file = Path(file)
        report = SourceReport(str(file))
        reports.append(report)
        try:
            report.sha256 = file_sha256(file)
            seen: set[str] = set()
            for line, key, raw, forced in _rows(file, report):
                report.rows += 1
                forced_types.update(forced)  # type: ignore[arg-type]  # only the three type names are kept
                if key in seen:
                    report.duplicates += 1
                    report.problem(f"line {line}: {key} again (this row wins)")
                seen.add(key)
                targets = _targets(key, file.parent, by_path, sorted_paths, order)
                if not targets:
                    report.unknown += 1
                    report.problem(f"line {line}: {key} is not in the index")
                    continue
                report.matched += 1
                for name, value in raw.items():
                    if name in BUILTIN_FIELDS:
                        report.bad_rows += 1
                        report.problem(f"line {line}: `{name}` is a built-in field; left out")
                        continue
                    column = values.setdefault(name, {})
                    for row in targets:
                        column[row] = (value, len(reports) - 1, line)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            report.missing = True
            LOG.warning("metadata file %s cannot be read (%s); the fields it gave before are kept", file, exc)
    fields = {name: _typed_field(name, column, forced_types.get(name), reports) for name, column in values.items()}
    return {name: f for name, f in fields.items() if f is not None}, reports


def _targets(key: str, base: Path, by_path: dict[str, int], sorted_paths: list[str], order: list[int]) -> list[int]:
    """Rows (positions) a row's path or glob names."""
    if not GLOB_CHARS & set(key):
        row = by_path.get(key if os.path.isabs(key) else os.path.normpath(base / key))
        return [] if row is None else [row]
    glob = key if os.path.isabs(key) or key.startswith("**") else str(base / key)
    regex, prefix = glob_regex(glob), glob_prefix(glob)
    start = bisect_left(sorted_paths, prefix)
    out = []
    for i in range(start, len(sorted_paths)):
        p = sorted_paths[i]
        if not p.startswith(prefix):
            break
        if regex.fullmatch(p):
            out.append(order[i])
    return out


def _typed_field(
    name: str, column: dict[int, tuple[Any, int, int]], forced: FieldType | None, reports: list[SourceReport]
) -> UserField | None:
    """A field's type (forced, else the kind most of its values have; text wins ties) and its values."""
    kinds = {row: _kind(raw) for row, (raw, _, _) in column.items()}
    counts: Counter[FieldType] = Counter(k for k, _ in kinds.values() if k is not None)
    if not counts:
        return None
    ftype: FieldType = forced if forced is not None else max(KINDS, key=counts.__getitem__)
    rows, out = [], []
    for row in sorted(column):
        kind, value = kinds[row]
        if kind is None or value is None:
            continue
        if ftype == "string":
            raw = column[row][0]
            value = (
                raw if isinstance(raw, str) else ("true" if raw is True else "false" if raw is False else f"{raw:g}")
            )
        elif kind != ftype:
            raw, source, line = column[row]
            reports[source].wrong_types += 1
            reports[source].problem(f"line {line}: {name}={raw!r} is not a {ftype}; left out")
            continue
        rows.append(row)
        out.append(value)
    values = np.array(out, dtype=object if ftype == "string" else np.float64)
    return UserField(ftype, np.array(rows, np.int64), values)

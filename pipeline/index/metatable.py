"""A user's metadata file (`--metadata`) as a table, column by column: CSV (a header with a `path` column; the
other columns are fields, `name:kind` forcing a field's type) or JSON lines (`.jsonl`, `.ndjson`, `.json`: one
object with a "path" a line). A row without a path is named to the caller and left out, never fatal; a file
without a `path` column is a PipelineError. userfields finds the images the rows name and types the columns.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np

from ..errors import PipelineError
from ..filters import FieldType

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
KINDS: frozenset[str] = frozenset(get_args(FieldType))  # what `name:kind` may force
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b',\r\n"')))  # all bytes but commas, line ends, quotes
_LINE_ENDS_TO_COMMAS = bytes.maketrans(b"\r\n", b",,")


@dataclass
class Table:
    """One metadata file, column by column: each row's line, its path (or glob), and each field's raw values
    (None where the row has none)."""

    lines: np.ndarray  # int64
    keys: list[str]
    columns: dict[str, list[Any]]
    forced: dict[str, FieldType]
    sparse: set[str]  # the columns with a row of no value


def read_table(path: Path, data: bytes, bad_row: Callable[[str], None]) -> Table:
    """A metadata file's bytes as columns: rows without a path are counted as bad, never fatal."""
    if path.suffix.lower() in JSON_SUFFIXES:
        lines, keys, objects = [], [], []
        for line, text in enumerate(data.decode("utf-8-sig").split("\n"), 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError:
                obj = None
            if not isinstance(obj, dict) or not isinstance(obj.get("path"), str) or not obj["path"]:
                bad_row(f'line {line}: not a JSON object with a "path"')
                continue
            lines.append(line)
            keys.append(obj.pop("path"))
            objects.append(obj)
        names = sorted({name for obj in objects for name in obj})
        by_name = {n: [obj.get(n) for obj in objects] for n in names}
        return Table(np.array(lines, np.int64), keys, by_name, {}, {n for n, c in by_name.items() if None in c})
    plain = plain_columns(data)
    if plain is not None:
        header, columns, count = plain
    else:
        reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))
        header = next(reader, [])
        body = list(reader)
        if any(len(row) != len(header) for row in body):  # ragged rows: padded (or cut) to the header
            body = [(row + [""] * len(header))[: len(header)] for row in body]
        columns = [list(c) for c in zip(*body, strict=True)] if body else [[] for _ in header]
        count = len(body)
    if not header:
        return Table(np.zeros(0, np.int64), [], {}, {}, set())
    names, forced = [], {}
    for column in header:
        name, _, kind = column.strip().partition(":")
        names.append(name)
        if kind in KINDS:
            forced[name] = cast(FieldType, kind)
    if "path" not in names:
        raise PipelineError(f"{path}: its header has no `path` column (found: {', '.join(names) or 'nothing'})")
    at = names.index("path")
    keep = np.arange(count)
    if "" in columns[at]:
        has_path = np.fromiter(map(bool, columns[at]), bool, count)
        for i in np.flatnonzero(~has_path).tolist():
            if any(c[i] for c in columns):
                bad_row(f"line {i + 2}: no path")
        keep = np.flatnonzero(has_path)
        columns = [[c[i] for i in keep.tolist()] for c in columns]
    named = [(n, c) for n, c in zip(names, columns, strict=True) if n != "path"]
    sparse = {n for n, c in named if "" in c}
    values = {n: c if n not in sparse else [v or None for v in c] for n, c in named}
    return Table(keep + 2, columns[at], values, forced, sparse)


def plain_columns(data: bytes) -> tuple[list[str], list[list[str]], int] | None:
    """(header, columns, rows) of a CSV file's bytes that need no CSV parser: no quotes, no blank lines, every
    line as many fields as the header (an export of a million rows is that), one kind of line end: checked on
    the file's commas and line ends alone (each is one byte in UTF-8), then split at once, not row by row.
    None for any other file (the csv module reads it)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.startswith((b"\n", b"\r")):
        return None
    if not data.endswith(b"\n"):
        first = data.find(b"\n")
        data += b"\r\n" if first > 0 and data[first - 1] == ord("\r") else b"\n"  # (the header's line end)
    head_end = data.index(b"\n") + 1
    shape = data[:head_end].translate(None, _NOT_STRUCTURE)  # the header's commas and its line end (and quotes)
    marks = data.translate(None, _NOT_STRUCTURE)
    lines = len(marks) // len(shape)
    if b'"' in shape or marks != shape * lines:
        return None  # a quote, a row of another width, another line end
    if len(shape) <= 2 and (b"\n\n" in data or b"\n\r\n" in data):
        return None  # a blank line (in a file of one column: wider ones have the header's commas on each line)
    width = shape.count(b",") + 1
    stride = width + shape.count(b"\r")  # (a carriage return ends one field more on each line)
    fields = data[head_end:-1].translate(_LINE_ENDS_TO_COMMAS).decode("utf-8").split(",") if lines > 1 else []
    if stride > width and any(fields[width::stride]):
        return None  # a carriage return inside a line
    header = data[:head_end].rstrip(b"\r\n").decode("utf-8").split(",")
    return header, [fields[i::stride] for i in range(width)], lines - 1

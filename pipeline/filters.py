"""The filter language of `--where` and `?where=`: parsed into conditions, typed against a version's
fields, never turned into SQL text.

One expression per `--where` (or `where=` parameter); several are combined with AND::

    category=shoes            key=value      key!=value
    category in (shoes,bags)  key in (a,b)   key not in (a,b)     at least one value
    price<100  mtime>=2019-06-01             < <= > >= on numbers and dates only
    path:/mnt/photos/2019/**  path:*.png     a glob on the image's absolute path

Keys are `[A-Za-z_][A-Za-z0-9_.-]*`. Whitespace around keys, operators and values is ignored; `in` and
`not in` need a space after the key and may be written in any case. A value is bare (no whitespace,
none of `, ( ) = < > " '`, and not starting with `!`) or quoted with "..." or '...', where a backslash
escapes the quote character and a backslash (any other backslash is kept as it is). So
`title="red, white & blue"` and `note='it\\'s'` work, and `key=""` is the empty value.

Globs follow pipeline.globs (`*`, `?`, `[...]`, `**`; a glob without a leading `/` matches anywhere).

Values stay text until `typed` meets them with a field's type (the metadata reader shares
`parse_number`, `parse_date` and `value_type`): numbers are plain decimal or exponent text, dates
ISO 8601 (`2019-06-01`, `2019-06-01T12:30`, `2019-06-01 12:30:00.5+02:00`; naive means UTC) compared
as POSIX seconds. Every mistake is a `FilterError`: one line that quotes the text and says what is
allowed (exit 2 on the CLI, 422 over HTTP).
"""

from __future__ import annotations

import calendar
import datetime as dt
import difflib
import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from .errors import InputError
from .globs import GlobError, compile_glob

Op = Literal["=", "!=", "in", "not in", "<", "<=", ">", ">=", "glob"]
FieldType = Literal["number", "date", "string"]

OPS: tuple[Op, ...] = get_args(Op)
ORDERED_OPS: frozenset[str] = frozenset({"<", "<=", ">", ">="})
KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")

_SYMBOL_OPS: dict[str, Op] = {"=": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_OP_CHARS = "=!<>"
_NOT_BARE = ",()\"'=<>"
_IN_RE = re.compile(r"(?:(not)\s+)?in(?=[\s(]|\Z)", re.IGNORECASE)
_USAGE = "use = != < <= > >= in (a,b) not in (a,b), or path:GLOB"


class FilterError(InputError):
    """A `--where` expression that cannot be read or does not fit the index's fields: the user fixes the text."""


def _shown(text: str) -> str:
    """The text as it goes into a one-line message: stripped, or repr'd where it holds line breaks or
    other unprintable characters (a message never spans lines)."""
    stripped = text.strip()
    return stripped if stripped and stripped.isprintable() else repr(text)


def _excerpt(text: str, limit: int = 24) -> str:
    """A quoted piece of the offending text, cut short so that the message stays one readable line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _is_bare(value: str) -> bool:
    """Whether a value reads back unquoted (else `__str__` quotes it)."""
    return bool(value) and not value.startswith("!") and not any(c.isspace() or c in _NOT_BARE for c in value)


def quote(value: str) -> str:
    """A value as the language writes it: bare where it reads back the same, else in double quotes."""
    if _is_bare(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Condition:
    """One parsed expression. Always valid: a hand-built one is checked as the parser would check it,
    so no reader ever meets a glob on another key or an `in` without values."""

    key: str  # "path" for globs
    op: Op
    values: tuple[str, ...]  # raw text, unquoted: one for every op but in / not in

    def __post_init__(self) -> None:
        if not KEY_RE.fullmatch(self.key):
            raise FilterError(f"{_excerpt(self.key)} is not a key: keys look like category, price or mtime")
        if self.op not in OPS:
            raise FilterError(f"{self.key}: unknown operator {self.op!r}; {_USAGE}")
        if not all(isinstance(v, str) for v in self.values):
            raise FilterError(f"{self.key}: values are text, not {self.values!r}")
        if self.op in ("in", "not in"):
            if not self.values:
                raise FilterError(f"{self.key} {self.op} (): give at least one value: {self.key} {self.op} (a,b)")
        elif len(self.values) != 1:
            raise FilterError(f"{self.key}{self.op}: takes one value, not {len(self.values)}")
        if self.op == "glob":
            if self.key != "path":
                raise FilterError(
                    f"{_shown(str(self))}: only path takes a glob; use path:GLOB, or = != in for {self.key}"
                )
            glob_regex(self.values[0])  # a bad glob fails here, not in a reader

    def __str__(self) -> str:
        """The canonical text: `parse_condition(str(c)) == c`."""
        if self.op == "glob":
            return f"path:{quote(self.values[0])}"
        if self.op in ("in", "not in"):
            return f"{self.key} {self.op} ({', '.join(quote(v) for v in self.values)})"
        return f"{self.key}{self.op}{quote(self.values[0])}"


@dataclass(frozen=True)
class Filter:
    """The conditions of one search, all of which an image must meet (AND); empty means no filtering."""

    conditions: tuple[Condition, ...] = ()

    def texts(self) -> list[str]:
        """One canonical expression per condition, as `--where` or `where=` takes them:
        `parse_where(f.texts()) == f`."""
        return [str(c) for c in self.conditions]

    def keys(self) -> list[str]:
        """The keys the conditions name, in first-use order (to check them against an index's fields)."""
        return list(dict.fromkeys(c.key for c in self.conditions))

    def __str__(self) -> str:
        """For logs and messages only (`category=shoes AND price<100`); `texts()` is the form that parses."""
        return " AND ".join(self.texts())

    def __bool__(self) -> bool:
        return bool(self.conditions)


class _Scanner:
    """A cursor over one expression; its errors all start with the expression itself."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, reason: str) -> FilterError:
        return FilterError(f"{_shown(self.text)}: {reason}")

    def skip_space(self) -> bool:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.pos > start

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def rest(self) -> str:
        return self.text[self.pos :]

    def value(self, after: str) -> str:
        """A bare or quoted value at the cursor (whitespace before it skipped)."""
        self.skip_space()
        ch = self.peek()
        if ch in ("'", '"'):
            return self.quoted(ch)
        start = self.pos
        while self.peek() and not (self.peek().isspace() or self.peek() in _NOT_BARE):
            self.pos += 1
        if self.pos > start:
            return self.text[start : self.pos]
        if ch in ("", ",", ")"):
            raise self.fail(f'no value after {after!r}; an empty value is written ""')
        raise self.fail(
            f"{_excerpt(self.rest())} is not a value after {after!r}; "
            "quote values that hold spaces or , ( ) = < > quotes"
        )

    def quoted(self, q: str) -> str:
        """A quoted value: backslash escapes the quote character and itself, any other backslash stays."""
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.text[self.pos + 1 : self.pos + 2] in (q, "\\"):
                out.append(self.text[self.pos + 1])
                self.pos += 2
            elif ch == q:
                self.pos += 1
                return "".join(out)
            else:
                out.append(ch)
                self.pos += 1
        raise self.fail(
            f"unclosed quote {_excerpt(self.text[start:])}; end it with {q}, and write a {q} inside as \\{q}"
        )

    def value_list(self, op: str) -> tuple[str, ...]:
        """`(a, b, ...)` after in / not in: at least one value."""
        self.skip_space()
        if self.peek() != "(":
            raise self.fail(f"expected ( after {op!r}: key {op} (a,b)")
        self.pos += 1
        self.skip_space()
        if self.peek() == ")":
            raise self.fail(f"empty list after {op!r}; give at least one value: key {op} (a,b)")
        values = [self.value("(")]
        while True:
            self.skip_space()
            ch = self.peek()
            if ch == ")":
                self.pos += 1
                return tuple(values)
            if ch == ",":
                self.pos += 1
                values.append(self.value(","))
            elif not ch:
                raise self.fail(f"unclosed ( after {op!r}; end the list with )")
            else:
                raise self.fail(
                    f"expected , or ) at {_excerpt(self.rest())}; quote values that hold spaces or , ( ) = < >"
                )


def parse_condition(text: str) -> Condition:
    """One `--where` expression, read strictly: a typo is an error, never a filter that quietly means
    something else."""
    s = _Scanner(text)
    s.skip_space()
    if not s.peek():
        raise FilterError(f"empty filter {text!r}: write key=value, key<value, key in (a,b) or path:GLOB")
    match = KEY_RE.match(text, s.pos)
    if not match:
        raise s.fail(
            f"{_excerpt(s.rest())} does not start with a key; keys look like category, price or mtime "
            "(a letter or _, then letters, digits, _ . -)"
        )
    key = match.group()
    s.pos = match.end()
    spaced = s.skip_space()
    ch = s.peek()
    op: Op
    values: tuple[str, ...]
    if ch == ":":
        s.pos += 1
        if key != "path":
            raise s.fail(f"only path takes a glob, not {key}; use path:GLOB, or = != in for {key}")
        op, values = "glob", (s.value("path:"),)
    elif ch and ch in _OP_CHARS:
        start = s.pos
        while s.peek() and s.peek() in _OP_CHARS:
            s.pos += 1
        run = text[start : s.pos]
        if run not in _SYMBOL_OPS:
            if run[:-1] in _SYMBOL_OPS and run.endswith("!"):
                raise s.fail(f'unknown operator {run!r}; a value that starts with ! is quoted: {key}{run[:-1]}"!..."')
            raise s.fail(f"unknown operator {run!r}; {_USAGE}")
        op, values = _SYMBOL_OPS[run], (s.value(run),)
    elif spaced and (word := _IN_RE.match(text, s.pos)):
        s.pos = word.end()
        op = "not in" if word.group(1) else "in"
        values = s.value_list(op)
    elif not ch:
        raise s.fail(f"no operator after {key!r}; {_USAGE}")
    else:
        raise s.fail(f"unknown operator at {_excerpt(s.rest())} after {key!r}; {_USAGE}")
    s.skip_space()
    if s.peek():
        raise s.fail(
            f"unexpected {_excerpt(s.rest())} after the value; quote a value that holds spaces or , ( ) = < >, "
            "and give each condition its own --where"
        )
    if op == "glob":
        try:
            compile_glob(values[0])
        except GlobError as exc:
            raise s.fail(str(exc)) from None
    return Condition(key, op, values)


def parse_where(texts: Sequence[str]) -> Filter:
    """All the `--where` expressions of one search (AND). Blank ones are skipped: an empty filter box
    on the page, or `where=`, means no filtering rather than an error."""
    if isinstance(texts, str):
        raise TypeError("parse_where takes a list of expressions, not one string")
    return Filter(tuple(parse_condition(t) for t in texts if t.strip()))


@functools.lru_cache(maxsize=256)
def glob_regex(glob: str) -> re.Pattern[str]:
    """The regex a path must match for `path:GLOB`, anchored at both ends (`.match` and `.fullmatch`
    agree), so that SQLite's REGEXP or Python can run it; compiled once per glob."""
    try:
        return compile_glob(glob)
    except GlobError as exc:
        raise FilterError(f"{_shown('path:' + quote(glob))}: {exc}") from None


_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DATE_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
    r"(?:[Tt ]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:[.,]([0-9]{1,9}))?)?"
    r"([Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?)?"
)


def parse_number(text: str) -> float | None:
    """Decimal or exponent text (`12`, `-3.5`, `1e6`) as a float, else None. Stricter than float():
    no nan/inf, no `1_000`, no non-ASCII digits, so that a value's type does not surprise anyone."""
    text = text.strip()
    if not _NUMBER_RE.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def parse_date(text: str) -> float | None:
    """An ISO 8601 date or date-time as POSIX seconds (naive means UTC), else None. Written out rather
    than datetime.fromisoformat, whose accepted forms differ between Python 3.10 and 3.11."""
    match = _DATE_RE.fullmatch(text.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        moment = dt.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
    except ValueError:
        return None
    offset = 0
    if zone and zone not in "Zz":
        hours, minutes = int(zone[1:3]), int(zone[-2:]) if len(zone) > 3 else 0
        if hours > 23 or minutes > 59:
            return None
        offset = (hours * 3600 + minutes * 60) * (-1 if zone[0] == "-" else 1)
    whole = calendar.timegm(moment.timetuple()) - offset
    if not fraction:
        return float(whole)
    scale = 10 ** len(fraction)
    return (whole * scale + int(fraction)) / scale  # exact integers, rounded once


def value_type(text: str) -> FieldType:
    """The type a metadata value reads as: number before date (`2019` is a number), else string."""
    if parse_number(text) is not None:
        return "number"
    if parse_date(text) is not None:
        return "date"
    return "string"


def _typed(text: str, field_type: FieldType, label: str, key: str) -> float | str:
    if field_type == "number":
        number = parse_number(text)
        if number is None:
            raise FilterError(f"{label}: {_excerpt(text)} is not a number; {key} holds numbers such as 12 or -3.5")
        return number
    if field_type == "date":
        seconds = parse_date(text)
        if seconds is None:
            raise FilterError(
                f"{label}: {_excerpt(text)} is not a date; {key} holds dates such as 2019-06-01 "
                "or 2019-06-01T12:30:00+02:00"
            )
        return seconds
    return text


def typed(text: str, field_type: FieldType, key: str) -> float | str:
    """A condition's value as it compares with a field of that type: numbers and dates as floats (a
    date in POSIX seconds), strings as they are."""
    return _typed(text, field_type, key, key)


def check_condition(cond: Condition, field_type: FieldType) -> None:
    """Refuse an operator the field's type cannot take, before any work: an order on text or a glob
    on anything but path would otherwise select by accident."""
    if cond.op == "glob" and cond.key != "path":  # unreachable through Condition, kept for clarity
        raise FilterError(f"{_shown(str(cond))}: only path takes a glob; use = != in for {cond.key}")
    if cond.op in ORDERED_OPS and field_type == "string":
        raise FilterError(f"{_shown(str(cond))}: {cond.key} holds text; use = != in or not in")


def typed_values(cond: Condition, field_type: FieldType) -> tuple[float | str, ...]:
    """`check_condition`, then each value typed, with the whole expression in any message
    (`price<abc: 'abc' is not a number; ...`): what a reader binds as query parameters."""
    check_condition(cond, field_type)
    if cond.op == "glob":
        return cond.values
    label = _shown(str(cond))
    return tuple(_typed(v, field_type, label, cond.key) for v in cond.values)


def check_key(cond: Condition, fields: Mapping[str, FieldType]) -> FieldType:
    """The type of the field a condition names, or a FilterError that lists the keys the index knows
    (and the nearest one, for a typo)."""
    if cond.key in fields:
        return fields[cond.key]
    near = difflib.get_close_matches(cond.key, list(fields), n=1)
    hint = f"did you mean {near[0]}? " if near else ""
    known = ", ".join(sorted(fields)) or "none"
    raise FilterError(f"{_shown(str(cond))}: no field {cond.key}; {hint}this index knows: {known}")


def value_matches(cond: Condition, values: tuple[float | str, ...], value: float | str | None) -> bool:
    """Whether one image's value (None: it has none) meets `cond`, whose `values` are typed (typed_values):
    the rule Metadata.select applies to a whole column, for one image (a search's live additions)."""
    if value is None:
        return False
    if cond.op == "glob":
        return bool(glob_regex(str(values[0])).fullmatch(str(value)))
    if cond.op in ("=", "in"):
        return value in values
    if cond.op in ("!=", "not in"):
        return value not in values
    bound = values[0]
    if isinstance(value, str) or isinstance(bound, str):
        return False  # (check_condition refuses an order on text)
    return {"<": value < bound, "<=": value <= bound, ">": value > bound, ">=": value >= bound}[cond.op]

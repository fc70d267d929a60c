"""Path globs: their syntax, compiled to an anchored regex, and the literal prefix every match starts with.
The `path:GLOB` condition of the filter language (pipeline.filters) and the glob rows of a metadata file
(index.userfields) both read globs so.

Globs: `*` matches within one path component (never `/`), `?` one character (not `/`), `[abc]`,
`[a-z]`, `[!a]` one character of a class (never `/`; a `]` first in a class is a member, `[[]` is a
literal `[`), and `**` as a whole component matches any number of whole components, none included
(`/a/**/b.jpg` matches `/a/b.jpg` and `/a/x/y/b.jpg`); a trailing `/**` matches everything below the
folder. `**` inside a component (`/a/**.jpg`) is an error rather than a silent `*`. A glob that does
not start with `/` matches anywhere: it reads as `**/` + glob (`*.png` is every PNG). Matching is
case-sensitive.
"""

from __future__ import annotations

import re


class GlobError(ValueError):
    """Why a glob is malformed, without the expression: each caller puts its own text in front."""


def _glob_components(glob: str) -> list[str]:
    """The glob split at `/`, with `**` put in front of a relative one (it matches anywhere)."""
    if not glob:
        raise GlobError("the glob is empty; write path:/some/folder/** or path:*.jpg")
    parts = glob.split("/")
    return parts if glob.startswith("/") else ["**", *parts]


def _class_regex(comp: str, i: int) -> tuple[str, int]:
    """The regex of the `[...]` class at comp[i], and the index after it. Never matches `/`."""
    j = i + 1
    negate = j < len(comp) and comp[j] == "!"
    j += negate
    start = j
    if j < len(comp) and comp[j] == "]":
        j += 1  # a leading ] is a member
    end = comp.find("]", j)
    if end < 0:
        raise GlobError(f"unclosed [ in {comp!r}; end the class with ], or write a literal [ as [[]")
    body = comp[start:end]
    items: list[str] = []
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            lo, hi = body[k], body[k + 2]
            if lo > hi:
                raise GlobError(f"the range {lo}-{hi} in {comp!r} runs backwards; write {hi}-{lo}")
            items.append(f"{re.escape(lo)}-{re.escape(hi)}")
            k += 3
        else:
            items.append(re.escape(body[k]))
            k += 1
    members = "".join(items)
    return (f"[^/{members}]" if negate else f"(?!/)[{members}]"), end + 1


def _component_regex(comp: str) -> str:
    """The regex of one component that is not `**`."""
    if "**" in comp:
        raise GlobError(f"** stands alone between slashes (/a/**/*.jpg); use * within a name, not {comp!r}")
    out: list[str] = []
    i = 0
    while i < len(comp):
        ch = comp[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            piece, i = _class_regex(comp, i)
            out.append(piece)
            continue
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def compile_glob(glob: str) -> re.Pattern[str]:
    """The regex a path must match for the glob, anchored at both ends (`.match` and `.fullmatch` agree);
    GlobError where the glob is malformed."""
    comps = _glob_components(glob)
    last = len(comps) - 1
    parts: list[str] = []
    for i, comp in enumerate(comps):
        if comp == "**":
            parts.append(".*" if i == last else "(?:[^/]*/)*")
        else:
            parts.append(_component_regex(comp) + ("" if i == last else "/"))
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


def glob_prefix(glob: str) -> str:
    """The literal text before the glob's first wildcard ("" for a relative glob): every matching path
    starts with it, so a reader can range-scan sorted paths instead of testing them all."""
    if not glob.startswith("/"):
        return ""
    cut = min((i for i in (glob.find(c) for c in "*?[") if i >= 0), default=len(glob))
    return glob[:cut]

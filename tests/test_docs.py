"""The docs keep up with the code: docs/usage.md names every command and every option of the CLI,
docs/architecture.md's module map is the one tests/test_architecture.py checks, and every relative link
of README.md and docs/ leads to a file that exists (and to a heading there, when it names one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from pipeline.cli import app
from test_architecture import TIERS

ROOT = Path(__file__).resolve().parent.parent
USAGE = ROOT / "docs" / "usage.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def cli_options() -> dict[str, list[str]]:
    """Every command path of the typer app ("model export", "extract", ...; "" for the top level) and
    the flags of its options: the long ones (both names of a --x/--no-x pair), else the short one (-k)."""
    found: dict[str, list[str]] = {}

    def walk(command, path: list[str]) -> None:
        flags = []
        for param in command.params:
            if param.param_type_name != "option":
                continue
            names = param.opts + param.secondary_opts
            flags += [n for n in names if n.startswith("--")] or names
        found[" ".join(path)] = flags
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, path + [name])

    walk(typer.main.get_command(app), [])
    return found


def test_the_cli_has_commands_and_options():  # the walk itself works (a broken walk would pass vacuously)
    options = cli_options()
    assert {"extract", "model export", "serve"} <= set(options)
    assert "--no-whiten" in options["model export"] and "--no-progress" in options["extract"]


def test_usage_names_every_command():
    text = USAGE.read_text()
    missing = [c for c in cli_options() if c and f"pipeline {c}" not in text]
    assert not missing, f"docs/usage.md does not mention these commands: {missing}"


def test_usage_names_every_option():
    text = USAGE.read_text()
    missing = []
    for command, flags in cli_options().items():
        # the command's own section when it has one (a "## pipeline COMMAND" heading), else the whole page
        section = (
            re.search(rf"^## pipeline {re.escape(command)}\n(.*?)(?=^## |\Z)", text, re.M | re.S) if command else None
        )
        where = section.group(1) if section else text
        missing += [
            f"{command or '(global)'} {flag}" for flag in flags if not re.search(rf"`{re.escape(flag)}(?![\w-])", where)
        ]
    assert not missing, f"docs/usage.md does not document these options (in `backticks`): {missing}"


def test_architecture_page_shows_the_tiers_the_test_checks():
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", text, re.M)
    shown = [tuple(re.findall(r"`([^`]+)`", modules)) for _, modules in rows]
    assert [int(t) for t, _ in rows] == list(range(len(rows))), "the tiers are numbered 0, 1, 2, ... in order"
    assert shown == [tuple(t) for t in TIERS], (
        "docs/architecture.md's module map differs from TIERS in tests/test_architecture.py"
    )


def slug(heading: str) -> str:
    """The anchor a code host (GitHub) gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", strip_code(page.read_text()), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans (whose brackets are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def links(page: Path) -> list[str]:
    text = strip_code(page.read_text())
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text) + re.findall(r"^\[[^\]]+\]:\s*(\S+)", text, re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading in {file.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"

"""Render docs/benchmarks.md from the benchmark results in docs/benchmarks/results/*.json.

Usage: python scripts/benchmarks/render.py            # rewrite docs/benchmarks.md
       python scripts/benchmarks/render.py --check    # exit 1 (with a diff) if the page is not up to date

Each result file is one area of the page (its schema: benchlib.py's docstring); each of its runs was written
by a benchmark script (or transcribed from the log of earlier runs, docs/history/). The page shows, per area,
one table of the current figures (with the feature dimension each was measured at, and the target and whether
it is met where one applies), then for each run what was measured, when, the host's speed and the exact
command that regenerates it. Standard library only: the tests run it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
# The page's order, from the image files to the service; areas not named here come after, by name.
AREAS = [
    "extraction",
    "index",
    "search",
    "update",
    "duplicates",
    "scale",
    "disk",
    "codes",
    "rebuild",
    "rebuild-scale",
    "catalog",
    "serve",
    "soak",
    "ray",
]

INTRO = """\
# Benchmarks

<!-- Rendered by `python scripts/benchmarks/render.py` from docs/benchmarks/results/*.json: rerun a benchmark
(or edit its result file), then render; tests/test_benchmarks_page.py checks that this page is up to date. -->

The current figures, one table per area. Each benchmark script in `scripts/benchmarks/` writes its run into
`docs/benchmarks/results/<area>.json` (`--json PATH` to write elsewhere), and one command renders this page
from those files:

```bash
python scripts/benchmarks/render.py
```

**Host.** Unless a run says otherwise, the figures come from the project's machine: 2 cores (AMD EPYC, AVX2,
no GPU), shared with other work, where repeat runs of one configuration vary by about ±5–10%. Each run gives the
host's speed at its start as numpy's float32 matrix product (sgemm, 2048 × 2048, GFLOP/s): compare absolute
figures only between runs at a similar speed. A ratio against a target is measured within one run.

**dim** is the feature dimension a figure was measured at: 1024, the default recipe's, for every index-side
figure (the benchmarks' synthetic vectors are 1024-d unless a script is told otherwise). Figures at 512-d (the
dimension of `large`, `seed` and `--pooling rmac`) are the end-to-end runs of a 512-d model of their day (Ray,
the nightly rebuild) and Ray's index merge of that run, and say so. "–": no feature dimension applies.

Superseded runs, and how the figures came about, are in [the 512-d runs replaced on
2026-12-07](history/benchmarks-512d-before-2026-12-07.md), the [log of runs before
2026-12](history/benchmarks-log-before-2026-12.md) and the git log.
"""


def when(date: str) -> str:
    """'2026-12-03T17:11:26+00:00' -> '2026-12-03 17:11 UTC' (a bare date stays as it is)."""
    if "T" not in date:
        return date
    day, _, time = date.partition("T")
    return f"{day} {time[:5]} UTC"


def cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def host_text(host: dict) -> str:
    speed = host.get("sgemm_gflops")
    parts = [f"host sgemm {speed:g} GFLOP/s" if speed is not None else "host speed not recorded"]
    if host.get("sgemm_gflops_after") is not None:
        parts[0] += f" ({host['sgemm_gflops_after']:g} at the end)"
    parts += [f"{host['cores']} cores" if host.get("cores") else "", host.get("machine", "")]
    if host.get("load_average") is not None:
        parts.append(f"load average {host['load_average']:g} at the start")
    return ", ".join(p for p in parts if p)


def measured(f: dict) -> str:
    value = f["value"]
    text = f"{value:g}" if isinstance(value, float) else str(value)
    text += f.get("unit", "")
    return text + (f" ({f['detail']})" if f.get("detail") else "")


def check_area(name: str, doc: dict) -> None:
    """The schema (benchlib.py): fail with the file and the field rather than render a broken page."""
    for key in ("area", "title", "runs"):
        assert key in doc, f"{name}: no {key!r}"
    assert doc["runs"], f"{name}: no runs"
    for run in doc["runs"]:
        for key in ("key", "date", "command", "host", "dim", "setup", "figures"):
            assert key in run, f"{name}, run {run.get('key')!r}: no {key!r}"
        assert "sgemm_gflops" in run["host"], f"{name}, run {run['key']!r}: the host's sgemm GFLOP/s (may be null)"
        for f in run["figures"]:
            assert "name" in f and "value" in f, f"{name}, run {run['key']!r}: a figure without name or value"
            assert ("target" in f) == ("met" in f), f"{name}: {f['name']!r}: a target and whether it is met go together"
            assert isinstance(f.get("met", False), bool), f"{name}: {f['name']!r}: met is true or false"


def render_area(doc: dict) -> list[str]:
    runs = doc["runs"]
    several = len(runs) > 1
    lines = [f"## {doc['title']}", ""]
    head = ["figure", "dim", "measured", "target", "met"]
    lines += ["| " + " | ".join((["run"] if several else []) + head) + " |", "|" + "---|" * (len(head) + several)]
    for run in runs:
        for f in run["figures"]:
            dim = f.get("dim", run["dim"])
            row = [
                f["name"],
                "–" if dim is None else dim,
                measured(f),
                f.get("target", ""),
                ("yes" if f["met"] else "**no**") if "met" in f else "",
            ]
            lines.append("| " + " | ".join(cell(c) for c in ([run["key"]] if several else []) + row) + " |")
    lines.append("")
    for run in runs:
        label = f"**{run['key']}**: " if several else ""
        lines += [f"{label}{run['setup']}", ""]
        lines += [f"Measured {when(run['date'])}, {host_text(run['host'])}; regenerate: `{run['command']}`", ""]
        if run.get("note"):
            lines += [f"*Note:* {run['note']}", ""]
    return lines


def unmet(docs: list[dict]) -> list[str]:
    found = []
    for doc in docs:
        for run in doc["runs"]:
            for f in run["figures"]:
                if f.get("met") is False:
                    where = f"{doc['title']}" + (f", {run['key']}" if len(doc["runs"]) > 1 else "")
                    value = f"{f['value']:g}" if isinstance(f["value"], float) else str(f["value"])
                    found.append(f"* {where}: {f['name']}: {value}{f.get('unit', '')}, target {f['target']}")
    return found


def render(results: Path = RESULTS) -> str:
    docs = {}
    for path in sorted(results.glob("*.json")):
        doc = json.loads(path.read_text())
        check_area(path.name, doc)
        assert doc["area"] == path.stem, f"{path.name}: area {doc['area']!r} is not the file's name"
        docs[path.stem] = doc
    order = [a for a in AREAS if a in docs] + sorted(set(docs) - set(AREAS))
    lines = [INTRO]
    missed = unmet([docs[a] for a in order])
    if missed:
        lines += ["**Targets not met** in the current figures:", "", *missed, ""]
    for area in order:
        lines += render_area(docs[area])
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="the result files' folder")
    ap.add_argument("--out", type=Path, default=PAGE, help="the page to write (or to check)")
    ap.add_argument("--check", action="store_true", help="only say whether the page is up to date (exit 1 if not)")
    args = ap.parse_args()
    text = render(args.results)
    if not args.check:
        args.out.write_text(text)
        print(f"wrote {args.out}")
        return
    current = args.out.read_text() if args.out.is_file() else ""
    if current != text:
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(args.out), "rendered", lineterm="")
        print("\n".join(list(diff)[:60]))
        sys.exit(f"{args.out} is not up to date: run python scripts/benchmarks/render.py")
    print(f"{args.out} is up to date")


if __name__ == "__main__":
    main()

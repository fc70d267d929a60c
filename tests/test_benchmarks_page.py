"""docs/benchmarks.md is the rendering of docs/benchmarks/results/*.json (scripts/benchmarks/render.py), and every
figure there names the host's speed and a command of a benchmark script that exists; every benchmark script backs
a figure."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks" / "results"
BENCHMARKS = ROOT / "scripts" / "benchmarks"
HELPERS = {"benchlib.py", "render.py"}  # the scripts that measure nothing themselves


def runs() -> list[tuple[str, dict]]:
    return [(path.name, run) for path in sorted(RESULTS.glob("*.json")) for run in json.loads(path.read_text())["runs"]]


def test_the_page_is_rendered_from_the_results():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "render.py"), "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{done.stdout}{done.stderr}"


def test_every_run_names_its_host_speed_date_and_a_command_of_a_benchmark_script():
    assert runs(), "no results in docs/benchmarks/results/"
    for name, run in runs():
        assert "sgemm_gflops" in run["host"], f"{name} {run['key']}: the host's sgemm GFLOP/s (null if not recorded)"
        assert run["date"][:4].isdigit(), f"{name} {run['key']}: a date"
        words = shlex.split(run["command"])
        assert words[0] == "python" and words[1].startswith("scripts/benchmarks/"), run["command"]
        assert (ROOT / words[1]).is_file(), f"{name} {run['key']}: {words[1]} does not exist"
        for figure in run["figures"]:
            assert ("target" in figure) == ("met" in figure), f"{name}: {figure['name']}"


def test_every_benchmark_script_backs_a_figure():
    used = {Path(shlex.split(run["command"])[1]).name for _, run in runs()}
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - HELPERS
    assert scripts - used == set(), f"scripts in scripts/benchmarks/ that back no figure: {sorted(scripts - used)}"


def test_render_check_fails_on_a_stale_page(tmp_path: Path):
    stale = tmp_path / "benchmarks.md"
    stale.write_text("# Benchmarks\n\nan old log\n")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "render.py"), "--check", "--out", str(stale)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "not up to date" in done.stderr

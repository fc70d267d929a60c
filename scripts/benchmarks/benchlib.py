"""What every benchmark script shares: the host's speed, the command line, child processes measured,
the benchmarks' synthetic set, and writing a result where scripts/benchmarks/render.py renders it from.

A result file, docs/benchmarks/results/<area>.json (or --json PATH), holds one area of docs/benchmarks.md:

    {"area": "index", "title": "Index build",
     "runs": [{"key": "512-d",                        # a script's variant; a new run replaces the one of its key
               "date": "2026-11-24T15:09:48+00:00",   # UTC, when the run started
               "command": "python scripts/benchmarks/bench_index.py",   # the exact command line
               "host": {"machine": "x86_64", "cores": 2, "sgemm_gflops": 185.0},  # numpy float32 GFLOP/s
               "dim": 512,                            # feature dimension of its figures (null: none applies)
               "setup": "what was measured, on what (one paragraph)",
               "figures": [{"name": "...", "value": 1.164, "unit": "", "detail": "109.0 vs 93.6 s",
                            "target": "≤ 1.2", "met": true}, ...],   # target and met only where a target applies
               "note": "(optional) a caveat of this run, shown on the page",
               "transcribed_from": "(optional) where a run measured before this layout was copied from",
               "result": {...}}]}                     # everything the script measured

Results are written, never appended to the page: `python scripts/benchmarks/render.py` renders the page.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "benchmarks" / "results"
DIM = 1024  # the benchmarks' synthetic vectors: the default recipe's features
CENTRES = 10_000  # cluster centres of the benchmarks' synthetic set


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The host's speed: float32 matrix product GFLOP/s through numpy (best of `repeats`), set beside every figure."""
    import numpy as np

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return round(2 * n**3 / best / 1e9, 1)


def host(gflops: float | None = None) -> dict[str, Any]:
    """The machine a run measures: its architecture, cores and numpy sgemm GFLOP/s (measured now unless given)."""
    return {
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "sgemm_gflops": sgemm_gflops() if gflops is None else gflops,
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """This process's command line as one would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def add_json_option(ap: argparse.ArgumentParser, area: str) -> None:
    ap.add_argument(
        "--json",
        type=Path,
        default=RESULTS / f"{area}.json",
        metavar="PATH",
        help=f"result file to write this run into (default: docs/benchmarks/results/{area}.json, which "
        "scripts/benchmarks/render.py renders into docs/benchmarks.md)",
    )


def figure(
    name: str,
    value: Any,
    unit: str = "",
    detail: str | None = None,
    target: str | None = None,
    met: bool | None = None,
    dim: int | None = None,
) -> dict[str, Any]:
    """One figure of a run. `target` (as shown, e.g. "≤ 1.2") and `met` go together; `dim` overrides the run's."""
    assert (target is None) == (met is None), f"{name}: a target and whether it is met go together"
    out: dict[str, Any] = {"name": name, "value": value}
    if unit:
        out["unit"] = unit
    if detail:
        out["detail"] = detail
    if target is not None:
        out["target"], out["met"] = target, bool(met)
    if dim is not None:
        out["dim"] = dim
    return out


def save(
    path: Path,
    area: str,
    title: str,
    *,
    key: str,
    date: str,
    command: str,
    host: dict[str, Any],
    dim: int | None,
    setup: str,
    figures: list[dict[str, Any]],
    result: dict[str, Any],
) -> None:
    """Write a run into a result file (replacing the run of the same key) and print its figures."""
    run = {
        "key": key,
        "date": date,
        "command": command,
        "host": host,
        "dim": dim,
        "setup": setup,
        "figures": figures,
        "result": result,
    }
    doc = json.loads(path.read_text()) if path.is_file() else {"area": area, "title": title, "runs": []}
    doc["area"], doc["title"] = area, title
    runs = doc["runs"]
    at = next((i for i, r in enumerate(runs) if r["key"] == key), None)
    if at is None:
        runs.append(run)
    else:
        runs[at] = run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"\n{title} ({key}), {date}, host sgemm {host.get('sgemm_gflops')} GFLOP/s: `{command}`")
    for f in figures:
        met = f" (target {f['target']}: {'met' if f['met'] else 'NOT met'})" if "target" in f else ""
        detail = f" ({f['detail']})" if f.get("detail") else ""
        print(f"  {f['name']}: {f['value']}{f.get('unit', '')}{detail}{met}")
    print(f"written to {path}; `python scripts/benchmarks/render.py` renders docs/benchmarks.md")


def wait_healthy(url: str, server: subprocess.Popen, limit: float = 120.0) -> None:
    """Wait until a `pipeline serve` child answers /api/health with 200 (AssertionError if it exits or takes
    over `limit` seconds: its log says why)."""
    import httpx

    deadline = time.monotonic() + limit
    while True:
        assert time.monotonic() < deadline and server.poll() is None, "the server did not start (see its log)"
        try:
            if httpx.get(f"{url}/api/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def run_measured(cmd: list[str], stderr: Path | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout of a child process (its stderr written to `stderr` if given)."""
    t0 = time.perf_counter()
    with open(stderr, "w") if stderr else contextlib.nullcontext() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024, out


def centres_of(seed: int, dim: int = DIM):
    """The cluster centres of the benchmarks' synthetic set of `seed` (make_shards' first draw)."""
    import numpy as np

    from pipeline.synthetic import positive_centres

    return positive_centres(CENTRES, dim, np.random.default_rng(seed))


def make_shards(features: Path, n: int, shard_size: int, seed: int, dim: int = DIM):
    """The benchmarks' synthetic set: n vectors clustered around CENTRES positive centres (pipeline.synthetic,
    calibrated on VGG16 features), written as real shards /synthetic/NNNNNNNN.jpg (once: skipped when the
    folder holds them). Returns the centres, from which held-out queries are drawn."""
    import numpy as np

    from pipeline.features import list_shards
    from pipeline.synthetic import clustered, model_info, positive_centres, write_shards

    rng = np.random.default_rng(seed)
    centres = positive_centres(CENTRES, dim, rng)
    if len(list_shards(features)) * shard_size >= n:
        return centres
    chunks = (clustered(min(shard_size, n - start), centres, rng) for start in range(0, n, shard_size))
    write_shards(features, chunks, model_info(dim), path_format="/synthetic/{:08d}.jpg", first_shard=0)
    return centres

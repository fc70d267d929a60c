"""Benchmark a nightly `pipeline rebuild` that finds nothing to do over 100k and 1M files: wall time and peak RSS.

Usage: python scripts/benchmarks/bench_scale_rebuild.py [--sizes 100000 1000000] [--base COMMIT]

For each size, in a scratch folder (deleted afterwards):
1. a tree of that many files, folders of 1,000 (album0000/IMG_0000000.jpg ...), hard links to 2,000
   small generated JPEGs: hard links share their content, so 2,000 decodes give every file's hash;
2. a features folder recording every file with its real size, mtime and content hash, written through
   the library's own ShardWriter (shards of 512 and catalog rows, as `pipeline extract` would have
   written them, without a million model runs), features from the tiny test model (64-d);
3. a published Flat index of it, so a rebuild with nothing changed has nothing to build.
Then `pipeline rebuild` runs in a fresh process with this checkout (and, alternately, with --base: a
commit to compare with, in a temporary git worktree), `--repeats` times each; the child's wall time and
peak RSS are recorded (least wall time, highest RSS), with the host's sgemm GFLOP/s.
Target: peak RSS < 500 MB at 1M files, and RSS that does not grow with N like Python objects per path.
Writes its figures into docs/benchmarks/results/rebuild-scale.json (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchlib import add_json_option, command_line, figure, host, now, save  # noqa: E402
from helpers import TINY_SIZE, save_pattern, write_tiny_model  # noqa: E402
from pipeline.features import RowMeta, ShardWriter, writing  # noqa: E402
from pipeline.images import load_image  # noqa: E402
from pipeline.index import build_index  # noqa: E402
from pipeline.model import FeatureModel, read_model_info  # noqa: E402

SOURCES = 2_000
PER_FOLDER = 1_000
SHARD_SIZE = 512  # extract's default
AREA, TITLE = "rebuild-scale", "No-change rebuild at scale"


def make_workdir(scratch: Path, n: int, model: Path) -> tuple[Path, Path]:
    """The tree of n files and a workdir whose features and published index record all of them."""
    sources = [save_pattern(scratch / "sources" / f"src{i:04d}.jpg", i, (96, 72)) for i in range(SOURCES)]
    decoded = [load_image(p, TINY_SIZE) for p in sources]
    feats = FeatureModel(model).embed(np.stack([d.pixels for d in decoded]))
    tree, work = scratch / "tree", scratch / "work"
    for start in range(0, n, PER_FOLDER):
        folder = tree / f"album{start // PER_FOLDER:04d}"
        folder.mkdir(parents=True)
        for i in range(start, min(n, start + PER_FOLDER)):
            os.link(sources[i % SOURCES], folder / f"IMG_{i:07d}.jpg")
    info = read_model_info(model)
    with writing(work / "features") as catalog:
        writer = ShardWriter(work / "features", info, model, SHARD_SIZE, catalog)
        for start in range(0, n, 10_000):
            idx = np.arange(start, min(n, start + 10_000))
            writer.add(
                [str(tree / f"album{i // PER_FOLDER:04d}" / f"IMG_{i:07d}.jpg") for i in idx],
                feats[idx % SOURCES],
                [RowMeta(decoded[s].content_hash, decoded[s].size, decoded[s].mtime) for s in idx % SOURCES],
            )
        writer.flush()
    build_index(work / "features", work / "index", factory="Flat", progress=False)
    return tree, work


def run_rebuild(checkout: Path, tree: Path, work: Path, model: Path) -> tuple[float, float, dict]:
    """Wall seconds, peak RSS (MiB) and the --json report of a `pipeline rebuild` in a fresh process.

    The peak comes from /usr/bin/time: a child forked from this (large) process would count this
    process's pages in its own ru_maxrss, even after exec."""
    with tempfile.NamedTemporaryFile("r") as peak:
        cmd = [
            "/usr/bin/time",
            "-o",
            peak.name,
            "-f",
            "%M",
            sys.executable,
            "-m",
            "pipeline",
            "-q",
            "rebuild",
            str(tree),
            "--workdir",
            str(work),
            "--model",
            str(model),
            "--json",
        ]
        t0 = time.perf_counter()
        out = subprocess.run(
            cmd,
            cwd=checkout,
            env={**os.environ, "PYTHONPATH": str(checkout)},
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        ).stdout
        wall = time.perf_counter() - t0
        return wall, int(peak.read().split()[-1]) / 1024, json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--base", help="a commit to compare with (measured in a temporary git worktree)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    add_json_option(ap, AREA)
    args = ap.parse_args()
    date, machine = now(), host()
    checkouts = {"this checkout": ROOT}
    if args.base:
        base = Path(tempfile.mkdtemp(prefix="pipeline-base-", dir=args.scratch))
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True, capture_output=True
        )
        checkouts = {args.base: base, **checkouts}
    rows = []
    try:
        for n in args.sizes:
            scratch = Path(tempfile.mkdtemp(prefix=f"pipeline-scale-{n}-", dir=args.scratch))
            try:
                model = write_tiny_model(scratch / "tiny.onnx")
                t0 = time.perf_counter()
                tree, work = make_workdir(scratch, n, model)
                print(f"{n} files, catalog and index ready in {time.perf_counter() - t0:.0f} s", flush=True)
                runs: dict[str, list[tuple[float, float]]] = {label: [] for label in checkouts}
                for _ in range(args.repeats):
                    for label, checkout in checkouts.items():
                        wall, rss, rep = run_rebuild(checkout, tree, work, model)
                        ex = rep["extract"]
                        assert (ex["unchanged"], ex["new"], ex["deleted"], rep["index_built"]) == (n, 0, 0, False), rep
                        print(f"{n} {label}: {wall:.1f} s, {rss:.0f} MiB", flush=True)
                        runs[label].append((wall, rss))
                for label, measured in runs.items():
                    rows.append(
                        {
                            "files": n,
                            "code": label,
                            "wall_s": round(min(w for w, _ in measured), 1),
                            "peak_rss_mib": round(max(r for _, r in measured)),
                        }
                    )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if args.base:
            subprocess.run(["git", "worktree", "remove", "--force", str(checkouts[args.base])], cwd=ROOT, check=True)
    res = {
        "sources": SOURCES,
        "per_folder": PER_FOLDER,
        "shard_size": SHARD_SIZE,
        "repeats": args.repeats,
        "runs": rows,
    }
    save(
        args.json,
        AREA,
        TITLE,
        key="default",
        date=date,
        command=command_line(),
        host=machine,
        dim=64,
        setup=setup(res),
        figures=figures(res),
        result=res,
    )


def setup(res: dict) -> str:
    return (
        f"A tree of hard links to {res['sources']:,} small JPEGs in folders of {res['per_folder']:,}, its catalog and "
        f"shards of {res['shard_size']} (features of the tests' tiny model, 64-d) and a published Flat index; "
        f"`pipeline rebuild` with nothing to do, in a fresh process: least wall time and highest peak RSS of "
        f"{res['repeats']}."
    )


def figures(res: dict) -> list[dict]:
    this = {r["files"]: r for r in res["runs"] if r["code"] == "this checkout"}
    out = [
        figure(f"{n:,} files: peak RSS / wall", f"{r['peak_rss_mib']} MiB / {r['wall_s']} s")
        for n, r in sorted(this.items())
    ]
    if this:
        largest, smallest = max(this), min(this)
        rss = this[largest]["peak_rss_mib"]
        out.insert(0, figure(f"peak RSS at {largest:,} files", rss, " MiB", target="< 500 MB", met=rss * 2**20 < 500e6))
        if largest > smallest:
            ratio = round(rss / this[smallest]["peak_rss_mib"], 2)
            out.insert(
                1, figure(f"peak RSS at {largest:,} files / at {smallest:,}", ratio, "×", target="< 2", met=ratio < 2)
            )
    return out


if __name__ == "__main__":
    main()

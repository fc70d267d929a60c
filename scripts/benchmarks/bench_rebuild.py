"""Benchmark nightly rebuilds on real photos: first run, a run with no changes, a run after changes.

Usage: python scripts/benchmarks/bench_rebuild.py [--photos bench-output/photos] [--count 200]

Copies `count` photos into a fresh collection, runs `pipeline rebuild` (a new process each
time) three times: from scratch; with nothing changed; after adding 10 photos, deleting 5 and
renaming 5. Reports wall time and what each run did; checks that the third run put exactly
10 images through the model and that the index holds exactly the live files.
Writes its figures into docs/benchmarks/results/rebuild.json (--json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import add_json_option, command_line, figure, host, now, save  # noqa: E402
from pipeline.index import IDS_FILE, META_FILE, current_version  # noqa: E402

AREA, TITLE = "rebuild", "Nightly rebuild"


def run(collection: Path, work: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "pipeline", "-q", "rebuild", str(collection), "--workdir", str(work), "--json"]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t, json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=ROOT / "bench-output" / "photos")
    ap.add_argument("--count", type=int, default=200)
    add_json_option(ap, AREA)
    args = ap.parse_args()
    photos = sorted(args.photos.glob("*.jpg"))
    if len(photos) < args.count + 10:
        sys.exit(f"need {args.count + 10} photos in {args.photos}: run scripts/eval/fetch_photos.py")
    date, machine = now(), host()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        collection, work = Path(tmp) / "photos", Path(tmp) / "work"
        collection.mkdir()
        for p in photos[: args.count]:
            shutil.copy(p, collection / p.name)
        for label in ("from scratch", "no changes"):
            rows.append((label, *run(collection, work)))
        for p in photos[args.count : args.count + 10]:
            shutil.copy(p, collection / p.name)
        names = sorted(collection.iterdir())
        for p in names[:5]:
            p.unlink()
        for p in names[5:10]:
            p.rename(p.with_name("renamed_" + p.name))
        rows.append(("+10, -5, 5 renamed", *run(collection, work)))
        version = current_version(work / "index")
        dim = json.loads((version / META_FILE).read_text())["dim"]
        db = sqlite3.connect(version / IDS_FILE)
        indexed = sorted(p for (p,) in db.execute("SELECT path FROM images"))
        db.close()
        exact = indexed == sorted(str(p) for p in collection.iterdir())
    res = {
        "photos": args.count,
        "dim": dim,
        "runs": [
            {
                "run": label,
                "wall_s": round(wall, 1),
                **{k: r["extract"][k] for k in ("new", "changed", "moved", "deleted", "unchanged", "extracted")},
                "index_built": r["index_built"],
            }
            for label, wall, r in rows
        ],
        "index_matches_live_files": exact,
    }
    save(
        args.json,
        AREA,
        TITLE,
        key="default",
        date=date,
        command=command_line(),
        host=machine,
        dim=dim,
        setup=setup(res),
        figures=figures(res),
        result=res,
    )


def setup(res: dict) -> str:
    return (
        f"{res['photos']} real photos (`scripts/eval/fetch_photos.py`) copied into a fresh collection; `pipeline "
        "rebuild` (the default model, a new process each time) from scratch, then with nothing changed, then after "
        "adding 10 photos, deleting 5 and renaming 5."
    )


def figures(res: dict) -> list[dict]:
    first, same, changed = res["runs"]
    return [
        figure(
            "no changes: images through the model",
            same["extracted"],
            "",
            f"{same['wall_s']} s, index " + ("built" if same["index_built"] else "up to date, not built"),
            target="0",
            met=same["extracted"] == 0,
        ),
        figure(
            "+10, −5, 5 renamed: images through the model",
            changed["extracted"],
            "",
            f"{changed['wall_s']} s; {changed['moved']} moved, {changed['deleted']} deleted",
            target="exactly 10",
            met=changed["extracted"] == 10,
        ),
        figure(
            "the index afterwards holds exactly the live files",
            "yes" if res["index_matches_live_files"] else "no",
            target="yes",
            met=res["index_matches_live_files"],
        ),
        figure(f"from scratch, {first['extracted']} images", first["wall_s"], " s"),
    ]


if __name__ == "__main__":
    main()

"""Benchmark nightly rebuilds on real photos: first run, a run with no changes, a run after changes.

Usage: python scripts/bench_rebuild.py [--photos bench-output/photos] [--count 200]

Copies `count` photos into a fresh collection, runs `pipeline rebuild` (a new process each
time) three times: from scratch; with nothing changed; after adding 10 photos, deleting 5 and
renaming 5. Reports wall time and what each run did; checks that the third run put exactly
10 images through the model and that the index holds exactly the live files.
Writes JSON and appends a section to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import record  # noqa: E402
from pipeline.index import IDS_FILE, current_version  # noqa: E402


def run(collection: Path, work: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "pipeline", "-q", "rebuild", str(collection), "--workdir", str(work), "--json"]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t, json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=ROOT / "bench-output" / "photos")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--json-out", type=Path, default=ROOT / "bench-output" / "bench_rebuild.json")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    photos = sorted(args.photos.glob("*.jpg"))
    if len(photos) < args.count + 10:
        sys.exit(f"need {args.count + 10} photos in {args.photos}: run scripts/fetch_photos.py")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        collection, work = Path(tmp) / "photos", Path(tmp) / "work"
        collection.mkdir()
        for p in photos[: args.count]:
            shutil.copy(p, collection / p.name)
        for label in ("from scratch", "no changes"):
            rows.append((label, *run(collection, work)))
        for p in photos[args.count: args.count + 10]:
            shutil.copy(p, collection / p.name)
        names = sorted(collection.iterdir())
        for p in names[:5]:
            p.unlink()
        for p in names[5:10]:
            p.rename(p.with_name("renamed_" + p.name))
        rows.append(("+10, -5, 5 renamed", *run(collection, work)))
        db = sqlite3.connect(current_version(work / "index") / IDS_FILE)
        indexed = sorted(p for (p,) in db.execute("SELECT path FROM images"))
        db.close()
        exact = indexed == sorted(str(p) for p in collection.iterdir())
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "python scripts/bench_rebuild.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "runs": [{"run": label, "wall_s": round(wall, 1), **{k: r["extract"][k] for k in
                     ("new", "changed", "moved", "deleted", "unchanged", "extracted")},
                     "index_built": r["index_built"]} for label, wall, r in rows],
           "index_matches_live_files": exact}
    res["targets"] = {"no_change_runs_no_model": res["runs"][1]["extracted"] == 0,
                      "changes_run_exactly_10": res["runs"][2]["extracted"] == 10, "index_exact": exact}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2))
    lines = [f"\n### Nightly rebuild — {res['date']}\n", f"`{res['command']}` — {args.count} real photos, fp32 model.\n",
             "| run | wall s | new | changed | moved | deleted | unchanged | through the model | index built |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['wall_s']} | {r['new']} | {r['changed']} | {r['moved']} | {r['deleted']} | "
              f"{r['unchanged']} | {r['extracted']} | {'yes' if r['index_built'] else 'no (up to date)'} |"
              for r in res["runs"]]
    lines += ["", f"Afterwards the index holds exactly the live files: {'yes' if exact else 'NO'}."]
    record("\n".join(lines) + "\n", args.no_doc)


if __name__ == "__main__":
    main()

"""Score feature models end to end (extract -> build-index -> eval) on the labelled sets: one table.

Usage:
  python scripts/make_heldout.py --out H                      # once: our own held-out copy set
  python scripts/eval_profiles.py --model seed=seed.onnx --model balanced=balanced.onnx \
      --heldout H --work DIR [--json out.json]

Sets: holidays-dev (mAP, R@1) and copies-dev (R@1, mAP) from ../shared/eval/ (skipped, with a
line saying so, when absent) and the held-out set made by make_heldout.py. Features and indexes
are cached per model checksum under --work, so a rerun only scores. Each row also gives the
model's compute per image relative to the seed recipe (pixels through the conv base / 224^2,
ModelInfo.relative_compute) and copies-dev's weakest transformations. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.extract import extract  # noqa: E402
from pipeline.index import build_index  # noqa: E402
from pipeline.model import read_model_info  # noqa: E402

# ../shared/eval of the checkout, or of a folder above it (a worktree under the main checkout's parent)
SHARED = next((p / "shared" / "eval" for p in ROOT.parents if (p / "shared" / "eval").is_dir()),
              ROOT.parent / "shared" / "eval")


def sets(heldout: Path | None) -> dict[str, tuple[Path, Path, Path]]:
    """name -> (database folder, query folder, ground truth) of every set present."""
    out = {}
    if SHARED.is_dir():
        out["holidays"] = (SHARED / "holidays-dev" / "images",) * 2 + (SHARED / "holidays-dev" / "groundtruth.json",)
        out["copies"] = (SHARED / "copies-dev" / "db", SHARED / "copies-dev" / "queries",
                         SHARED / "copies-dev" / "groundtruth.json")
    else:
        print(f"{SHARED} not found: holidays and copies skipped")
    if heldout is not None:
        out["heldout"] = (heldout / "db", heldout / "queries", heldout / "groundtruth.json")
    return out


def score_model(label: str, model: Path, work: Path, heldout: Path | None, order: list[str]) -> dict:
    info = read_model_info(model)
    row = {"profile": label, "model": info.name, "checksum": info.checksum[:12], "resize": info.resize,
           "pooling": info.pooling, "compute": round(info.relative_compute(), 2)}
    present = sets(heldout)
    for name in [n for n in order if n in present]:
        db, queries, gt = present[name]
        # a held-out set is cached under its folder's path: extraction is incremental, so two sets sharing a
        # cache folder would be indexed together
        key = name if name != "heldout" else f"heldout-{hashlib.sha1(str(db.resolve()).encode()).hexdigest()[:10]}"
        base = work / info.checksum[:12] / key
        extract([db], base / "features", model, progress=False)
        build_index(base / "features", base / "index", progress=False)
        report = evaluate(base / "index", gt, queries, model=model, exact=True)
        row[name] = report.to_dict()
        print(f"{label} {name}: {json.dumps(row[name])}", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| profile | holidays mAP | holidays R@1 | copies R@1 | copies mAP | heldout R@1 | heldout mAP "
             "| compute (seed = 1) | copies: weakest R@1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(s: str, k: str) -> str:
            return f"{r[s][k]:.3f}" if s in r else "-"
        weakest = ", ".join(f"{t} {v['recall@1']:.2f}" for t, v in list(r.get("copies", {}).get("by_transformation", {}).items())[:4])
        lines.append(f"| {r['profile']} | {cell('holidays', 'mAP')} | {cell('holidays', 'recall@1')} "
                     f"| {cell('copies', 'recall@1')} | {cell('copies', 'mAP')} | {cell('heldout', 'recall@1')} "
                     f"| {cell('heldout', 'mAP')} | {r['compute']:.2f} | {weakest} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="LABEL=model.onnx (repeat)")
    ap.add_argument("--heldout", type=Path, default=ROOT / "bench-output" / "heldout")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-output" / "eval-profiles")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--sets", default="holidays,copies,heldout", help="which sets to score, in this order")
    args = ap.parse_args()
    heldout = args.heldout if (args.heldout / "groundtruth.json").is_file() else None
    if heldout is None:
        print(f"no held-out set at {args.heldout} (make it with scripts/make_heldout.py): skipped")
    rows = [score_model(label, Path(path), args.work, heldout, args.sets.split(",")) for label, path in (m.split("=", 1) for m in args.model)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()

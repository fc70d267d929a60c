"""Pair precision and recall of `pipeline duplicates` on a transformed-copy set, per threshold.

Usage:
  pipeline extract SET/db SET/queries --out F && pipeline build-index F --out I
  python scripts/eval/dupes_quality.py --index I [--thresholds 0.80,0.85,0.90] [--choose]

SET is laid out like ../shared/eval/copies-dev: db/img0007.jpg and its copies
queries/img0007_crop70+jpeg15.jpg (the picture's name is the file name up to the first "_").
All five images of a picture are "same picture" pairs; images of distinct pictures are not.
A predicted pair is two images in one group of `find_groups`. `--choose` prints the threshold with
the best F0.5 (precision weighted over recall: groups are connected components, so one false
pair can chain two pictures' groups together, and the more images a collection holds the more
chances it has; a missed heavily edited copy costs less). Use it on the calibration set only,
never on held-out data.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.duplicates import default_threshold, find_groups  # noqa: E402
from pipeline.search import Searcher  # noqa: E402


def picture(path: str) -> str:
    return Path(path).stem.split("_")[0]


def pairs_of(groups: list[list[str]]) -> set[tuple[str, str]]:
    return {tuple(sorted(p)) for g in groups for p in combinations(g, 2)}


def score(index: Path, threshold: float, truth: set[tuple[str, str]]) -> dict:
    groups = [[i.path for i in g.images] for g in find_groups(index, threshold, progress=False)]
    found = pairs_of(groups)
    tp = len(found & truth)
    precision = tp / len(found) if found else 1.0
    recall = tp / len(truth)
    return {
        "threshold": threshold,
        "groups": len(groups),
        "pairs": len(found),
        "true_pairs": len(truth),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(2 * precision * recall / (precision + recall), 4) if tp else 0.0,
        "f05": round(1.25 * precision * recall / (0.25 * precision + recall), 4) if tp else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--thresholds", default=",".join(f"{t / 100:.2f}" for t in range(70, 100, 2)))
    ap.add_argument("--choose", action="store_true", help="Print the threshold with the best F0.5.")
    args = ap.parse_args()
    searcher = Searcher(args.index)
    paths, default = searcher.indexed_paths(), default_threshold(searcher)
    by_picture: dict[str, list[str]] = {}
    for p in paths:
        by_picture.setdefault(picture(p), []).append(p)
    truth = pairs_of(list(by_picture.values()))
    thresholds = sorted({float(t) for t in args.thresholds.split(",")} | {default})
    rows = [score(args.index, t, truth) for t in thresholds]
    print(f"{len(paths)} images of {len(by_picture)} pictures, {len(truth)} same-picture pairs")
    print("| threshold | groups | predicted pairs | precision | recall | F1 | F0.5 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " (default)" if r["threshold"] == default else ""
        print(
            f"| {r['threshold']:.2f}{mark} | {r['groups']} | {r['pairs']} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['f1']:.3f} | {r['f05']:.3f} |"
        )
    if args.choose:
        best = max(rows, key=lambda r: (r["f05"], r["precision"]))
        print("best F0.5:", json.dumps(best))


if __name__ == "__main__":
    main()

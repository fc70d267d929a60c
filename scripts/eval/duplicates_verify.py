"""Measure `pipeline duplicates` with and without `--verify` on a copy set like ../shared/eval/copies-dev.

Usage:
    pipeline extract SET/db SET/queries --out F            # the default model's features
    python scripts/eval/duplicates_verify.py --set SET --features F [--json docs/benchmarks/quality/dv.json]

The set's pictures (db/) and their transformed copies (queries/) are indexed (a Flat index of F), then grouped
twice: at the calibrated cosine threshold, and with --verify. Every pair of images in one group is a found
pair; a pair is true when both come from one picture (a copy and its original, or two copies of one original;
two distinct db pictures are never one). Reports pair precision and recall of both, the recall of verified
pairs per transformation (named in a copy's file name, each pair counted for both of its copies'), the
candidates checked, and the wall time of each.

--same A:B (repeatable): count db pictures A and B, and their copies, as one picture (variants the set labels
distinct, such as one wallpaper in two colours): a diagnostic of what the labels cost, never a recipe choice.

--choose-colour (dev sets only): the copies' lightness limit (copies.check MAX_LIGHTNESS_SHIFT) with the best F0.5
of --verify's pairs over a grid, each image's local features and each pair's fit computed once for the grid.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.duplicates import find_groups  # noqa: E402
from pipeline.index import build_index  # noqa: E402


def transformations(name: str) -> list[str]:
    m = re.search(r"_([^_]+)\.[a-z]+$", name)
    return m.group(1).split("+") if m else []


def found_pairs(index: Path, verify: bool, workers: int | None = None) -> set[frozenset[str]]:
    """Every pair of file names in one group of `pipeline duplicates` (with --verify or not; `workers`: its
    verifying processes, 0 for this one)."""
    groups = find_groups(index, progress=False, verify=verify, workers=workers)
    return {frozenset((Path(x.path).name, Path(y.path).name)) for g in groups for x, y in combinations(g.images, 2)}


def choose_colour(index: Path, truth: set[frozenset[str]]) -> None:
    """The lightness limit with the best F0.5 of --verify's pairs (precision weighed over recall), printed."""
    import functools

    from pipeline.copies import check
    from pipeline.duplicates import verified

    # each image's features and each pair's fit once for the grid (the limits only change the verdict)
    verified.local_features = functools.lru_cache(maxsize=None)(verified.local_features)
    check.fit = functools.lru_cache(maxsize=None)(check.fit)  # type: ignore[assignment]
    scores = []
    for lightness in (50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 120.0, 1e9):
        check.MAX_LIGHTNESS_SHIFT = lightness
        found = found_pairs(index, verify=True, workers=0)  # (the limit set here, in this process)
        tp = len(found & truth)
        p, r = (tp / len(found) if found else 1.0), tp / len(truth)
        f = 1.25 * p * r / (0.25 * p + r) if p + r else 0.0
        scores.append((round(f, 4), lightness, round(p, 4), round(r, 4)))
        print(f"lightness <= {lightness:g}: precision {p:.4f} recall {r:.4f} F0.5 {f:.4f}")
    f, lightness, p, r = max(scores)
    print(f"best F0.5 {f}: MAX_LIGHTNESS_SHIFT {lightness:g} (P {p}, R {r})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", type=Path, default=ROOT.parent / "shared" / "eval" / "copies-dev")
    ap.add_argument("--features", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--label", default="")
    ap.add_argument("--choose-colour", action="store_true", help="calibrate the colour limits (dev sets only)")
    ap.add_argument("--same", action="append", default=[], metavar="A:B", help="count pictures A and B as one")
    args = ap.parse_args()
    gt = json.loads((args.set / "groundtruth.json").read_text())
    origin = {g["query"]: g["positives"][0] for g in gt}
    origin.update({p.name: p.name for p in (args.set / "db").iterdir()})
    one = dict(pair.split(":") for pair in args.same)
    origin = {name: one.get(picture, picture) for name, picture in origin.items()}
    truth = {
        frozenset(p) for p in combinations(sorted(origin), 2) if origin[p[0]] == origin[p[1]]
    }  # every pair of one picture
    work = Path(tempfile.mkdtemp(prefix="dv-"))
    try:
        build_index(args.features, work / "index", flat_below=10**9, progress=False)
        if args.choose_colour:
            choose_colour(work / "index", truth)
            return
        out: dict = {"set": str(args.set), "label": args.label, "images": len(origin), "true_pairs": len(truth)}
        if args.same:
            out["same"] = args.same
        for verify in (False, True):
            t0 = time.perf_counter()
            groups = find_groups(work / "index", progress=False, verify=verify)
            seconds = time.perf_counter() - t0
            found = {
                frozenset((Path(x.path).name, Path(y.path).name)) for g in groups for x, y in combinations(g.images, 2)
            }
            tp = len(found & truth)
            key = "verified" if verify else "threshold"
            out[key] = {
                "groups": len(groups),
                "pairs": len(found),
                "precision": round(tp / len(found), 4) if found else 1.0,
                "recall": round(tp / len(truth), 4),
                "seconds": round(seconds, 2),
            }
            if verify:
                per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
                for pair in truth:
                    for name in pair:
                        for t in transformations(name):
                            per[t][0] += pair in found
                            per[t][1] += 1
                out[key]["recall_by_transformation"] = {t: round(a / b, 3) for t, (a, b) in sorted(per.items())}
            print(key, json.dumps(out[key]))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            runs = json.loads(args.json.read_text()) if args.json.is_file() else []
            runs = [r for r in runs if r.get("label") != args.label] + [out]
            args.json.write_text(json.dumps(runs, indent=1) + "\n")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

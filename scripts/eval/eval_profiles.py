"""Score feature models end to end (extract -> build-index -> eval) on the labelled sets: one table.

Usage:
  python scripts/eval/make_heldout.py --out H                 # once: our own held-out copy set
  python scripts/eval/eval_profiles.py --model seed=seed.onnx --model balanced=balanced.onnx \
      --heldout H [--heldout H2 ...] --work DIR [--json out.json] [--plot DIR]

Sets: holidays-dev (mAP, R@1) and copies-dev (R@1, mAP) from ../shared/eval/ (skipped, with a
line saying so, when absent) and the held-out sets made by make_heldout.py. Features and indexes
are cached per model checksum (and held-out folder) under --work, so a rerun only scores. Each row
also gives the model's compute per image relative to the seed recipe (pixels through the conv base
/ 224^2, ModelInfo.relative_compute) and copies-dev's weakest transformations. Prints a Markdown table.
With several held-out sets, it also pools their queries (R@1 over all of them) and compares each
model with the first one query by query: the queries only one of the two finds first, and the
two-sided sign test of those (McNemar's exact test). Recipes a few queries apart on one set trade
more than that each way; the pooled, paired figure says whether a difference is more than luck.
--plot DIR draws each set's precision-recall curves, every model on one picture.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.evaluate import EvalReport, evaluate, write_pr_plot  # noqa: E402
from pipeline.extract import extract  # noqa: E402
from pipeline.index import build_index  # noqa: E402
from pipeline.model import read_model_info  # noqa: E402

# ../shared/eval of the checkout, or of a folder above it (a worktree under the main checkout's parent)
SHARED = next(
    (p / "shared" / "eval" for p in ROOT.parents if (p / "shared" / "eval").is_dir()), ROOT.parent / "shared" / "eval"
)


def sets(heldouts: list[Path]) -> dict[str, tuple[Path, Path, Path]]:
    """name -> (database folder, query folder, ground truth) of every set present."""
    out = {}
    if SHARED.is_dir():
        out["holidays"] = (SHARED / "holidays-dev" / "images",) * 2 + (SHARED / "holidays-dev" / "groundtruth.json",)
        out["copies"] = (
            SHARED / "copies-dev" / "db",
            SHARED / "copies-dev" / "queries",
            SHARED / "copies-dev" / "groundtruth.json",
        )
    else:
        print(f"{SHARED} not found: holidays and copies skipped")
    for i, h in enumerate(heldouts):  # one set keeps the name "heldout"
        name = "heldout" if len(heldouts) == 1 else f"heldout-{h.name}"
        out[name if name not in out else f"{name}-{i}"] = (h / "db", h / "queries", h / "groundtruth.json")
    return out


def score_model(
    label: str,
    model: Path,
    work: Path,
    heldouts: list[Path],
    order: list[str],
    reports: dict[str, list[tuple[str, EvalReport]]],
) -> dict:
    """One model's row of the table; each set's report is added to `reports` (for the plots)."""
    info = read_model_info(model)
    row = {
        "profile": label,
        "model": info.name,
        "checksum": info.checksum[:12],
        "resize": info.resize,
        "pooling": info.pooling,
        "compute": round(info.relative_compute(), 2),
    }
    present = sets(heldouts)
    for name in [n for o in order for n in present if n.split("-")[0] == o]:
        db, queries, gt = present[name]
        # a held-out set is cached under its folder's path: extraction is incremental, so two sets sharing a
        # cache folder would be indexed together
        folder = hashlib.sha1(str(db.resolve()).encode()).hexdigest()[:10]
        key = name if not name.startswith("heldout") else f"heldout-{folder}"
        base = work / info.checksum[:12] / key
        extract([db], base / "features", model, progress=False)
        build_index(base / "features", base / "index", progress=False)
        report = evaluate(base / "index", gt, queries, model=model, exact=True)
        row[name] = report.to_dict()
        reports.setdefault(name, []).append((label, report))
        print(f"{label} {name}: {json.dumps(row[name])}", flush=True)
        if name.startswith("heldout"):
            row[name]["first"] = {s.query: s.first_positive == 1 for s in report.per_query}
    return row


def heldout_names(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r if k.startswith("heldout")))


def pooled(row: dict, names: list[str]) -> dict[str, bool]:
    """Per held-out query (set/query), whether its first result is right."""
    return {f"{n}/{q}": hit for n in names if n in row for q, hit in row[n]["first"].items()}


def paired(rows: list[dict]) -> str:
    """Each model against the first, on all held-out queries pooled: the queries only one finds first."""
    names = heldout_names(rows)
    ref = pooled(rows[0], names)
    lines = [
        f"| profile | held-out R@1, pooled ({len(ref)} queries) | right only here | right only with "
        f"{rows[0]['profile']} | sign test p (two-sided) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mine = pooled(r, names)  # every model is scored on the same sets, so on the same queries
        wins = sum(mine[q] and not ref[q] for q in ref)
        losses = sum(ref[q] and not mine[q] for q in ref)
        n = wins + losses
        p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n) if n else 1.0
        lines.append(
            f"| {r['profile']} | {sum(mine.values()) / len(mine):.4f} ({sum(mine.values())}) | {wins} "
            f"| {losses} | {p:.3f} |"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    held = heldout_names(rows)
    lines = [
        "| profile | holidays mAP | holidays R@1 | copies R@1 | copies mAP | "
        + "".join(f"{n} R@1 | {n} mAP | " for n in held)
        + "compute (seed = 1) | copies: weakest R@1 |",
        "|---|---|---|---|---|" + "---|---|" * len(held) + "---|---|",
    ]
    for r in rows:

        def cell(s: str, k: str, r: dict = r) -> str:
            return f"{r[s][k]:.3f}" if s in r else "-"

        by_transformation = list(r.get("copies", {}).get("by_transformation", {}).items())
        weakest = ", ".join(f"{t} {v['recall@1']:.2f}" for t, v in by_transformation[:4])
        lines.append(
            f"| {r['profile']} | {cell('holidays', 'mAP')} | {cell('holidays', 'recall@1')} "
            f"| {cell('copies', 'recall@1')} | {cell('copies', 'mAP')} | "
            + "".join(f"{cell(n, 'recall@1')} | {cell(n, 'mAP')} | " for n in held)
            + f"{r['compute']:.2f} | {weakest} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="LABEL=model.onnx (repeat)")
    ap.add_argument(
        "--heldout",
        type=Path,
        action="append",
        help="a held-out set (repeat for several; default bench-output/heldout)",
    )
    ap.add_argument("--work", type=Path, default=ROOT / "bench-output" / "eval-profiles")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--sets", default="holidays,copies,heldout", help="which sets to score, in this order")
    ap.add_argument(
        "--plot",
        type=Path,
        help="write here each set's precision-recall curves, every model on one picture (SET-pr.png)",
    )
    args = ap.parse_args()
    heldouts = []
    for h in args.heldout or [ROOT / "bench-output" / "heldout"]:
        if (h / "groundtruth.json").is_file():
            heldouts.append(h)
        else:
            print(f"no held-out set at {h} (make it with scripts/eval/make_heldout.py): skipped")
    reports: dict[str, list[tuple[str, EvalReport]]] = {}
    rows = [
        score_model(label, Path(path), args.work, heldouts, args.sets.split(","), reports)
        for label, path in (m.split("=", 1) for m in args.model)
    ]
    if args.plot:
        args.plot.mkdir(parents=True, exist_ok=True)
        for name, curves in reports.items():
            write_pr_plot(curves, args.plot / f"{name}-pr.png")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    if len(rows) > 1 and heldout_names(rows):
        print()
        print(paired(rows))


if __name__ == "__main__":
    main()

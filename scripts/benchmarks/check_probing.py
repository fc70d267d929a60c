"""Do real copies need more probing than the synthetic ones `pipeline duplicates` was calibrated on?

Usage: python scripts/benchmarks/check_probing.py --index bench-output/dupes-bench/index-1000000
       [--heldout bench-output/heldout] [--model M]

Extracts ../shared/eval/copies-dev and the held-out set (scripts/eval/make_heldout.py) with the default
model (or --model), pairs every copy with its original, keeps the pairs at cosine >= the threshold, and asks, of
the index's IVF centroids, what each pair needs to be compared: the fixed nprobe (either vector
probing the other's list) and the score gap over e = sqrt(2 - 2 threshold) (duplicates.PROBE_GAP).
With the 1M benchmark's index (bench_duplicates.py) these are real vectors among synthetic lists: indicative
only, and the model's features must have the index's dimension (1024: the default recipe; --threshold its own).
Writes its figures into docs/benchmarks/results/duplicates.json (--json; run "real copies").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_duplicates import AREA, TITLE, probes_needed  # noqa: E402
from benchlib import add_json_option, command_line, figure, host, now, save  # noqa: E402
from pipeline.duplicates import DEFAULT_THRESHOLD, PROBE_GAP  # noqa: E402
from pipeline.extract import extract  # noqa: E402
from pipeline.features import list_shards, read_shard  # noqa: E402
from pipeline.index import current_version  # noqa: E402

# ../shared/eval of the checkout, or of a folder above it (a worktree under the main checkout's parent)
SHARED = next(
    (p / "shared" / "eval" for p in ROOT.parents if (p / "shared" / "eval").is_dir()), ROOT.parent / "shared" / "eval"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--heldout", type=Path, default=ROOT / "bench-output" / "heldout")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    ap.add_argument("--model", type=Path, help="feature model (default: the one the other commands find)")
    add_json_option(ap, AREA)
    args = ap.parse_args()
    date, machine = now(), host()
    index = faiss.read_index(str(current_version(args.index) / "index.faiss"), faiss.IO_FLAG_MMAP)
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    e = float(np.sqrt(2 - 2 * args.threshold))
    res: dict = {
        "index_vectors": index.ntotal,
        "nlist": ivf.nlist,
        "threshold": args.threshold,
        "probe_gap": PROBE_GAP,
        "sets": {},
    }
    for name, root in (("copies-dev", SHARED / "copies-dev"), ("held-out", args.heldout)):
        truth = json.loads((root / "groundtruth.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            extract([root / "db", root / "queries"], tmp, args.model, progress=False)
            feats = {}
            for shard in list_shards(Path(tmp)):
                data = read_shard(shard)
                feats.update(zip(data.paths, data.features, strict=True))
        x = np.stack([feats[str(root / "queries" / t["query"])] for t in truth]).astype(np.float32)
        y = np.stack([feats[str(root / "db" / t["positives"][0])] for t in truth]).astype(np.float32)
        res["dim"] = x.shape[1]
        close = (x * y).sum(1) >= args.threshold
        x, y = x[close], y[close]
        sx, sy, r = x @ centroids.T, y @ centroids.T, np.arange(len(x))
        a, b = sx.argmax(1), sy.argmax(1)
        gap = np.minimum(sx[r, a] - sx[r, b], sy[r, b] - sy[r, a]) / e
        rank = probes_needed(ivf, x, y)
        res["sets"][name] = {
            "pairs": len(x),
            "in_different_lists": int((a != b).sum()),
            "missed_with_32_lists": int((rank > 32).sum()),
            "largest_nprobe_needed": int(rank.max()),
            "missed_with_gap_rule": int((gap > PROBE_GAP).sum()),
            "largest_gap_needed_e": round(float(gap.max()), 3),
            "gap_needed_p99_e": round(float(np.quantile(gap, 0.99)), 3),
        }
        print(f"{name}: {json.dumps(res['sets'][name])}", flush=True)
    save(
        args.json,
        AREA,
        TITLE,
        key="real copies",
        date=date,
        command=command_line(),
        host=machine,
        dim=res["dim"],
        setup=setup(res),
        figures=figures(res),
        result=res,
    )


def setup(res: dict) -> str:
    return (
        f"Not a timing: the copy-original pairs of copies-dev and of a held-out set (real features, cosine ≥ "
        f"{res['threshold']}) placed among the IVF centroids of the 1M planted-groups benchmark's index "
        f"({res['nlist']} lists): which of them `duplicates`' probing compares (either vector probing the other's "
        f"list). Real vectors among synthetic lists: indicative only."
    )


def figures(res: dict) -> list[dict]:
    out = []
    for name, s in res["sets"].items():
        p99 = f", 99th percentile {s['gap_needed_p99_e']} e" if "gap_needed_p99_e" in s else ""
        most = f"; largest nprobe needed {s['largest_nprobe_needed']}" if "largest_nprobe_needed" in s else ""
        out += [
            figure(
                f"{name}: copy pairs the gap rule ({res['probe_gap']} e) misses",
                s["missed_with_gap_rule"],
                "",
                f"of {s['pairs']}; largest gap needed {s['largest_gap_needed_e']} e{p99}",
            ),
            figure(
                f"{name}: copy pairs 32 fixed lists per vector miss",
                s["missed_with_32_lists"],
                "",
                f"of {s['pairs']}{most}",
            ),
        ]
    return out


if __name__ == "__main__":
    main()

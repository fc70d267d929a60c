"""Do real copies need more probing than the synthetic ones `pipeline duplicates` was calibrated on?

Usage: python scripts/check_probing.py --index bench-output/dupes-bench/index-1000000 [--heldout bench-output/heldout] [--model M]

Extracts ../shared/eval/copies-dev and the held-out set (scripts/make_heldout.py) with the default
model (or --model), pairs every copy with its original, keeps the pairs at cosine >= the threshold, and asks, of
the index's IVF centroids, what each pair needs to be compared: the fixed nprobe (either vector
probing the other's list) and the score gap over e = sqrt(2 - 2 threshold) (duplicates.PROBE_GAP).
With the 1M benchmark's index these are real vectors among synthetic lists: indicative only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_duplicates import probes_needed  # noqa: E402
from pipeline.duplicates import DEFAULT_THRESHOLD, PROBE_GAP  # noqa: E402
from pipeline.extract import extract  # noqa: E402
from pipeline.index import current_version  # noqa: E402
from pipeline.features import list_shards, read_shard  # noqa: E402

SHARED = ROOT.parent / "shared" / "eval"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--heldout", type=Path, default=ROOT / "bench-output" / "heldout")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    ap.add_argument("--model", type=Path, help="feature model (default: the one the other commands find)")
    args = ap.parse_args()
    index = faiss.read_index(str(current_version(args.index) / "index.faiss"), faiss.IO_FLAG_MMAP)
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    e = float(np.sqrt(2 - 2 * args.threshold))
    for name, root in (("copies-dev", SHARED / "copies-dev"), ("held-out", args.heldout)):
        truth = json.loads((root / "groundtruth.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            extract([root / "db", root / "queries"], tmp, args.model, progress=False)
            feats = {p: v for s in list_shards(Path(tmp)) for d in [read_shard(s)] for p, v in zip(d.paths, d.features)}
        x = np.stack([feats[str(root / "queries" / t["query"])] for t in truth]).astype(np.float32)
        y = np.stack([feats[str(root / "db" / t["positives"][0])] for t in truth]).astype(np.float32)
        close = (x * y).sum(1) >= args.threshold
        x, y = x[close], y[close]
        sx, sy, r = x @ centroids.T, y @ centroids.T, np.arange(len(x))
        a, b = sx.argmax(1), sy.argmax(1)
        gap = np.minimum(sx[r, a] - sx[r, b], sy[r, b] - sy[r, a]) / e
        rank = probes_needed(ivf, x, y)
        print(f"{name}: {len(x)} copy pairs at cosine >= {args.threshold} ({(a != b).sum()} in different lists); "
              f"missed with 32 lists per vector: {(rank > 32).sum()} (largest nprobe needed {rank.max()}); "
              f"missed with the gap rule ({PROBE_GAP} e): {(gap > PROBE_GAP).sum()} (largest gap needed "
              f"{gap.max():.3f} e, 99th percentile {np.quantile(gap, 0.99):.3f} e)")


if __name__ == "__main__":
    main()

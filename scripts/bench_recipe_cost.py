"""Throughput of feature models' bare ONNX Runtime sessions on the same photos, passes alternating.

Usage: python scripts/bench_recipe_cost.py --photos bench-output/photos A.onnx B.onnx [...]

Each model's photos are decoded to its own input shapes once; then every pass times each model in
turn with bench_extract.time_bare (batches of 8, after a warm-up), so host speed drifts touch all
alike. Prints images/s per pass, the best pass's ratio of each model to the first, and the host's
sgemm. For recipes of one conv base, this says what the pooling costs beside the convolutions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_extract import time_bare  # noqa: E402
from benchlib import sgemm_gflops  # noqa: E402
from pipeline.images import decode_bytes, read_file  # noqa: E402
from pipeline.model import read_model_info  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--photos", type=Path, default=ROOT / "bench-output" / "photos")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    files = sorted(args.photos.glob("*.jpg"))[: args.limit]
    pixels = {m: [decode_bytes(read_file(f)[0], read_model_info(m).resize_to) for f in files] for m in args.models}
    speed: dict[Path, list[float]] = {m: [] for m in args.models}
    for _ in range(args.passes):
        for m in args.models:
            speed[m].append(round(time_bare(m, pixels[m], 8), 2))
    first = max(speed[args.models[0]])
    print(json.dumps({"images": len(files), "sgemm_gflops": round(sgemm_gflops(), 1),
                      "images_per_s": {m.name: v for m, v in speed.items()},
                      "best_vs_first": {m.name: round(max(v) / first, 3) for m, v in speed.items()}}))


if __name__ == "__main__":
    main()

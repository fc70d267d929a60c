"""Time per image of feature models' bare ONNX Runtime sessions on the same decoded batches, alternating.

Usage: python scripts/bench_recipe_cost.py --photos bench-output/photos A.onnx B.onnx [...]

Each model decodes the photos to its own input shape once (outside the timing); then every pass
runs each model in turn over the same photos in batches of 8, so host speed drifts touch all alike.
Prints images/s per pass, the best pass's ratio of each model to the first, and the host's sgemm.
For recipes of one conv base, this says what the pooling costs beside the convolutions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import sgemm_gflops  # noqa: E402
from pipeline.images import decode_bytes, read_file  # noqa: E402
from pipeline.model import FeatureModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--photos", type=Path, default=ROOT / "bench-output" / "photos")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    files = sorted(args.photos.glob("*.jpg"))[: args.limit]
    models = {m.name: FeatureModel(m) for m in args.models}
    batches = {}
    for name, m in models.items():
        images = [decode_bytes(read_file(f)[0], m.info.resize_to) for f in files]
        batches[name] = [images[i:i + 8] for i in range(0, len(images), 8)]
        m.embed_each(batches[name][0], batch_size=8)  # warm-up
    speed: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.passes):
        for name, m in models.items():
            t0 = time.perf_counter()
            for chunk in batches[name]:
                m.embed_each(chunk, batch_size=8)
            speed[name].append(round(len(files) / (time.perf_counter() - t0), 2))
    first = next(iter(models))
    print(json.dumps({"images": len(files), "sgemm_gflops": round(sgemm_gflops(), 1), "images_per_s": speed,
                      "best_vs_first": {n: round(max(v) / max(speed[first]), 3) for n, v in speed.items()}}))


if __name__ == "__main__":
    main()

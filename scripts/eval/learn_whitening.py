"""Learn the whitening a profile ships with (pipeline/model/data/whitening-PROFILE.npz), from independent photos.

Usage:
  python scripts/eval/fetch_photos.py --gcompris bench-output/whitening     # 104 photographs of gcompris-qt-data 3.1-2
  python scripts/eval/learn_whitening.py --profile balanced --photos bench-output/whitening

The photos are decoded and pooled exactly as the profile's recipe does (frames trimmed, aspect buckets), and
PCA-whitening of each R-MAC region is fitted per pooled map (learn_whitening). The file records how and on what
it was learned (its provenance, which goes into the model's metadata and checksum). No evaluation set draws on
gcompris-qt-data. Re-learning gives matrices equal up to float rounding, so a new sha256: the committed file is
the reference, and docs/quality.md measures models built from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.images import find_images  # noqa: E402
from pipeline.model import (  # noqa: E402
    PROFILES,
    Whitening,
    build_feature_graph,
    learn_whitening,
    load_layers,
    save_whitening,
    shipped_whitening_path,
    whitening_checksum,
)

SOURCE = (
    "the photographs of Debian's gcompris-qt-data 3.1-2 (GPL-3+, CC-BY-SA-4.0 and public-domain files, "
    "per its debian/copyright) kept by scripts/eval/fetch_photos.py --gcompris"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="balanced", choices=sorted(PROFILES))
    ap.add_argument("--photos", type=Path, required=True, help="the independent photos (fetch_photos.py --gcompris)")
    ap.add_argument("--out", type=Path, help="default: the profile's shipped file in pipeline/model/data/")
    args = ap.parse_args()
    recipe = PROFILES[args.profile]
    layers, _ = load_layers()
    plain, _ = build_feature_graph(
        layers, input_size=recipe.input_size, pooling=recipe.pooling, aspect=recipe.aspect, frame=recipe.frame
    )
    files = find_images([args.photos])
    learned = learn_whitening(plain, recipe.pooling, files)
    whitening = Whitening(learned.maps, f"{learned.provenance}: {SOURCE}")
    out = args.out or shipped_whitening_path(args.profile)
    save_whitening(out, whitening)
    print(f"wrote {out}: {len(files)} photos, sha256 {whitening_checksum(whitening)}")


if __name__ == "__main__":
    main()

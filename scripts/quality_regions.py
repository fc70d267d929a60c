"""Second quality push: learned PCA-whitening of R-MAC regions, aspect-kept buckets and two-scale R-MAC.

Usage:
  python scripts/make_heldout.py --out bench-output/heldout          # once: our own held-out copy set
  python scripts/fetch_photos.py --gcompris bench-output/whitening   # once: photos no evaluation set uses
  python scripts/quality_regions.py [--train bench-output/whitening] [--heldout bench-output/heldout]

For each input policy (`squash224`: 224x224 squashed, the `square` profile's; `bucketS`: aspect kept in the
seven buckets of about SxS pixels that the product uses, `bucket192` being the default's), the
R-MAC region vectors (block5_conv3 max-pooled over each region, L2-normalised) of every image are
computed once, with the product's own decode and resize (`decode_bytes`), and cached. Then scored
with exact cosine ranking and `pipeline eval`'s metrics:
  * plain R-MAC (regions summed, L2-normalised);
  * R-MAC with PCA-whitening of the regions (Tolias et al. 2016: each region centred, projected,
    L2-normalised before the sum), learned on the region vectors of the --train photos (each photo,
    its mirror image and two random crops of 60-90% of its sides), with eigenvalue power `a`
    (0.5 = full whitening, 0.25 = half) and shrinkage `s` (the eigenvalues' mean x s added first);
  * two inputs combined: their R-MAC descriptors L2-normalised and summed.
Compute = the largest input's pixels over the seed's 224x224, summed over inputs.
Writes bench-output/quality_regions.json and prints a Markdown table (docs/quality.md).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from quality_experiments import datasets, l2n, maps_session, rank, region_vectors  # noqa: E402
from pipeline.evaluate import score  # noqa: E402
from pipeline.images import InputSize, decode_bytes, input_shapes, read_file  # noqa: E402
from pipeline.model import ASPECTS, aspect_shapes  # noqa: E402

WHITENINGS = [(0.5, 0.0), (0.5, 0.1), (0.5, 1.0), (0.25, 0.0), (0.25, 0.1), (0.25, 1.0)]  # (power a, shrinkage s)


def input_size(policy: str) -> InputSize:
    """squashN: N x N; bucketN: the aspect buckets of about N x N pixels; shortN: the same aspects with
    the short side N (wide pictures get more pixels, not fewer rows)."""
    side = int(policy.removeprefix("squash").removeprefix("bucket").removeprefix("short"))
    if policy.startswith("short"):
        shapes = [(side, 8 * round(side * a / 8)) for a in ASPECTS]
        return tuple(dict.fromkeys(shapes + [(w, h) for h, w in shapes]))
    return side if policy.startswith("squash") else aspect_shapes(side)


def compute(policy: str) -> float:
    return max(h * w for h, w in input_shapes(input_size(policy))) / 224**2


def regions(sess, images: list[bytes], policy: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(every image's region vectors, concatenated; regions per image), cached per policy."""
    if cache.exists():
        d = np.load(cache)
        return d["regions"], d["counts"]
    t0, out = time.perf_counter(), []
    for data in images:
        fmap = sess.run(["block5_conv3/relu"], {"image": decode_bytes(data, input_size(policy))[None]})[0][0]
        out.append(region_vectors(fmap).astype(np.float32))
    print(f"{cache.stem}: {len(images)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    r, n = np.concatenate(out), np.array([len(x) for x in out])
    np.savez(cache, regions=r, counts=n)
    return r, n


def training_views(folder: Path, seed: int = 0) -> list[bytes]:
    """Each photo, its mirror image and two random crops (60-90% of its sides), as JPEG bytes."""
    rng, out = np.random.default_rng(seed), []

    def jpeg(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95)
        return buf.getvalue()

    for path in sorted(folder.glob("*.jpg")):
        with Image.open(path) as im:
            im = im.convert("RGB")
            out += [path.read_bytes(), jpeg(ImageOps.mirror(im))]
            for _ in range(2):
                s = rng.uniform(0.6, 0.9)
                w, h = int(im.width * s), int(im.height * s)
                x, y = rng.integers(0, im.width - w + 1), rng.integers(0, im.height - h + 1)
                out.append(jpeg(im.crop((x, y, x + w, y + h))))
    return out


def learn_whitening(r: np.ndarray, power: float, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, projection) of PCA-whitening learned on region vectors r."""
    mean = r.mean(0)
    eigval, eigvec = np.linalg.eigh(np.cov((r - mean).T))
    eigval = np.maximum(eigval, 1e-9) + shrink * eigval.mean()
    return mean, (eigvec / eigval**power).T


def rmac(r: np.ndarray, n: np.ndarray, whitening: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    if whitening is not None:
        mean, projection = whitening
        r = l2n((r - mean) @ projection.T)
    out = np.zeros((len(n), r.shape[1]), np.float32)
    np.add.at(out, np.repeat(np.arange(len(n)), n), r)
    return l2n(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, default=ROOT / "bench-output" / "whitening",
                    help="photos to learn whitening on (fetch_photos.py --gcompris); absent: no whitening rows")
    ap.add_argument("--heldout", type=Path, default=ROOT / "bench-output" / "heldout")
    ap.add_argument("--whiten", default="squash224,bucket272", help="policies to learn whitening for")
    ap.add_argument("--combos", default="squash224,bucket272,bucket224,bucket160,squash160,bucket224+bucket160,"
                    "squash224+bucket160,bucket224+squash160,bucket272+bucket160,squash224+bucket272")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-output" / "quality-regions")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    sess = maps_session(None)
    whitenings: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    if args.train.is_dir():
        views = training_views(args.train)
        for policy in args.whiten.split(","):
            r, _ = regions(sess, views, policy, args.cache / f"train-{policy}.npz")
            print(f"{policy}: whitening learned on {len(r):,} region vectors of {len(views)} views", flush=True)
            whitenings[policy] = {f"whitened a{a} s{s}": learn_whitening(r, a, s) for a, s in WHITENINGS}
    rows = []
    for name, (db, queries, gt) in datasets(args.heldout).items():
        files = sorted(set(db) | set(queries))
        pos, names, qnames = {f: i for i, f in enumerate(files)}, [f.name for f in db], [e["query"] for e in gt]
        cached: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def region_set(policy: str) -> tuple[np.ndarray, np.ndarray]:
            if policy not in cached:
                cached[policy] = regions(sess, [read_file(f)[0] for f in files], policy, args.cache / f"{name}-{policy}.npz")
            return cached[policy]

        def evaluate(recipe: str, x: np.ndarray, cost: float) -> None:
            rankings = rank(x[[pos[f] for f in queries]], x[[pos[f] for f in db]], names, qnames)
            rep = score(dict(zip(qnames, rankings)), gt).to_dict()
            rows.append({"set": name, "recipe": recipe, "compute": round(cost, 2), "mAP": rep["mAP"], "recall@1": rep["recall@1"]})
            print(json.dumps(rows[-1]), flush=True)

        for combo in args.combos.split(","):
            parts = combo.split("+")
            evaluate(combo, l2n(sum(rmac(*region_set(p)) for p in parts)), sum(map(compute, parts)))
        for policy, variants in whitenings.items():
            for variant, w in variants.items():
                evaluate(f"{policy} {variant}", rmac(*region_set(policy), w), compute(policy))
    (ROOT / "bench-output").mkdir(exist_ok=True)
    (ROOT / "bench-output" / "quality_regions.json").write_text(json.dumps(rows, indent=1))
    print(render(rows))


def render(rows: list[dict]) -> str:
    """A Markdown table: one row per recipe, mAP and R@1 of each set (and the dimension when rows give it)."""
    sets = list(dict.fromkeys(r["set"] for r in rows))
    by = {(r["set"], r["recipe"]): r for r in rows}
    extra = ["dim"] if rows and "dim" in rows[0] else []
    lines = ["| recipe | " + "".join(f"{c} | " for c in extra) + "compute | "
             + " | ".join(f"{s} mAP | {s} R@1" for s in sets) + " |", "|---" * (2 + len(extra) + 2 * len(sets)) + "|"]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        first = next(r for r in rows if r["recipe"] == recipe)
        cells = [f"{by[s, recipe]['mAP']:.3f} | {by[s, recipe]['recall@1']:.3f}" if (s, recipe) in by else "— | —"
                 for s in sets]
        name = recipe.replace("|", "\\|")  # a bare | would split the Markdown cell
        lines.append(f"| `{name}` | " + "".join(f"{first[c]} | " for c in extra) + f"{first['compute']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

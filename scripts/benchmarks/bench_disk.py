"""Bytes on disk per image: every file a collection leaves, for the default IVF-Flat plan and the compressed one.

Usage: python scripts/benchmarks/bench_disk.py [--n 200000] [--workdir bench-output/disk-bench]

1. Writes N synthetic 1024-d features (the benchmarks' set) as shards of extract's default size, with paths
   and content hashes shaped like a real collection's (/srv/photos/2019/06/01/IMG_20190601_000123.jpg,
   32 hex digits, real sizes and times), and their catalog (Catalog.reconcile, as extract records them).
2. Builds the default plan (`pipeline build-index`, IVF-Flat) and the compressed plan (`--max-memory` at 400
   bytes an image: IVF-PQ codes + the float16 re-rank store) into two index folders.
3. Reports bytes per image of each file: the shards, the catalog, and each file of the published version
   (the index, the re-rank store, the id table, the recall sample, the metadata).
4. The shards as schema 1 wrote them (float32 features, no checksums), rewritten from the same rows: the
   saving of float16 shards.
Writes its figures into docs/benchmarks/results/disk.json (--json) and deletes its work folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import DIM, add_json_option, centres_of, command_line, figure, host, now, save  # noqa: E402
from pipeline.extract import DEFAULT_SHARD_SIZE  # noqa: E402
from pipeline.features import CATALOG_FILE, Catalog, list_shards  # noqa: E402
from pipeline.index import build_index, current_version  # noqa: E402
from pipeline.synthetic import clustered, model_info  # noqa: E402

AREA, TITLE = "disk", "Bytes on disk per image"
PATH = "/srv/photos/{y}/{m:02d}/{d:02d}/IMG_{y}{m:02d}{d:02d}_{i:06d}.jpg"


def make_collection(features: Path, n: int, seed: int) -> None:
    """n vectors as shards of extract's size, with a real collection's paths, hashes, sizes and times, and
    their catalog."""
    from pipeline.features import ShardData, shard_name, write_shard

    rng = np.random.default_rng(seed)
    centres = centres_of(seed, DIM)
    features.mkdir(parents=True)
    info = model_info(DIM)
    for number, start in enumerate(range(0, n, DEFAULT_SHARD_SIZE)):
        rows = range(start, min(n, start + DEFAULT_SHARD_SIZE))
        days = rng.integers(0, 3650, len(rows))
        paths = [
            PATH.format(y=2015 + int(d) // 365, m=1 + int(d) % 365 // 31, d=1 + int(d) % 28, i=i)
            for d, i in zip(days, rows, strict=True)
        ]
        data = ShardData(
            clustered(len(rows), centres, rng),
            paths,
            [rng.bytes(16).hex() for _ in rows],
            rng.integers(500_000, 8_000_000, len(rows)),
            1.4e9 + rng.uniform(0, 3e8, len(rows)),
            [],
            [],
        )
        write_shard(features / shard_name(number), data, info)
    with Catalog(features) as catalog:
        catalog.reconcile()


def schema_1_bytes(features: Path, out: Path) -> int:
    """The shards' bytes as schema 1 wrote them: float32 features, contiguous, no checksums."""
    import h5py

    total = 0
    out.mkdir()
    for shard in list_shards(features):
        copy = out / shard.name
        with h5py.File(shard, "r") as src, h5py.File(copy, "w") as dst:
            for name in ("paths", "hashes", "errors/paths", "errors/reasons"):
                src.copy(src[name], dst, name=name)
            dst["features"] = src["features"][()].astype(np.float32)
            dst["sizes"], dst["mtimes"] = src["sizes"][()], src["mtimes"][()]
            dst.attrs.update({k: v for k, v in src.attrs.items() if k != "strings_sha256"})
            dst.attrs["schema_version"] = 1
        total += copy.stat().st_size
        copy.unlink()
    return total


def per_image(n: int, folder: Path) -> dict[str, float]:
    """Bytes per image of each file of a version folder, and of each of its folders (metadata/) as a whole."""
    out = {}
    for f in sorted(folder.iterdir()):
        files = [f] if f.is_file() else [g for g in f.rglob("*") if g.is_file()]
        out[f.name + ("" if f.is_file() else "/")] = round(sum(g.stat().st_size for g in files) / n, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-output" / "disk-bench")
    ap.add_argument("--seed", type=int, default=0)
    add_json_option(ap, AREA)
    args = ap.parse_args()
    date, machine, n, work = now(), host(), args.n, args.workdir
    shutil.rmtree(work, ignore_errors=True)
    features = work / "features"
    t0 = time.perf_counter()
    make_collection(features, n, args.seed)
    print(f"collection of {n:,} written in {time.perf_counter() - t0:.0f} s", flush=True)
    shards = sum(p.stat().st_size for p in list_shards(features))
    with Catalog(features) as catalog:  # checkpointed: the catalog's bytes, not its write-ahead log's
        catalog.reconcile()
    res: dict = {
        "n": n,
        "dim": DIM,
        "shard_size": DEFAULT_SHARD_SIZE,
        "shards": round(shards / n, 1),
        "shards_schema_1": round(schema_1_bytes(features, work / "v1") / n, 1),
        "catalog": round((features / CATALOG_FILE).stat().st_size / n, 1),
        "plans": {},
    }
    for plan, spec in (("ivf-flat", {}), ("compressed", {"max_memory": n * 400})):
        report = build_index(features, work / f"index-{plan}", progress=False, **spec)
        res["plans"][plan] = {
            "factory": report.meta["factory"],
            "rerank": report.meta.get("rerank", 0),
            "files": per_image(n, current_version(work / f"index-{plan}")),
        }
        print(plan, res["plans"][plan], flush=True)
    res["saving"] = round(1 - res["shards"] / res["shards_schema_1"], 3)
    print(res, flush=True)
    machine["sgemm_gflops_after"] = host()["sgemm_gflops"]
    save(
        args.json,
        AREA,
        TITLE,
        key=f"{n:,}",
        date=date,
        command=command_line(),
        host=machine,
        dim=DIM,
        setup=(
            f"{n:,} synthetic {DIM}-d features in shards of {DEFAULT_SHARD_SIZE} (extract's default) with a real "
            "collection's paths (/srv/photos/2019/06/01/IMG_20190601_000123.jpg), content hashes, sizes and times, "
            "and their catalog; the default plan (IVF-Flat) and the compressed plan (`--max-memory` at 400 bytes an "
            "image) built from them. Bytes of each file divided by the number of images. Schema 1 shards: the same "
            "rows rewritten as float32 without checksums."
        ),
        figures=figures(res),
        result=res,
    )
    shutil.rmtree(work, ignore_errors=True)


def figures(res: dict) -> list[dict]:
    out = [
        figure(
            "shards (float16 features, checksummed)",
            res["shards"],
            " B",
            f"schema 1 (float32): {res['shards_schema_1']} B; {res['saving']:.0%} saved",
        ),
        figure("catalog (catalog.sqlite)", res["catalog"], " B"),
    ]
    for plan, p in res["plans"].items():
        files = p["files"]
        total = round(sum(files.values()) + res["shards"] + res["catalog"])
        out.append(
            figure(
                f"{plan} (`{p['factory']}`): the index version's files",
                round(sum(files.values())),
                " B",
                "; ".join(f"{k} {v:g}" for k, v in files.items()),
            )
        )
        out.append(figure(f"{plan}: all of it (shards + catalog + version)", total, " B"))
    return out


if __name__ == "__main__":
    main()

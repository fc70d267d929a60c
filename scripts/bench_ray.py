"""Benchmark the Ray stages: do they cost little over a local run, and give the same results?

Usage (under the shared benchmark lock, after scripts/fetch_photos.py --count 300):
  flock /tmp/pipeline-bench.lock python scripts/bench_ray.py --photos bench-output/photos --model models/vgg16.onnx

Measures in one run:
  (a) `pipeline extract` vs `pipeline extract --ray ADDRESS` (a one-node cluster started before,
      as `ray start --head` would be) on the same photos: time per image, and bitwise equality of
      every feature;
  (b) the same job on a two-node cluster on this machine (ray.cluster_utils.Cluster: two raylets,
      one CPU each): its shards' features equal the local run's;
  (c) index fill at --vectors (1M) vectors: one IVF add of everything vs 10 partial indexes (each
      from the serialized trained index, add_with_ids) merged with merge_from: time and equality.
Targets: (a) Ray time <= 1.15 x local time; (a), (b) bitwise-equal features; (c) byte-equal index.
Appends a section to docs/benchmarks.md (unless --no-doc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import record, sgemm_gflops, targets_line  # noqa: E402
from pipeline.catalog import Catalog  # noqa: E402
from pipeline.shards import read_shard  # noqa: E402


def run_extract(photos: Path, out: Path, model: Path, *extra: str) -> dict:
    """`pipeline extract` in a fresh process; its --json report and wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "-q", "extract", str(photos), "--out", str(out),
                           "--model", str(model), "--json", *extra], env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    return {**json.loads(done.stdout), "wall_s": round(wall, 2)}


def features(features_dir: Path) -> dict[str, np.ndarray]:
    with Catalog(features_dir) as catalog:
        live = catalog.live_rows()
    out = {}
    for name, rows in live.items():
        data = read_shard(features_dir / name)
        out.update((data.paths[r], data.features[r]) for r in rows)
    return out


def same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[p], b[p]) for p in a)


def bench_extract(photos: Path, model: Path, work: Path, shard_size: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    shards = ("--shard-size", str(shard_size))
    local = run_extract(photos, work / "local", model, *shards)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=str(work / "ray-one"))
    address = ray.get_runtime_context().gcs_address
    on_ray = run_extract(photos, work / "ray", model, *shards, "--ray", address)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    two = run_extract(photos, work / "two-nodes", model, *shards, "--ray", cluster.address)
    nodes = len([n for n in cluster.list_all_nodes()])
    cluster.shutdown()
    base = features(work / "local")
    return {
        "images": local["extracted"], "local_s": local["wall_s"], "ray_s": on_ray["wall_s"],
        "two_nodes_s": two["wall_s"], "nodes": nodes,
        "local_ips": local["images_per_second"], "ray_ips": on_ray["images_per_second"],
        "two_nodes_ips": two["images_per_second"],
        "ray_ratio": round(on_ray["wall_s"] / local["wall_s"], 3),
        "ray_equal": same(base, features(work / "ray")), "two_nodes_equal": same(base, features(work / "two-nodes")),
        "shards": [len(list((work / d).glob("shard-*.h5"))) for d in ("local", "ray", "two-nodes")],
    }


def bench_merge(n: int, parts: int, dim: int = 512, seed: int = 0) -> dict:
    """One add vs `parts` partial indexes merged, on clustered synthetic vectors (the training is common)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        v = centres[rng.integers(0, 1000, m)] + 0.5 * rng.normal(size=(m, dim)).astype(np.float32)
        x[s:s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    nlist = 2 ** int(np.ceil(np.log2(4 * np.sqrt(n))))
    trained = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    t = time.perf_counter()
    trained.train(x[rng.choice(n, size=min(n, 10 * nlist), replace=False)])  # only the fill is compared
    train_s = time.perf_counter() - t
    blob = faiss.serialize_index(trained)

    single = faiss.deserialize_index(blob)
    t = time.perf_counter()
    single.add(x)
    single_s = time.perf_counter() - t

    bounds = np.linspace(0, n, parts + 1).astype(int)
    part_s, blobs = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        t = time.perf_counter()
        p = faiss.deserialize_index(blob)
        p.add_with_ids(x[lo:hi], np.arange(lo, hi, dtype=np.int64))
        blobs.append(faiss.serialize_index(p))
        part_s.append(time.perf_counter() - t)
        del p
    t = time.perf_counter()
    merged = faiss.deserialize_index(blob)
    for b in blobs:
        merged.merge_from(faiss.deserialize_index(b), 0)
    merge_s = time.perf_counter() - t
    del blobs
    queries = x[rng.choice(n, size=1000, replace=False)]
    params = faiss.SearchParametersIVF(nprobe=16)
    d1, i1 = single.search(queries, 10, params=params)
    d2, i2 = merged.search(queries, 10, params=params)
    return {"vectors": n, "nlist": nlist, "parts": parts, "train_s": round(train_s, 1), "single_add_s": round(single_s, 1),
            "partial_add_s_max": round(max(part_s), 1), "partial_add_s_sum": round(sum(part_s), 1),
            "merge_s": round(merge_s, 1),
            "bytes_equal": bool(np.array_equal(faiss.serialize_index(single), faiss.serialize_index(merged))),
            "search_equal": bool(np.array_equal(i1, i2) and np.array_equal(d1, d2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--parts", type=int, default=10)
    ap.add_argument("--shard-size", type=int, default=64,
                    help="images per shard (= per Ray task): small enough that both nodes of the two-node cluster work")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    gflops = sgemm_gflops()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        ex = bench_extract(args.photos, args.model, Path(tmp), args.shard_size)
    mg = bench_merge(args.vectors, args.parts)
    result = {"extract": ex, "merge": mg, "sgemm_gflops": gflops, "cpus": os.cpu_count(),
              "load_avg": os.getloadavg()[0]}
    print(json.dumps(result, indent=2), file=sys.stderr)
    targets = {"Ray extraction <= 1.15x local": ex["ray_ratio"] <= 1.15,
               "bitwise-equal features (one node, two nodes)": ex["ray_equal"] and ex["two_nodes_equal"],
               "merged index byte-equal to a single build": mg["bytes_equal"] and mg["search_equal"]}
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    record(f"""
### Ray: extraction and index merge — {when} (`scripts/bench_ray.py`)

Host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy sgemm {gflops} GFLOP/s,
load average {result['load_avg']:.1f} at the start (the machine is shared).

| extraction of {ex['images']} photos (fresh process each, wall time) | seconds | img/s (report) | features vs local |
|---|---|---|---|
| `pipeline extract` | {ex['local_s']} | {ex['local_ips']} | — |
| `pipeline extract --ray ADDRESS` (one-node cluster started before) | {ex['ray_s']} | {ex['ray_ips']} | {'bitwise equal' if ex['ray_equal'] else 'DIFFERENT'} |
| same, two-node cluster on this machine ({ex['nodes']} raylets, 1 CPU each) | {ex['two_nodes_s']} | {ex['two_nodes_ips']} | {'bitwise equal' if ex['two_nodes_equal'] else 'DIFFERENT'} |

Ray / local wall time: {ex['ray_ratio']}x. Shards written (local, one node, two nodes): {ex['shards']}.

| index fill, {mg['vectors']:,} vectors, IVF{mg['nlist']},Flat (training common: {mg['train_s']} s) | seconds |
|---|---|
| one `add` of everything | {mg['single_add_s']} |
| {mg['parts']} partial indexes, `add_with_ids`: slowest one / all of them in a row | {mg['partial_add_s_max']} / {mg['partial_add_s_sum']} |
| `merge_from` of the {mg['parts']} partials (the driver's part) | {mg['merge_s']} |

Merged index byte-equal to the single build: {mg['bytes_equal']}; same top-10 (ids and scores) for 1,000
queries at nprobe 16: {mg['search_equal']}. With {mg['parts']} workers the fill takes about the slowest
partial plus the merge, instead of the single add.

{targets_line(targets)}
""", args.no_doc)


if __name__ == "__main__":
    main()

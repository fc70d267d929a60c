"""Benchmark the index stage at 1M vectors: `pipeline build-index` against raw faiss, memory, recall, qps.

Usage: python scripts/bench_index.py [--n 1000000] [--workdir bench-output/index-bench]
(bench_search.py then measures search on the index this leaves behind.)

1. Writes N synthetic clustered unit vectors (512-d, or --dim) as real HDF5 shards (once; reused after).
2. (a) runs `pipeline build-index` in a fresh process: wall time and peak RSS (whole build:
   reading shards, training, adding, ids table, recall tuning, writing, publishing).
3. (b) runs raw faiss in a fresh process: the same factory and training-sample size, train +
   add on vectors already in memory (reading the shards is not counted).
4. Loads the published index and reports batch queries/s, single-query latency and recall@10
   against exact search at the chosen nprobe, on 1,000 held-out queries (new vectors drawn
   from the same clusters, not in the index).
Target: (a) <= 1.2 x (b); peak RSS <= 1.5 x index size + a few hundred MB.
Writes JSON and appends a table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import record, targets_line  # noqa: E402
from pipeline.model import ModelInfo  # noqa: E402
from pipeline.features import ShardData, list_shards, shard_name, write_shard  # noqa: E402

DIM = 512


def clustered(n: int, centres: np.ndarray, rng: np.random.Generator, spread: float = 0.6) -> np.ndarray:
    """Unit vectors around random centres, noise of norm ~`spread`: at 100k vectors, random pairs have
    cosine ~0.47 and a query's nearest neighbour ~0.76, about as for VGG16 max-pooled features."""
    dim = centres.shape[1]
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_shards(features: Path, n: int, shard_size: int, seed: int, dim: int = DIM) -> np.ndarray:
    """Write n vectors as shards (skipped if present); returns the cluster centres for queries.

    Like max-pooled ReLU features, the centres lie in the positive orthant (random pairs have
    cosine ~0.6), and neighbours are not trivially separated into clusters.
    """
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(10_000, dim))).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    if sum(1 for _ in list_shards(features)) * shard_size >= n:
        return centres
    features.mkdir(parents=True, exist_ok=True)
    info = ModelInfo(name="synthetic", weights_sha256="s" * 64, input_size=224, dim=dim)
    for s, start in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - start)
        vecs = clustered(m, centres, rng)
        paths = [f"/synthetic/{start + i:08d}.jpg" for i in range(m)]
        hashes = [f"{start + i:032x}" for i in range(m)]  # distinct, like real files
        write_shard(features / shard_name(s), ShardData(vecs, paths, hashes, np.zeros(m, np.int64), np.zeros(m), [], []),
                    info)
    return centres


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024, out


RAW_FAISS = r"""
import sys, time, json, numpy as np, faiss
sys.path.insert(0, sys.argv[1])
from pipeline.features import list_shards, read_shard
from pathlib import Path
factory, train_size = sys.argv[3], int(sys.argv[4])
data = np.concatenate([read_shard(p).features for p in list_shards(Path(sys.argv[2]))])
rng = np.random.default_rng(0)
sample = data[np.sort(rng.choice(len(data), train_size, replace=False))]
index = faiss.index_factory(data.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
t0 = time.perf_counter(); index.train(sample); t1 = time.perf_counter(); index.add(data); t2 = time.perf_counter()
print(json.dumps({"train_s": t1 - t0, "add_s": t2 - t1}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=20_000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-output" / "index-bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, default=ROOT / "bench-output" / "bench_index.json")
    ap.add_argument("--dim", type=int, default=DIM, help="vector dimension (1024: the default recipe's features)")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    import faiss

    tag = f"{args.n}-v2" + (f"-d{args.dim}" if args.dim != DIM else "")
    features, index_dir = args.workdir / f"features-{tag}", args.workdir / f"index-{tag}"
    t0 = time.perf_counter()
    centres = make_shards(features, args.n, args.shard_size, args.seed, args.dim)
    print(f"shards ready in {time.perf_counter() - t0:.1f} s", flush=True)

    wall_a, rss_a, out = run_measured([sys.executable, "-m", "pipeline", "-q", "build-index", str(features),
                                       "--out", str(index_dir), "--json", "--no-progress"])
    meta = json.loads(out)
    index_file = Path(meta["version_dir"]) / "index.faiss"
    index_mib = index_file.stat().st_size / 2**20
    print(f"(a) pipeline build-index: {wall_a:.1f} s, peak RSS {rss_a:.0f} MiB, index {index_mib:.0f} MiB, "
          f"{meta['factory']} nprobe {meta['nprobe']} recall@10 {meta['recall_at_10']}", flush=True)

    wall_b, rss_b, out = run_measured([sys.executable, "-c", RAW_FAISS, str(ROOT), str(features), meta["factory"],
                                       str(meta["train_size"])])
    raw = json.loads(out)
    raw_s = raw["train_s"] + raw["add_s"]
    print(f"(b) raw faiss train {raw['train_s']:.1f} s + add {raw['add_s']:.1f} s = {raw_s:.1f} s", flush=True)

    index = faiss.read_index(str(index_file))
    rng = np.random.default_rng(args.seed + 1)
    queries = clustered(1000, centres, rng)
    from pipeline.features import read_shard

    data = np.concatenate([read_shard(p).features for p in list_shards(features)])
    _, truth = faiss.knn(queries, data, 10, metric=faiss.METRIC_INNER_PRODUCT)
    del data
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = meta["nprobe"]
    t0 = time.perf_counter()
    _, found = index.search(queries, 10)
    batch_qps = len(queries) / (time.perf_counter() - t0)
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
    faiss.omp_set_num_threads(1)
    lat = []
    for q in queries[:500]:
        t = time.perf_counter()
        index.search(q[None], 10)
        lat.append((time.perf_counter() - t) * 1000)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/bench_index.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "n": args.n, "dim": args.dim, "factory": meta["factory"], "nprobe": meta["nprobe"], "train_size": meta["train_size"],
        "pipeline_build_s": round(wall_a, 1), "pipeline_timings": meta["timings"],
        "raw_faiss_s": round(raw_s, 1), "raw_faiss": {k: round(v, 1) for k, v in raw.items()},
        "ratio": round(wall_a / raw_s, 3),
        "peak_rss_mib": round(rss_a), "index_mib": round(index_mib), "rss_over_index": round(rss_a / index_mib, 3),
        "tuned_recall_at_10": meta["recall_at_10"],
        "heldout_recall_at_10": round(recall, 4), "batch_qps": round(batch_qps),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 3), "latency_ms_p99": round(float(np.percentile(lat, 99)), 3),
    }
    res["targets"] = {"build_le_1.2x_raw": res["ratio"] <= 1.2,
                      "rss_le_1.5x_index_plus_400MiB": rss_a <= 1.5 * index_mib + 400}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2))
    t = res["pipeline_timings"]
    text = "\n".join([
        f"\n### Index build — {res['date']}\n",
        f"`{res['command']}` — {args.n:,} synthetic clustered {args.dim}-d unit vectors in real shards; {res['factory']}, "
        f"training sample {res['train_size']:,}.\n",
        "| what | seconds |", "|---|---|",
        f"| (a) `pipeline build-index`, whole process | {res['pipeline_build_s']} |",
        f"| &nbsp;&nbsp;of which train / add / recall tuning | {t.get('train_s')} / {t.get('add_s')} / {t.get('tune_s')} |",
        f"| (b) raw faiss train + add (vectors in memory) | {res['raw_faiss_s']} ({raw['train_s']:.1f} + {raw['add_s']:.1f}) |",
        f"| **(a)/(b)** | **{res['ratio']}** |",
        "",
        f"Peak RSS of (a): {res['peak_rss_mib']} MiB for an index of {res['index_mib']} MiB "
        f"({res['rss_over_index']}x). nprobe {res['nprobe']} (tuned: recall@10 {res['tuned_recall_at_10']}); on 1,000 "
        f"held-out queries: recall@10 {res['heldout_recall_at_10']}, {res['batch_qps']} queries/s in one batch, "
        f"single query p50 {res['latency_ms_p50']} ms / p99 {res['latency_ms_p99']} ms (one thread). "
        + targets_line(res["targets"]),
    ]) + "\n"
    record(text, args.no_doc)


if __name__ == "__main__":
    main()

"""Benchmark the index stage at 1M vectors: `pipeline build-index` against raw faiss, memory, recall, qps.

Usage: python scripts/benchmarks/bench_index.py [--n 1000000] [--dim 1024] [--workdir bench-output/index-bench]
(bench_search.py then measures search on the index this leaves behind.)

1. Writes N synthetic clustered unit vectors (1024-d, or --dim) as real HDF5 shards (once; reused after):
   the benchmarks' synthetic set (benchlib.make_shards, with pipeline.synthetic's generator).
2. (a) runs `pipeline build-index` in a fresh process: wall time and peak RSS (whole build:
   reading shards, training, adding, ids table, recall tuning, writing, publishing).
3. (b) runs raw faiss in a fresh process: the same factory and training-sample size, train +
   add on vectors already in memory (reading the shards is not counted).
4. Loads the published index and reports batch queries/s, single-query latency and recall@10
   against exact search at the chosen nprobe, on 1,000 held-out queries (new vectors drawn
   from the same clusters, not in the index).
Target: (a) <= 1.2 x (b); peak RSS <= 1.5 x index size + a few hundred MB.
Writes its figures into docs/benchmarks/results/index.json (--json), one run per --dim.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import DIM, add_json_option, command_line, figure, host, make_shards, now, run_measured, save  # noqa: E402
from pipeline.features import list_shards, read_shard  # noqa: E402
from pipeline.synthetic import clustered  # noqa: E402

AREA, TITLE = "index", "Index build"

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
    ap.add_argument("--dim", type=int, default=DIM, help="vector dimension (1024: the default recipe's features)")
    add_json_option(ap, AREA)
    args = ap.parse_args()
    import faiss

    date, machine = now(), host()
    tag = f"{args.n}-v2" + (f"-d{args.dim}" if args.dim != DIM else "")
    features, index_dir = args.workdir / f"features-{tag}", args.workdir / f"index-{tag}"
    t0 = time.perf_counter()
    centres = make_shards(features, args.n, args.shard_size, args.seed, args.dim)
    print(f"shards ready in {time.perf_counter() - t0:.1f} s", flush=True)

    wall_a, rss_a, out = run_measured(
        [
            sys.executable,
            "-m",
            "pipeline",
            "-q",
            "build-index",
            str(features),
            "--out",
            str(index_dir),
            "--json",
            "--no-progress",
        ]
    )
    meta = json.loads(out)
    index_file = Path(meta["version_dir"]) / "index.faiss"
    index_mib = index_file.stat().st_size / 2**20
    print(
        f"(a) pipeline build-index: {wall_a:.1f} s, peak RSS {rss_a:.0f} MiB, index {index_mib:.0f} MiB, "
        f"{meta['factory']} nprobe {meta['nprobe']} recall@10 {meta['recall_at_10']}",
        flush=True,
    )

    _, _, out = run_measured(
        [sys.executable, "-c", RAW_FAISS, str(ROOT), str(features), meta["factory"], str(meta["train_size"])]
    )
    raw = json.loads(out)
    raw_s = raw["train_s"] + raw["add_s"]
    print(f"(b) raw faiss train {raw['train_s']:.1f} s + add {raw['add_s']:.1f} s = {raw_s:.1f} s", flush=True)

    index = faiss.read_index(str(index_file))
    rng = np.random.default_rng(args.seed + 1)
    queries = clustered(1000, centres, rng)
    data = np.concatenate([read_shard(p).features for p in list_shards(features)])
    _, truth = faiss.knn(queries, data, 10, metric=faiss.METRIC_INNER_PRODUCT)
    del data
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = meta["nprobe"]
    t0 = time.perf_counter()
    _, found = index.search(queries, 10)
    batch_qps = len(queries) / (time.perf_counter() - t0)
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
    faiss.omp_set_num_threads(1)
    lat = []
    for q in queries[:500]:
        t = time.perf_counter()
        index.search(q[None], 10)
        lat.append((time.perf_counter() - t) * 1000)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    res = {
        "n": args.n,
        "dim": args.dim,
        "factory": meta["factory"],
        "nprobe": meta["nprobe"],
        "train_size": meta["train_size"],
        "pipeline_build_s": round(wall_a, 1),
        "pipeline_timings": meta["timings"],
        "raw_faiss_s": round(raw_s, 1),
        "raw_faiss": {k: round(v, 1) for k, v in raw.items()},
        "ratio": round(wall_a / raw_s, 3),
        "peak_rss_mib": round(rss_a),
        "index_mib": round(index_mib),
        "rss_over_index": round(rss_a / index_mib, 3),
        "tuned_recall_at_10": meta["recall_at_10"],
        "heldout_recall_at_10": round(recall, 4),
        "batch_qps": round(batch_qps),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 3),
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 3),
    }
    save(
        args.json,
        AREA,
        TITLE,
        key=f"{args.dim}-d",
        date=date,
        command=command_line(),
        host=machine,
        dim=args.dim,
        setup=setup(res),
        figures=figures(res),
        result=res,
    )


def setup(res: dict) -> str:
    return (
        f"{res['n']:,} synthetic clustered {res['dim']}-d unit vectors in real shards (the benchmarks' set, "
        f"distributed like VGG16 max-pooled features); {res['factory']}, training sample {res['train_size']:,}. "
        "(a) a whole `pipeline build-index` process (reading the shards, training, adding, the id table, recall "
        "tuning, writing, publishing); (b) raw faiss in a fresh process, the same factory and training-sample "
        "size, train + add on vectors already in memory, and nothing written (the product writes the index, the id "
        "table and the metadata, fsyncs them and publishes atomically). Queries: 1,000 held-out vectors (new ones "
        "from the same "
        "clusters, not in the index), searched with raw faiss at the tuned nprobe."
    )


def figures(res: dict) -> list[dict]:
    t, raw = res["pipeline_timings"], res["raw_faiss"]
    return [
        figure(
            "`pipeline build-index` (a) / raw faiss train + add (b)",
            res["ratio"],
            "×",
            f"{res['pipeline_build_s']} vs {res['raw_faiss_s']} s; (a) trains {t.get('train_s')}, adds "
            f"{t.get('add_s')}, tunes {t.get('tune_s')} s; (b) {raw['train_s']} + {raw['add_s']} s",
            target="≤ 1.2",
            met=res["ratio"] <= 1.2,
        ),
        figure(
            "peak RSS of (a) / index size",
            res["rss_over_index"],
            "×",
            f"{res['peak_rss_mib']} MiB for a {res['index_mib']} MiB index",
            target="≤ 1.5 × index + 400 MiB",
            met=res["peak_rss_mib"] <= 1.5 * res["index_mib"] + 400,
        ),
        figure(
            f"recall@10 of held-out queries, nprobe {res['nprobe']} (tuned: recall@10 {res['tuned_recall_at_10']})",
            res["heldout_recall_at_10"],
        ),
        figure(
            "single query p50 / p99 (raw faiss, one thread)",
            f"{res['latency_ms_p50']} / {res['latency_ms_p99']}",
            " ms",
        ),
        figure("batch of 1,000 queries", res["batch_qps"], " queries/s"),
    ]


if __name__ == "__main__":
    main()

"""Benchmark search: index-only latency and recall at 1M vectors, and image queries end to end.

Usage:
  python scripts/benchmarks/bench_index.py      # once: builds the 1M-vector index this reads
  bash scripts/demo.sh                          # once: builds demo-output/index from samples/
  python scripts/benchmarks/bench_search.py     # or --dim 1024 after bench_index.py --dim 1024

Part 1 (1,000,000 synthetic vectors, the index left by bench_index.py): through `Searcher`
(memory-mapped index, id -> path look-up included), single-query latency p50/p99, batch
queries per second and recall@10 against exact search, on 1,000 held-out queries.
Part 2 (the real sample collection): one `pipeline search` process on one image, split into
load (index + model), model (decode + inference) and look-up; then a warm Searcher's time per
image query beyond the model's own inference time.
Targets: p50 <= 2 ms at recall@10 >= 0.95 (1M); warm image query <= model time + 5 ms.
Writes its figures into docs/benchmarks/results/search.json (--json), one run per --dim.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import DIM, add_json_option, centres_of, command_line, figure, host, now, save  # noqa: E402
from pipeline.features import list_shards, read_shard  # noqa: E402
from pipeline.images import load_image  # noqa: E402
from pipeline.search import Searcher  # noqa: E402
from pipeline.synthetic import clustered  # noqa: E402

AREA, TITLE = "search", "Search"


def part_1m(workdir: Path, n: int, seed: int, dim: int = DIM) -> dict:
    import faiss

    tag = f"{n}-v2" + (f"-d{dim}" if dim != DIM else "")  # as bench_index.py names them
    features, index_dir = workdir / f"features-{tag}", workdir / f"index-{tag}"
    t0 = time.perf_counter()
    searcher = Searcher(index_dir)
    load_s = time.perf_counter() - t0
    queries = clustered(1000, centres_of(seed, dim), np.random.default_rng(seed + 1))  # as bench_index.py draws them
    data = np.concatenate([read_shard(p).features for p in list_shards(features)])
    _, truth = faiss.knn(queries, data, 10, metric=faiss.METRIC_INNER_PRODUCT)
    del data
    cold, lat, found = [], [], []
    for q in queries:  # first pass: the mapped lists are touched for the first time
        t = time.perf_counter()
        hits = searcher.search_vectors(q[None], 10)[0]
        cold.append((time.perf_counter() - t) * 1000)
        found.append([int(Path(h.path).stem) for h in hits])
    for q in queries:  # second pass: a warm server
        t = time.perf_counter()
        searcher.search_vectors(q[None], 10)
        lat.append((time.perf_counter() - t) * 1000)
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
    t = time.perf_counter()
    searcher.search_vectors(queries, 10)
    qps = len(queries) / (time.perf_counter() - t)
    return {
        "n": searcher.count,
        "factory": searcher.meta["factory"],
        "nprobe": searcher.nprobe,
        "load_ms": round(load_s * 1000, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "cold_p50_ms": round(float(np.percentile(cold, 50)), 3),
        "cold_p99_ms": round(float(np.percentile(cold, 99)), 3),
        "batch_qps": round(qps),
        "recall_at_10": round(recall, 4),
    }


def part_real(index_dir: Path, query: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "-q",
        "search",
        str(query),
        "--index",
        str(index_dir),
        "-k",
        "10",
        "--json",
    ]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    process_s = time.perf_counter() - t
    t0 = time.perf_counter()
    s = Searcher(index_dir)
    t1 = time.perf_counter()
    model = s.model
    t2 = time.perf_counter()
    pixels = load_image(query, model.info.input_size).pixels
    feats = model.embed(pixels[None])
    t3 = time.perf_counter()
    s.search_vectors(feats, 10)
    t4 = time.perf_counter()
    warm_total, warm_model = [], []
    for _ in range(10):
        t = time.perf_counter()
        s.search([query], k=10)
        warm_total.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.embed(pixels[None])
        warm_model.append(time.perf_counter() - t)
    overhead = (np.median(warm_total) - np.median(warm_model)) * 1000
    return {
        "images": s.count,
        "process_s": round(process_s, 3),
        "load_index_ms": round((t1 - t0) * 1000, 1),
        "load_model_ms": round((t2 - t1) * 1000, 1),
        "decode_and_model_ms": round((t3 - t2) * 1000, 1),
        "lookup_ms": round((t4 - t3) * 1000, 2),
        "warm_query_ms": round(float(np.median(warm_total)) * 1000, 1),
        "warm_model_ms": round(float(np.median(warm_model)) * 1000, 1),
        "warm_overhead_ms": round(float(overhead), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-output" / "index-bench")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--dim", type=int, default=DIM, help="vector dimension of bench_index.py's run (1024: the default recipe's)"
    )
    ap.add_argument("--real-index", type=Path, default=ROOT / "demo-output" / "index")
    ap.add_argument("--query", type=Path, default=ROOT / "samples" / "queries" / "chelsea_crop80.jpg")
    add_json_option(ap, AREA)
    args = ap.parse_args()
    date, machine = now(), host()
    res = {"dim": args.dim}
    res["synthetic"] = a = part_1m(args.workdir, args.n, args.seed, args.dim)
    print(json.dumps(a), flush=True)
    res["real"] = r = part_real(args.real_index, args.query)
    print(json.dumps(r), flush=True)
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
    a, r = res["synthetic"], res["real"]
    return (
        f"{a['n']:,} synthetic {res['dim']}-d vectors (bench_index.py's index: {a['factory']}, tuned nprobe "
        f"{a['nprobe']}), searched through `Searcher` (memory-mapped index, id -> path look-up included) with 1,000 "
        "held-out queries, one at a time (first touch, then warm) and in one batch. Image queries: the sample "
        f"collection ({r['images']} images, `demo-output/index` from `scripts/demo.sh`, the default model), one "
        "query image."
    )


def figures(res: dict) -> list[dict]:
    a, r = res["synthetic"], res["real"]
    return [
        figure(
            "single query p50, warm",
            a["p50_ms"],
            " ms",
            f"p99 {a['p99_ms']} ms",
            target="≤ 2 ms",
            met=a["p50_ms"] <= 2.0,
        ),
        figure(
            "recall@10 vs exact search, held-out queries",
            a["recall_at_10"],
            target="≥ 0.95",
            met=a["recall_at_10"] >= 0.95,
        ),
        figure(
            "first touch p50 / p99 (the mapped lists read for the first time)",
            f"{a['cold_p50_ms']} / {a['cold_p99_ms']}",
            " ms",
        ),
        figure("batch of 1,000 queries", a["batch_qps"], " queries/s"),
        figure("loading the index (memory-mapped)", a["load_ms"], " ms"),
        figure(
            "warm image query beyond the model's inference (decode, batching, faiss, ids)",
            r["warm_overhead_ms"],
            " ms",
            f"{r['warm_query_ms']} ms, of which the model {r['warm_model_ms']} ms",
            target="≤ 5 ms",
            met=r["warm_overhead_ms"] <= 5.0,
        ),
        figure(
            "a whole `pipeline search` process, one image query",
            r["process_s"],
            " s",
            f"load index {r['load_index_ms']} ms, load model {r['load_model_ms']} ms, decode and model "
            f"{r['decode_and_model_ms']} ms, look-up {r['lookup_ms']} ms, the rest Python start-up and imports",
        ),
    ]


if __name__ == "__main__":
    main()

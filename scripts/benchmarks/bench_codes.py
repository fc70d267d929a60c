"""Benchmark coarse-to-fine binary codes against IVF-PQ at the same code bytes per image, both re-ranked.

Usage: flock /tmp/pipeline-bench.lock python scripts/bench_codes.py --features DIR --workdir DIR [--bits 256]

DIR holds synthetic shards written by bench_index.make_shards(seed 0) (e.g. bench_scale.py's 1M and
10M sets): the held-out queries are new vectors from the same cluster centres, not in the index,
and their exact top-10 is computed here by streaming the shards.
1. binary: `pipeline build-index --codes binary:BITS` in a fresh process (wall time, peak RSS); the
   pool of candidates it tuned on its own recall queries.
2. IVF-PQ: `pipeline build-index --factory IVF<nlist>,PQ<BITS/4>x4fs` (fast-scan PQ: BITS/8 bytes a
   code, as the binary codes) in a fresh process; its candidates are re-ranked from the binary
   version's vector store (the same float16 features); candidates and nprobe chosen here on separate
   tuning queries, the fewest candidates (then nprobe) reaching recall@10 0.95.
3. For each: recall@10 on the held-out queries, single-query p50/p99 (one thread), batch queries/s.
Writes JSON and appends a table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_index import DIM, clustered, run_measured  # noqa: E402
from benchlib import record, sgemm_gflops  # noqa: E402

CANDIDATES = (100, 200, 500, 1000, 2000, 5000)  # IVF-PQ candidates re-ranked, as the binary kind's pool grid


def centres_of(seed: int) -> np.ndarray:
    """The cluster centres make_shards(seed) drew (its first draw from the same generator)."""
    centres = np.abs(np.random.default_rng(seed).normal(size=(10_000, DIM))).astype(np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def exact_top(features: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids (positions in shard order = the ids of a build without catalog), streamed."""
    import faiss

    from pipeline.features import list_shards, read_shard

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    offset = 0
    for p in list_shards(features):
        feats = np.ascontiguousarray(read_shard(p).features, np.float32)
        d, i = faiss.knn(queries, feats, k, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, np.where(i >= 0, i + offset, -1))
        offset += len(feats)
    heap.finalize()
    return heap.I


def recall10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth)]))


def measure(search, queries: np.ndarray, truth: np.ndarray, singles: int) -> dict:
    """recall@10, batch queries/s (all threads) and single-query latency (one thread) of search(x, k)."""
    import faiss

    t0 = time.perf_counter()
    _, found = search(queries, 10)
    qps = len(queries) / (time.perf_counter() - t0)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    lat = []
    for q in queries[:singles]:
        t = time.perf_counter()
        search(q[None], 10)
        lat.append((time.perf_counter() - t) * 1000)
    faiss.omp_set_num_threads(threads)
    return {"recall_at_10": round(recall10(found, truth), 4), "batch_qps": round(qps, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3)}


def build(features: Path, out: Path, extra: list[str]) -> tuple[dict, float, float]:
    wall, rss, stdout = run_measured([sys.executable, "-m", "pipeline", "-q", "build-index", str(features), "--out",
                                      str(out), "--json", "--no-progress", *extra])
    return json.loads(stdout), wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--bits", type=int, default=256)
    ap.add_argument("--nlist", type=int, default=1024, help="IVF lists of the IVF-PQ index")
    ap.add_argument("--binary-factory", help="the faiss binary index of the binary kind (default: the plan's), e.g. BFlat")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--singles", type=int, default=300, help="queries timed one at a time")
    ap.add_argument("--seed", type=int, default=0, help="the seed the shards were made with")
    ap.add_argument("--json-out", type=Path, default=ROOT / "bench-output" / "bench_codes.json")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    import faiss

    from pipeline.search import Searcher
    from pipeline.index import Reranked, VectorStore

    gflops = sgemm_gflops()
    centres = centres_of(args.seed)
    rng = np.random.default_rng(args.seed + 12345)
    queries, tuning = clustered(args.queries, centres, rng), clustered(300, centres, rng)
    t0 = time.perf_counter()
    both = exact_top(args.features, np.concatenate([queries, tuning]), 10)
    truth, tuning_truth = both[:len(queries)], both[len(queries):]
    print(f"exact truth in {time.perf_counter() - t0:.0f} s", flush=True)

    rows = []
    meta, wall, rss = build(args.features, args.workdir / "binary", ["--codes", f"binary:{args.bits}",
                                                                      *(["--factory", args.binary_factory] if args.binary_factory else [])])
    n = meta["count"]
    version = Path(meta["version_dir"])
    engine = Searcher(args.workdir / "binary").index
    rows.append({"kind": f"binary ITQ{args.bits} + {meta['codes']['index']}, re-rank pool {meta['codes']['setting']}",
                 "bytes_per_image": round((version / "codes.faiss").stat().st_size / n, 1),
                 "build_s": round(wall, 1), "peak_rss_mib": round(rss), "build_timings": meta["timings"],
                 **measure(engine.search, queries, truth, args.singles)})
    print(rows[-1], flush=True)

    factory = f"IVF{args.nlist},PQ{args.bits // 4}x4fs"
    meta, wall, rss = build(args.features, args.workdir / "ivfpq", ["--factory", factory, "--nprobe", "16"])
    index = faiss.read_index(str(Path(meta["version_dir"]) / "index.faiss"))
    store = VectorStore.open(version)
    sweep: list[dict] = []
    for candidates in CANDIDATES:  # the cheapest (candidates, nprobe) reaching 0.95 on the tuning queries
        reranked = Reranked(index, store, candidates)
        for nprobe in (8, 16, 32, 64):
            _, found = reranked.search(tuning, 10, params=faiss.SearchParametersIVF(nprobe=nprobe))
            sweep.append({"candidates": candidates, "nprobe": nprobe, "recall": round(recall10(found, tuning_truth), 4)})
            if sweep[-1]["recall"] >= 0.95:
                break
        if sweep[-1]["recall"] >= 0.95:
            break
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    rows.append({"kind": f"{factory}, nprobe {nprobe}, re-rank {candidates}",
                 "bytes_per_image": round((Path(meta["version_dir"]) / "index.faiss").stat().st_size / n, 1),
                 "build_s": round(wall, 1), "peak_rss_mib": round(rss), "build_timings": meta["timings"],
                 "nprobe_sweep": sweep, **measure(lambda x, k: reranked.search(x, k, params=params), queries, truth,
                                                   args.singles)})
    print(rows[-1], flush=True)

    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "python scripts/bench_codes.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "n": n, "bits": args.bits, "sgemm_gflops": gflops, "cpus": os.cpu_count(), "queries": args.queries,
           "rows": rows}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2))
    text = "\n".join([
        f"\n### Binary codes vs IVF-PQ at {n:,} — {res['date']}\n",
        f"`{res['command']}` — host sgemm {gflops} GFLOP/s, {res['cpus']} cores (shared). Both re-ranked by exact "
        f"cosine from the same float16 vector store (on disk, memory-mapped, {2 * DIM} B/image, not counted below); "
        f"{args.queries:,} held-out queries (not in the index), recall@10 against exact search.\n",
        "| kind | code bytes/image (index file) | build s | peak RSS MiB | recall@10 | p50 ms | p99 ms | batch q/s |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['kind']} | {r['bytes_per_image']} | {r['build_s']} | {r['peak_rss_mib']} | {r['recall_at_10']} | "
          f"{r['p50_ms']} | {r['p99_ms']} | {r['batch_qps']} |" for r in rows],
    ]) + "\n"
    record(text, args.no_doc)


if __name__ == "__main__":
    main()

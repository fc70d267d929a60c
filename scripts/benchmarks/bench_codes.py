"""Benchmark coarse-to-fine binary codes against IVF-PQ at the same code bytes per image, both re-ranked.

Usage: python scripts/benchmarks/bench_codes.py --features DIR --workdir DIR [--bits 256]

DIR holds synthetic shards written by benchlib.make_shards(seed 0) (e.g. bench_scale.py's 1M and
10M sets): the held-out queries are new vectors from the same cluster centres, not in the index,
and their exact top-10 is computed here by streaming the shards.
1. binary: `pipeline build-index --codes binary:BITS` in a fresh process (wall time, peak RSS); the
   pool of candidates it tuned on its own recall queries.
2. IVF-PQ: `pipeline build-index --factory IVF<nlist>,PQ<BITS/4>x4fs` (fast-scan PQ: BITS/8 bytes a
   code, as the binary codes) in a fresh process; its candidates are re-ranked from the binary
   version's vector store (the same float16 features); candidates and nprobe chosen here on separate
   tuning queries, the fewest candidates (then nprobe) reaching recall@10 0.95.
3. For each: recall@10 on the held-out queries, single-query p50/p99 (one thread), batch queries/s.
Writes its figures into docs/benchmarks/results/codes.json (--json), one run per number of vectors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import DIM, add_json_option, centres_of, command_line, figure, host, now, run_measured, save  # noqa: E402
from pipeline.synthetic import clustered  # noqa: E402

AREA, TITLE = "codes", "Binary codes vs IVF-PQ"

CANDIDATES = (100, 200, 500, 1000, 2000, 5000)  # IVF-PQ candidates re-ranked, as the binary kind's pool grid


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
    return float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth, strict=True)]))


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
    return {
        "recall_at_10": round(recall10(found, truth), 4),
        "batch_qps": round(qps, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
    }


def build(features: Path, out: Path, extra: list[str]) -> tuple[dict, float, float]:
    wall, rss, stdout = run_measured(
        [
            sys.executable,
            "-m",
            "pipeline",
            "-q",
            "build-index",
            str(features),
            "--out",
            str(out),
            "--json",
            "--no-progress",
            *extra,
        ]
    )
    return json.loads(stdout), wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--bits", type=int, default=256)
    ap.add_argument("--nlist", type=int, default=1024, help="IVF lists of the IVF-PQ index")
    ap.add_argument(
        "--binary-factory", help="the faiss binary index of the binary kind (default: the plan's), e.g. BFlat"
    )
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--singles", type=int, default=300, help="queries timed one at a time")
    ap.add_argument("--seed", type=int, default=0, help="the seed the shards were made with")
    add_json_option(ap, AREA)
    args = ap.parse_args()
    import faiss

    from pipeline.index import Reranked, VectorStore
    from pipeline.search import Searcher

    date, machine = now(), host()
    centres = centres_of(args.seed)
    rng = np.random.default_rng(args.seed + 12345)
    queries, tuning = clustered(args.queries, centres, rng), clustered(300, centres, rng)
    t0 = time.perf_counter()
    both = exact_top(args.features, np.concatenate([queries, tuning]), 10)
    truth, tuning_truth = both[: len(queries)], both[len(queries) :]
    print(f"exact truth in {time.perf_counter() - t0:.0f} s", flush=True)

    rows = []
    binary = ["--codes", f"binary:{args.bits}", *(["--factory", args.binary_factory] if args.binary_factory else [])]
    meta, wall, rss = build(args.features, args.workdir / "binary", binary)
    n = meta["count"]
    version = Path(meta["version_dir"])
    engine = Searcher(args.workdir / "binary").index
    rows.append(
        {
            "kind": f"binary ITQ{args.bits} + {meta['codes']['index']}, re-rank pool {meta['codes']['setting']}",
            "bytes_per_image": round((version / "codes.faiss").stat().st_size / n, 1),
            "build_s": round(wall, 1),
            "peak_rss_mib": round(rss),
            "build_timings": meta["timings"],
            **measure(engine.search, queries, truth, args.singles),
        }
    )
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
            recall = round(recall10(found, tuning_truth), 4)
            sweep.append({"candidates": candidates, "nprobe": nprobe, "recall": recall})
            if sweep[-1]["recall"] >= 0.95:
                break
        if sweep[-1]["recall"] >= 0.95:
            break
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    rows.append(
        {
            "kind": f"{factory}, nprobe {nprobe}, re-rank {candidates}",
            "bytes_per_image": round((Path(meta["version_dir"]) / "index.faiss").stat().st_size / n, 1),
            "build_s": round(wall, 1),
            "peak_rss_mib": round(rss),
            "build_timings": meta["timings"],
            "nprobe_sweep": sweep,
            **measure(lambda x, k: reranked.search(x, k, params=params), queries, truth, args.singles),
        }
    )
    print(rows[-1], flush=True)

    res = {"n": n, "bits": args.bits, "queries": args.queries, "rows": rows}
    save(
        args.json,
        AREA,
        TITLE,
        key=f"{n:,}",
        date=date,
        command=command_line(),
        host=machine,
        dim=DIM,
        setup=setup(res),
        figures=figures(res),
        result=res,
    )


def setup(res: dict) -> str:
    return (
        f"{res['n']:,} synthetic {DIM}-d vectors (the benchmarks' set): learned binary codes (`--codes "
        f"binary:{res['bits']}`, {res['bits'] // 8} bytes a code) against fast-scan IVF-PQ codes of the same bytes, "
        f"both re-ranked by exact cosine from the same float16 vector store (on disk, memory-mapped, {2 * DIM} bytes "
        f"an image, not counted); IVF-PQ's candidates and nprobe tuned on 300 separate queries; recall@10 against "
        f"exact search on {res['queries']:,} held-out queries, single queries on one thread."
    )


def figures(res: dict) -> list[dict]:
    return [
        figure(
            r["kind"],
            f"recall@10 {r['recall_at_10']}, p50 {r['p50_ms']} ms",
            "",
            f"p99 {r['p99_ms']} ms, a batch {r['batch_qps']} queries/s; {r['bytes_per_image']} bytes/image in the "
            f"index file; build {r['build_s']} s, peak RSS {r['peak_rss_mib']} MiB",
        )
        for r in res["rows"]
    ]


if __name__ == "__main__":
    main()

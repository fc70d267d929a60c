"""Benchmark index kinds at scale (1M, 10M): memory, build time against raw faiss, recall, latency.

Usage: python scripts/benchmarks/bench_scale.py --n 10000000 [--kinds pq-rerank] [--data DIR]

1. Writes N synthetic 1024-d features as real shards under --data (once; the benchmarks' set,
   benchlib.make_shards, calibrated on VGG16 features; a set of 1M can be the first shards of the 10M one),
   plus 1,000 held-out queries (new vectors from the same clusters, not in the index) and their
   exact top-100 ids: <data>/truth<N>.npz (queries, ids, scores), reused by other benchmarks.
2. Per kind (KINDS: build_index keyword arguments for N; adding a kind is one entry), each in a
   fresh process: (a) `build_index` (wall, peak RSS); (b) raw faiss on the same factory and
   training-sample size, train + add streamed shard by shard (reading not counted); (c) a
   `Searcher` on the published version: recall@10 against the exact top-10, batch queries/s,
   single-query p50/p99 (one thread), peak RSS and the resident anonymous memory (the index) apart
   from the file pages of the memory-mapped vector store (page cache, reclaimable).
3. With --real DIR (features of real photos, e.g. the eval sets run through the model): the
   compressed kind's codes at the size real photos allow, every list probed, every vector a query
   (its self-match left out of result and truth, as build_index measures): recall@10 of the codes
   alone and with re-ranking.
4. With --candidates: how many candidates re-ranking needs (DEFAULT_RERANK): vectors at the
   density of 10M (1,000 per cluster, 50 clusters of the generator) coded by each code kind
   trained on the generator's full spread, and the share of the exact top-10 of held-out queries
   among the top-c candidates (all lists probed: the codes alone are measured).
Writes its figures into docs/benchmarks/results/scale.json (--json), one run per --n, with the host's sgemm
GFLOP/s before and after. Targets (the compressed kind, pq-rerank): the index within its budget (400 bytes an
image: 4 GB at 10M), recall@10 >= 0.95, p50 <= 10 ms, build <= 1.2 x raw faiss.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import DIM, add_json_option, centres_of, command_line, figure, host, make_shards, now, run_measured, save  # noqa: E402
from pipeline.synthetic import clustered  # noqa: E402

AREA, TITLE = "scale", "Compressed indexes at scale"

QUERIES, TRUTH_K, SEED = 1000, 100, 0

# Index kinds: build_index keyword arguments for n vectors. The compressed kind gets 400 bytes per
# vector of budget (4 GB at 10M), so that SQ8 (520) does not fit and the plan picks PQ codes.
KINDS = {
    "ivf-flat": lambda n: {},
    "ivf-sq8": lambda n: {"factory": f"IVF{_plan(n).nlist},SQ8", "rerank": 0},
    "pq-rerank": lambda n: {"max_memory": n * 400},
}


def _plan(n: int):
    from pipeline.index import plan_index

    return plan_index(n)


def prepare(data: Path, n: int, shard_size: int) -> tuple[Path, Path]:
    """The shards of n vectors and the exact top-100 of the held-out queries (both made once)."""
    import faiss

    from pipeline.features import list_shards, read_shard

    features = data / f"features-{n // 1_000_000}m" if n % 1_000_000 == 0 else data / f"features-{n}"
    centres = make_shards(features, n, shard_size, SEED)
    truth = data / (f"truth{n // 1_000_000}m.npz" if n % 1_000_000 == 0 else f"truth{n}.npz")
    if not truth.exists():
        queries = clustered(QUERIES, centres, np.random.default_rng(SEED + 1))
        heap = faiss.ResultHeap(QUERIES, TRUTH_K, keep_max=True)
        offset = 0
        for path in list_shards(features):
            feats = read_shard(path, features=True).features
            d, i = faiss.knn(queries, feats, TRUTH_K, metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(d, np.where(i >= 0, i + offset, -1))
            offset += len(feats)
        heap.finalize()
        assert offset == n, f"{features} holds {offset} vectors, expected {n}"
        tmp = truth.with_suffix(".tmp.npz")
        np.savez(tmp, queries=queries, ids=heap.I, scores=heap.D)
        os.replace(tmp, truth)
    return features, truth


def run_json(cmd: list[str]) -> tuple[float, float, dict]:
    """Wall seconds, peak RSS (MiB) and the JSON printed last by a child process."""
    wall, rss, out = run_measured(cmd)
    return wall, rss, json.loads(out.strip().splitlines()[-1])


def child_build(features: str, out: str, spec: str) -> None:
    from pipeline.index import build_index

    report = build_index(features, out, progress=False, **json.loads(spec))
    print(json.dumps({"version_dir": report.version_dir, **report.meta}))


def child_raw(features: str, factory: str, train_size: str) -> None:
    """Raw faiss: the same factory and sample size (drawn as the pipeline draws it); train, then add shard
    by shard. Compute (train + add) and reading the shards (sample, then every shard) are timed apart."""
    import faiss

    from pipeline.features import list_shards, read_rows, read_shard, shard_info
    from pipeline.index import quantizer_search_depth, sample_runs

    paths = list_shards(Path(features))
    counts = np.array([shard_info(p).count for p in paths])
    n = int(counts.sum())
    take = sample_runs(np.random.default_rng(SEED), n, int(train_size))
    starts = np.concatenate([[0], np.cumsum(counts)])
    t0 = time.perf_counter()
    sample = np.concatenate(
        [
            read_rows(p, take[(take >= a) & (take < b)] - a)
            for p, a, b in zip(paths, starts[:-1], starts[1:], strict=True)
        ]
    )
    read_s = time.perf_counter() - t0
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    quantizer_search_depth(index)  # as the pipeline sets it (a no-op without an HNSW quantizer)
    t0 = time.perf_counter()
    index.train(sample)
    train_s, add_s = time.perf_counter() - t0, 0.0
    del sample
    for p in paths:
        t0 = time.perf_counter()
        feats = read_shard(p).features
        t1 = time.perf_counter()
        index.add(feats)
        read_s, add_s = read_s + t1 - t0, add_s + time.perf_counter() - t1
    print(json.dumps({"train_s": train_s, "add_s": add_s, "read_s": read_s}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child_search(index_dir: str, truth_path: str) -> None:
    """Recall, batch qps and single-query latency through Searcher (id -> path look-up included)."""
    import faiss

    from pipeline.search import Searcher

    with np.load(truth_path) as t:
        queries, truth = t["queries"], t["ids"][:, :10]
    searcher = Searcher(index_dir)
    t0 = time.perf_counter()
    hits = searcher.search_vectors(queries, k=10)
    batch_qps = len(queries) / (time.perf_counter() - t0)
    # ids are positions here (synthetic shards have no catalog), as in the truth file
    recall = float(np.mean([len({h.id for h in row} & set(tr)) / 10 for row, tr in zip(hits, truth, strict=True)]))
    faiss.omp_set_num_threads(1)
    lat = []
    for q in queries[:500]:
        t = time.perf_counter()
        searcher.search_vectors(q[None], k=10)
        lat.append((time.perf_counter() - t) * 1000)
    print(
        json.dumps(
            {
                "recall_at_10": recall,
                "batch_qps": batch_qps,
                "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99)),
                "rss_anon_mib": _status_kib("RssAnon") / 1024,
                "rss_file_mib": _status_kib("RssFile") / 1024,
                "vm_hwm_mib": _status_kib("VmHWM") / 1024,
            }
        )
    )


CANDIDATE_CODES, CANDIDATE_DEPTHS = ("SQ4", "PQ256x4fs", "PQ128x4fs", "PQ64x4fs"), (50, 200, 500, 1000)


def candidates_check(features: Path) -> dict:
    """Share of the exact top-10 among the top-c candidates of each code kind, at the density of 10M."""
    import faiss

    from pipeline.features import list_shards, read_shard

    centres = centres_of(SEED, DIM)  # as make_shards draws them
    train = read_shard(list_shards(features)[0]).features  # the whole spread, for training the codes
    x = clustered(50_000, centres[:50], np.random.default_rng(SEED + 5))
    q = clustered(200, centres[:50], np.random.default_rng(SEED + 6))
    _, truth = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    out = {}
    for code in CANDIDATE_CODES:
        index = faiss.index_factory(x.shape[1], f"IVF64,{code}", faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        index.add(x)
        _, found = index.search(q, max(CANDIDATE_DEPTHS), params=faiss.SearchParametersIVF(nprobe=64))
        pairs = list(zip(found, truth, strict=True))
        shares = {c: [len(set(f[:c]) & set(t)) / 10 for f, t in pairs] for c in CANDIDATE_DEPTHS}
        out[code] = {c: round(float(np.mean(v)), 4) for c, v in shares.items()}
    print(f"[candidates] {json.dumps(out)}", flush=True)
    return out


def real_check(features: Path, work: Path) -> dict:
    """Recall@10 against exact search of the PQ codes the plan picks, alone and re-ranked, on real features."""
    from pipeline.features import list_shards, shard_info
    from pipeline.index import build_index, plan_index

    n = sum(shard_info(p).count for p in list_shards(features))
    plan = plan_index(n, flat_below=0, **KINDS["pq-rerank"](n))  # IVF even at this size
    out = {"n": n, "factory": plan.factory, "rerank": plan.rerank}
    for key, rerank in (("recall_at_10_codes_alone", 0), ("recall_at_10_reranked", plan.rerank)):
        meta = build_index(
            features,
            work / f"real-{rerank}",
            factory=plan.factory,
            nprobe=plan.nlist,
            rerank=rerank,
            recall_queries=n,
            keep=1,
            progress=False,
        ).meta
        out[key] = meta["recall_at_10"]
        shutil.rmtree(work / f"real-{rerank}", ignore_errors=True)
    print(f"[real] {json.dumps(out)}", flush=True)
    return out


def measure_kind(name: str, n: int, features: Path, truth: Path, work: Path, raw: bool) -> dict:
    spec = KINDS[name](n)
    out = work / f"index-{name}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    me = [sys.executable, __file__]
    wall, rss, meta = run_json(me + ["_build", str(features), str(out), json.dumps(spec)])
    version = Path(meta["version_dir"])
    index_bytes = (version / "index.faiss").stat().st_size
    store_bytes = sum((version / f).stat().st_size for f in ("vectors.npy", "vector_ids.npy") if (version / f).exists())
    # bytes on disk per image: every file of the version, and the shards it was built from
    disk = {f.name: round(f.stat().st_size / n, 1) for f in sorted(version.iterdir()) if f.is_file()}
    disk["shards"] = round(sum(p.stat().st_size for p in features.glob("shard-*.h5")) / n, 1)
    print(
        f"[{name}] build {wall:.1f} s, peak RSS {rss:.0f} MiB, {meta['factory']} nprobe {meta['nprobe']} "
        f"rerank {meta.get('rerank')} tuned recall@10 {meta['recall_at_10']}",
        flush=True,
    )
    res = {
        "kind": name,
        "spec": spec,
        "factory": meta["factory"],
        "nlist": meta["nlist"],
        "nprobe": meta["nprobe"],
        "rerank": meta.get("rerank", 0),
        "train_size": meta["train_size"],
        "build_s": round(wall, 1),
        "build_timings": meta["timings"],
        "build_peak_rss_mib": round(rss),
        "index_bytes_per_image": round(index_bytes / n, 1),
        "store_bytes_per_image": round(store_bytes / n, 1),
        "index_mib": round(index_bytes / 2**20),
        "disk_bytes_per_image": disk,
        "tuned_recall_at_10": meta["recall_at_10"],
    }
    if raw:
        _, _, r = run_json(me + ["_raw", str(features), meta["factory"], str(meta["train_size"])])
        res["raw_faiss_s"] = round(r["train_s"] + r["add_s"], 1)
        res["raw_faiss"] = {k: round(v, 1) for k, v in r.items()}
        res["build_over_raw"] = round(wall / res["raw_faiss_s"], 3)
        res["build_over_raw_with_reading"] = round(wall / (res["raw_faiss_s"] + r["read_s"]), 3)
        print(
            f"[{name}] raw faiss {res['raw_faiss_s']} s ({res['raw_faiss']}): ratio {res['build_over_raw']}, "
            f"{res['build_over_raw_with_reading']} with its reading counted",
            flush=True,
        )
    _, rss, s = run_json(me + ["_search", str(out), str(truth)])
    res.update(
        {
            "heldout_recall_at_10": round(s["recall_at_10"], 4),
            "batch_qps": round(s["batch_qps"]),
            "p50_ms": round(s["p50_ms"], 3),
            "p99_ms": round(s["p99_ms"], 3),
            "search_peak_rss_mib": round(rss),
            "search_rss_anon_mib": round(s["rss_anon_mib"]),
            "search_rss_file_mib": round(s["rss_file_mib"]),
        }
    )
    print(f"[{name}] {json.dumps(res)}", flush=True)
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # a measured child process
        {"_build": child_build, "_raw": child_raw, "_search": child_search}[sys.argv[1]](*sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument(
        "--data",
        type=Path,
        default=ROOT / "bench-output" / "scale",
        help="where the shards and truth files are made (once) and the indexes built: about 21 GB at 10M",
    )
    ap.add_argument("--shard-size", type=int, default=50_000)
    ap.add_argument("--no-raw", action="store_true", help="skip the raw faiss builds")
    ap.add_argument("--real", type=Path, help="a features folder of real photos for the codes' recall check")
    ap.add_argument("--candidates", action="store_true", help="measure the candidates re-ranking needs per code kind")
    ap.add_argument("--keep", action="store_true", help="keep the built indexes (default: delete each after measuring)")
    add_json_option(ap, AREA)
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        sys.exit(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    date, machine = now(), host()
    t0 = time.perf_counter()
    features, truth = prepare(args.data, args.n, args.shard_size)
    print(f"shards and truth ready in {time.perf_counter() - t0:.1f} s: {features}, {truth}", flush=True)
    results = []
    for name in kinds:
        results.append(measure_kind(name, args.n, features, truth, args.data, not args.no_raw))
        if not args.keep:
            shutil.rmtree(args.data / f"index-{name}-{args.n}", ignore_errors=True)
    real = real_check(args.real, args.data) if args.real else None
    cands = candidates_check(features) if args.candidates else None
    machine["sgemm_gflops_after"] = host()["sgemm_gflops"]
    res = {"n": args.n, "queries": QUERIES, "kinds": results, "real": real, "candidates": cands}
    save(
        args.json,
        AREA,
        TITLE,
        key=f"{args.n:,}",
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
        f"{res['n']:,} synthetic {DIM}-d features (the benchmarks' set) in real shards; {res['queries']:,} held-out "
        "queries (new vectors, not in the index), truth their exact top-10 over all of them. Per index kind "
        "(pq-rerank: what `build-index --max-memory` plans for 400 bytes an image), each step a fresh process: "
        "`build_index` "
        "(wall, peak RSS); raw faiss on the same factory and training sample, train + add with the shards streamed "
        "(its reading timed apart); a `Searcher` on the published version (recall@10, single queries on one thread, a "
        "batch). The float16 re-rank store is on disk, memory-mapped: its pages count as page cache, not the index's "
        "memory."
    )


def figures(res: dict) -> list[dict]:
    n, out = res["n"], []
    for r in res["kinds"]:
        budget = n * 400

        def aim(text: str, ok: bool, compressed: bool = r["kind"] == "pq-rerank") -> dict:
            """The compressed kind's targets; the other kinds are measured beside it."""
            return {"target": text, "met": ok} if compressed else {}

        label = f"{r['kind']} (`{r['factory']}`, nprobe {r['nprobe']}, {r['rerank']} re-ranked)"
        out += [
            figure(
                f"{label}: index in RAM",
                r["index_mib"],
                " MiB",
                f"{r['index_bytes_per_image']} bytes/image; re-rank store on disk {r['store_bytes_per_image']} "
                "bytes/image",
                **aim(f"≤ {budget / 1e9:g} GB", r["index_mib"] * 2**20 <= budget),
            ),
            figure(
                f"{label}: recall@10, held-out queries",
                r["heldout_recall_at_10"],
                **aim("≥ 0.95", r["heldout_recall_at_10"] >= 0.95),
            ),
            figure(
                f"{label}: single query p50",
                r["p50_ms"],
                " ms",
                f"p99 {r['p99_ms']} ms; a batch {r['batch_qps']} queries/s",
                **aim("≤ 10 ms", r["p50_ms"] <= 10),
            ),
        ]
        if "build_over_raw" in r:
            out += [
                figure(
                    f"{label}: `build_index` / raw faiss, compute only (train + add)",
                    r["build_over_raw"],
                    "×",
                    f"{r['build_s']} vs {r['raw_faiss_s']} s",
                    **aim("≤ 1.2", r["build_over_raw"] <= 1.2),
                ),
                figure(
                    f"{label}: `build_index` / raw faiss reading the same shards",
                    r["build_over_raw_with_reading"],
                    "×",
                    f"{r['build_s']} vs {round(r['raw_faiss_s'] + r['raw_faiss']['read_s'], 1)} s",
                    **aim("≤ 1.2", r["build_over_raw_with_reading"] <= 1.2),
                ),
            ]
        if "disk_bytes_per_image" in r:
            disk = r["disk_bytes_per_image"]
            out.append(
                figure(
                    f"{label}: bytes on disk per image, index version + shards",
                    round(sum(disk.values())),
                    " B",
                    "; ".join(f"{k} {v:g}" for k, v in disk.items() if v >= 0.05),
                )
            )
        out.append(
            figure(
                f"{label}: peak RSS, build / search",
                f"{r['build_peak_rss_mib']} / {r['search_peak_rss_mib']}",
                " MiB",
                f"search: {r['search_rss_anon_mib']} MiB anonymous (the index), the rest file pages of the store",
            )
        )
    return out


if __name__ == "__main__":
    main()

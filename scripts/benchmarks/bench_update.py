"""Benchmark the nightly index step at 1M: an update of the published index against a full build.

Usage: flock /tmp/pipeline-bench.lock python scripts/bench_update.py [--n 1000000] [--new 0.01] [--deleted 0.005]
       [--cache DIR]

1. Writes N synthetic clustered 512-d unit vectors (bench_index.py's generator) as real shards and
   builds their catalog with the library (Catalog.reconcile imports the shards, numbering the ids).
   With --cache, they are made once in DIR and each run starts from hard links to those shards
   (never written in place) and a copy of that catalog.
2. `pipeline build-index` publishes the first version (a full build, a fresh process); its held-out
   recall@10 on its own live set is measured (step 5's queries): what its quantizer reached before
   any update.
3. Changes the collection as a night would: `--new` of N new images (a new shard, imported) and
   `--deleted` of N images marked gone in the catalog.
4. (a) `pipeline build-index --update` makes the next version from the published one;
   (b) `pipeline build-index` builds the same live set from scratch into another folder.
   Both in fresh processes: wall time, the index step's own time (meta build_seconds), peak RSS.
5. recall@10 of both against exact search over the live set, at their tuned nprobe, on --heldout
   (10,000) held-out queries (new vectors from the same clusters, not in either index), and of the
   first version and both at equal nprobe: the update's own loss is the paired difference from the
   first version at equal nprobe (the same quantizer), the rest is another k-means draw (--seeds).
Targets: (a) <= 10% of (b), for the whole process and for the index step (meta build_seconds);
recall@10 of (a) within 0.005 of (b)'s.
Writes JSON, appends a section to docs/benchmarks.md, and deletes its work folder (2 GB per index).

With --seeds 0,1,2,... it measures instead how far full builds of the same N vectors differ from one
another by their draw alone (build_index's `seed`: its training sample, hence k-means' start, and its
recall queries): per seed, the quantizer is trained as build_index trains it, nprobe is tuned as it
tunes it, and recall@10 of the bench's held-out queries is read from list assignments (for IVF-Flat,
a true neighbour is found exactly when its list is probed), so no index is filled or written.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_index import DIM, clustered, make_shards, run_measured  # noqa: E402
from benchlib import record, sgemm_gflops, targets_line  # noqa: E402
from pipeline.features import CATALOG_FILE, Catalog  # noqa: E402
from pipeline.index import INDEX_FILE, current_version  # noqa: E402
from pipeline.model import ModelInfo  # noqa: E402
from pipeline.features import ShardData, list_shards, next_shard_number, read_shard, shard_name, write_shard  # noqa: E402


def build(features: Path, index_dir: Path, *extra: str) -> tuple[float, float, dict]:
    """Wall seconds, peak RSS (MiB) and meta of one `pipeline build-index` process."""
    wall, rss, out = run_measured([sys.executable, "-m", "pipeline", "-q", "build-index", str(features), "--out",
                                   str(index_dir), "--json", "--no-progress", *extra])
    return wall, rss, json.loads(out)


def exact_truth(features: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top-k of each query among the catalog's live vectors (one pass over the shards)."""
    import faiss

    with Catalog(features) as c:
        live = c.live_ids()
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for name, (rows, ids) in sorted(live.items()):
        d, i = faiss.knn(queries, read_shard(features / name).features[rows], k, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, ids[i])
    heap.finalize()
    return heap.I


def heldout_recall(index_dir: Path, nprobes: list[int], queries: np.ndarray, truth: np.ndarray) -> list[np.ndarray]:
    """Per query, recall@k of the published index at each nprobe."""
    import faiss

    index = faiss.read_index(str(current_version(index_dir) / INDEX_FILE), faiss.IO_FLAG_MMAP_IFC)
    out = []
    for nprobe in nprobes:
        _, found = index.search(queries, truth.shape[1], params=faiss.SearchParametersIVF(nprobe=nprobe))
        out.append(np.array([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))
    return out


def seed_spread(features: Path, centres: np.ndarray, seeds: list[int], bench_seed: int, n_heldout: int,
                samples: list[int]) -> dict:
    """Held-out recall@10 of full builds of `features` that differ only by build_index's seed: at the
    nprobe each one's tuning picks on 1,000 recall queries as build_index draws them (and, as a what-if,
    on larger samples), and at fixed nprobe (see the module docstring)."""
    import faiss

    from pipeline.features import live_parts
    from pipeline.index import NPROBE_GRID, TRUTH_DEPTH, lower_bound, plan_index, recall_at, sample_runs

    _, parts, _, _ = live_parts(features)
    x = np.concatenate([read_shard(info.path).features[rows] for info, rows in parts])
    n = len(x)
    plan = plan_index(n, DIM)
    queries = clustered(n_heldout, centres, np.random.default_rng(bench_seed + 1))
    _, truth = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)  # positions
    fixed = [p for p in NPROBE_GRID if p <= 16]
    grid = [p for p in NPROBE_GRID if p <= 64]
    out = {"n": n, "factory": plan.factory, "train_size": plan.train_size, "heldout_queries": n_heldout, "seeds": {}}
    for seed in seeds:
        rng = np.random.default_rng(seed)  # drawn as build_index draws them, then the what-if samples
        train = sample_runs(rng, n, plan.train_size)
        rest = np.setdiff1d(np.arange(n), train, assume_unique=True)
        draws = [np.sort(rng.choice(rest, size=m, replace=False)) for m in [1000, *samples]]
        t0 = time.perf_counter()
        index = faiss.index_factory(DIM, plan.factory, faiss.METRIC_INNER_PRODUCT)
        index.train(x[train])
        train_s = time.perf_counter() - t0
        quantizer = faiss.extract_index_ivf(index).quantizer

        def probe_rank(q: np.ndarray, tr: np.ndarray) -> np.ndarray:
            """Per query and true neighbour, the rank of the neighbour's list among the query's probes
            (grid[-1] when further): an IVF-Flat search at nprobe p finds it exactly when rank < p."""
            _, probes = quantizer.search(q, grid[-1])
            lists = quantizer.search(x[np.maximum(tr, 0)].reshape(-1, DIM), 1)[1].reshape(tr.shape)
            hit = lists[:, :, None] == probes[:, None, :]
            return np.where(hit.any(axis=2) & (tr >= 0), hit.argmax(axis=2), grid[-1])

        held_rank = probe_rank(queries, truth)
        heldout = {p: round(float((held_rank < p).mean()), 4) for p in fixed}
        row = {"train_s": round(train_s, 1), "heldout_at_nprobe": heldout}
        for q_pos in draws:
            q_truth = faiss.knn(x[q_pos], x, TRUTH_DEPTH, metric=faiss.METRIC_INNER_PRODUCT)[1]
            rank = probe_rank(x[q_pos], q_truth)

            def recall(p: int) -> np.ndarray:
                return recall_at(np.where(rank < p, q_truth, -1), q_truth, q_pos, 10)

            tuned = next(p for p in grid if lower_bound(recall(p)) >= 0.95)
            row[len(q_pos)] = {"nprobe": tuned, "tuned_recall_at_10": round(float(recall(tuned).mean()), 4),
                               "heldout_at_tuned": round(float((held_rank < tuned).mean()), 4)}
        out["seeds"][seed] = row
        print(f"seed {seed}: trained in {train_s:.0f} s; tuned on 1,000 / {samples} recall queries: "
              + "; ".join(f"nprobe {r['nprobe']} (tuned {r['tuned_recall_at_10']}, held-out {r['heldout_at_tuned']})"
                          for m, r in row.items() if isinstance(m, int))
              + f"; held-out at fixed nprobe {heldout}", flush=True)
    for m in [1000, *samples]:
        at = np.array([r[m]["heldout_at_tuned"] for r in out["seeds"].values()])
        out[f"heldout_at_tuned_{m}"] = {"mean": round(float(at.mean()), 4), "sd": round(float(at.std(ddof=1)), 4),
                                        "min": float(at.min()), "max": float(at.max())}
    return out


def means(per_query: list[np.ndarray]) -> list[float]:
    return [round(float(r.mean()), 4) for r in per_query]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--new", type=float, default=0.01)
    ap.add_argument("--deleted", type=float, default=0.005)
    ap.add_argument("--shard-size", type=int, default=20_000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-output" / "update-bench")
    ap.add_argument("--cache", type=Path, help="Make the N base shards and their catalog once in this folder and "
                    "start each run from them (kept; about 2 GB at 1M).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, default=ROOT / "bench-output" / "bench_update.json")
    ap.add_argument("--keep-files", action="store_true", help="Keep the shards and indexes (several GB).")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--seeds", help="Comma-separated build seeds: measure how full builds differ by their draw "
                    "alone (module docstring) on the --cache shards, and nothing else.")
    ap.add_argument("--samples", default="4000", help="With --seeds: larger recall samples to tune on as well (what-if).")
    ap.add_argument("--heldout", type=int, default=10_000, help="Held-out queries measuring recall@10 (1,000 "
                    "give a paired standard error of ~0.007 between two builds; 10,000 about a third of it).")
    args = ap.parse_args()
    gflops = sgemm_gflops()
    if args.seeds:
        return seeds_main(args, gflops)
    shutil.rmtree(args.workdir, ignore_errors=True)
    features, updated, full = args.workdir / "features", args.workdir / "index", args.workdir / "index-full"
    try:
        base = args.cache or features
        t0 = time.perf_counter()
        centres = make_shards(base, args.n, args.shard_size, args.seed)
        t1 = time.perf_counter()
        with Catalog(base) as c:
            c.reconcile()
        catalog_s = time.perf_counter() - t1
        if args.cache:
            features.mkdir(parents=True)
            for shard in list_shards(base):
                os.link(shard, features / shard.name)
            shutil.copyfile(base / CATALOG_FILE, features / CATALOG_FILE)
        print(f"host sgemm {gflops:.0f} GFLOP/s; shards in {t1 - t0:.1f} s, catalog in {catalog_s:.1f} s", flush=True)

        first_s, first_rss, first = build(features, updated)
        queries = clustered(args.heldout, centres, np.random.default_rng(args.seed + 1))
        same = sorted({4, 5, 6, 7, 8, first["nprobe"]})
        per_first, *at_same_first = heldout_recall(updated, [first["nprobe"], *same], queries,
                                                   exact_truth(features, queries, 10))
        rec_first, *same_first = means([per_first, *at_same_first])
        print(f"first version: full build {first_s:.1f} s, {first['factory']} nprobe {first['nprobe']}, "
              f"held-out recall@10 {rec_first}", flush=True)

        rng = np.random.default_rng(args.seed + 2)
        n_new, n_del = round(args.n * args.new), round(args.n * args.deleted)
        info = ModelInfo(name="synthetic", weights_sha256="s" * 64, input_size=224, dim=DIM)
        write_shard(features / shard_name(next_shard_number(features)),
                    ShardData(clustered(n_new, centres, rng), [f"/synthetic/new/{i:08d}.jpg" for i in range(n_new)],
                              [f"new{i:029x}" for i in range(n_new)], np.zeros(n_new, np.int64), np.zeros(n_new), [], []),
                    info)
        with Catalog(features) as c:
            c.reconcile()
            c.mark_gone(f"/synthetic/{i:08d}.jpg" for i in np.sort(rng.choice(args.n, n_del, replace=False)))

        upd_s, upd_rss, upd = build(features, updated, "--update")
        assert upd["made_by"] == "update", upd["made_by"]
        print(f"(a) update: {upd_s:.1f} s (index step {upd['build_seconds']} s), nprobe {upd['nprobe']}", flush=True)
        full_s, full_rss, fb = build(features, full)
        print(f"(b) full build: {full_s:.1f} s (index step {fb['build_seconds']} s), nprobe {fb['nprobe']}", flush=True)

        truth = exact_truth(features, queries, 10)
        per_upd, *at_same_upd = heldout_recall(updated, [upd["nprobe"], *same], queries, truth)
        per_full, *at_same_full = heldout_recall(full, [fb["nprobe"], *same], queries, truth)
        rec_upd, rec_full, *same_upd = means([per_upd, per_full, *at_same_upd])
        same_full = means(at_same_full)
        diff = per_upd - per_full  # the same queries: the paired difference's standard error
        diff_se = round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 4)
        # The update's own loss: against the version it was made from, at equal nprobe (the same quantizer).
        loss = {p: (round(float((a - f).mean()), 4), round(float((a - f).std(ddof=1) / np.sqrt(len(a))), 4))
                for p, a, f in zip(same, at_same_upd, at_same_first)}
    finally:
        if not args.keep_files:
            shutil.rmtree(args.workdir, ignore_errors=True)

    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "flock /tmp/pipeline-bench.lock python scripts/bench_update.py "
                   + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "sgemm_gflops": round(gflops), "n": args.n, "new": n_new, "deleted": n_del,
        "factory": upd["factory"], "catalog_s": round(catalog_s, 1), "first_build_s": round(first_s, 1),
        "first": {"nprobe": first["nprobe"], "tuned_recall_at_10": first["recall_at_10"],
                  "heldout_recall_at_10": rec_first},
        "update": {"wall_s": round(upd_s, 1), "index_step_s": upd["build_seconds"], "timings": upd["timings"],
                   "peak_rss_mib": round(upd_rss), "nprobe": upd["nprobe"], "tuned_recall_at_10": upd["recall_at_10"],
                   "held_recall_at_10": upd.get("trained_recall_at_10"), "nprobe_sweep": upd["nprobe_sweep"],
                   "recall_queries": upd["recall_queries"], "heldout_recall_at_10": round(rec_upd, 4)},
        "full": {"wall_s": round(full_s, 1), "index_step_s": fb["build_seconds"], "timings": fb["timings"],
                 "peak_rss_mib": round(full_rss), "nprobe": fb["nprobe"], "tuned_recall_at_10": fb["recall_at_10"],
                 "recall_queries": fb["recall_queries"], "heldout_recall_at_10": round(rec_full, 4)},
    }
    res["recall_at_equal_nprobe"] = {p: {"first": f, "update": a, "full": b}
                                     for p, f, a, b in zip(same, same_first, same_upd, same_full)}
    res["heldout_difference"] = {"update_minus_full": round(rec_upd - rec_full, 4), "standard_error": diff_se}
    res["update_minus_first_at_equal_nprobe"] = {p: {"mean": m, "standard_error": e} for p, (m, e) in loss.items()}
    res["ratio_wall"] = round(upd_s / full_s, 4)
    res["ratio_index_step"] = round(upd["build_seconds"] / fb["build_seconds"], 4)
    res["targets"] = {"update_le_10pct_of_full": res["ratio_wall"] <= 0.10,
                      "index_step_le_10pct_of_full": res["ratio_index_step"] <= 0.10,
                      "recall_within_0.005": abs(rec_upd - rec_full) <= 0.005}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2))
    u, f = res["update"], res["full"]
    text = "\n".join([
        f"\n### Nightly index update — {res['date']} (host sgemm {res['sgemm_gflops']} GFLOP/s)\n",
        f"`{res['command']}` (commit {res['commit']}) — {args.n:,} synthetic clustered 512-d vectors in real shards with their catalog "
        f"({res['catalog_s']} s to import), published as {res['factory']} by a full build ({res['first_build_s']} s); "
        f"then {n_new:,} new images and {n_del:,} deleted.\n",
        "| index step | process wall s | of which the index step | peak RSS MiB | nprobe | recall@10 tuned | "
        "recall@10 held-out |",
        "|---|---|---|---|---|---|---|",
        f"| (a) `build-index --update` | {u['wall_s']} | {u['index_step_s']} | {u['peak_rss_mib']} | {u['nprobe']} | "
        f"{u['tuned_recall_at_10']} ({u['recall_queries']} q) | {u['heldout_recall_at_10']} |",
        f"| (b) `build-index` (full) | {f['wall_s']} | {f['index_step_s']} | {f['peak_rss_mib']} | {f['nprobe']} | "
        f"{f['tuned_recall_at_10']} ({f['recall_queries']} q) | {f['heldout_recall_at_10']} |",
        f"| **(a)/(b)** | **{res['ratio_wall']}** | **{res['ratio_index_step']}** | | | | |",
        "",
        f"First version (before the changes): nprobe {first['nprobe']}, recall@10 tuned {first['recall_at_10']}, "
        f"held-out {rec_first} on its own live set. The update held the recall its quantizer reached when "
        f"trained ({u['held_recall_at_10']}); its sweep: {u['nprobe_sweep']}.",
        "",
        f"Held-out recall@10, update − full build: {res['heldout_difference']['update_minus_full']} "
        f"(standard error {diff_se}, paired over the same queries).",
        "",
        "Held-out recall@10 at equal nprobe, first version / update / full build: "
        + ", ".join(f"nprobe {p}: {r['first']} / {r['update']} / {r['full']}"
                    for p, r in res["recall_at_equal_nprobe"].items()) + ".",
        "",
        f"{args.heldout:,} held-out queries. The update's own loss, update − first version at equal nprobe (same "
        "quantizer, paired): " + ", ".join(f"nprobe {p}: {r['mean']} ± {r['standard_error']}"
                                           for p, r in res["update_minus_first_at_equal_nprobe"].items()) + ".",
        "",
        f"Update timings (s): {u['timings']}. " + targets_line(res["targets"]),
    ]) + "\n"
    record(text, args.no_doc)


def seeds_main(args: argparse.Namespace, gflops: float) -> None:
    """--seeds: the spread of full builds' held-out recall@10 over their draws, recorded like a run."""
    if not args.cache:
        sys.exit("--seeds needs --cache (the N shards and their catalog)")
    centres = make_shards(args.cache, args.n, args.shard_size, args.seed)
    with Catalog(args.cache) as c:
        c.reconcile()
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "python scripts/bench_update.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "sgemm_gflops": round(gflops),
           **seed_spread(args.cache, centres, [int(s) for s in args.seeds.split(",")], args.seed, args.heldout,
                          [int(m) for m in args.samples.split(",") if m])}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2))
    sizes = [m for m in next(iter(res["seeds"].values())) if isinstance(m, int)]
    fixed = [p for p in next(iter(res["seeds"].values()))["heldout_at_nprobe"] if 3 <= p <= 10]
    rows = [f"| {s} | " + " | ".join(f"{r[m]['nprobe']} / {r[m]['tuned_recall_at_10']} / **{r[m]['heldout_at_tuned']}**"
                                     for m in sizes)
            + " | " + " | ".join(str(r["heldout_at_nprobe"][p]) for p in fixed) + " |" for s, r in res["seeds"].items()]
    record("\n".join([
        f"\n### Full builds that differ only by their draw — {res['date']} (host sgemm {res['sgemm_gflops']} GFLOP/s)\n",
        f"`{res['command']}` — {res['n']:,} vectors, {res['factory']}, {res['train_size']:,} training vectors per "
        f"seed; recall@10 of {res['heldout_queries']:,} held-out queries (the update bench's generator) read from "
        "list assignments.\n",
        "| seed | " + " | ".join(f"tuned on {m:,} recall queries: nprobe / recall there / held-out" for m in sizes)
        + " | " + " | ".join(f"held-out at nprobe {p}" for p in fixed) + " |",
        "|---" * (1 + len(sizes) + len(fixed)) + "|", *rows, "",
        *(f"Held-out recall@10 at the nprobe tuned on {m:,} queries, over {len(rows)} seeds: mean "
          f"{res[f'heldout_at_tuned_{m}']['mean']}, sd {res[f'heldout_at_tuned_{m}']['sd']}, range "
          f"{res[f'heldout_at_tuned_{m}']['min']}–{res[f'heldout_at_tuned_{m}']['max']}." for m in sizes),
    ]) + "\n", args.no_doc)


if __name__ == "__main__":
    main()

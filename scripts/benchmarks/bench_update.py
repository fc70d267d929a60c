"""Benchmark the nightly index step at 1M: an update of the published index against a full build.

Usage: python scripts/benchmarks/bench_update.py [--n 1000000] [--new 0.01] [--deleted 0.005] [--cache DIR]

1. Writes N synthetic clustered 1024-d unit vectors (the benchmarks' set, benchlib.make_shards) as real shards and
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
Writes its figures into docs/benchmarks/results/update.json (--json; run "update", or "seeds" with --seeds) and
deletes its work folder (2 GB per index).

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
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import DIM, add_json_option, command_line, figure, host, make_shards, now, run_measured, save  # noqa: E402
from pipeline.features import CATALOG_FILE, Catalog, list_shards, read_shard  # noqa: E402
from pipeline.index import INDEX_FILE, current_version  # noqa: E402
from pipeline.synthetic import clustered, model_info, write_shards  # noqa: E402

AREA, TITLE = "update", "Nightly index update"


def build(features: Path, index_dir: Path, *extra: str) -> tuple[float, float, dict]:
    """Wall seconds, peak RSS (MiB) and meta of one `pipeline build-index` process."""
    wall, rss, out = run_measured(
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
            *extra,
        ]
    )
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
        out.append(np.array([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))
    return out


def seed_spread(
    features: Path, centres: np.ndarray, seeds: list[int], bench_seed: int, n_heldout: int, samples: list[int]
) -> dict:
    """Held-out recall@10 of full builds of `features` that differ only by build_index's seed: at the
    nprobe each one's tuning picks on 1,000 recall queries as build_index draws them (and, as a what-if,
    on larger samples), and at fixed nprobe (see the module docstring)."""
    import faiss

    from pipeline.features import live_parts
    from pipeline.index import NPROBE_GRID, TRUTH_DEPTH, lower_bound, plan_index, recall_at, sample_runs

    parts = live_parts(features).parts
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

        def probe_rank(q: np.ndarray, tr: np.ndarray, quantizer=quantizer) -> np.ndarray:
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

            def recall(p: int, rank=rank, q_truth=q_truth, q_pos=q_pos) -> np.ndarray:
                return recall_at(np.where(rank < p, q_truth, -1), q_truth, q_pos, 10)

            tuned = next(p for p in grid if lower_bound(recall(p)) >= 0.95)
            row[len(q_pos)] = {
                "nprobe": tuned,
                "tuned_recall_at_10": round(float(recall(tuned).mean()), 4),
                "heldout_at_tuned": round(float((held_rank < tuned).mean()), 4),
            }
        out["seeds"][seed] = row
        print(
            f"seed {seed}: trained in {train_s:.0f} s; tuned on 1,000 / {samples} recall queries: "
            + "; ".join(
                f"nprobe {r['nprobe']} (tuned {r['tuned_recall_at_10']}, held-out {r['heldout_at_tuned']})"
                for m, r in row.items()
                if isinstance(m, int)
            )
            + f"; held-out at fixed nprobe {heldout}",
            flush=True,
        )
    for m in [1000, *samples]:
        at = np.array([r[m]["heldout_at_tuned"] for r in out["seeds"].values()])
        out[f"heldout_at_tuned_{m}"] = {
            "mean": round(float(at.mean()), 4),
            "sd": round(float(at.std(ddof=1)), 4),
            "min": float(at.min()),
            "max": float(at.max()),
        }
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
    ap.add_argument(
        "--cache",
        type=Path,
        help="Make the N base shards and their catalog once in this folder and "
        "start each run from them (kept; about 2 GB at 1M).",
    )
    ap.add_argument("--seed", type=int, default=0)
    add_json_option(ap, AREA)
    ap.add_argument("--keep-files", action="store_true", help="Keep the shards and indexes (several GB).")
    ap.add_argument(
        "--seeds",
        help="Comma-separated build seeds: measure how full builds differ by their draw "
        "alone (module docstring) on the --cache shards, and nothing else.",
    )
    ap.add_argument(
        "--samples", default="4000", help="With --seeds: larger recall samples to tune on as well (what-if)."
    )
    ap.add_argument(
        "--heldout",
        type=int,
        default=10_000,
        help="Held-out queries measuring recall@10 (1,000 "
        "give a paired standard error of ~0.007 between two builds; 10,000 about a third of it).",
    )
    args = ap.parse_args()
    date, machine = now(), host()
    if args.seeds:
        return seeds_main(args, date, machine)
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
        print(
            f"host sgemm {machine['sgemm_gflops']:.0f} GFLOP/s; shards in {t1 - t0:.1f} s, catalog in "
            f"{catalog_s:.1f} s",
            flush=True,
        )

        first_s, first_rss, first = build(features, updated)
        queries = clustered(args.heldout, centres, np.random.default_rng(args.seed + 1))
        same = sorted({4, 5, 6, 7, 8, first["nprobe"]})
        per_first, *at_same_first = heldout_recall(
            updated, [first["nprobe"], *same], queries, exact_truth(features, queries, 10)
        )
        rec_first, *same_first = means([per_first, *at_same_first])
        print(
            f"first version: full build {first_s:.1f} s, {first['factory']} nprobe {first['nprobe']}, "
            f"held-out recall@10 {rec_first}",
            flush=True,
        )

        rng = np.random.default_rng(args.seed + 2)
        n_new, n_del = round(args.n * args.new), round(args.n * args.deleted)
        write_shards(
            features,
            clustered(n_new, centres, rng),
            model_info(DIM),
            path_format="/synthetic/new/{:08d}.jpg",
            hash_format="new{:029x}",
        )
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
        loss = {
            p: (round(float((a - f).mean()), 4), round(float((a - f).std(ddof=1) / np.sqrt(len(a))), 4))
            for p, a, f in zip(same, at_same_upd, at_same_first, strict=True)
        }
    finally:
        if not args.keep_files:
            shutil.rmtree(args.workdir, ignore_errors=True)

    res = {
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "n": args.n,
        "new": n_new,
        "deleted": n_del,
        "heldout_queries": args.heldout,
        "factory": upd["factory"],
        "catalog_s": round(catalog_s, 1),
        "first_build_s": round(first_s, 1),
        "first": {
            "nprobe": first["nprobe"],
            "tuned_recall_at_10": first["recall_at_10"],
            "heldout_recall_at_10": rec_first,
        },
        "update": {
            "wall_s": round(upd_s, 1),
            "index_step_s": upd["build_seconds"],
            "timings": upd["timings"],
            "peak_rss_mib": round(upd_rss),
            "nprobe": upd["nprobe"],
            "tuned_recall_at_10": upd["recall_at_10"],
            "held_recall_at_10": upd.get("trained_recall_at_10"),
            "nprobe_sweep": upd["nprobe_sweep"],
            "recall_queries": upd["recall_queries"],
            "heldout_recall_at_10": round(rec_upd, 4),
        },
        "full": {
            "wall_s": round(full_s, 1),
            "index_step_s": fb["build_seconds"],
            "timings": fb["timings"],
            "peak_rss_mib": round(full_rss),
            "nprobe": fb["nprobe"],
            "tuned_recall_at_10": fb["recall_at_10"],
            "recall_queries": fb["recall_queries"],
            "heldout_recall_at_10": round(rec_full, 4),
        },
    }
    res["recall_at_equal_nprobe"] = {
        p: {"first": f, "update": a, "full": b}
        for p, f, a, b in zip(same, same_first, same_upd, same_full, strict=True)
    }
    res["heldout_difference"] = {"update_minus_full": round(rec_upd - rec_full, 4), "standard_error": diff_se}
    res["update_minus_first_at_equal_nprobe"] = {p: {"mean": m, "standard_error": e} for p, (m, e) in loss.items()}
    res["ratio_wall"] = round(upd_s / full_s, 4)
    res["ratio_index_step"] = round(upd["build_seconds"] / fb["build_seconds"], 4)
    save(
        args.json,
        AREA,
        TITLE,
        key="update",
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
        f"{res['n']:,} synthetic clustered {DIM}-d vectors (the benchmarks' set) in real shards with their catalog, "
        f"published as {res['factory']} by a full build; then {res['new']:,} new images and {res['deleted']:,} "
        "deleted. (a) `pipeline build-index --update` makes the next version from the published one; (b) a full "
        "`pipeline build-index` of the same live set; each a fresh process. Recall@10 against exact search over the "
        f"live set, on {res['heldout_queries']:,} held-out queries (new vectors from the same clusters)."
    )


def figures(res: dict) -> list[dict]:
    u, f, d = res["update"], res["full"], res["heldout_difference"]
    loss = res["update_minus_first_at_equal_nprobe"]
    worst = max(loss.values(), key=lambda r: abs(r["mean"]))
    return [
        figure(
            "(a) update / (b) full build, whole process",
            res["ratio_wall"],
            "×",
            f"{u['wall_s']} vs {f['wall_s']} s",
            target="≤ 0.10",
            met=res["ratio_wall"] <= 0.10,
        ),
        figure(
            "the same, the index step alone",
            res["ratio_index_step"],
            "×",
            f"{u['index_step_s']} vs {f['index_step_s']} s",
            target="≤ 0.10",
            met=res["ratio_index_step"] <= 0.10,
        ),
        figure(
            "held-out recall@10, (a) − (b)",
            d["update_minus_full"],
            "",
            f"standard error {d['standard_error']}, paired; (a) {u['heldout_recall_at_10']} at nprobe "
            f"{u['nprobe']}, (b) {f['heldout_recall_at_10']} at nprobe {f['nprobe']}",
            target="within ±0.005",
            met=abs(d["update_minus_full"]) <= 0.005,
        ),
        figure(
            "the update's own loss: (a) − the version it was made from, at equal nprobe",
            worst["mean"],
            "",
            f"± {worst['standard_error']}, the largest over nprobe {', '.join(map(str, loss))}",
        ),
        figure("peak RSS, (a) / (b)", f"{u['peak_rss_mib']} / {f['peak_rss_mib']}", " MiB"),
    ]


def seeds_main(args: argparse.Namespace, date: str, machine: dict) -> None:
    """--seeds: the spread of full builds' held-out recall@10 over their draws, recorded as the run "seeds"."""
    if not args.cache:
        sys.exit("--seeds needs --cache (the N shards and their catalog)")
    centres = make_shards(args.cache, args.n, args.shard_size, args.seed)
    with Catalog(args.cache) as c:
        c.reconcile()
    res = seed_spread(
        args.cache,
        centres,
        [int(s) for s in args.seeds.split(",")],
        args.seed,
        args.heldout,
        [int(m) for m in args.samples.split(",") if m],
    )
    save(
        args.json,
        AREA,
        TITLE,
        key="seeds",
        date=date,
        command=command_line(),
        host=machine,
        dim=DIM,
        setup=seeds_setup(res),
        figures=seeds_figures(res),
        result=res,
    )


def seeds_setup(res: dict) -> str:
    return (
        f"Full builds of the same {res['n']:,} vectors ({res['factory']}, {res['train_size']:,} training vectors) "
        f"that differ only by their seed (training sample, recall queries): held-out recall@10 of "
        f"{res['heldout_queries']:,} queries (the update benchmark's) at the nprobe each build's tuning picks, read "
        "from list assignments."
    )


def seeds_figures(res: dict) -> list[dict]:
    sizes = sorted(int(k[len("heldout_at_tuned_") :]) for k in res if k.startswith("heldout_at_tuned_"))
    return [
        figure(
            f"held-out recall@10 at the nprobe tuned on {m:,} recall queries, over {len(res['seeds'])} seeds",
            f"{r['mean']} (sd {r['sd']})",
            "",
            f"range {r['min']}–{r['max']}",
        )
        for m in sizes
        for r in [res[f"heldout_at_tuned_{m}"]]
    ]


if __name__ == "__main__":
    main()

"""Benchmark search within a part of the collection at 1M 1024-d: recall@10 against exact search over the
selected images and single-query latency, at selections of 100% down to 0.001%, random and clustered, for
the default plan (IVF-Flat) and the `--max-memory 600M` compressed plan; the planner's crossovers, measured;
and a metadata-only change against an index update.

Usage: python scripts/benchmarks/bench_filters.py [--n 1000000] [--cache bench-output/scale/features-1m]

1. Features: the benchmarks' synthetic set (benchlib.make_shards, seed 0, shards of 50,000; made once in
   --cache, as bench_scale.py makes it), hard-linked into a work folder and imported into a catalog.
2. Metadata, a CSV keyed by path: `r` uniform in [0, 1) (`r<f` selects a random share f) and `near`, the
   cosine to one indexed image (`near>=t` selects the images most like one picture: a clustered selection,
   as a folder of similar pictures is). Both indexes are built with it (`pipeline build-index --metadata`).
3. The planner's constants are measured on tuning queries (crossovers(): how many candidates a selection's
   codes propose, ALPHA, the size below which every selected vector is scored, the share from which the
   version's lists are probed), for both plans.
4. Reported on held-out queries (other draws from the same clusters, not indexed), with those constants:
   recall@10 and single-query p50/p99 at every selection, and unfiltered p50 in the same run. A filter's
   selection is made at its first query and kept (Searcher.select); its first-query cost is reported apart.
5. Metadata-only change: 1% new images (a new shard, imported) and an index update (`build_index(update=
   True)`) timed; then the CSV rewritten and `republish_metadata` timed (what `pipeline rebuild` runs when only
   the metadata changed): 1% of its rows, every row, every row in a new row order.
Targets: recall@10 >= 0.95 and p50 <= 10 ms at every selection; p50 <= 2x unfiltered at 10% and above;
metadata-only <= 10% of the update. Writes docs/benchmarks/results/filters.json (--json).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import DIM, add_json_option, command_line, figure, host, make_shards, now, save  # noqa: E402
from pipeline.features import Catalog, list_shards, read_shard  # noqa: E402
from pipeline.index import build_index, republish_metadata  # noqa: E402
from pipeline.index import filtered as planner  # noqa: E402
from pipeline.search import Searcher  # noqa: E402
from pipeline.synthetic import clustered, model_info, write_shards  # noqa: E402

AREA, TITLE = "filters", "Filtered search"
SHARES = [1.0, 0.1, 0.01, 0.001, 0.0001, 0.00001]
SEED, SHARD = 0, 50_000
IDS = np.zeros(0, np.int64)  # the catalog id of each position of the benchmark's vectors (all_vectors)


def link_features(cache: Path, work: Path, n: int) -> Path:
    features = work / "features"
    features.mkdir(parents=True)
    for shard in list_shards(cache)[: n // SHARD]:
        os.link(shard, features / shard.name)
    with Catalog(features) as c:
        c.reconcile()
    return features


def all_vectors(features: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Every live vector, its path and its catalog id, in shard order."""
    with Catalog(features) as c:
        live = c.live_ids()
    vectors, paths, ids = [], [], []
    for shard in list_shards(features):
        rows, shard_ids = live[shard.name]
        data = read_shard(shard)
        vectors.append(data.features[rows])
        paths += [data.paths[i] for i in rows]
        ids.append(shard_ids)
    return np.concatenate(vectors), paths, np.concatenate(ids)


def write_metadata(path: Path, paths: list[str], r: np.ndarray, near: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "r", "near"])
        w.writerows(zip(paths, np.char.mod("%.7f", r), np.char.mod("%.7f", near), strict=True))


def selections(r: np.ndarray, near: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """(kind, where, chosen positions) of every reported selection."""
    out = []
    for share in SHARES:
        out.append(("random", f"r<{share}", np.flatnonzero(r < share)))
        t = np.quantile(near, 1 - share) if share < 1 else -2.0
        out.append(("clustered", f"near>={t:.7f}", np.flatnonzero(near >= float(f"{t:.7f}"))))
    return out


def truth(x: np.ndarray, chosen: np.ndarray, queries: np.ndarray, k: int = 10) -> list[set[int]]:
    """Ids of the exact top-k among `chosen` (positions into x, turned into catalog ids through IDS)."""
    best = np.full((len(queries), 0), -np.inf, np.float32), np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(chosen), 200_000):
        block = chosen[start : start + 200_000]
        s = queries @ x[block].T
        scores, ids = np.concatenate([best[0], s], 1), np.concatenate([best[1], np.broadcast_to(block, s.shape)], 1)
        keep = np.argsort(-scores, 1)[:, :k]
        best = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
    return [set(IDS[row].tolist()) for row in best[1]]


def measure(searcher: Searcher, queries: np.ndarray, where: list[str] | None, expected: list[set[int]] | None):
    """(recall@10 mean, p50 ms, p99 ms, first-query ms): one query at a time, the first apart (it makes the
    selection)."""
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = searcher.search_vectors(q[None], 10, where=where)[0]
        times.append((time.perf_counter() - t) * 1000)
        found.append({h.id for h in hits})
    recall = None
    if expected is not None:
        recall = float(np.mean([len(f & e) / max(1, len(e)) for f, e in zip(found, expected, strict=True)]))
    rest = np.array(times[1:])
    return recall, float(np.percentile(rest, 50)), float(np.percentile(rest, 99)), times[0]


def force(route: str, compressed: bool = False) -> None:
    """Make the planner take one route for every selection (for measuring the routes against each other)."""
    exact, probe = {"exact": (10**12, 2.0), "codes": (0, 2.0), "lists": (0, 0.0)}[route]
    if compressed:
        planner.STORE_EXACT_BELOW, planner.STORE_PROBE_ABOVE = exact, probe
    else:
        planner.EXACT_BELOW, planner.PROBE_ABOVE = exact, probe


def smallest(searcher: Searcher, queries: np.ndarray, values, name: str, cases, expected, floor: float, log: dict):
    """The first of `values` (set as planner.<name> in turn) whose recall@10 is >= `floor` in every case (else
    the last); each value's (recall, p50) per case recorded in `log`."""
    for value in values:
        setattr(planner, name, value)
        per = {w: measure(searcher, queries, [w], expected[w])[:2] for w, _ in cases}
        log[value] = per
        print(f"{name} {value}: {per}", flush=True)
        if min(v[0] or 0 for v in per.values()) >= floor:
            return value
    return values[-1]


def both_routes(flat: Searcher, pq: Searcher, queries: np.ndarray, where: list[str], exp, routes) -> dict:
    """(recall, p50) of each of two routes forced in turn, for both plans (compressed keys start "pq_")."""
    row = {}
    for searcher, compressed, prefix in ((flat, False, ""), (pq, True, "pq_")):
        for mode in routes:
            force(mode, compressed)
            row[prefix + mode] = measure(searcher, queries, where, exp)[:2]
    return row


def crossovers(
    flat: Searcher, pq: Searcher, x: np.ndarray, r: np.ndarray, near: np.ndarray, tune_q: np.ndarray
) -> dict:
    """The planner's constants, measured on the tuning queries, for both plans (IVF-Flat, compressed):
    1. RERANK: the smallest of 250, 500, 1000, 2000 whose codes keep recall@10 >= 0.99 at 10% (random and
       clustered) and 30% (random), IVF-Flat.
    2. ALPHA: the smallest of 1, 1.5, 2, 2.5, 3, 4 for which probing the lists keeps recall@10 >= 0.96 at
       shares 0.5, 0.7 and 0.9, IVF-Flat.
    3. The exact crossover: the largest selection size (1,000 to 120,000) at which ranking every selected
       vector is no slower than the codes.
    4. The lists crossover: the smallest share (0.2 to 0.9) from which probing the lists is faster than the
       codes and keeps recall@10 >= 0.95, there and at every larger share.
    """
    out: dict = {"rerank": {}, "alphas": {}, "sizes": [], "shares": []}

    def clustered_where(share: float) -> tuple[str, np.ndarray]:
        t = float(f"{np.quantile(near, 1 - share):.7f}")
        return f"near>={t:.7f}", np.flatnonzero(near >= t)

    cases = [(f"r<{s}", np.flatnonzero(r < s)) for s in (0.1, 0.3)] + [clustered_where(0.1)]
    expected = {where: truth(x, chosen, tune_q) for where, chosen in cases}
    force("codes")
    planner.RERANK = smallest(flat, tune_q, (250, 500, 1000, 2000), "RERANK", cases, expected, 0.99, out["rerank"])
    force("lists")
    high = [(f"r<{s}", np.flatnonzero(r < s)) for s in (0.5, 0.7, 0.9)]
    expected.update({w: truth(x, chosen, tune_q) for w, chosen in high})
    planner.ALPHA = smallest(flat, tune_q, (1.0, 1.5, 2.0, 2.5, 3.0, 4.0), "ALPHA", high, expected, 0.96, out["alphas"])
    order = np.argsort(r)
    for size in [s for s in (1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 120_000) if s < len(r) // 2]:
        chosen = np.sort(order[:size])
        where = [f"r<{r[order[size]]:.7f}"]
        exp = truth(x, chosen, tune_q)
        row: dict = {"size": size, **both_routes(flat, pq, tune_q, where, exp, ("exact", "codes"))}
        out["sizes"].append(row)
        print(f"exact crossover {size}: {row}", flush=True)
    for share in (0.2, 0.3, 0.5, 0.7, 0.9):
        where = [f"r<{share}"]
        exp = expected.get(where[0]) or truth(x, np.flatnonzero(r < share), tune_q)
        row = {"share": share, **both_routes(flat, pq, tune_q, where, exp, ("codes", "lists"))}
        out["shares"].append(row)
        print(f"lists crossover {share}: {row}", flush=True)

    def exact_below(prefix: str) -> int:  # exact: no slower than the codes (which may also miss)
        fine = [row["size"] for row in out["sizes"] if row[prefix + "exact"][1] <= row[prefix + "codes"][1]]
        return max(fine, default=0)

    def probe_above(prefix: str) -> float:  # lists: faster and recall >= 0.95 from there on
        good = [
            row[prefix + "lists"][1] < row[prefix + "codes"][1] and row[prefix + "lists"][0] >= 0.95
            for row in out["shares"]
        ]
        for i, row in enumerate(out["shares"]):
            if all(good[i:]):
                return row["share"]
        return 1.0

    out["exact_below"], out["store_exact_below"] = exact_below(""), exact_below("pq_")
    out["probe_above"], out["store_probe_above"] = probe_above(""), probe_above("pq_")
    planner.EXACT_BELOW, planner.STORE_EXACT_BELOW = out["exact_below"], out["store_exact_below"]
    planner.PROBE_ABOVE, planner.STORE_PROBE_ABOVE = out["probe_above"], out["store_probe_above"]
    out["alpha"], out["rerank_chosen"] = planner.ALPHA, planner.RERANK
    return out


def metadata_change(
    features: Path, index_dir: Path, meta: Path, paths: list[str], r: np.ndarray, near: np.ndarray, centres, n: int
) -> dict:
    """An index update (1% new images, imported) timed, then metadata-only versions (republish_metadata, what
    `pipeline rebuild` runs when only the metadata files changed): 1% of the rows changed, then every row, then
    every row again in a new row order (its paths looked up again: no target of its own, shown beside)."""
    new = clustered(n // 100, centres, np.random.default_rng(303))
    write_shards(features, new, model_info(DIM), path_format="/synthetic/new-{:08d}.jpg")
    with Catalog(features) as c:
        c.reconcile()
    t = time.perf_counter()
    build_index(features, index_dir, update=True, progress=False)
    update_s = time.perf_counter() - t
    rng = np.random.default_rng(404)
    out: dict = {"update_s": round(update_s, 2), "figures": []}
    some = r.copy()
    changed = rng.choice(len(r), len(r) // 100, replace=False)
    some[changed] = rng.random(len(changed))
    shuffled = rng.permutation(len(r))
    cases = (
        ("1% of the rows changed", some, np.arange(len(r)), True),
        ("every row changed", rng.random(len(r)), np.arange(len(r)), True),
        ("every row changed, in a new row order", rng.random(len(r)), shuffled, False),
    )
    for label, values, order, targeted in cases:
        write_metadata(meta, [paths[i] for i in order], values[order], near[order])
        t = time.perf_counter()
        republish_metadata(index_dir, [meta], keep=10)  # (no version pruned: the update before pruned none)
        seconds = time.perf_counter() - t
        out[label] = round(seconds, 2)
        ratio = seconds / update_s
        out["figures"].append(
            figure(
                f"metadata-only version ({label}) over an index update (1% new)",
                round(ratio, 3),
                "×",
                f"{seconds:.1f} vs {update_s:.1f} s",
                target="≤ 0.10" if targeted else None,
                met=ratio <= 0.10 if targeted else None,
            )
        )
        print(out["figures"][-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-output" / "scale" / "features-1m")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-output" / "filters-bench")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--reuse", action="store_true", help="Reuse the work folder's features and indexes (a rerun).")
    ap.add_argument(
        "--metadata-only", action="store_true", help="Only step 5 (builds IVF-Flat alone; run key 'metadata-1M')."
    )
    add_json_option(ap, AREA)
    args = ap.parse_args()
    date, gflops = now(), host()
    reuse = args.reuse and (args.workdir / "compressed").is_dir()
    if not reuse:
        shutil.rmtree(args.workdir, ignore_errors=True)
    centres = make_shards(args.cache, args.n, SHARD, SEED)
    features = args.workdir / "features" if reuse else link_features(args.cache, args.workdir, args.n)
    global IDS
    x, paths, IDS = all_vectors(features)
    x = x.astype(np.float32)
    rng = np.random.default_rng(7)
    r, near = rng.random(len(x)), x @ x[rng.integers(len(x))]
    meta = args.workdir / "metadata.csv"
    if not reuse:
        write_metadata(meta, paths, r, near)
    tune_q = clustered(args.queries, centres, np.random.default_rng(101))
    test_q = clustered(args.queries, centres, np.random.default_rng(202))
    built = {}
    plans = (("ivf_flat", {}),) if args.metadata_only else (("ivf_flat", {}), ("compressed", {"max_memory": "600M"}))
    for name, extra in plans:
        if reuse:
            built_meta = Searcher(args.workdir / name).meta
        else:
            built_meta = build_index(features, args.workdir / name, metadata=[meta], progress=False, **extra).meta
        built[name] = {k: built_meta.get(k) for k in ("factory", "nprobe", "build_seconds", "recall_at_10")}
        print(f"built {name}: {built[name]}", flush=True)
    if args.metadata_only:
        change = metadata_change(features, args.workdir / "ivf_flat", meta, paths, r, near, centres, args.n)
        setup = (
            f"{args.n:,} synthetic {DIM}-d vectors in IVF-Flat ({built['ivf_flat']['factory']}) with a 2-field, "
            f"{args.n:,}-row metadata CSV: an index update with 1% new images against versions made from a change "
            "of the metadata file alone (1% of its rows, then all of them, then all of them in a new row order), "
            "one after the other in this run. The CSV lists the first million images in id order (the 1% the update "
            "added have no row), in a new order in the last case."
        )
        run = {
            "key": "metadata-1M",
            "setup": setup,
            "figures": change.pop("figures"),
            "result": {"built": built, **change},
        }
        save(args.json, AREA, TITLE, date=date, command=command_line(), host=gflops, dim=DIM, **run)
        shutil.rmtree(args.workdir, ignore_errors=True)
        return
    flat, pq = Searcher(args.workdir / "ivf_flat"), Searcher(args.workdir / "compressed")
    for s in (flat, pq):
        s.warm()
    planner_constants = crossovers(flat, pq, x, r, near, tune_q)
    rows, figures = [], []
    for name, searcher in (("ivf_flat", flat), ("compressed", pq)):
        unfiltered = measure(searcher, test_q, None, truth(x, np.arange(len(x)), test_q))
        for kind, where, chosen in selections(r, near):
            recall, p50, p99, first = measure(searcher, test_q, [where], truth(x, chosen, test_q))
            row = {
                "index": name,
                "kind": kind,
                "where": where,
                "selected": len(chosen),
                "share": len(chosen) / len(x),
                "recall_at_10": round(recall or 0, 4),
                "p50_ms": round(p50, 2),
                "p99_ms": round(p99, 2),
                "first_query_ms": round(first, 1),
                "vs_unfiltered_p50": round(p50 / unfiltered[1], 2),
            }
            rows.append(row)
            print(row, flush=True)
        worst_recall = min(row["recall_at_10"] for row in rows if row["index"] == name)
        worst_p50 = max(row["p50_ms"] for row in rows if row["index"] == name)
        worst_ratio = max(row["vs_unfiltered_p50"] for row in rows if row["index"] == name and row["share"] >= 0.1)
        label = "IVF-Flat" if name == "ivf_flat" else "compressed (--max-memory 600M)"
        figures += [
            figure(f"{label}: unfiltered p50", round(unfiltered[1], 2), " ms", f"recall@10 {unfiltered[0]:.3f}"),
            figure(
                f"{label}: lowest recall@10 over the 12 selections",
                worst_recall,
                "",
                target="≥ 0.95",
                met=worst_recall >= 0.95,
            ),
            figure(
                f"{label}: highest p50 over the 12 selections", worst_p50, " ms", target="≤ 10 ms", met=worst_p50 <= 10
            ),
            figure(
                f"{label}: highest p50 at 10% and above, over unfiltered",
                worst_ratio,
                "×",
                target="≤ 2",
                met=worst_ratio <= 2,
            ),
        ]
    change = metadata_change(features, args.workdir / "ivf_flat", meta, paths, r, near, centres, args.n)
    figures += change["figures"]
    setup = (
        f"{args.n:,} synthetic {DIM}-d vectors (the benchmarks' clustered set) with a 2-field metadata CSV; "
        f"IVF-Flat ({built['ivf_flat']['factory']}, nprobe {built['ivf_flat']['nprobe']}) and the --max-memory 600M "
        f"plan ({built['compressed']['factory']}, re-ranked from the store); {args.queries} held-out queries, one "
        "at a time, against exact search over the selected images; selections of 100% to 0.001%, random (r<f) "
        "and clustered (the images most like one picture). Planner constants measured in the same run on other "
        f"queries: every selected vector scored up to {planner_constants['exact_below']:,} selected (IVF-Flat; "
        f"{planner_constants['store_exact_below']:,} compressed), the version's lists probed from a share of "
        f"{planner_constants['probe_above']} ({planner_constants['store_probe_above']} compressed) at nprobe / "
        f"f^{planner_constants['alpha']}, the selection's 4-bit codes between, {planner_constants['rerank_chosen']:,} "
        "candidates re-ranked exactly."
    )
    result = {
        "built": built,
        "planner": planner_constants,
        "rows": rows,
        "metadata_change": {k: v for k, v in change.items() if k != "figures"},
    }
    run = {"key": "1M", "setup": setup, "figures": figures, "result": result}
    save(args.json, AREA, TITLE, date=date, command=command_line(), host=gflops, dim=DIM, **run)
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

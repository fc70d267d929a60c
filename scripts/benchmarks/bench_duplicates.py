"""Benchmark `pipeline duplicates` at 1M vectors with planted near-duplicate groups.

Usage: flock /tmp/pipeline-bench.lock python scripts/bench_duplicates.py [--n 1000000] [--groups 2000] [--nprobe N]

1. Writes N synthetic 512-d unit vectors as real shards (bench_index.py's generator: clustered,
   positive orthant, random pairs at cosine ~0.47), of which `groups` planted groups of 2-8
   images: an original and noisy copies at cosine to it drawn uniformly from 0.82-0.97 (the range
   of copies-dev's copy-to-original cosines above the default threshold, real features, docs/quality.md);
   one group in ten also holds a byte-identical copy (same vector and content hash).
2. Builds the index with `pipeline build-index` (IVF, tuned nprobe), once; reused after.
3. Runs `pipeline duplicates --json` in a fresh process: wall time and peak RSS, against the
   index file's size. Checks that every planted group is recovered: all its images in one found
   group (which may also hold a genuine neighbour), and no found group holding two planted groups;
   and, apart, that so is every planted group whose copy-original pairs are all within reach of
   the lists probed (either image probes the other's list, by the product's own probing): a miss
   there is the product's error, one outside reach a limit of probing. Reports the lists probed per
   vector and, for comparison, the fixed nprobe each planted pair would need.
4. For comparison, times faiss's own range search (IVF, nprobe 32 or --nprobe) with 2,000 indexed
   vectors as queries, extrapolated to all N: the one-query-per-image way of finding the pairs.
Targets: <= 10 minutes; peak RSS <= 2x the index. Records the host's sgemm GFLOP/s beside them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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
from benchlib import record, sgemm_gflops, targets_line  # noqa: E402
from pipeline import duplicates  # noqa: E402
from pipeline.duplicates import DEFAULT_THRESHOLD, MAX_PROBES, PROBE_GAP, Probing  # noqa: E402
from pipeline.model import ModelInfo  # noqa: E402
from pipeline.features import ShardData, list_shards, read_shard, shard_name, write_shard  # noqa: E402


def copy_of(v: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at exactly `cosine` to unit vector v: v plus noise orthogonal to it."""
    noise = rng.normal(size=v.shape).astype(np.float32)
    noise -= (noise @ v) * v
    noise *= np.sqrt(1 / cosine**2 - 1) / np.linalg.norm(noise)
    out = v + noise
    return out / np.linalg.norm(out)


def probes_needed(ivf, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """For each pair (x[k], y[k]): the smallest nprobe at which either vector probes the other's list
    (a vector probes its nprobe nearest centroids, its own list first)."""
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), 1000):
        sx, sy = x[s:s + 1000] @ centroids.T, y[s:s + 1000] @ centroids.T
        r = np.arange(len(sx))
        rank_x = (sx > sx[r, sy.argmax(1)][:, None]).sum(1)  # centroids x prefers to y's list
        rank_y = (sy > sy[r, sx.argmax(1)][:, None]).sum(1)
        out[s:s + 1000] = np.minimum(rank_x, rank_y) + 1
    return out


def make_planted(features: Path, n: int, n_groups: int, shard_size: int, seed: int) -> list[list[int]]:
    """Write the shards (once) and return the planted groups as lists of ids (= row order)."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(10_000, DIM))).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = rng.integers(2, 9, n_groups)
    slots = rng.permutation(n)[: sizes.sum()]
    groups = [sorted(int(i) for i in g) for g in np.split(slots, np.cumsum(sizes)[:-1])]
    if len(list_shards(features)) * shard_size >= n:
        return groups
    vecs = np.concatenate([clustered(min(shard_size, n - s), centres, rng) for s in range(0, n, shard_size)])
    hashes = [f"{i:032x}" for i in range(n)]
    for g, ids in enumerate(groups):
        original = vecs[ids[0]]
        for i in ids[1:]:
            vecs[i] = copy_of(original, rng.uniform(0.82, 0.97), rng)
        if g % 10 == 0:  # a byte-identical file: same content, same feature
            vecs[ids[-1]], hashes[ids[-1]] = original, hashes[ids[0]]
    features.mkdir(parents=True, exist_ok=True)
    info = ModelInfo(name="synthetic", weights_sha256="s" * 64, input_size=224, dim=DIM)
    for s, start in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - start)
        write_shard(features / shard_name(s), ShardData(vecs[start:start + m], [f"/synthetic/{start + i:08d}.jpg" for i in range(m)],
                    hashes[start:start + m], np.zeros(m, np.int64), np.zeros(m), [], []), info)
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--groups", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=20_000)
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    ap.add_argument("--nprobe", type=int, help="lists each vector probes (default: the product's, by score gap)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-output" / "dupes-bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, default=ROOT / "bench-output" / "bench_duplicates.json")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    features, index_dir = args.workdir / f"features-{args.n}", args.workdir / f"index-{args.n}"
    gflops = sgemm_gflops()
    t0 = time.perf_counter()
    # Shards are written in a child process: a child's peak RSS counts the memory of the process it
    # was started from, so the measuring process stays small.
    maker = multiprocessing.get_context("spawn").Process(
        target=make_planted, args=(features, args.n, args.groups, args.shard_size, args.seed))
    maker.start()
    maker.join()
    planted = make_planted(features, args.n, args.groups, args.shard_size, args.seed)  # the shards exist: ids only
    print(f"shards ready in {time.perf_counter() - t0:.1f} s; host sgemm {gflops:.0f} GFLOP/s", flush=True)
    if not (index_dir / "CURRENT").exists():
        wall, rss, _ = run_measured([sys.executable, "-m", "pipeline", "-q", "build-index", str(features),
                                     "--out", str(index_dir), "--no-progress"])
        print(f"index built in {wall:.0f} s (peak RSS {rss:.0f} MiB)", flush=True)
    version = index_dir / "versions" / (index_dir / "CURRENT").read_text().strip()
    meta = json.loads((version / "meta.json").read_text())
    index_mib = (version / "index.faiss").stat().st_size / 2**20

    gap = PROBE_GAP * float(np.sqrt(2 - 2 * args.threshold))
    probing = Probing(args.nprobe, args.nprobe) if args.nprobe else Probing(meta["nprobe"], MAX_PROBES, gap)
    wall, rss, out = run_measured([sys.executable, "-m", "pipeline", "-q", "duplicates", "--index", str(index_dir),
                                   "--threshold", str(args.threshold), "--json", "--no-progress"]
                                  + (["--nprobe", str(args.nprobe)] if args.nprobe else []))
    found = json.loads(out)
    group_of = {int(Path(img["path"]).stem): g["group"] for g in found for img in g["images"]}

    def is_recovered(ids: list[int]) -> bool:
        """All the planted group's images in one found group (which may hold more: a genuine neighbour)."""
        return len({group_of.get(i) for i in ids}) == 1 and ids[0] in group_of

    recovered = sum(map(is_recovered, planted))
    planted_in = [group_of[ids[0]] for ids in planted if ids[0] in group_of]
    merged = len(planted_in) - len(set(planted_in))
    extra = len({g["group"] for g in found} - set(planted_in))
    import faiss

    index = faiss.read_index(str(version / "index.faiss"), faiss.IO_FLAG_MMAP_IFC)
    queries = read_shard(list_shards(features)[0]).features[:2_000]
    t0 = time.perf_counter()
    range_nprobe = args.nprobe or 32
    index.range_search(queries, args.threshold, params=faiss.SearchParametersIVF(nprobe=range_nprobe))
    range_s = (time.perf_counter() - t0) * args.n / len(queries)
    # Which planted copy-original pairs are compared: a pair is when either vector probes the other's
    # list, with the product's own probing (duplicates._probes). A group all of whose pairs are
    # compared must be recovered (the product's contract); one with a pair out of reach may still be,
    # through a copy-copy pair. And, for comparison, the fixed nprobe each pair would need.
    ivf = faiss.extract_index_ivf(index)
    ivf.make_direct_map()
    pairs = np.array([(ids[0], c) for ids in planted for c in ids[1:]])
    x, y = ivf.reconstruct_batch(pairs[:, 0]), ivf.reconstruct_batch(pairs[:, 1])
    need = probes_needed(ivf, x, y)
    pair_recall = {p: round(float(np.mean(need <= p)), 5) for p in (meta["nprobe"], 8, 16, 32, 64)}
    both = np.concatenate([x, y])
    own = ivf.quantizer.search(both, 1)[1][:, 0]
    slots, lists = duplicates.probe_table(ivf, lambda s: both[s], len(both), probing)
    reached = np.zeros(len(pairs), bool)
    partner = np.where(slots < len(pairs), slots + len(pairs), slots - len(pairs))  # x's partner is y, and back
    np.logical_or.at(reached, slots % len(pairs), lists == own[partner])
    group_reached = np.logical_and.reduceat(reached, np.cumsum([0] + [len(ids) - 1 for ids in planted[:-1]]))
    in_reach = [ids for ids, g in zip(planted, group_reached) if g]
    recovered_in_reach = sum(map(is_recovered, in_reach))
    sample = ivf.reconstruct_batch(np.random.default_rng(1).choice(index.ntotal, 20_000, replace=False))
    probed = np.bincount(duplicates.probe_table(ivf, lambda s: sample[s], len(sample), probing)[0], minlength=len(sample))
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "flock /tmp/pipeline-bench.lock python scripts/bench_duplicates.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "n": args.n, "factory": meta["factory"], "tuned_nprobe": meta["nprobe"], "threshold": args.threshold,
        "probing": {"least": probing.least, "most": probing.most, "gap": probing.gap and round(probing.gap, 5),
                    "lists_per_vector_mean": round(float(probed.mean()), 1), "p99": int(np.quantile(probed, 0.99)),
                    "max": int(probed.max())}, "range_search_nprobe": range_nprobe,
        "sgemm_gflops": round(gflops), "wall_s": round(wall, 1), "peak_rss_mib": round(rss), "index_mib": round(index_mib),
        "rss_over_index": round(rss / index_mib, 3), "faiss_range_search_s_extrapolated": round(range_s), "planted_groups": len(planted), "recovered": recovered,
        "planted_groups_merged_together": merged, "planted_pair_recall_by_nprobe": pair_recall, "other_groups": extra, "groups_found": len(found),
        "planted_pairs_compared": round(float(reached.mean()), 5),
        "planted_groups_in_reach": len(in_reach), "recovered_in_reach": recovered_in_reach,
        "planted_pair_nprobe_needed_max": int(need.max()),
    }
    res["targets"] = {"all_planted_recovered": recovered == len(planted) and merged == 0,
                      "all_in_reach_recovered": recovered_in_reach == len(in_reach),
                      "le_10_minutes": wall <= 600, "rss_le_2x_index": rss <= 2 * index_mib}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2))
    text = "\n".join([
        f"\n### Duplicates — {res['date']} (host sgemm {res['sgemm_gflops']} GFLOP/s)\n",
        f"`{res['command']}` — {args.n:,} synthetic 512-d unit vectors in real shards, {len(planted):,} planted groups "
        f"of 2–8 (copies at cosine 0.82–0.97 to their original, one group in ten with a byte-identical file); "
        f"{res['factory']} (tuned nprobe {res['tuned_nprobe']}), threshold {args.threshold}; `duplicates` probing "
        + (f"{args.nprobe} lists per vector" if args.nprobe else
           f"lists within {res['probing']['gap']} of each vector's nearest centroid's score (PROBE_GAP {PROBE_GAP} x "
           f"sqrt(2 - 2 x {args.threshold})), at least the tuned {probing.least}, at most {probing.most}: "
           f"{res['probing']['lists_per_vector_mean']} lists per vector on average (p99 {res['probing']['p99']}, "
           f"max {res['probing']['max']}; 20,000 vectors)") + ".\n",
        "| wall s | peak RSS MiB | index MiB | RSS / index | planted groups recovered | planted groups merged | other groups |",
        "|---|---|---|---|---|---|---|",
        f"| {res['wall_s']} | {res['peak_rss_mib']} | {res['index_mib']} | {res['rss_over_index']} | "
        f"{recovered} / {len(planted)} | {merged} | {extra} |",
        "",
        f"Planted copy-original pairs compared by this probing: {res['planted_pairs_compared']}; planted groups all "
        f"of whose pairs are compared: {len(in_reach)}, of which recovered: {recovered_in_reach}. With a fixed number "
        "of lists per vector instead: " + ", ".join(f"nprobe {p}: {r}" for p, r in pair_recall.items())
        + f"; the largest nprobe a planted pair needs: {res['planted_pair_nprobe_needed_max']}.",
        "",
        f"For comparison, faiss's range search with every vector as a query (nprobe {range_nprobe}; timed on 2,000, "
        f"extrapolated): {res['faiss_range_search_s_extrapolated']} s.",
        "",
        targets_line(res["targets"]),
    ]) + "\n"
    record(text, args.no_doc)


if __name__ == "__main__":
    main()

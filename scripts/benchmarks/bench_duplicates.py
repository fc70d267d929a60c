"""Benchmark `pipeline duplicates` at 1M vectors with planted near-duplicate groups.

Usage: python scripts/benchmarks/bench_duplicates.py [--n 1000000] [--groups 2000] [--nprobe N]

1. Writes N synthetic 1024-d unit vectors as real shards (the benchmarks' set: pipeline.synthetic's generator,
   clustered, positive orthant, random pairs at cosine ~0.47), of which `groups` planted groups of 2-8
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
Targets: every planted group recovered; <= 10 minutes; peak RSS <= 2x the index. Writes its figures into
docs/benchmarks/results/duplicates.json (--json; run "planted").

--verify (run "planted-verify", its own work folder): the planted groups' images are real files, each group a
picture of --pictures (long side 640) and its copies made with two of the held-out sets' transformations
(scripts/eval/make_heldout.py) at a random JPEG quality; the other images' paths name no file. Runs plain
`pipeline duplicates` and `pipeline duplicates --verify` on the same index, one after the other: the ratio of
their wall times (target <= 2), the candidate pairs --verify checked (those of images without a file end at
once as unreadable), and the planted copies joined to their original's group, per transformation.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import CENTRES, DIM, add_json_option, command_line, figure, host, now, run_measured, save  # noqa: E402
from pipeline import duplicates  # noqa: E402
from pipeline.duplicates import DEFAULT_THRESHOLD, MAX_PROBES, PROBE_GAP, Probing  # noqa: E402
from pipeline.features import list_shards, read_shard  # noqa: E402
from pipeline.synthetic import clustered, model_info, positive_centres, write_shards  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts" / "eval"))
from make_heldout import TRANSFORMS  # noqa: E402

AREA, TITLE = "duplicates", "Duplicates"
SHARED = ROOT.parent / "shared" / "eval"


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
        sx, sy = x[s : s + 1000] @ centroids.T, y[s : s + 1000] @ centroids.T
        r = np.arange(len(sx))
        rank_x = (sx > sx[r, sy.argmax(1)][:, None]).sum(1)  # centroids x prefers to y's list
        rank_y = (sy > sy[r, sx.argmax(1)][:, None]).sum(1)
        out[s : s + 1000] = np.minimum(rank_x, rank_y) + 1
    return out


def make_planted(
    features: Path, n: int, n_groups: int, shard_size: int, seed: int, files: Path | None = None, pictures=()
) -> list[list[int]]:
    """Write the shards (once) and return the planted groups as lists of ids (= row order). `files`: the
    images' paths are there, and the planted groups' files are written (write_files)."""
    rng = np.random.default_rng(seed)
    centres = positive_centres(CENTRES, DIM, rng)  # as benchlib.make_shards draws them
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
    path_format = "/synthetic/{:08d}.jpg" if files is None else str(files / "{:08d}.jpg")
    if files is not None:
        write_files(files, groups, pictures, seed)
    write_shards(features, vecs, model_info(DIM), shard_size, path_format=path_format, hashes=hashes, first_shard=0)
    return groups


def write_files(files: Path, groups: list[list[int]], pictures: list[Path], seed: int) -> None:
    """Group g: picture g of the shuffled --pictures (cycled: groups that share one are far apart in the index,
    never compared) as its original, and its copies, each two transformations in sequence saved at a random
    JPEG quality (no two copies the same bytes); a byte-identical group's last image is the original's bytes.
    files/planted.json: each copy's transformations."""
    from PIL import Image

    rng = random.Random(seed)
    sources = sorted(p for folder in pictures for p in folder.glob("*.jpg"))
    if not sources:
        sys.exit(f"no pictures (*.jpg) in {', '.join(map(str, pictures))}")
    rng.shuffle(sources)
    files.mkdir(parents=True, exist_ok=True)
    made: dict[int, str] = {}
    for g, ids in enumerate(groups):
        im = Image.open(sources[g % len(sources)]).convert("RGB")
        im.thumbnail((640, 640), Image.Resampling.LANCZOS)
        original = files / f"{ids[0]:08d}.jpg"
        im.save(original, quality=90)
        for i in ids[1:]:
            if g % 10 == 0 and i == ids[-1]:
                (files / f"{i:08d}.jpg").write_bytes(original.read_bytes())
                continue
            a, b = rng.sample(sorted(TRANSFORMS), 2)
            TRANSFORMS[b](TRANSFORMS[a](im, rng), rng).save(files / f"{i:08d}.jpg", quality=rng.randint(70, 95))
            made[i] = f"{a}+{b}"
    (files / "planted.json").write_text(json.dumps(made))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--groups", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=20_000)
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    ap.add_argument("--nprobe", type=int, help="lists each vector probes (default: the product's, by score gap)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-output" / "dupes-bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify", action="store_true", help="planted groups of real files; plain and --verify timed")
    ap.add_argument(
        "--pictures",
        type=Path,
        nargs="+",
        default=[SHARED / "holidays-dev" / "images", SHARED / "copies-dev" / "db"],
        help="folders of real pictures (*.jpg) for --verify's planted groups",
    )
    add_json_option(ap, AREA)
    args = ap.parse_args()
    if args.verify and args.workdir == ap.get_default("workdir"):
        args.workdir = ROOT / "bench-output" / "dupes-verify-bench"
    features, index_dir = args.workdir / f"features-{args.n}", args.workdir / f"index-{args.n}"
    files = args.workdir / "files" if args.verify else None
    date, machine = now(), host()
    t0 = time.perf_counter()
    # Shards are written in a child process: a child's peak RSS counts the memory of the process it
    # was started from, so the measuring process stays small.
    maker = multiprocessing.get_context("spawn").Process(
        target=make_planted, args=(features, args.n, args.groups, args.shard_size, args.seed, files, args.pictures)
    )
    maker.start()
    maker.join()
    planted = make_planted(features, args.n, args.groups, args.shard_size, args.seed, files)  # ids only
    print(
        f"shards ready in {time.perf_counter() - t0:.1f} s; host sgemm {machine['sgemm_gflops']:.0f} GFLOP/s",
        flush=True,
    )
    if not (index_dir / "CURRENT").exists():
        wall, rss, _ = run_measured(
            [
                sys.executable,
                "-m",
                "pipeline",
                "-q",
                "build-index",
                str(features),
                "--out",
                str(index_dir),
                "--no-progress",
            ]
        )
        print(f"index built in {wall:.0f} s (peak RSS {rss:.0f} MiB)", flush=True)
    version = index_dir / "versions" / (index_dir / "CURRENT").read_text().strip()
    meta = json.loads((version / "meta.json").read_text())
    index_mib = (version / "index.faiss").stat().st_size / 2**20

    gap = PROBE_GAP * float(np.sqrt(2 - 2 * args.threshold))
    probing = Probing(args.nprobe, args.nprobe) if args.nprobe else Probing(meta["nprobe"], MAX_PROBES, gap)
    wall, rss, out = run_measured(
        [
            sys.executable,
            "-m",
            "pipeline",
            "-q",
            "duplicates",
            "--index",
            str(index_dir),
            "--threshold",
            str(args.threshold),
            "--json",
            "--no-progress",
        ]
        + (["--nprobe", str(args.nprobe)] if args.nprobe else [])
    )
    found = json.loads(out)
    group_of = {int(Path(img["path"]).stem): g["group"] for g in found for img in g["images"]}

    def is_recovered(ids: list[int]) -> bool:
        """All the planted group's images in one found group (which may hold more: a genuine neighbour)."""
        return len({group_of.get(i) for i in ids}) == 1 and ids[0] in group_of

    recovered = sum(map(is_recovered, planted))
    planted_in = [group_of[ids[0]] for ids in planted if ids[0] in group_of]
    merged = len(planted_in) - len(set(planted_in))
    extra = len({g["group"] for g in found} - set(planted_in))
    if args.verify:
        assert files is not None
        verified_run(args, index_dir, planted, files, wall, date, machine, recovered)
        return
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
    in_reach = [ids for ids, g in zip(planted, group_reached, strict=True) if g]
    recovered_in_reach = sum(map(is_recovered, in_reach))
    sample = ivf.reconstruct_batch(np.random.default_rng(1).choice(index.ntotal, 20_000, replace=False))
    probed = np.bincount(
        duplicates.probe_table(ivf, lambda s: sample[s], len(sample), probing)[0], minlength=len(sample)
    )
    res = {
        "n": args.n,
        "groups": args.groups,
        "factory": meta["factory"],
        "tuned_nprobe": meta["nprobe"],
        "threshold": args.threshold,
        "fixed_nprobe": args.nprobe,
        "probing": {
            "least": probing.least,
            "most": probing.most,
            "gap": probing.gap and round(probing.gap, 5),
            "probe_gap": PROBE_GAP,
            "lists_per_vector_mean": round(float(probed.mean()), 1),
            "p99": int(np.quantile(probed, 0.99)),
            "max": int(probed.max()),
        },
        "range_search_nprobe": range_nprobe,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(rss),
        "index_mib": round(index_mib),
        "rss_over_index": round(rss / index_mib, 3),
        "faiss_range_search_s_extrapolated": round(range_s),
        "planted_groups": len(planted),
        "recovered": recovered,
        "planted_groups_merged_together": merged,
        "planted_pair_recall_by_nprobe": pair_recall,
        "other_groups": extra,
        "groups_found": len(found),
        "planted_pairs_compared": round(float(reached.mean()), 5),
        "planted_groups_in_reach": len(in_reach),
        "recovered_in_reach": recovered_in_reach,
        "planted_pair_nprobe_needed_max": int(need.max()),
    }
    save(
        args.json,
        AREA,
        TITLE,
        key="planted",
        date=date,
        command=command_line(),
        host=machine,
        dim=DIM,
        setup=setup(res),
        figures=figures(res),
        result=res,
    )


def verified_run(
    args: argparse.Namespace,
    index_dir: Path,
    planted: list[list[int]],
    files: Path,
    plain_wall: float,
    date: str,
    machine: dict,
    plain_recovered: int,
) -> None:
    """`pipeline duplicates --verify` on the index plain `duplicates` just ran on: its wall time against that
    run's, what it checked (from its log) and which planted copies it joined to their original."""
    log = args.workdir / "verify.log"
    cmd = [sys.executable, "-m", "pipeline", "duplicates", "--index", str(index_dir), "--verify", "--json"]
    wall, rss, out = run_measured(cmd + ["--no-progress"], stderr=log)
    summary = r"(\d+) candidate pairs at cosine >= ([\d.]+), (\d+) verified \((\d+) not checked"
    said = re.search(summary, log.read_text())
    if said is None:
        sys.exit(f"no verification summary in {log}")
    candidates, floor, verified, unreadable = int(said[1]), float(said[2]), int(said[3]), int(said[4])
    found = json.loads(out)
    group_of = {int(Path(img["path"]).stem): g["group"] for g in found for img in g["images"]}
    made = json.loads((files / "planted.json").read_text())
    by_transform: dict[str, list[bool]] = {}
    transformed = []
    for ids in planted:
        for i in ids[1:]:
            joined = ids[0] in group_of and group_of.get(i) == group_of[ids[0]]
            for name in made.get(str(i), "identical").split("+"):
                by_transform.setdefault(name, []).append(joined)
            if str(i) in made:
                transformed.append(joined)
    planted_in = [group_of[ids[0]] for ids in planted if ids[0] in group_of]
    res = {
        "n": args.n,
        "groups": len(planted),
        "pictures": sorted(map(str, args.pictures)),
        "plain_wall_s": round(plain_wall, 1),
        "plain_recovered": plain_recovered,
        "verify_wall_s": round(wall, 1),
        "verify_peak_rss_mib": round(rss),
        "ratio": round(wall / plain_wall, 3),
        "floor": floor,
        "candidate_pairs": candidates,
        "verified_pairs": verified,
        "unreadable_pairs": unreadable,
        "checked_pairs": candidates - unreadable,
        "copies": len(transformed),
        "copies_joined": int(sum(transformed)),
        "joined_by_transformation": {k: [int(sum(v)), len(v)] for k, v in sorted(by_transform.items())},
        "planted_groups_merged_together": len(planted_in) - len(set(planted_in)),
    }
    figures_ = [
        figure(
            "wall time, `duplicates --verify` / plain `duplicates`, whole processes, same index",
            res["ratio"],
            "×",
            f"{res['verify_wall_s']} vs {res['plain_wall_s']} s",
            target="≤ 2",
            met=res["ratio"] <= 2,
        ),
        figure(
            "candidate pairs (each image's 10 nearest at cosine ≥ the floor)",
            candidates,
            "",
            f"floor {floor}; {res['checked_pairs']} checked from files, {unreadable} ended at once (no file: the "
            "synthetic images)",
        ),
        figure(
            "planted copies joined to their original's group",
            round(res["copies_joined"] / max(1, res["copies"]), 3),
            "",
            f"{res['copies_joined']} of {res['copies']} (byte-identical copies apart); "
            f"{res['planted_groups_merged_together']} planted groups merged together",
        ),
    ] + [
        figure(f"… copies made with {name}", round(ok / total, 3), "", f"{ok} of {total}")
        for name, (ok, total) in res["joined_by_transformation"].items()
        if name != "identical"
    ]
    save(
        args.json,
        AREA,
        TITLE,
        key="planted-verify",
        date=date,
        command=command_line(),
        host=machine,
        dim=DIM,
        setup=(
            f"`pipeline duplicates` then `pipeline duplicates --verify` (fresh processes, 2 verifying workers) on "
            f"{res['n']:,} synthetic {DIM}-d unit vectors (the benchmarks' set) with {res['groups']:,} planted groups "
            "of 2–8 as in the planted run, whose files are real: each group a picture "
            f"(from {', '.join(p.parent.name if p.name in ('images', 'db') else p.name for p in args.pictures)}) "
            "and copies made with two of the held-out sets' transformations each (scripts/eval/make_heldout.py); "
            "the synthetic images' paths name no file."
        ),
        figures=figures_,
        result=res,
    )


def setup(res: dict) -> str:
    pr = res["probing"]
    probing = (
        f"{res['fixed_nprobe']} lists per vector"
        if res.get("fixed_nprobe")
        else f"the lists within {pr['gap']} of its nearest centroid's score (PROBE_GAP {pr['probe_gap']} × "
        f"sqrt(2 − 2 × threshold)), at least the tuned {pr['least']}, at most {pr['most']}"
    )
    return (
        f"`pipeline duplicates` (a fresh process) on {res['n']:,} synthetic {DIM}-d unit vectors in real shards (the "
        f"benchmarks' set) with {res['planted_groups']:,} planted groups of 2–8: copies at cosine 0.82–0.97 to their "
        f"original, one group in ten with a byte-identical file; {res['factory']} (tuned nprobe "
        f"{res['tuned_nprobe']}), threshold {res['threshold']}, each vector probing {probing}."
    )


def figures(res: dict) -> list[dict]:
    pr = res["probing"]
    everyone = res["recovered"] == res["planted_groups"] and res["planted_groups_merged_together"] == 0
    return [
        figure(
            "planted groups recovered (none merged with another)",
            f"{res['recovered']} / {res['planted_groups']}",
            "",
            f"{res['planted_groups_merged_together']} merged; {res['other_groups']} other groups: background "
            "pairs above the threshold",
            target="all",
            met=everyone,
        ),
        figure("wall time, whole process", res["wall_s"], " s", target="≤ 600 s", met=res["wall_s"] <= 600),
        figure(
            "peak RSS / index size",
            res["rss_over_index"],
            "×",
            f"{res['peak_rss_mib']} MiB for a {res['index_mib']} MiB index",
            target="≤ 2",
            met=res["rss_over_index"] <= 2,
        ),
        figure("lists probed per vector", pr["lists_per_vector_mean"], "", f"p99 {pr['p99']}, max {pr['max']}"),
        figure(
            "planted copy-original pairs compared",
            res["planted_pairs_compared"],
            "",
            f"the largest fixed nprobe a pair needs: {res['planted_pair_nprobe_needed_max']}",
        ),
        figure(
            f"for comparison: faiss range search, every vector a query (nprobe {res['range_search_nprobe']})",
            res["faiss_range_search_s_extrapolated"],
            " s",
            "timed on 2,000 vectors, extrapolated",
        ),
    ]


if __name__ == "__main__":
    main()

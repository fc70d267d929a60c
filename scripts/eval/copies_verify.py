"""Measure the geometric check of copies (pipeline.copies) on a copy set like ../shared/eval/copies-dev.

Usage:
    pipeline extract SET/db SET/queries --out F            # the default model's features (for the top 20)
    python scripts/eval/copies_verify.py --set SET --features F [--choose] [--geometry similarity]
        [--no-query-pairs] [--json docs/benchmarks/quality/copies_verify.json]

Reports (a) search-style: each query's top 20 database pictures by exact cosine are verified; precision and
recall of the "verified" flag for true copies, overall and per transformation (named in the query's file name);
(b) pair-style, for duplicates: every (query, db) pair and every (query, query) pair, precision and recall of
verified pairs; (c) cost, single thread: ms per image for local features, ms per pair, p50 per query of verifying
its 20 candidates from cached features and from files, the cache's bytes per image, and the host's sgemm speed.
`--choose` calibrates the inlier threshold (the rule: the smallest threshold with search-flag precision >= 0.99
and pair precision >= 0.98, else the best search-flag F0.5); dev sets only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.copies import (  # noqa: E402
    INLIER_THRESHOLD,
    features_from_bytes,
    features_to_bytes,
    fit,
    local_features,
    verify_pair,
)
from pipeline.features import live_parts, read_shard  # noqa: E402

TOP = 20
THRESHOLDS = range(4, 151)


def sgemm_gflops() -> float:
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(3))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def global_vectors(features_dir: Path) -> dict[str, np.ndarray]:
    """file name -> the default model's vector, from a features folder."""
    parts = live_parts(features_dir).parts
    out = {}
    for info, rows in parts:
        data = read_shard(info.path)
        for r in rows:
            out[Path(data.paths[r]).name] = np.asarray(data.features[r], np.float32)
    return out


def transformations(name: str) -> list[str]:
    m = re.search(r"_([^_]+)\.[a-z]+$", name)
    return m.group(1).split("+") if m else []


def prf(verified: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp = int((verified & truth).sum())
    fp = int((verified & ~truth).sum())
    fn = int((~verified & truth).sum())
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f05 = 1.25 * p * r / (0.25 * p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f05": round(f05, 4), "tp": tp, "fp": fp, "fn": fn}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", type=Path, default=ROOT.parent / "shared" / "eval" / "copies-dev")
    ap.add_argument("--features", type=Path, required=True, help="features folder of SET/db and SET/queries")
    ap.add_argument("--choose", action="store_true", help="calibrate the inlier threshold (dev sets only)")
    ap.add_argument("--threshold", type=int, default=INLIER_THRESHOLD)
    ap.add_argument("--geometry", default="similarity", choices=["similarity", "affine", "homography"])
    ap.add_argument("--no-query-pairs", action="store_true", help="skip the (query, query) pairs")
    ap.add_argument("--search-only", action="store_true", help="verify only each query's top 20")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    if not (args.set / "groundtruth.json").exists():
        sys.exit(f"no copy set at {args.set} (groundtruth.json missing)")
    cv2.setNumThreads(1)
    gt = json.loads((args.set / "groundtruth.json").read_text())
    queries = [g["query"] for g in gt]
    origin = {g["query"]: g["positives"][0] for g in gt}
    db = sorted(p.name for p in (args.set / "db").iterdir())

    # local features, timed per image (read, decode, ORB; with the mirror for queries)
    t0 = time.perf_counter()
    feats, feat_ms, feat_mirror_ms = {}, [], []
    for name in db:
        t = time.perf_counter()
        feats[name] = local_features(args.set / "db" / name)
        feat_ms.append(1000 * (time.perf_counter() - t))
    for name in queries:
        t = time.perf_counter()
        feats[name] = local_features(args.set / "queries" / name, mirrored=True)
        feat_mirror_ms.append(1000 * (time.perf_counter() - t))
    unread = {n: f.reason for n, f in feats.items() if f.reason}
    print(f"local features of {len(feats)} pictures in {time.perf_counter() - t0:.1f} s; unreadable: {unread}")

    # inliers of every pair: the better of the query and its mirror (verify_pair's verdict at any threshold)
    def pair_inliers(q: str, c: str) -> int:
        """The inliers of the better fit (query or its mirror) that holds at any inlier count (spread over
        MIN_SPREAD of both pictures, colours kept: verify_pair's verdict at any inlier threshold); 0 when neither
        does."""
        fq, fc = feats[q], feats[c]
        if fq.reason or fc.reason:
            return 0
        fits = [fit(fq, fc, args.geometry)] + ([fit(fq.mirror, fc, args.geometry)] if fq.mirror else [])
        return max((f.inliers for f in fits if f.holds(0)), default=0)

    vecs = global_vectors(args.features)
    Q = np.stack([vecs[q] for q in queries])
    D = np.stack([vecs[d] for d in db])
    top = np.argsort(-(Q @ D.T), axis=1, kind="stable")[:, :TOP]
    t0 = time.perf_counter()
    if args.search_only:  # only each query's top 20 (the pair-style figures are then left out)
        qd = np.zeros((len(queries), len(db)), int)
        for i, q in enumerate(queries):
            qd[i, top[i]] = [pair_inliers(q, db[j]) for j in top[i]]
    else:
        qd = np.array([[pair_inliers(q, d) for d in db] for q in queries])
    qd_truth = np.array([[origin[q] == d for d in db] for q in queries])
    qq, qq_truth = [], []
    if not (args.no_query_pairs or args.search_only):
        for i, q1 in enumerate(queries):
            for q2 in queries[i + 1 :]:
                qq.append(pair_inliers(q1, q2))
                qq_truth.append(origin[q1] == origin[q2])
    pair_k = np.concatenate([qd.ravel(), np.array(qq, int)])
    pair_truth = np.concatenate([qd_truth.ravel(), np.array(qq_truth, bool)])
    print(f"{len(pair_k)} pairs in {time.perf_counter() - t0:.1f} s")

    # search-style: the top 20 by exact cosine of the default model
    s_k = np.take_along_axis(qd, top, 1)
    s_truth = np.take_along_axis(qd_truth, top, 1)
    in_top = s_truth.any(1)

    def search_scores(t: int) -> dict:
        return prf(s_k >= t, s_truth)

    def pair_scores(t: int) -> dict:
        return prf(pair_k >= t, pair_truth)

    chosen = args.threshold
    sweep = []
    if args.choose:
        for t in THRESHOLDS:
            sweep.append({"threshold": t, "search": search_scores(t), "pairs": pair_scores(t)})
        meets = [s for s in sweep if s["search"]["precision"] >= 0.99 and s["pairs"]["precision"] >= 0.98]
        if meets:
            chosen, how = meets[0]["threshold"], "smallest threshold with search precision >= 0.99, pairs >= 0.98"
        else:
            best = max(sweep, key=lambda s: (s["search"]["f05"], -s["threshold"]))
            chosen, how = best["threshold"], "no threshold meets both precisions: the best search-flag F0.5"
        print(f"chosen threshold {chosen} ({how})")
        for s in sweep:
            shown = (4, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150)
            if s["threshold"] in shown or s["threshold"] == chosen:
                print(f"  T={s['threshold']:3d} search {s['search']}  pairs {s['pairs']}")

    # per transformation: search-flag recall of the true copy (where it is in the top 20), pair recall
    per_t: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"search": [0, 0], "pairs": [0, 0]})
    for i, q in enumerate(queries):
        row = s_truth[i]
        for tr in transformations(q):
            if row.any():
                per_t[tr]["search"][0] += int(s_k[i][row][0] >= chosen)
                per_t[tr]["search"][1] += 1
            per_t[tr]["pairs"][0] += int(qd[i][qd_truth[i]][0] >= chosen)
            per_t[tr]["pairs"][1] += 1
    for i, q1 in enumerate(queries):  # (query, query) pairs count for both queries' transformations
        for j in range(i + 1, len(queries)):
            if origin[q1] == origin[queries[j]] and not (args.no_query_pairs or args.search_only):
                k = pair_inliers(q1, queries[j])
                for tr in set(transformations(q1)) | set(transformations(queries[j])):
                    per_t[tr]["pairs"][0] += int(k >= chosen)
                    per_t[tr]["pairs"][1] += 1
    by_transformation = {
        tr: {
            "search_recall": round(v["search"][0] / max(v["search"][1], 1), 3),
            "search_n": v["search"][1],
            "pair_recall": round(v["pairs"][0] / max(v["pairs"][1], 1), 3),
            "pair_n": v["pairs"][1],
        }
        for tr, v in sorted(per_t.items())
    }

    # cost, single thread: verify_pair as it runs (mirror only where the query itself falls short)
    pair_ms = []
    for i, q in enumerate(queries[:60]):
        for j in top[i]:
            t = time.perf_counter()
            verify_pair(feats[q], feats[db[j]], chosen)
            pair_ms.append(1000 * (time.perf_counter() - t))
    cached = {n: features_to_bytes(feats[n]) for n in db}
    cache_bytes = [len(b) for b in cached.values()]
    per_query_cached, per_query_files = [], []
    for i, q in enumerate(queries[:40]):
        t = time.perf_counter()
        fq = local_features(args.set / "queries" / q, mirrored=True)
        for j in top[i]:
            verify_pair(fq, features_from_bytes(cached[db[j]]), chosen)
        per_query_cached.append(1000 * (time.perf_counter() - t))
        t = time.perf_counter()
        fq = local_features(args.set / "queries" / q, mirrored=True)
        for j in top[i]:
            verify_pair(fq, local_features(args.set / "db" / db[j]), chosen)
        per_query_files.append(1000 * (time.perf_counter() - t))
    from_bytes_ms = 1000 * min(_timed(lambda: [features_from_bytes(b) for b in cached.values()]) for _ in range(3))

    result = {
        "label": args.label,
        "set": str(args.set.name),
        "config": {
            "features": "ORB, long side 480 px, 1000 features, FAST threshold 5",
            "matching": "ratio 0.8 and mutual nearest (Hamming)",
            "geometry": args.geometry,
            "threshold": chosen,
            "top": TOP,
            "ranking": "exact cosine of the default model (features folder " + args.features.name + ")",
        },
        "queries": len(queries),
        "db": len(db),
        "unreadable": unread,
        "search": {**search_scores(chosen), "true_copy_in_top20": round(float(in_top.mean()), 4)},
        "pairs": None
        if args.search_only
        else {
            **pair_scores(chosen),
            "pairs": len(pair_k),
            "true_pairs": int(pair_truth.sum()),
            "query_db_only": prf(qd.ravel() >= chosen, qd_truth.ravel()),
        },
        "by_transformation": by_transformation,
        "cost_ms": {
            "features_per_image_p50": round(float(np.median(feat_ms)), 2),
            "features_with_mirror_per_query_p50": round(float(np.median(feat_mirror_ms)), 2),
            "verify_pair_p50": round(float(np.median(pair_ms)), 3),
            "verify_pair_p90": round(float(np.percentile(pair_ms, 90)), 3),
            "query_top20_cached_p50": round(float(np.median(per_query_cached)), 1),
            "query_top20_from_files_p50": round(float(np.median(per_query_files)), 1),
            "features_from_bytes_per_image": round(from_bytes_ms / len(cached), 4),
            "threads": "cv2.setNumThreads(1)",
        },
        "cache_bytes_per_image": {
            "mean": round(float(np.mean(cache_bytes)), 0),
            "max": int(np.max(cache_bytes)),
            "keypoints_mean": round(float(np.mean([len(feats[n]) for n in db])), 1),
        },
        "host_sgemm_gflops": round(sgemm_gflops(), 1),
        "opencv": cv2.__version__,
    }
    if sweep:
        result["sweep"] = [s for s in sweep if s["threshold"] <= 60 or s["threshold"] % 10 == 0]
    print(json.dumps({k: v for k, v in result.items() if k != "sweep"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(args.json.read_text()) if args.json.exists() else {}
        old[args.label or args.set.name] = result
        args.json.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()

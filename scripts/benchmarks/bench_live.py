"""Benchmark live additions: inserts over HTTP, the time until another searcher finds them, search at 1M with
10,000 additions not yet folded, and the nightly fold-in of those additions against an index update.

Usage (one benchmark at a time on the machine):
  python scripts/benchmarks/bench_live.py [--parts http,search,fold] [--seconds 60] [--reuse] [--keep]

Parts (each saved as its own run of docs/benchmarks/results/live.json, --json):
 http    The sample collection (samples/gallery, indexed by `pipeline rebuild` with the real model) served by a
         real `pipeline serve --writable` process. In --rounds alternating rounds: the bare model (FeatureModel in
         this process, the server idle) embeds a round of new, distinct JPEGs (random crops, colour shifts,
         sizes and qualities of the sample originals) in batches of 8 for --seconds/--rounds of model time; then 8
         clients POST that same round to /api/images (multipart, the API key), as fast as it answers.
         1. additions/s over HTTP against the bare model's images/s at batch 8 on the same images;
         2. from each 201 until a separate Searcher in this process (its own journal connection; the writer
            is the server process) finds the new id in the top 10 of a vector search with the image's own
            feature (the bare model's): polled every 2 ms while an addition is pending; p50 and p99.
 search  The benchmarks' synthetic 1M set (--cache, 1024-d, float16 shards: bench_scale.py makes it) hard-linked
         into a work folder, a catalog imported, the default IVF-Flat index built (or reused: --reuse). Single-
         query latency (Searcher.search_vectors, one query at a time, held-out draws from the set's clusters as
         bench_filters.py draws them) and recall@10 against exact search, before and after 10,000 additions
         (other draws from the same clusters, through ingest.Collection.add: files stored, journal rows; no
         model), which the searcher finds in its live part (an IVF-Flat on the version's quantizer).
         3. p50 with / p50 without; recall@10 with (exact over version + additions) against without.
 fold    4. The nightly fold-in of those 10,000 additions (features.fold_live, then build_index(update=True):
         what `pipeline rebuild` runs, no model) against an index update of 10,000 new files (the same vectors
         written as a new shard into a copy of the features folder, imported, then build_index(update=True)),
         each from its own hard-linked copy of the published version. (fold runs the additions of search.)
Targets: (1) >= 0.85 x the bare model; (2) p99 <= 1 s; (3) p50 ratio <= 1.2 and recall@10 the same (>= without
- 0.005); (4) fold-in / update <= 1.0. The shared features cache is never written: shards are hard links, the
catalog a copy; the work folder is deleted at the end (--keep: the built 1M index is kept for --reuse).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import queue
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import (  # noqa: E402
    DIM,
    add_json_option,
    command_line,
    figure,
    host,
    make_shards,
    now,
    save,
    sgemm_gflops,
    wait_healthy,
)
from pipeline.features import CATALOG_FILE, Catalog, fold_live, list_shards, read_shard  # noqa: E402
from pipeline.images import decode_bytes  # noqa: E402
from pipeline.index import build_index  # noqa: E402
from pipeline.ingest import Collection  # noqa: E402
from pipeline.model import FeatureModel, export_model, read_model_info  # noqa: E402
from pipeline.search import Searcher  # noqa: E402
from pipeline.synthetic import clustered, model_info, write_shards  # noqa: E402

AREA, TITLE = "live", "Live additions"
PARTS = ("http", "search", "fold")
CLIENTS = 8
BATCH = 8
SAMPLES = ROOT / "samples"
SEED, SHARD = 0, 50_000  # the benchmarks' synthetic set (benchlib.make_shards), as bench_filters.py reads it
ADDITIONS = 10_000
K = 10
POLL_S = 0.002  # the searcher's pause between searches while an addition is not found yet
GIVE_UP_S = 30.0  # an addition not found by then counts as never found


# ---------------------------------------------------------------------------------------------- http


def originals() -> list[Image.Image]:
    """The sample originals (RGB), the sources of the new images."""
    out = []
    for p in sorted((SAMPLES / "gallery").glob("*.jpg")):
        if "_" not in p.stem:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
    return out


def new_jpeg(sources: list[Image.Image], seed: int) -> bytes:
    """A new picture: a random crop (the source's aspect kept, 60-95% of each side), colour and brightness
    shifted, resized to 50-100%, saved at a random JPEG quality. Distinct seeds give distinct bytes."""
    rng = np.random.default_rng(seed)
    im = sources[int(rng.integers(len(sources)))]
    w, h = im.size
    f = rng.uniform(0.6, 0.95)
    cw, ch = int(w * f), int(h * f)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = im.crop((x, y, x + cw, y + ch))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))
    s = rng.uniform(0.5, 1.0)
    out = out.resize((max(64, int(cw * s)), max(64, int(ch * s))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue()


class Images:
    """Distinct new JPEGs, numbered; every one checked unique (its bytes never seen before)."""

    def __init__(self) -> None:
        self.sources, self.next, self.seen = originals(), 0, set()

    def take(self, n: int) -> list[bytes]:
        out = []
        while len(out) < n:
            data = new_jpeg(self.sources, 10_000 + self.next)
            self.next += 1
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if digest not in self.seen:
                self.seen.add(digest)
                out.append(data)
        return out


class Bare:
    """The model alone in this process, as the server runs it: images decoded at the model's input shapes,
    embedded in batches of up to BATCH images of one shape (FeatureModel.embed_each, as the server's batcher)."""

    def __init__(self, model_path: Path) -> None:
        self.model = FeatureModel(model_path)
        sample = [decode_bytes(new_jpeg(originals(), seed), self.model.info.resize_to) for seed in range(32)]
        for shape in {px.shape for px in sample}:  # each input shape the new images take, once at full batch
            self.model.embed(np.stack([px for px in sample if px.shape == shape][:1] * BATCH))

    def round(self, images: Images, model_s: float, chunk: int = 32) -> tuple[list[bytes], np.ndarray, float]:
        """New images embedded until `model_s` seconds of model time: their bytes, features and the model time
        (generating and decoding them is not counted)."""
        datas: list[bytes] = []
        feats: list[np.ndarray] = []
        spent = 0.0
        while spent < model_s:
            batch = images.take(chunk)
            pixels = [decode_bytes(d, self.model.info.resize_to) for d in batch]
            t = time.perf_counter()
            feats.append(self.model.embed_each(pixels, BATCH))
            spent += time.perf_counter() - t
            datas += batch
        return datas, np.concatenate(feats), spent


class Poller(threading.Thread):
    """The other searcher: a Searcher of the served index in this process (its own journal connection), told of
    each 201 and polling search_vectors with the image's feature until the new id is in the top K."""

    def __init__(self, index_dir: Path) -> None:
        super().__init__(name="poller", daemon=True)
        self.searcher = Searcher(index_dir)
        self.inbox: queue.Queue[tuple[int, np.ndarray, float]] = queue.Queue()
        self.stop = threading.Event()
        self.delays: list[float] = []  # seconds from a 201 until a search that had found it returned
        self.waits: list[float] = []  # of which, until the search that found it started
        self.tries: list[int] = []  # searches each took (1: the first search after its 201)
        self.missed: list[int] = []
        self.searches = 0
        self.error: BaseException | None = None

    def watch(self, idx: int, feature: np.ndarray, t201: float) -> None:
        self.inbox.put((idx, feature, t201))

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _run(self) -> None:
        pending: dict[int, list] = {}  # id -> [feature, t201, tries]
        while True:
            if not pending:
                try:
                    idx, feat, t201 = self.inbox.get(timeout=0.05)
                except queue.Empty:
                    if self.stop.is_set():
                        return
                    continue
                pending[idx] = [feat, t201, 0]
            while True:
                try:
                    idx, feat, t201 = self.inbox.get_nowait()
                except queue.Empty:
                    break
                pending[idx] = [feat, t201, 0]
            ids = list(pending)
            t_start = time.perf_counter()
            hits = self.searcher.search_vectors(np.stack([pending[i][0] for i in ids]), K)
            t = time.perf_counter()
            self.searches += 1
            for idx, found in zip(ids, hits, strict=True):
                pending[idx][2] += 1
                if any(h.id == idx for h in found):
                    _, t201, tries = pending.pop(idx)
                    self.delays.append(t - t201)
                    self.waits.append(t_start - t201)
                    self.tries.append(tries)
                elif t - pending[idx][1] > GIVE_UP_S:
                    pending.pop(idx)
                    self.missed.append(idx)
            if pending:
                time.sleep(POLL_S)


def post_all(url: str, key: str, datas: list[bytes], feats: np.ndarray | None, poller: Poller | None) -> dict:
    """CLIENTS clients POST every image of `datas` (each taken once from a shared queue); returns the count,
    seconds (first request to last answer), latencies and statuses."""
    work: queue.Queue[int] = queue.Queue()
    for i in range(len(datas)):
        work.put(i)
    out: list[tuple[float, int | str]] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"X-API-Key": key}) as http:
            while True:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                t = time.perf_counter()
                status: int | str
                try:
                    r = http.post("/api/images", files={"image": (f"new{i}.jpg", datas[i], "image/jpeg")})
                    t201 = time.perf_counter()
                    status = r.status_code
                    if status == 201 and poller is not None and feats is not None:
                        poller.watch(int(r.json()["id"]), feats[i], t201)
                except httpx.HTTPError as exc:
                    t201, status = time.perf_counter(), type(exc).__name__
                out.append((t201 - t, status))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"n": len(datas), "seconds": time.perf_counter() - t0, "results": out}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, float), q))


def part_http(args: argparse.Namespace) -> dict:
    res: dict = {}
    if not args.model.is_file():
        export_model(args.model)
    info = read_model_info(args.model)
    res["model"], res["dim"] = info.short(), info.dim
    work = args.workdir / "http"
    shutil.rmtree(work, ignore_errors=True)
    photos = work / "photos"
    shutil.copytree(SAMPLES / "gallery", photos)
    log = open(work / "log.txt", "a")
    key = secrets.token_hex(16)
    (work / "api-key").write_text(key + "\n")
    pipeline = [sys.executable, "-m", "pipeline", "-q"]
    t = time.perf_counter()
    subprocess.run(
        [*pipeline, "rebuild", str(photos), "--workdir", str(work), "--model", str(args.model)], check=True, stderr=log
    )
    res["rebuild_s"] = round(time.perf_counter() - t, 1)
    res["gallery_images"] = len(list(photos.glob("*.jpg")))
    bare, images = Bare(args.model), Images()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            *pipeline,
            "serve",
            "--workdir",
            str(work),
            "--writable",
            "--api-key-file",
            str(work / "api-key"),
            "--model",
            str(args.model),
            "--port",
            str(port),
            "--batch-size",
            str(BATCH),
        ],
        stderr=log,
    )
    poller = None
    try:
        wait_healthy(url, server)
        warm = post_all(url, key, images.take(2 * CLIENTS), None, None)  # the server's first batches, not counted
        assert all(s == 201 for _, s in warm["results"]), f"warm-up additions failed: {warm['results']}"
        poller = Poller(work / "index")
        poller.start()
        stats0 = httpx.get(f"{url}/api/stats", headers={"X-API-Key": key}).json()
        rounds = []
        for r in range(args.rounds):
            datas, feats, model_s = bare.round(images, args.seconds / args.rounds)
            posted = post_all(url, key, datas, feats, poller)
            rounds.append({"images": len(datas), "bare_s": model_s, "http_s": posted["seconds"], **posted})
            print(
                f"round {r + 1}: {len(datas)} images; bare {len(datas) / model_s:.2f} img/s, "
                f"HTTP {len(datas) / posted['seconds']:.2f} additions/s",
                flush=True,
            )
        poller.stop.set()
        poller.join(GIVE_UP_S + 10)
        assert poller.error is None, f"the searcher failed: {poller.error!r}"
        stats1 = httpx.get(f"{url}/api/stats", headers={"X-API-Key": key}).json()
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    results = [x for r in rounds for x in r["results"]]
    n = sum(r["images"] for r in rounds)
    bare_rate = n / sum(r["bare_s"] for r in rounds)
    http_rate = n / sum(r["http_s"] for r in rounds)
    lat = [x[0] for x in results]
    statuses: dict[str, int] = {}
    for _, s in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    res["insert"] = {
        "images": n,
        "rounds": [
            {"images": r["images"], "bare_s": round(r["bare_s"], 2), "http_s": round(r["http_s"], 2)} for r in rounds
        ],
        "bare_img_per_s": round(bare_rate, 2),
        "http_additions_per_s": round(http_rate, 2),
        "ratio_to_bare": round(http_rate / bare_rate, 3),
        "statuses": statuses,
        "created": statuses.get("201", 0),
        "post_p50_ms": round(pct(lat, 50) * 1000, 1),
        "post_p99_ms": round(pct(lat, 99) * 1000, 1),
        "server_mean_batch": round(
            (stats1["images_embedded"] - stats0["images_embedded"]) / max(1, stats1["batches"] - stats0["batches"]), 2
        ),
        "server_live": stats1["live"],
    }
    assert poller is not None
    d = np.array(poller.delays) * 1000
    res["findable"] = {
        "found": len(poller.delays),
        "missed": len(poller.missed),
        "p50_ms": round(pct(d, 50), 2) if len(d) else None,
        "p99_ms": round(pct(d, 99), 2) if len(d) else None,
        "max_ms": round(float(d.max()), 2) if len(d) else None,
        "until_the_finding_search_started_p50_ms": round(pct(np.array(poller.waits) * 1000, 50), 2) if len(d) else None,
        "first_search": sum(t == 1 for t in poller.tries),
        "searches": poller.searches,
        "searcher_live_additions": len(poller.searcher.live) if poller.searcher.live is not None else 0,
    }
    print(res["insert"], res["findable"], sep="\n", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return res


def http_figures(res: dict) -> list[dict]:
    ins, fnd = res["insert"], res["findable"]
    slow = fnd["p99_ms"] if fnd["p99_ms"] is not None else float("inf")
    return [
        figure(
            f"additions over HTTP, {CLIENTS} clients / the bare model at batch {BATCH}",
            ins["ratio_to_bare"],
            "×",
            f"{ins['http_additions_per_s']} vs {ins['bare_img_per_s']} img/s on the same {ins['images']} new images; "
            f"{ins['created']} answered 201; POST p50 {ins['post_p50_ms']} ms, p99 {ins['post_p99_ms']} ms; "
            f"server's mean batch {ins['server_mean_batch']}",
            target="≥ 0.85",
            met=ins["ratio_to_bare"] >= 0.85 and ins["created"] == ins["images"],
        ),
        figure(
            "201 until another searcher finds the addition (top 10), p50",
            fnd["p50_ms"],
            " ms",
            f"{fnd['found']} of {ins['created']} found, {fnd['first_search']} by the first search after the 201",
        ),
        figure(
            "201 until another searcher finds the addition (top 10), p99",
            fnd["p99_ms"],
            " ms",
            f"slowest {fnd['max_ms']} ms; {fnd['missed']} never found (within {GIVE_UP_S:g} s)",
            target="≤ 1 s",
            met=slow <= 1000 and fnd["missed"] == 0 and fnd["found"] == ins["created"],
        ),
    ]


def http_setup(res: dict) -> str:
    rounds = ", ".join(str(r["images"]) for r in res["insert"]["rounds"])
    return (
        f"A `pipeline serve --writable` process (--batch-size {BATCH}, model {res['model']}) over the sample "
        f"collection (samples/gallery, {res['gallery_images']} images, indexed by `pipeline rebuild`), clients in "
        f"the benchmark process on the same cores. Alternating rounds ({rounds} images): the bare model in "
        "this process (the server idle) embeds a round of new, distinct JPEGs (random crops of the sample "
        "originals, their aspect kept, colour, brightness, size and JPEG quality varied) in batches of up to "
        f"{BATCH} of one shape, decoding not counted; then {CLIENTS} clients POST that round to /api/images (one "
        "connection each; 16 warm-up additions before). Findable: a Searcher of the served index in the benchmark "
        "process (its own journal connection; the writer is the server process), told of each 201 at once, "
        f"searches the image's bare-model feature (top {K}) every {POLL_S * 1000:g} ms until the new id is in it; "
        "the time is taken when that search returns."
    )


# ---------------------------------------------------------------------------------------------- 1M


def link_tree(src: Path, dst: Path) -> None:
    """A copy of `src` whose large files (a published version's, never changed once published) are hard links;
    files under 1 MiB (CURRENT, meta, locks) are copied."""
    for folder, _dirs, files in os.walk(src):
        out = dst / Path(folder).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            path = Path(folder) / name
            if path.stat().st_size >= 1 << 20:
                os.link(path, out / name)
            else:
                shutil.copy2(path, out / name)


def copy_catalog(src: Path, dst: Path) -> None:
    """catalog.sqlite copied whole (SQLite's backup: the WAL's pages included)."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def features_copy(cache: Path, catalog: Path, dst: Path, shards: int) -> None:
    """A features folder: the cache's first `shards` shards hard-linked, the catalog copied."""
    dst.mkdir(parents=True)
    for shard in list_shards(cache)[:shards]:
        os.link(shard, dst / shard.name)
    copy_catalog(catalog, dst / CATALOG_FILE)


def all_vectors(features: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every live vector (float16, as the shards hold them) and its catalog id, in shard order."""
    with Catalog(features) as c:
        live = c.live_ids()
    vectors, ids = [], []
    for shard in list_shards(features):
        rows, shard_ids = live[shard.name]
        vectors.append(read_shard(shard).features[rows])
        ids.append(shard_ids)
    return np.concatenate(vectors), np.concatenate(ids)


def exact_top(x: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the exact top k of each query among the rows of x (any float type), best first."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(x), 100_000):
        s = queries @ x[start : start + 100_000].astype(np.float32).T
        top = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        best_i = np.concatenate([best_i, ids[start : start + 100_000][top]], 1)
        keep = np.argsort(-best_s, 1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_s, best_i


def measure(searcher: Searcher, queries: np.ndarray) -> tuple[np.ndarray, list[set[int]]]:
    """Single-query times (ms) and the ids found, one query at a time (after 50 warm-up queries)."""
    for q in queries[:50]:
        searcher.search_vectors(q[None], K)
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = searcher.search_vectors(q[None], K)[0]
        times.append((time.perf_counter() - t) * 1000)
        found.append({h.id for h in hits})
    return np.array(times), found


def recall(found: list[set[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(f & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


def tiny_png(i: int) -> bytes:
    """A distinct 4x4 PNG for addition i (the 1M additions' files: stored and recorded, never decoded)."""
    px = np.frombuffer(hashlib.blake2b(i.to_bytes(8, "little"), digest_size=48).digest(), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px.reshape(4, 4, 3), "RGB").save(buf, "PNG")
    return buf.getvalue()


def page_in(paths: list[Path]) -> None:
    """Read files through the page cache (so neither fold-in nor update pays a cold read the other did not)."""
    buf = bytearray(8 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def clear_but(work: Path, keep: Path) -> None:
    """Delete everything in `work` but `keep`."""
    for p in work.iterdir():
        if p == keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def part_1m(args: argparse.Namespace, parts: set[str]) -> dict:
    work = args.workdir / "1m"
    base, features = work / "base", work / "features"
    reuse = args.reuse and (base / "index" / "CURRENT").is_file() and (base / CATALOG_FILE).is_file()
    if reuse:
        clear_but(work, base)
    else:
        shutil.rmtree(work, ignore_errors=True)
    centres = make_shards(args.cache, args.n, SHARD, SEED)
    shards = args.n // SHARD
    res: dict = {"n": args.n, "reused_index": reuse}
    if reuse:
        features_copy(args.cache, base / CATALOG_FILE, features, shards)
    else:
        features.mkdir(parents=True)
        for shard in list_shards(args.cache)[:shards]:
            os.link(shard, features / shard.name)
        with Catalog(features) as c:
            c.reconcile()
        base.mkdir(parents=True)
        copy_catalog(features / CATALOG_FILE, base / CATALOG_FILE)
        t = time.perf_counter()
        build_index(features, base / "index", progress=False)
        res["build_s"] = round(time.perf_counter() - t, 1)
        print(f"built the 1M index in {res['build_s']} s", flush=True)
    searcher = Searcher(base / "index")
    meta = searcher.meta
    res["index"] = {k: meta.get(k) for k in ("factory", "nprobe", "count", "recall_at_10", "build_seconds")}
    assert Path(meta["features_dir"]) == features.resolve(), f"the index reads {meta['features_dir']}"
    add_vectors = clustered(ADDITIONS, centres, np.random.default_rng(303))

    if "search" in parts:
        searcher.warm()
        queries = clustered(args.queries, centres, np.random.default_rng(202))
        x, ids = all_vectors(features)
        t = time.perf_counter()
        truth_s, truth_i = exact_top(x, ids, queries)
        res["truth_s"] = round(time.perf_counter() - t, 1)
        del x
        times0, found0 = measure(searcher, queries)
        print(f"without additions: p50 {pct(times0, 50):.2f} ms, recall@10 {recall(found0, truth_i):.4f}", flush=True)
    t = time.perf_counter()
    with Collection(work, meta["model"]["checksum"], int(meta["dim"])) as collection:
        added_ids = np.array([collection.add(tiny_png(i), add_vectors[i]).id for i in range(ADDITIONS)], np.int64)
    add_s = time.perf_counter() - t
    res["additions"] = {"count": ADDITIONS, "seconds": round(add_s, 1), "per_s": round(ADDITIONS / add_s, 1)}
    print(f"{ADDITIONS} additions through ingest.Collection.add in {add_s:.1f} s", flush=True)

    if "search" in parts:
        t = time.perf_counter()
        searcher.search_vectors(queries[:1], K)  # reads the 10,000 additions from the journal into its live part
        first_ms = (time.perf_counter() - t) * 1000
        assert searcher.live is not None and len(searcher.live) == ADDITIONS, "the live part lacks additions"
        times1, found1 = measure(searcher, queries)
        # exact over the version and the additions, as the journal holds them (float16)
        add_s16 = add_vectors.astype(np.float16)
        a_s, a_i = exact_top(add_s16, added_ids, queries)
        both_s, both_i = np.concatenate([truth_s, a_s], 1), np.concatenate([truth_i, a_i], 1)
        keep = np.argsort(-both_s, 1)[:, :K]
        truth1 = np.take_along_axis(both_i, keep, 1)
        is_added = np.isin(truth1, added_ids)
        found_added = sum(len(f & set(t[m].tolist())) for f, t, m in zip(found1, truth1, is_added, strict=True))
        res["search"] = {
            "queries": len(queries),
            "nprobe": searcher.nprobe,
            "without": {
                "p50_ms": round(pct(times0, 50), 3),
                "p99_ms": round(pct(times0, 99), 3),
                "recall_at_10": round(recall(found0, truth_i), 4),
            },
            "with": {
                "p50_ms": round(pct(times1, 50), 3),
                "p99_ms": round(pct(times1, 99), 3),
                "recall_at_10": round(recall(found1, truth1), 4),
                "first_search_ms": round(first_ms, 1),
                "truth_neighbours_added": int(is_added.sum()),
                "of_them_found": int(found_added),
            },
        }
        s = res["search"]
        s["p50_ratio"] = round(s["with"]["p50_ms"] / s["without"]["p50_ms"], 3)
        print(res["search"], flush=True)
    del searcher

    if "fold" in parts:
        res["fold"] = fold_against_update(work, base, features, args, add_vectors, shards)
        print(res["fold"], flush=True)
    if args.keep:
        clear_but(work, base)
    else:
        shutil.rmtree(work)
    return res


def fold_against_update(
    work: Path, base: Path, features: Path, args: argparse.Namespace, vectors: np.ndarray, shards: int
) -> dict:
    """The nightly fold-in of the journal's additions (fold_live + an index update, as `pipeline rebuild` runs
    them) against an index update of as many new files (a new shard of the same vectors, imported), each
    from a hard-linked copy of the published version: files, fold-in, files again (the baseline is their mean,
    so that a drift of the shared machine's speed weighs on both sides)."""
    out: dict = {"files": []}
    version = (base / "index" / "CURRENT").read_text().strip()
    hot = [p for p in (base / "index").rglob("*") if p.is_file()] + list_shards(features)

    def files_update(n: int) -> dict:
        files, index = work / f"features-files{n}", work / f"index-files{n}"
        features_copy(args.cache, base / CATALOG_FILE, files, shards)
        link_tree(base / "index", index)
        os.sync()
        page_in(hot)
        t0 = time.perf_counter()
        write_shards(files, vectors, model_info(DIM), path_format="/synthetic/new-{:08d}.jpg")
        with Catalog(files) as c:
            c.reconcile()
        t1 = time.perf_counter()
        meta = build_index(files, index, update=True, progress=False).meta
        t2 = time.perf_counter()
        check_update(meta, args.n)
        shutil.rmtree(files)
        shutil.rmtree(index)
        return {"shard_s": round(t1 - t0, 2), "update_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2), **made(meta)}

    out["files"].append(files_update(1))
    print(f"files update: {out['files'][-1]}", flush=True)

    fold_index = work / "index-fold"
    link_tree(base / "index", fold_index)
    os.sync()
    page_in(hot)
    t0 = time.perf_counter()
    report = fold_live(features)
    t1 = time.perf_counter()
    meta = build_index(features, fold_index, update=True, progress=False).meta
    t2 = time.perf_counter()
    check_update(meta, args.n)
    assert report.folded == ADDITIONS, report
    out["fold"] = {
        "fold_s": round(t1 - t0, 2),
        "update_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2),
        **made(meta),
        "report": report.to_dict(),
    }
    print(f"fold-in: {out['fold']}", flush=True)

    out["files"].append(files_update(2))
    print(f"files update: {out['files'][-1]}", flush=True)

    # the folded version holds the additions under their journal ids, and its searcher has no live part left
    folded = Searcher(fold_index)
    probe = vectors[:200]
    hits = folded.search_vectors(probe, 1)
    with Collection(work, folded.meta["model"]["checksum"], DIM) as collection:
        want = [collection.journal.find(hashlib.blake2b(tiny_png(i), digest_size=16).hexdigest()) for i in range(200)]
    out["check"] = {
        "from_version": version,
        "top1_is_the_addition": sum(h[0].id == w[0] for h, w in zip(hits, want, strict=True) if w and h),
        "of": len(probe),
        "live_left": 0 if folded.live is None else len(folded.live),
    }
    mean = {k: round(float(np.mean([f[k] for f in out["files"]])), 2) for k in ("shard_s", "update_s", "total_s")}
    out["files_mean"] = mean
    out["ratio"] = round(out["fold"]["total_s"] / mean["total_s"], 3)
    out["ratio_update_only"] = round(out["fold"]["update_s"] / mean["update_s"], 3)
    return out


def check_update(meta: dict, n: int) -> None:
    assert meta["made_by"] == "update" and meta["count"] == n + ADDITIONS, f"not the update expected: {meta}"


def made(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("version", "nprobe", "recall_at_10")}


def search_figures(res: dict) -> list[dict]:
    s = res["search"]
    w0, w1 = s["without"], s["with"]
    return [
        figure(
            f"search p50 with {ADDITIONS:,} live additions / without",
            s["p50_ratio"],
            "×",
            f"{w1['p50_ms']} vs {w0['p50_ms']} ms (p99 {w1['p99_ms']} vs {w0['p99_ms']} ms); nprobe {s['nprobe']}, "
            f"{s['queries']} single queries",
            target="≤ 1.2",
            met=s["p50_ratio"] <= 1.2,
        ),
        figure(
            "recall@10 without additions (exact: the version)",
            w0["recall_at_10"],
            "",
            f"nprobe {s['nprobe']}",
        ),
        figure(
            f"recall@10 with {ADDITIONS:,} live additions (exact: version + additions)",
            w1["recall_at_10"],
            "",
            f"{w1['truth_neighbours_added']} of the exact neighbours are additions, {w1['of_them_found']} of them "
            f"found; the first search after the additions (reading them) {w1['first_search_ms']} ms",
            target="≥ without − 0.005",
            met=w1["recall_at_10"] >= w0["recall_at_10"] - 0.005,
        ),
        figure(
            f"{ADDITIONS:,} additions through ingest.Collection.add (no model)",
            res["additions"]["per_s"],
            "/s",
            f"{res['additions']['seconds']} s: each file and journal row durable",
        ),
    ]


def fold_figures(res: dict) -> list[dict]:
    f = res["fold"]
    return [
        figure(
            f"nightly fold-in of {ADDITIONS:,} additions / an index update of {ADDITIONS:,} new files",
            f["ratio"],
            "×",
            f"fold_live {f['fold']['fold_s']} s + update {f['fold']['update_s']} s vs new shard "
            f"{f['files_mean']['shard_s']} s + update {f['files_mean']['update_s']} s (the mean of "
            f"{' and '.join(str(x['total_s']) for x in f['files'])} s, before and after); after the fold, "
            f"{f['check']['top1_is_the_addition']} of {f['check']['of']} additions are their own top hit "
            f"under their journal ids; the update step alone {f['ratio_update_only']}×",
            target="≤ 1.0",
            met=f["ratio"] <= 1.0,
        ),
    ]


def setup_1m(res: dict, what: str) -> str:
    idx = res["index"]
    built = "reused (--reuse)" if res["reused_index"] else f"built in {res.get('build_s')} s"
    common = (
        f"{res['n']:,} synthetic {DIM}-d vectors (the benchmarks' clustered set, float16 shards, hard-linked into a "
        f"work folder with a copy of its catalog) in the default index ({idx['factory']}, nprobe {idx['nprobe']}; "
        f"{built}); {ADDITIONS:,} additions, other draws from the same clusters, through ingest.Collection.add "
        "(a 4x4 PNG file each, feature given: no model; the journal features/live.sqlite). "
    )
    if what == "search":
        return common + (
            f"One Searcher, {res['search']['queries']} held-out queries (draws from the same clusters), one at a time "
            "(50 warm-up queries before each pass), before and after the additions (found in its live part: an "
            "IVF-Flat on the version's quantizer, probed with the version's nprobe); recall@10 against exact search "
            "over the version, then over the version and the additions."
        )
    return common + (
        "Each from its own hard-linked copy of the published version, files and index read into the page cache "
        "first: an index update (build_index(update=True)) after the same 10,000 vectors were written as a new "
        "shard into a copy of the features folder and imported; then the fold-in as `pipeline rebuild` runs it "
        "(features.fold_live: the journal into a shard and the catalog, then build_index(update=True)); then the "
        "files update again: its baseline is the mean of the two."
    )


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--seconds", type=float, default=60.0, help="http: the bare model's time over all rounds")
    ap.add_argument("--rounds", type=int, default=6, help="http: alternating rounds of the bare model and HTTP")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "vgg16.onnx", help="exported when missing")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-output" / "scale" / "features-1m")
    ap.add_argument("--queries", type=int, default=1000, help="search: single queries per pass (at least 500)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-output" / "live-bench")
    ap.add_argument("--reuse", action="store_true", help="reuse the 1M index a run with --keep left")
    ap.add_argument("--keep", action="store_true", help="keep the built 1M index (about 4 GB) for --reuse")
    add_json_option(ap, AREA)
    args = ap.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= set(PARTS) or not parts:
        ap.error(f"--parts: some of {', '.join(PARTS)}")
    if args.queries < 500:
        ap.error("--queries: at least 500")
    date, machine, started = now(), host(), time.perf_counter()
    done: list[dict] = []
    if "http" in parts:
        res = part_http(args)
        done.append(
            {"key": "HTTP", "dim": res["dim"], "setup": http_setup(res), "figures": http_figures(res), "result": res}
        )
    if parts & {"search", "fold"}:
        res = part_1m(args, parts)
        if "search" in parts:
            done.append(
                {
                    "key": "1M search",
                    "dim": DIM,
                    "setup": setup_1m(res, "search"),
                    "figures": search_figures(res),
                    "result": {k: v for k, v in res.items() if k != "fold"},
                }
            )
        if "fold" in parts:
            done.append(
                {
                    "key": "1M fold-in",
                    "dim": DIM,
                    "setup": setup_1m(res, "fold"),
                    "figures": fold_figures(res),
                    "result": {k: v for k, v in res.items() if k != "search"},
                }
            )
    machine["sgemm_gflops_after"] = sgemm_gflops()
    wall = round(time.perf_counter() - started, 1)
    for run in done:
        run["result"]["run_wall_s"] = wall
        save(args.json, AREA, TITLE, date=date, command=command_line(), host=machine, **run)
    print(f"\nwhole run: {wall} s")


if __name__ == "__main__":
    main()

"""Benchmark `pipeline serve`: a lone warm query, 8 concurrent clients, hot swaps and bad requests under load.

Usage (one benchmark at a time on the machine):
  python scripts/benchmarks/bench_serve.py

A real `pipeline serve` process (127.0.0.1, a free port, the real model) serves the sample collection
(samples/gallery copied to the workdir and indexed by `pipeline rebuild`). Measured in one run:
 1. the bare model (FeatureModel.embed in this process, the server idle): single-image time, and
    throughput at batch sizes 1, 2, 4, 8, 16; the best one is the server's --batch-size;
 2. a lone warm image query over HTTP (multipart upload -> JSON), median of 30;
 3. 8 concurrent clients for --seconds: throughput and latency p50/p99, against the bare model's
    throughput at its best batch size;
 4. the same load while `pipeline rebuild` publishes 5 times (2 new images each): failed requests, and
    seconds from each publish (CURRENT rewritten) until a new image is the top hit of its own query;
 5. the same load with 200 bad requests mixed in (garbage bytes, truncated JPEG, 50 MB body,
    decompression bomb, path-traversal ids, unknown ids): each must get its 4xx; good requests must
    all answer, with the right first result.
Every good request checks its first result (the query's original or one of its copies).
Targets: (2) <= model single-image time + 15 ms; (3) >= 0.85 x the bare model; (4) 0 failed and each
new image findable <= 2 s after its publish; (5) 200 of 200 bad requests get their 4xx, 0 good ones fail.
Writes its figures into docs/benchmarks/results/serve.json (--json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import add_json_option, command_line, figure, host, now, save, wait_healthy  # noqa: E402
from pipeline.images import decode_bytes  # noqa: E402
from pipeline.model import FeatureModel, export_model, read_model_info  # noqa: E402

AREA, TITLE = "serve", "Query service"

CLIENTS = 8
SAMPLES = ROOT / "samples"


class Bare:
    """The model alone, in this process: a session like the server's, fed decoded sample queries."""

    def __init__(self, model_path: Path, queries: list[bytes]) -> None:
        self.model = FeatureModel(model_path)
        size = self.model.info.input_size
        self.pixels = np.stack([decode_bytes(q, size) for q in queries])
        self.model.embed(self.pixels[:1])

    def single_s(self) -> float:
        t = time.perf_counter()
        self.model.embed(self.pixels[:1])
        return time.perf_counter() - t

    def run(self, batch: int, seconds: float) -> tuple[int, float]:
        """(images, seconds) of back-to-back batches for about `seconds`."""
        x = np.resize(self.pixels, (batch, *self.pixels.shape[1:]))
        self.model.embed(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            self.model.embed(x)
            n += batch
        return n, time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def good_queries() -> list[tuple[str, bytes, str]]:
    """(file name, bytes, stem every correct first result starts with) of the sample crops."""
    return [(p.name, p.read_bytes(), p.stem.split("_")[0]) for p in sorted((SAMPLES / "queries").glob("*_crop80.jpg"))]


def search(http: httpx.Client, name: str, data: bytes, k: int = 10) -> httpx.Response:
    return http.post(f"/api/search?k={k}", files={"image": (name, data, "image/jpeg")})


def load(url: str, queries, stop: threading.Event, limit_s: float, out: list, offset: int) -> None:
    """One client: good queries back to back until `stop` (bounded by limit_s); appends (latency s, ok, status)."""
    deadline = time.monotonic() + limit_s
    with httpx.Client(base_url=url, timeout=60) as http:
        i = offset
        while not stop.is_set() and time.monotonic() < deadline:
            name, data, stem = queries[i % len(queries)]
            t = time.perf_counter()
            try:
                r = search(http, name, data)
                ok = r.status_code == 200 and Path(r.json()[0]["results"][0]["path"]).name.startswith(stem)
                status = r.status_code
            except httpx.HTTPError as exc:
                ok, status = False, type(exc).__name__
            out.append((time.perf_counter() - t, ok, status))
            i += 1


class Load:
    """CLIENTS good clients in threads, for the length of a `with` block."""

    def __init__(self, url: str, queries, limit_s: float) -> None:
        self.stop, self.results = threading.Event(), []
        self.threads = [
            threading.Thread(target=load, args=(url, queries, self.stop, limit_s, self.results, i))
            for i in range(CLIENTS)
        ]

    def __enter__(self) -> Load:
        self.t0 = time.perf_counter()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.wait()

    def wait(self) -> None:
        """Until every client is done (stopped, or at its time limit)."""
        for t in self.threads:
            t.join()
        self.seconds = time.perf_counter() - self.t0

    def summary(self) -> dict:
        return summary(self.results, self.seconds)


def summary(results: list, seconds: float) -> dict:
    """Requests, failures, throughput and latency percentiles of client results."""
    lat = np.array([r[0] for r in results]) * 1000
    failed = [r for r in results if not r[1]]
    return {
        "requests": len(results),
        "failed": len(failed),
        "failed_statuses": sorted({str(r[2]) for r in failed}),
        "seconds": round(seconds, 2),
        "img_per_s": round(len(results) / seconds, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
    }


def bad_requests(sample_jpeg: bytes) -> list[tuple[str, str, str, dict, int]]:
    """(kind, method, url, httpx arguments, expected status): 25 of each of 8 kinds."""
    buf = io.BytesIO()
    Image.new("1", (9500, 9500)).save(buf, "PNG")  # 90.25 M pixels > the 89.5 M limit, 11 kB of file
    bomb = buf.getvalue()
    huge = b"\0" * (50 * 1024 * 1024)
    kinds = [
        ("garbage bytes", "POST", "/api/search", {"files": {"image": ("x.jpg", os.urandom(20_000))}}, 400),
        (
            "truncated JPEG",
            "POST",
            "/api/search",
            {"files": {"image": ("t.jpg", sample_jpeg[: len(sample_jpeg) // 2])}},
            400,
        ),
        ("50 MB body", "POST", "/api/search", {"files": {"image": ("big.jpg", huge)}}, 413),
        ("decompression bomb", "POST", "/api/search", {"files": {"image": ("bomb.png", bomb)}}, 400),
        ("path traversal (thumbnail)", "GET", "/api/thumbnail/..%2F..%2F..%2Fetc%2Fpasswd", {}, 404),
        ("path traversal (like)", "GET", "/api/search?like=../../../etc/passwd", {}, 422),
        ("unknown id (like)", "GET", "/api/search?like=987654", {}, 404),
        ("unknown id (thumbnail)", "GET", "/api/thumbnail/987654", {}, 404),
    ]
    return [kinds[i % len(kinds)] for i in range(200)]


def send_bad(url: str, requests: list, out: list) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        for kind, method, path, kwargs, expected in requests:
            try:
                r = http.request(method, path, **kwargs)
                ok = r.status_code == expected and "error" in r.json()
                out.append((kind, ok, r.status_code))
            except httpx.HTTPError as exc:
                out.append((kind, False, type(exc).__name__))


def new_images(photos: Path, round_: int) -> list[Path]:
    """Two pictures not yet in the collection: rotated, cropped, tinted copies of two originals."""
    originals = sorted(p for p in (SAMPLES / "gallery").glob("*.jpg") if "_" not in p.stem)
    out = []
    for j in range(2):
        src = originals[(2 * round_ + j) % len(originals)]
        with Image.open(src) as im:
            w, h = im.size
            im = im.convert("RGB").rotate(90, expand=True).crop((w // 10, h // 10, w - w // 10, h - h // 10))
            im = Image.eval(im, lambda v, s=round_: min(255, v + 10 * (s + 1)))
            # a copy of that original: a right answer for its queries
            dst = photos / "new" / f"{src.stem}_new{round_}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            im.save(dst, quality=90)
        out.append(dst)
    return out


def watch_current(index_dir: Path, stop: threading.Event, out: dict) -> None:
    """version -> first time (perf_counter) CURRENT named it."""
    while not stop.is_set():
        try:
            v = (index_dir / "CURRENT").read_text().strip()
        except OSError:
            v = None
        if v and v not in out:
            out[v] = time.perf_counter()
        time.sleep(0.005)


def publishes(url: str, photos: Path, workdir: Path, model: Path, index_dir: Path, queries, log) -> dict:
    seen: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_current, args=(index_dir, stop, seen))
    watcher.start()
    delays, rebuild_s, probes = [], [], []
    try:
        with Load(url, queries, 600) as lo, httpx.Client(base_url=url, timeout=60) as http:
            for round_ in range(5):
                before = set(seen)
                added = new_images(photos, round_)
                t = time.perf_counter()
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pipeline",
                        "-q",
                        "rebuild",
                        str(photos),
                        "--workdir",
                        str(workdir),
                        "--model",
                        str(model),
                    ],
                    check=True,
                    stderr=log,
                )
                rebuild_s.append(round(time.perf_counter() - t, 2))
                [version] = set(seen) - before
                # Findable = served: every request that starts from then on searches the new version.
                deadline = time.monotonic() + 30
                while http.get("/api/stats").json()["version"] != version:
                    assert time.monotonic() < deadline, f"{version} was never served"
                    time.sleep(0.01)
                delays.append(round(time.perf_counter() - seen[version], 3))
                t = time.perf_counter()
                r = search(http, added[-1].name, added[-1].read_bytes(), k=1)  # waits its turn behind the load
                probes.append(round(time.perf_counter() - t, 2))
                assert r.headers["X-Index-Version"] == version and r.json()[0]["results"][0]["path"] == str(added[-1])
                print(
                    f"publish {round_ + 1}: rebuild {rebuild_s[-1]} s, served {delays[-1]} s after it; "
                    f"a query for the new image found it, answered in {probes[-1]} s",
                    flush=True,
                )
    finally:
        stop.set()
        watcher.join()
    return {**lo.summary(), "rebuild_s": rebuild_s, "findable_after_s": delays, "probe_s": probes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-output" / "serve")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "vgg16.onnx", help="exported when missing")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the concurrent-load phase")
    add_json_option(ap, AREA)
    args = ap.parse_args()
    date, machine = now(), host()
    res: dict = {}
    if not args.model.is_file():
        export_model(args.model)
    res["model"], res["dim"] = read_model_info(args.model).short(), read_model_info(args.model).dim
    shutil.rmtree(args.workdir, ignore_errors=True)
    photos = args.workdir / "photos"
    shutil.copytree(SAMPLES / "gallery", photos)
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = open(args.workdir / "log.txt", "a")
    index_dir = args.workdir / "index"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "-q",
            "rebuild",
            str(photos),
            "--workdir",
            str(args.workdir),
            "--model",
            str(args.model),
        ],
        check=True,
        stderr=log,
    )
    queries = good_queries()

    bare_model = Bare(args.model, [q[1] for q in queries])
    rates = {b: round(n / s, 2) for b in (1, 2, 4, 8, 16) for n, s in [bare_model.run(b, 4.0)]}
    best = max(rates, key=rates.get)
    res["bare"] = bare = {"img_per_s": rates, "best_batch": best}
    print(json.dumps(bare), flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "-q",
            "serve",
            "--index",
            str(index_dir),
            "--model",
            str(args.model),
            "--port",
            str(port),
            "--batch-size",
            str(bare["best_batch"]),
        ],
        stderr=log,
    )
    try:
        wait_healthy(url, server)

        # Lone query and bare single image, interleaved: both see the same moments of a shared machine.
        with httpx.Client(base_url=url, timeout=60) as http:
            name, data, stem = queries[0]
            for _ in range(3):
                search(http, name, data)
            lone, single = [], []
            for _ in range(30):
                single.append(bare_model.single_s())
                t = time.perf_counter()
                r = search(http, name, data)
                lone.append(time.perf_counter() - t)
                assert Path(r.json()[0]["results"][0]["path"]).name.startswith(stem)
        res["lone"] = {
            "median_ms": round(float(np.median(lone)) * 1000, 1),
            "model_single_ms": round(float(np.median(single)) * 1000, 1),
        }
        res["lone"]["over_model_ms"] = round(res["lone"]["median_ms"] - res["lone"]["model_single_ms"], 1)
        print(json.dumps(res["lone"]), flush=True)

        # 8 clients vs the bare model at its best batch size, in alternating thirds of --seconds.
        stats0 = httpx.get(f"{url}/api/stats").json()
        bare_n = bare_s = 0.0
        loads = []
        for _ in range(3):
            n, s = bare_model.run(best, args.seconds / 3)
            bare_n, bare_s = bare_n + n, bare_s + s
            with Load(url, queries, args.seconds / 3) as lo:
                lo.wait()
            loads.append(lo)
        stats1 = httpx.get(f"{url}/api/stats").json()
        c = summary([r for part in loads for r in part.results], sum(part.seconds for part in loads))
        bare["best_img_per_s"] = round(bare_n / bare_s, 2)
        res["concurrent"] = {
            **c,
            "ratio_to_bare": round(c["img_per_s"] / bare["best_img_per_s"], 3),
            "mean_batch": round(
                (stats1["images_embedded"] - stats0["images_embedded"]) / max(1, stats1["batches"] - stats0["batches"]),
                2,
            ),
        }
        print(json.dumps(res["concurrent"]), flush=True)

        res["publishes"] = publishes(url, photos, args.workdir, args.model, index_dir, queries, log)
        print(json.dumps(res["publishes"]), flush=True)

        bad_out: list = []
        bad = threading.Thread(target=send_bad, args=(url, bad_requests(queries[0][1]), bad_out))
        with Load(url, queries, 600) as lo:
            bad.start()
            bad.join()
        kinds = sorted({k for k, _, _ in bad_out})
        res["bad"] = {
            **lo.summary(),
            "bad_requests": len(bad_out),
            "bad_answered_right": sum(ok for _, ok, _ in bad_out),
            "wrong": sorted({f"{k}: {s}" for k, ok, s in bad_out if not ok}),
            "kinds": kinds,
        }
        print(json.dumps(res["bad"]), flush=True)
        res["server_stats"] = httpx.get(f"{url}/api/stats").json()
    finally:
        server.terminate()
        server.wait(30)
        log.close()

    res["images"] = len(list(photos.rglob("*.jpg")))
    save(
        args.json,
        AREA,
        TITLE,
        key="default",
        date=date,
        command=command_line(),
        host=machine,
        dim=res["dim"],
        setup=setup(res),
        figures=figures(res),
        result=res,
    )


def setup(res: dict) -> str:
    return (
        "A `pipeline serve` process over the sample collection (samples/gallery, indexed by `pipeline rebuild`"
        + (f"; model {res['model']}" if "model" in res else "")
        + "), clients in the benchmark process on the same "
        "cores (httpx, one "
        f"connection each): a lone warm query against the bare model in this process (median of 30, interleaved); "
        f"{CLIENTS} clients for the load against the bare model at its best batch (the server's --batch-size, "
        "alternating thirds); 5 publishes by `pipeline rebuild` under that load; 200 bad requests under that load "
        "(garbage, truncated JPEG, 50 MB body, decompression bomb, path traversal, unknown ids)."
    )


def figures(res: dict) -> list[dict]:
    lone, c, p, b, bare = res["lone"], res["concurrent"], res["publishes"], res["bad"], res["bare"]
    slowest = max(p["findable_after_s"])
    return [
        figure(
            "lone warm query over HTTP − the bare model on one image",
            lone["over_model_ms"],
            " ms",
            f"{lone['median_ms']} vs {lone['model_single_ms']} ms",
            target="≤ 15 ms",
            met=lone["over_model_ms"] <= 15,
        ),
        figure(
            f"{CLIENTS} concurrent clients / the bare model at its best batch ({bare['best_batch']})",
            c["ratio_to_bare"],
            "×",
            f"{c['img_per_s']} vs {bare['best_img_per_s']} img/s; p50 {c['p50_ms']} ms, "
            f"p99 {c['p99_ms']} ms; mean batch {c['mean_batch']}; {c['failed']} of {c['requests']} failed",
            target="≥ 0.85",
            met=c["ratio_to_bare"] >= 0.85,
        ),
        figure(
            "failed requests during 5 publishes under load",
            f"{p['failed']} of {p['requests']}",
            "",
            f"rebuilds took {', '.join(map(str, p['rebuild_s']))} s",
            target="0",
            met=p["failed"] == 0,
        ),
        figure(
            "a publish until the new version is served, slowest of 5",
            slowest,
            " s",
            f"{', '.join(map(str, p['findable_after_s']))} s; its new image then found first",
            target="≤ 2 s",
            met=slowest <= 2.0,
        ),
        figure(
            "bad requests under load answered with their 4xx",
            f"{b['bad_answered_right']} of {b['bad_requests']}",
            "",
            target="all 200",
            met=b["bad_answered_right"] == b["bad_requests"] == 200,
        ),
        figure(
            "good requests failed meanwhile",
            f"{b['failed']} of {b['requests']}",
            "",
            f"p99 {b['p99_ms']} ms",
            target="0",
            met=b["failed"] == 0,
        ),
    ]


if __name__ == "__main__":
    main()

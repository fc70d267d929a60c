"""Soak `pipeline serve`: minutes of mixed load with publishes and a rollback; memory and descriptors stay flat.

Usage (one benchmark at a time on the machine): python scripts/benchmarks/bench_soak.py [--minutes 10]

A real `pipeline serve` process (the real model, an API key from a file) serves the sample collection
(samples/gallery, indexed by `pipeline rebuild`). Measured in one run:
 1. "more like this" throughput: 1 client, then 8 concurrent clients (`like=`, no model run), each for
    --like-seconds: the searches run in parallel (no lock around them).
 2. The soak, --minutes long: 2 clients uploading sample queries, 2 asking "more like" random ids, 1 asking
    thumbnails, 1 sending bad requests (garbage, truncated, a bomb, a 50 MB body, traversal ids, unknown ids,
    no key, a wrong Host); a `pipeline rebuild` publishing a new version (a new picture) every minute, and
    once, at the middle, a rollback (CURRENT names the previous version), undone by the next publish. Every
    5 s: the server's resident memory (VmRSS) and open file descriptors.
Targets: 0 failed good requests; every bad request its 4xx; RSS and descriptors flat once warm (the last
minute's mean within 10% of the fifth's: by then the service holds the 3 versions it keeps open, each with
its files); the rollback served within 2 s.
Writes its figures into docs/benchmarks/results/soak.json (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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

from bench_serve import SAMPLES, bad_requests, free_port, good_queries, search  # noqa: E402
from benchlib import add_json_option, command_line, figure, host, now, save, wait_healthy  # noqa: E402
from pipeline.model import locate_model, read_model_info  # noqa: E402

AREA, TITLE = "soak", "Query service soak"
WARM_MINUTES = 4  # publishes until the service holds its 3 open versions (DEFAULT_OPEN_VERSIONS), plus one
KEY = "soak-key"


def rebuild(photos: Path, workdir: Path, model: Path, log) -> None:
    cmd = [sys.executable, "-m", "pipeline", "-q", "rebuild", str(photos), "--workdir", str(workdir)]
    subprocess.run([*cmd, "--model", str(model), "--workers", "0"], check=True, stderr=log)


def proc_state(pid: int) -> tuple[float, int]:
    """(VmRSS MiB, open file descriptors) of a process."""
    rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


class Clients:
    """Client threads appending (route, latency s, ok, status) until `stop`."""

    def __init__(self) -> None:
        self.stop, self.results, self.threads = threading.Event(), [], []
        self.lock = threading.Lock()

    def add(self, route: str, step) -> None:
        def run() -> None:
            with httpx.Client(base_url=self.url, timeout=60, headers={"X-API-Key": KEY}) as http:
                while not self.stop.is_set():
                    t = time.perf_counter()
                    try:
                        ok, status = step(http)
                    except httpx.HTTPError as exc:
                        ok, status = False, type(exc).__name__
                    with self.lock:
                        self.results.append((route, time.perf_counter() - t, ok, status))

        self.threads.append(threading.Thread(target=run, daemon=True))

    def start(self, url: str) -> None:
        self.url = url
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def like_rate(url: str, ids: list[int], clients: int, seconds: float) -> float:
    """ "More like" queries per second with `clients` concurrent clients."""
    c = Clients()
    rng = random.Random(clients)
    for _ in range(clients):
        c.add("like", lambda http: (http.get(f"/api/search?like={rng.choice(ids)}").status_code == 200, 0))
    c.start(url)
    time.sleep(seconds)
    c.finish()
    return len(c.results) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-output" / "soak")
    ap.add_argument("--model", type=Path, help="default: the model `pipeline` finds (pipeline model export)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--like-seconds", type=float, default=15.0)
    add_json_option(ap, AREA)
    args = ap.parse_args()
    date, machine = now(), host()
    model = args.model or locate_model(None)[0]
    shutil.rmtree(args.workdir, ignore_errors=True)
    photos, index_dir = args.workdir / "photos", args.workdir / "index"
    shutil.copytree(SAMPLES / "gallery", photos)
    log = open(args.workdir / "log.txt", "a")
    rebuild(photos, args.workdir, model, log)
    (args.workdir / "key").write_text(KEY + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "-q", "serve", "--index", str(index_dir), "--model", str(model)]
        + ["--port", str(port), "--api-key-file", str(args.workdir / "key")],
        stderr=log,
    )
    res: dict = {"model": read_model_info(model).short(), "minutes": args.minutes}
    try:
        wait_healthy(url, server)
        queries = good_queries()
        with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": KEY}) as http:
            first = search(http, *queries[0][:2], k=100).json()[0]["results"]
        ids = [h["id"] for h in first]  # the first version's images: in every later version, and the rolled-back one
        one, eight = like_rate(url, ids, 1, args.like_seconds), like_rate(url, ids, 8, args.like_seconds)
        res["like"] = {"one_client_qps": round(one, 1), "eight_clients_qps": round(eight, 1)}
        print(json.dumps(res["like"]), flush=True)

        c = Clients()
        rng = random.Random(0)

        def upload(http: httpx.Client) -> tuple[bool, int]:
            name, data, stem = rng.choice(queries)
            r = search(http, name, data)
            return r.status_code == 200 and Path(r.json()[0]["results"][0]["path"]).name.startswith(stem), r.status_code

        def like(http: httpx.Client) -> tuple[bool, int]:
            r = http.get(f"/api/search?like={rng.choice(ids)}")
            return r.status_code == 200 and bool(r.json()[0]["results"]), r.status_code

        def thumb(http: httpx.Client) -> tuple[bool, int]:
            r = http.get(f"/api/thumbnail/{rng.choice(ids)}")
            return r.status_code == 200 and r.content[:2] == b"\xff\xd8", r.status_code

        bad = bad_requests(queries[0][1])
        bad += [("no key", "GET", "/api/stats", {"headers": {"X-API-Key": ""}}, 401)] * 25
        bad += [("wrong Host", "GET", "/api/stats", {"headers": {"Host": "evil.example"}}, 421)] * 25
        bad_iter = iter(bad * 1000)

        def bad_one(http: httpx.Client) -> tuple[bool, int]:
            kind, method, path, kwargs, expected = next(bad_iter)
            r = http.request(method, path, **kwargs)
            time.sleep(0.2)
            return r.status_code == expected and "error" in r.json(), (kind, r.status_code)

        for route, step, n in (("upload", upload, 2), ("like", like, 2), ("thumbnail", thumb, 1), ("bad", bad_one, 1)):
            for _ in range(n):
                c.add(route, step)
        samples: list[tuple[float, float, int]] = []
        publishes, rollback = [], {}
        t0 = time.monotonic()
        c.start(url)
        end = t0 + args.minutes * 60
        next_sample, next_publish, round_ = t0, t0 + 60, 0
        while time.monotonic() < end:
            now_ = time.monotonic()
            if now_ >= next_sample:
                samples.append((now_ - t0, *proc_state(server.pid)))
                next_sample += 5
            if now_ >= next_publish and now_ + 30 < end:
                round_ += 1
                current = (index_dir / "CURRENT").read_text().strip()
                if round_ == max(2, int(args.minutes // 2)) and not rollback:  # the rollback, at the middle
                    versions = sorted(p.name for p in (index_dir / "versions").iterdir() if not p.name.startswith("."))
                    older = versions[versions.index(current) - 1]
                    tmp = index_dir / "CURRENT.tmp"
                    tmp.write_text(older + "\n")
                    tmp.replace(index_dir / "CURRENT")
                    t = time.monotonic()
                    while httpx.get(f"{url}/api/health").json()["version"] != older:
                        time.sleep(0.05)
                    rollback = {"from": current, "to": older, "served_after_s": round(time.monotonic() - t, 3)}
                else:
                    with Image.open(sorted((SAMPLES / "gallery").glob("*.jpg"))[round_ % 12]) as im:
                        im.rotate(3 * round_, expand=True).save(photos / f"new{round_:02d}.jpg", quality=90)
                    t = time.monotonic()
                    rebuild(photos, args.workdir, model, log)
                    publishes.append(round(time.monotonic() - t, 1))
                next_publish += 60
            time.sleep(0.2)
        c.finish()
        samples.append((time.monotonic() - t0, *proc_state(server.pid)))
    finally:
        server.terminate()
        res["exit_code"] = server.wait(timeout=60)
    routes = sorted({r[0] for r in c.results})
    res["routes"] = {}
    for route in routes:
        rows = [r for r in c.results if r[0] == route]
        lat = np.array([r[1] for r in rows]) * 1000
        res["routes"][route] = {
            "requests": len(rows),
            "failed": sum(not r[2] for r in rows),
            "failures": sorted({str(r[3]) for r in rows if not r[2]})[:10],
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
        }
    minute = np.array(samples)

    def mean_in(a: float, b: float, col: int) -> float:
        sel = minute[(minute[:, 0] >= a) & (minute[:, 0] < b), col]
        return float(sel.mean())

    # Warm once the service holds as many versions as it keeps open (3; one publish a minute): the minute after
    # that is the baseline, and a leak would grow with every publish after it.
    last, base = args.minutes * 60, min(WARM_MINUTES, args.minutes - 2) * 60
    res["baseline_minute"] = int(base // 60) + 1
    res["rss_mib"] = {
        "baseline": round(mean_in(base, base + 60, 1)),
        "last_minute": round(mean_in(last - 60, last + 1, 1)),
    }
    res["fds"] = {
        "baseline": round(mean_in(base, base + 60, 2), 1),
        "last_minute": round(mean_in(last - 60, last + 1, 2), 1),
        "each_minute": [int(x) for x in minute[::12, 2]],
    }
    res["rss_mib"]["max"] = round(float(minute[:, 1].max()))
    res["publishes"], res["rollback"] = publishes, rollback
    print(json.dumps(res, indent=1), flush=True)
    machine["sgemm_gflops_after"] = host()["sgemm_gflops"]
    save(
        args.json,
        AREA,
        TITLE,
        key="default",
        date=date,
        command=command_line(),
        host=machine,
        dim=read_model_info(model).dim,
        setup=setup(res),
        figures=figures(res),
        result=res,
    )
    shutil.rmtree(args.workdir, ignore_errors=True)


def setup(res: dict) -> str:
    return (
        f"A `pipeline serve` process (model {res['model']}, key from a file) over the sample collection. (1) "
        '"more like this" (`like=`, no model run) with 1 client, then 8 concurrent clients. (2) '
        f"{res['minutes']:g} minutes of: 2 clients uploading the sample queries (each answer's first result "
        'checked), 2 asking "more like" random ids, 1 asking thumbnails, 1 sending bad requests (garbage, '
        "truncated, a bomb, a 50 MB body, traversal and unknown ids, no key, a wrong Host), a `pipeline rebuild` "
        "publishing a new picture every minute, and at the middle a rollback (CURRENT names the previous version). "
        "The server's VmRSS and open descriptors every 5 s."
    )


def figures(res: dict) -> list[dict]:
    good = [r for k, r in res["routes"].items() if k != "bad"]
    failed = sum(r["failed"] for r in good)
    bad = res["routes"].get("bad", {"requests": 0, "failed": 0})
    rss, fds = res["rss_mib"], res["fds"]
    rss_growth = rss["last_minute"] / rss["baseline"] - 1
    fd_growth = fds["last_minute"] / fds["baseline"] - 1
    out = [
        figure(
            "good requests failed",
            failed,
            "",
            f"of {sum(r['requests'] for r in good)}: "
            + "; ".join(
                f"{k} {r['requests']} (p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms)"
                for k, r in res["routes"].items()
                if k != "bad"
            ),
            target="0",
            met=failed == 0,
        ),
        figure(
            "bad requests answered their 4xx",
            f"{bad['requests'] - bad['failed']} / {bad['requests']}",
            target="all",
            met=bad["failed"] == 0,
        ),
        figure(
            f"resident memory, last minute / minute {res['baseline_minute']}",
            round(rss_growth + 1, 3),
            "×",
            f"{rss['baseline']} → {rss['last_minute']} MiB (max {rss['max']})",
            target="≤ 1.1",
            met=rss_growth <= 0.1,
        ),
        figure(
            f"open file descriptors, last minute / minute {res['baseline_minute']}",
            round(fd_growth + 1, 3),
            "×",
            f"{fds['baseline']} → {fds['last_minute']}; at each minute: {', '.join(map(str, fds['each_minute']))}",
            target="≤ 1.1",
            met=fd_growth <= 0.1,
        ),
        figure(
            "rollback (CURRENT names the previous version) served after",
            res["rollback"].get("served_after_s"),
            " s",
            f"{len(res['publishes'])} publishes meanwhile, each a `pipeline rebuild` of "
            f"{min(res['publishes'] or [0])}–{max(res['publishes'] or [0])} s",
            target="≤ 2 s",
            met=bool(res["rollback"]) and res["rollback"]["served_after_s"] <= 2,
        ),
        figure(
            '"more like this": 8 concurrent clients / 1 client',
            round(res["like"]["eight_clients_qps"] / res["like"]["one_client_qps"], 2),
            "×",
            f"{res['like']['eight_clients_qps']} vs {res['like']['one_client_qps']} queries/s",
        ),
        figure("exit code after SIGTERM", res["exit_code"], target="0", met=res["exit_code"] == 0),
    ]
    return out


if __name__ == "__main__":
    main()

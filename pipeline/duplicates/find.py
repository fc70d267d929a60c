"""find_groups: a published index's near-duplicate groups, from its candidate pairs to described groups.

Flat-coded indexes (Flat, IVF...,Flat) hold the exact features, so their scores are exact.
Compressed codes with a vector store (the default for them, index/store.py) are compared with the
stored features (float16); without one (--rerank 0), decoded, with a margin, and the candidate
pairs are re-ranked with the exact features of the shards the index was built from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np

from ..errors import PipelineError
from ..features import exact_features
from ..filters import Filter
from ..index import recorded_model
from ..progress import Progress
from ..search import Searcher
from .describe import DuplicateGroup, describe_groups
from .groups import components, union
from .pairs import Probing, pairs_above, probing_for
from .thresholds import default_threshold
from .verified import VerifyReport, candidate_pairs, join_verified, possible_for, verify_pairs

LOG = logging.getLogger(__name__)

FLUSH_PAIRS = 4_000_000  # pairs buffered before they are merged into the groups
DEFAULT_MIN_SIZE = 2  # images in the smallest group reported

Vectors = Callable[[np.ndarray], np.ndarray]  # features by indexed id
Pairs = list[tuple[np.ndarray, np.ndarray]]  # batches of pairs, as positions into the sorted ids


def find_groups(
    index_dir: Path | str,
    threshold: float | None = None,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    limit: int | None = None,
    nprobe: int | None = None,
    rerank_margin: float | None = None,
    progress: bool | None = None,
    where: Filter | Sequence[str] | None = None,
    verify: bool = False,
    workers: int | None = None,
) -> list[DuplicateGroup]:
    """Every group of at least `min_size` near-duplicate images of the published index, largest first
    (at most `limit` groups). Reads only: nothing is deleted or moved.

    `threshold`: cosine (default: the one calibrated for the index's recipe, default_threshold).

    `nprobe`: IVF lists each vector probes (default: by score gap to its nearest centroid, PROBE_GAP).
    `rerank_margin`: for compressed codes, pairs whose decoded score is at least threshold minus this
    are re-scored with the exact features from the shards (default: measured, see _code_error).

    `where`: only images a filter selects are grouped, by pairs of selected images only (filters: the
    `--where` language); the scan still reads the whole index. Images removed or hidden since the version was
    built (ingest) are in no group; images added since are grouped once the nightly job has folded them in.

    `verify`: groups are joined only by pairs verified with local features (duplicates.verified: each image's
    nearest others above a lower "possible" floor, checked one by one; `threshold` is not used then); needs the
    `verify` extra (OpenCV). `workers`: processes verifying pairs (default: one per core, at most 16; 0: this process).
    """
    _check_arguments(threshold, min_size, limit, nprobe, workers)
    t0 = time.monotonic()
    searcher = Searcher(index_dir)
    if threshold is None:
        threshold = default_threshold(searcher)
    if searcher.meta.get("codes"):
        raise PipelineError(
            f"{searcher.version_dir} holds binary codes (build-index --codes), which `duplicates` "
            "cannot scan list by list; build an index without --codes for it"
        )
    ids = searcher.ids()  # sorted; ids are stable catalog ids, not positions: groups are formed over positions
    selection = searcher.select(where)
    chosen = None if selection is None else np.isin(ids, selection.ids)  # by position
    if searcher.live is not None and searcher.live.excluded:  # removed or hidden: in no group
        kept = ~np.isin(ids, np.fromiter(searcher.live.excluded, np.int64))
        chosen = kept if chosen is None else chosen & kept
    exact, vectors = _features(searcher)
    rescore: tuple[Vectors, float] | None = None
    cut = threshold
    if not exact:
        if rerank_margin is None:
            rerank_margin = _code_error(searcher, ids, vectors)
            LOG.info(
                "compressed codes: pairs re-ranked with exact features from %.3f below the threshold", rerank_margin
            )
        rescore, cut = (vectors, threshold), threshold - rerank_margin
    parent = np.arange(len(ids), dtype=np.int64)
    if verify:
        floor = possible_for(recorded_model(searcher.meta), threshold)
        a, b = candidate_pairs(searcher, ids, vectors, floor, chosen, progress=progress)
        paths = searcher.indexed_paths()  # (in id order: position i is ids[i])
        report = VerifyReport()
        join_verified(parent, a, b, verify_pairs(paths, a, b, progress, workers), report)
        found = report.joined
        LOG.info(
            "duplicates --verify: %d candidate pairs at cosine >= %.3f, %d verified (%d not checked: unreadable), "
            "%d held back from chaining two groups",
            report.candidates,
            floor,
            report.verified,
            report.unreadable,
            report.held_back,
        )
    else:
        probing = probing_for(cut, nprobe, searcher.nprobe)
        found = _join_pairs_above(parent, searcher, ids, cut, probing, rescore, progress, chosen)
    for same in searcher.same_content_ids():  # byte-identical files: one group, whatever the threshold
        pos = np.searchsorted(ids, same)
        if chosen is not None:
            pos = pos[chosen[pos]]
        if len(pos) < 2:
            continue
        union(parent, np.full(len(pos) - 1, pos[0]), pos[1:])
    groups = [ids[g] for g in components(parent, min_size)]
    LOG.info(
        "duplicates: %d pairs at cosine >= %.3f, %d groups of >= %d images (%s, %.1f s)",
        found,
        threshold,
        len(groups),
        min_size,
        searcher.meta.get("factory"),
        time.monotonic() - t0,
    )
    return describe_groups(searcher, groups[:limit], vectors)


def _check_arguments(
    threshold: float | None, min_size: int, limit: int | None, nprobe: int | None, workers: int | None
) -> None:
    """Refuse, in the CLI's words, arguments that cannot mean anything (before any file is read)."""
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise PipelineError(f"--threshold is a cosine, in [-1, 1] (got {threshold})")
    if min_size < 2:
        raise PipelineError(f"--min-size must be at least 2 (got {min_size})")
    if limit is not None and limit < 1:
        raise PipelineError(f"--limit must be at least 1 (got {limit})")
    if nprobe is not None and nprobe < 1:
        raise PipelineError(f"--nprobe must be at least 1 (got {nprobe})")
    if workers is not None and workers < 0:
        raise PipelineError(f"--workers must be 0 or more (got {workers})")


def _features(searcher: Searcher) -> tuple[bool, Vectors]:
    """(exact, full vectors by id): in the index itself (flat), or in the version's vector store (float16:
    scores within ~1e-3 of float32, no margin needed), both exact; otherwise the shards' features, since the
    index holds only decoded codes, against which candidate pairs are checked."""
    base = searcher.index
    if isinstance(base, faiss.IndexIDMap):  # a flat index keeps its ids in an id map
        base = faiss.downcast_index(base.index)
    if isinstance(base, (faiss.IndexFlat, faiss.IndexIVFFlat)) or searcher.store is not None:
        return True, searcher.vectors
    meta = searcher.meta
    return False, exact_features(Path(meta["features_dir"]), meta["shards"], meta["dim"], searcher.version_dir)


def _code_error(searcher: Searcher, ids: np.ndarray, vectors: Vectors, sample: int = 1000, seed: int = 0) -> float:
    """How far scores of decoded codes stray from exact ones: 1.5 x the largest error over all pairs
    of a seeded sample of indexed vectors (decoded from the index vs exact from the shards)."""
    ids = np.sort(np.random.default_rng(seed).choice(ids, min(sample, len(ids)), replace=False))
    decoded, exact = searcher.decoded(ids), vectors(ids)
    return 1.5 * float(np.abs(decoded @ decoded.T - exact @ exact.T).max())


def _join_pairs_above(
    parent: np.ndarray,
    searcher: Searcher,
    ids: np.ndarray,
    cut: float,
    probing: Probing,
    rescore: tuple[Vectors, float] | None,
    progress: bool | None,
    chosen: np.ndarray | None = None,
) -> int:
    """Join in `parent` every candidate pair at `cut` (re-scored first when `rescore` is (exact vectors by
    id, threshold)), merged FLUSH_PAIRS at a time so the pairs never all sit in memory; returns how many
    pairs were joined. `chosen` (by position): only pairs of two chosen images."""
    found = buffered = 0
    pending: Pairs = []
    with Progress(len(ids), "duplicates", enabled=progress) as bar:
        for a, b, done in pairs_above(searcher, ids, cut, probing):
            pa, pb = np.searchsorted(ids, a), np.searchsorted(ids, b)
            if chosen is not None:
                keep = chosen[pa] & chosen[pb]
                pa, pb = pa[keep], pb[keep]
            pending.append((pa, pb))
            buffered += len(a)
            bar.update(done)
            if buffered >= FLUSH_PAIRS:
                found += _merge(parent, pending, rescore, ids)
                pending, buffered = [], 0
    return found + _merge(parent, pending, rescore, ids)


def _merge(parent: np.ndarray, pending: Pairs, rescore: tuple[Vectors, float] | None, ids: np.ndarray) -> int:
    """Join the groups of the pending pairs (positions into `ids`; first re-scored with exact features
    when `rescore` is (vectors by id, threshold)); returns how many pairs were joined."""
    if not pending:
        return 0
    a = np.concatenate([p[0] for p in pending])
    b = np.concatenate([p[1] for p in pending])
    if rescore is not None and len(a):
        vectors, threshold = rescore
        involved, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
        v = vectors(ids[involved])
        ia, ib = inverse[: len(a)], inverse[len(a) :]
        keep = np.einsum("ij,ij->i", v[ia], v[ib]) >= threshold
        a, b = a[keep], b[keep]
    union(parent, a, b)
    return len(a)

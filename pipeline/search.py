"""The search stage: load a published index and its model once, answer top-k queries.

Queries are image files (run through the model in batches, then through faiss in one call)
or already-indexed paths (`like`: their stored vector is used, no model run).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from .copies import LocalFeatures, local_features, verify_pair
from .errors import DeadlineExceeded, ImageError, ModelMismatchError, PipelineError
from .filters import FieldType, Filter, parse_where
from .images import load_image
from .index import (
    CODES_FILE,
    IDS_FILE,
    INDEX_FILE,
    MAX_POOL,
    VECTOR_IDS_FILE,
    VECTORS_FILE,
    Centroids,
    CoarseToFine,
    Codebook,
    Gathered,
    IdTable,
    ListMap,
    LivePart,
    Metadata,
    Reranked,
    Selection,
    VectorStore,
    added_fields,
    codes_possible,
    codes_search,
    current_version,
    damaged,
    exact_search,
    filtered_nprobe,
    ivf_params,
    ivf_search,
    published_name,
    ranked,
    read_meta,
    route,
    search_preassigned,
)
from .model import DEFAULT_BATCH_SIZE, DEFAULT_THREADS, FeatureModel

LOG = logging.getLogger(__name__)
VERIFY_KEYS = ("verified", "inliers", "unverified")  # a hit's keys only where it was verified
VERIFY_AT_MOST = 50  # hits of a query verified (the top ones): each costs a file read and a geometric fit
VERIFY_THREADS = 2  # candidates checked at once
LOCAL_KEPT = 512  # candidates' local features a Searcher keeps (about 30 KB each)
SELECTIONS_KEPT = 64  # filters whose selection a Searcher keeps (a page or a script repeats the same filter)


@dataclass(frozen=True)
class Hit:
    rank: int
    id: int  # the image's id in the index version (ids.sqlite); a service's handle for it
    path: str
    score: float
    metadata: dict = field(default_factory=dict)  # the image's fields (built-in and the user's), for people
    verified: bool | None = None  # with verify: the same picture, by local features and a geometric fit
    inliers: int | None = None  # with verify: matched points that fit the transform
    unverified: str | None = None  # with verify: why a hit could not be checked (its file cannot be read)


@dataclass(frozen=True)
class QueryResult:
    query: str
    hits: list[Hit] = field(default_factory=list)
    error: str | None = None  # set when the query could not be used

    def to_dict(self) -> dict:
        hits = [{k: v for k, v in vars(h).items() if v is not None or k not in VERIFY_KEYS} for h in self.hits]
        d: dict = {"query": self.query, "results": hits}
        if self.error is not None:
            d["error"] = self.error
        return d


def check_deadline(deadline: float | None, stage: str) -> None:
    """DeadlineExceeded when `deadline` (time.monotonic()) has passed, naming the stage that was not begun."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"the request's time ran out before {stage}; retry shortly")


def _merged(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The top k of two result lists per query (scores, ids), by score."""
    scores, ids = np.hstack([a[0], b[0]]), np.hstack([a[1], b[1]])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _read_index(path: str, mmap: bool) -> faiss.Index:
    """Read a faiss index; with `mmap`, its codes and IVF lists are memory-mapped (IO_FLAG_MMAP_IFC:
    loads in milliseconds, searches as fast as in memory, pages shared between processes)."""
    if mmap:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError:
            LOG.debug("faiss cannot memory-map %s; reading it into memory", path)
    return faiss.read_index(path)


@dataclass(frozen=True)
class QueryFile:
    """What a query is matched against when excluding itself: its path and content hash."""

    path: str
    content_hash: str | None


def _pointer(index_dir: Path) -> str | None:
    """What CURRENT says right now (None if unreadable): tells a concurrent publish from damage."""
    try:
        return published_name(index_dir)
    except (OSError, ValueError):
        return None


WARM_CHUNK = 8 << 20  # bytes per read when warming a version's files
DEFAULT_K = 10  # results per query


class Searcher:
    """A published index, its id -> path table and the model that made its features.

    The index version is resolved once at construction: a later publish does not affect this
    Searcher. IVF and flat indexes are memory-mapped (loading is near-instant, pages come in on
    use). The model must carry the weights checksum recorded in the index, else ModelMismatchError.
    A compressed index with a vector store (meta "rerank" > 0) proposes that many candidates, ranked
    again by their exact scores from the store (memory-mapped: its pages are page cache, not ours).
    """

    def __init__(
        self, index_dir: Path | str, model: Path | str | None = None, threads: int = DEFAULT_THREADS, mmap: bool = True
    ) -> None:
        for attempt in range(5):
            named = _pointer(Path(index_dir))
            try:
                self.version_dir = current_version(Path(index_dir))
                self._open(mmap)
                break
            except PipelineError:
                # A newer build may have published and pruned the version CURRENT named, between our
                # reading CURRENT and opening that version: then CURRENT names another one by now,
                # to try in turn. A damaged version that is still current is reported at once.
                if attempt == 4 or _pointer(Path(index_dir)) == named:
                    raise
        self.nprobe = self.meta.get("nprobe")
        self._model_arg = model
        self._threads = threads
        self._model: FeatureModel | None = None
        self._direct_map = False
        self._map_lock = threading.Lock()  # the direct map, list map and metadata are made once, by the first thread
        self._lists: ListMap | None = None
        self._centroids: Centroids | None = None
        self._selections: OrderedDict[str, Selection] = OrderedDict()
        self._gathered = Gathered()  # selections' vectors or codes, made at their first search
        # large selections' codebook: trained by warm(), else at the first selection that needs codes
        self.codebook = Codebook(int(self.meta["dim"]))
        # candidates' local features (verify), kept for the next queries
        self._local_features = functools.lru_cache(maxsize=LOCAL_KEPT)(local_features)
        self._select_lock = threading.Lock()
        features = self.meta.get("features_dir")
        ivf = None if isinstance(self.index, CoarseToFine) else faiss.try_extract_index_ivf(self.index)
        self._ivf = ivf if self.meta.get("nlist") else None  # an IVF version's lists (the live part probes them too)
        # the journal's additions since this version and its removals (none for a version of a bare folder)
        checksum = self.meta["model"].get("checksum")
        dim = int(self.meta["dim"])
        self.live = LivePart(Path(features), dim, self.id_table, self._ivf, checksum) if features else None

    def _open(self, mmap: bool) -> None:
        index_path = self.version_dir / INDEX_FILE
        self.meta = read_meta(self.version_dir)
        try:
            self.index: faiss.Index | CoarseToFine
            if self.meta.get("codes"):  # coarse-to-fine: binary codes, re-ranked from the vector store
                index_path = self.version_dir / CODES_FILE
                self.index = CoarseToFine.open(self.version_dir, self.meta)
            else:
                self.index = _read_index(str(index_path), mmap)
        except (RuntimeError, OSError, KeyError, PipelineError) as exc:
            raise damaged(index_path, exc) from None
        self.id_table = IdTable(self.version_dir / IDS_FILE)  # opened now: the version stays readable if pruned
        # (its columns memory-mapped now, likewise)
        self.metadata = Metadata(self.version_dir, self.id_table, expected=bool(self.meta.get("metadata")))
        self.store = (
            self.index.store
            if isinstance(self.index, CoarseToFine)
            else VectorStore.open(self.version_dir)
            if self.meta.get("rerank")
            else None
        )

    def warm(self, stop: threading.Event | None = None) -> int:
        """Read this version's memory-mapped files (index or codes, vector store) through the page cache
        once, in large sequential reads, so that the first queries do not wait on the disk page by page:
        at 10M the re-rank store is 9.8 GB, and a first batch of queries re-ranking from it cold ran at
        14 queries/s (docs/benchmarks.md). Returns the bytes read. Cheap when the files are cached. Setting
        `stop` ends the reading early (a service shutting down does not wait for 10 GB). Then the codebook
        of large filtered selections is trained, where a filter may need it (seconds at 1M images), so that the
        first such filter does not wait for it."""
        done, buf = 0, bytearray(WARM_CHUNK)
        for name in (CODES_FILE if self.meta.get("codes") else INDEX_FILE, VECTORS_FILE, VECTOR_IDS_FILE):
            try:
                with open(self.version_dir / name, "rb", buffering=0) as fh:
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    while (stop is None or not stop.is_set()) and (n := fh.readinto(buf)):
                        done += n
            except FileNotFoundError:  # no store: an exact index
                continue
            except OSError as exc:
                raise damaged(self.version_dir / name, exc) from None
        stopped = stop is not None and stop.is_set()
        if self._ivf is not None and codes_possible(self.count, self.store is not None) and not stopped:
            self.codebook.train(self.ids, self.vectors)
        return done

    @property
    def model(self) -> FeatureModel:
        """The feature model (given, else the one recorded in the index, else the default), loaded on
        first use and checked against the index."""
        if self._model is None:
            recorded = self.meta["model"].get("path")
            use = self._model_arg or (recorded if recorded and Path(recorded).is_file() else None)
            fm = FeatureModel(use, threads=self._threads)
            want = self.meta["model"]
            expected = want.get("checksum")
            if fm.info.checksum != expected:
                made_by = f"checksum {expected[:12]}" if expected else "no checksum: an older index format"
                raise ModelMismatchError(
                    f"the index was built with model {want.get('name', '?')} ({made_by}) "
                    f"but {fm.path} is {fm.info.short()}; rebuild the index or pass the right --model"
                )
            self._model = fm
        return self._model

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def roots(self) -> list[str] | None:
        """The folders the collection was scanned from, as the version records them; None for versions
        made before they were recorded (or from a features folder without a catalog)."""
        roots = self.meta.get("roots")
        if roots and self.live is not None and self.live.ingest is not None:
            return sorted({*roots, str(self.live.ingest)})
        return roots or None

    def indexed_paths(self) -> list[str]:
        """Every indexed path, in id order."""
        return self.id_table.paths()

    def path_of(self, idx: int) -> str | None:
        """The indexed path of an image id (an addition's too), None when this version has no such id (a
        client's id, unlike one the index returned, may simply be wrong) or it was removed or hidden since."""
        live = self.live
        if live is None:
            return self.id_table.path_of(idx)
        live.sync()  # an addition acknowledged a moment ago, or a removal
        if idx in live.excluded:
            return None  # removed or hidden: as if it were not there
        path = self.id_table.path_of(idx)
        if path is None and idx in live.images:
            return live.images[idx].path
        return path

    @property
    def fields(self) -> dict[str, FieldType]:
        """The fields filters can name: the version's and those the additions since carry."""
        if self.live is None:
            return dict(self.metadata.fields)
        return {**self.live.fields(), **self.metadata.fields}

    def rows(self, ids: np.ndarray) -> dict[int, tuple[str, str]]:
        """id -> (path, content hash) for the given ids (-1 ignored), live additions included."""
        added = self.live.images if self.live is not None else {}
        wanted = np.asarray(ids).ravel().tolist()  # (a result's few ids: looked up one by one)
        out = self.id_table.rows(np.array([i for i in wanted if i not in added], np.int64))
        out.update((i, (added[i].path, added[i].content_hash)) for i in wanted if i in added)
        return out

    def fields_of(self, ids: np.ndarray) -> list[dict]:
        """Each id's fields (Metadata.of), live additions included."""
        added = self.live.images if self.live is not None else {}
        kept = [i for i in ids.tolist() if i not in added]
        version = dict(zip(kept, self.metadata.of(np.array(kept, np.int64)), strict=True))
        return [added_fields(added[i]) if i in added else version[i] for i in ids.tolist()]

    def ids(self) -> np.ndarray:
        """Every indexed id, sorted (stable catalog ids: sparse, not positions)."""
        return self.id_table.ids()

    def same_content_ids(self) -> list[np.ndarray]:
        """Ids of byte-identical files (same content hash), one sorted array per content indexed more than once."""
        return self.id_table.same_content_ids()

    def _search(
        self,
        vectors: np.ndarray,
        k: int,
        nprobe: int | None,
        selection: Selection | None = None,
        among: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of the version (within `selection`) and of its live part (within `among`), merged by score."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        live = self.live if self.live is not None and len(self.live) else None
        nprobe = nprobe or self.nprobe
        if live is not None and selection is None and self.store is None and self._ivf is not None and nprobe:
            # one pass over the coarse quantizer chooses the lists of the version and of its live part
            coarse, lists = self._ivf.quantizer.search(vectors, int(nprobe))
            version = search_preassigned(self._ivf, vectors, min(k, self.count), coarse, lists)
            return _merged(version, live.search(vectors, k, nprobe, among, (coarse, lists)), k)
        version = self._search_version(vectors, min(k, self.count), nprobe, selection)
        if live is None:
            return version
        return _merged(version, live.search(vectors, k, nprobe, among), k)

    def nearest(self, vectors: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The version's own top-k of each vector (scores, ids; -1 where fewer), at the tuned nprobe: no live part,
        no removals, no paths (the candidates of `duplicates --verify`)."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        return self._search_version(vectors, min(k, self.count), nprobe or self.nprobe, None)

    def _search_version(
        self, vectors: np.ndarray, k: int, nprobe: int | None, selection: Selection | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if selection is not None:
            return self._search_within(vectors, k, nprobe, selection)
        if isinstance(self.index, CoarseToFine):  # `nprobe` overrides the tuned setting (pool, nprobe or efSearch)
            return self.index.search(vectors, k, nprobe)
        params = ivf_params(int(nprobe)) if nprobe and self.meta.get("nlist") else None
        index: faiss.Index | Reranked = (
            Reranked(self.index, self.store, self.meta["rerank"]) if self.store is not None else self.index
        )
        return index.search(vectors, k, params=params)

    def _search_within(
        self, vectors: np.ndarray, k: int, nprobe: int | None, selection: Selection
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among a filter's selection, planned as index.filtered says."""
        k = min(k, len(selection.ids))
        if k == 0:
            return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
        ivf = self._ivf
        if isinstance(self.index, CoarseToFine):
            return self._codes_within(vectors, k, nprobe, selection)
        if ivf is None:  # Flat: exact, skipping unselected ids
            params = faiss.SearchParameters()
            params.sel = selection.selector()
            return self.index.search(vectors, k, params=params)
        how = route(selection, self.store is not None)
        if how == "exact":
            return self._exact(vectors, k, selection, self.vectors)
        if how == "codes":
            codes = self._gathered.codes(selection, self.codebook, self.ids, self.vectors)
            if codes is not None:
                return codes_search(codes, selection.ids, vectors, k, self.vectors)
        with self._map_lock:
            if self._lists is None or self._centroids is None:
                self._lists, self._centroids = ListMap(ivf), Centroids(ivf)
        probe = filtered_nprobe(int(nprobe or self.nprobe or 1), selection, len(selection.lists(self._lists)))
        fetch = max(k, int(self.meta.get("rerank") or 0)) if self.store is not None else k
        scores, ids = ivf_search(ivf, self._centroids, self._lists, vectors, fetch, probe, selection)
        if self.store is not None:
            return self.store.rerank(vectors, ids, k)
        return scores, ids

    def _exact(
        self, vectors: np.ndarray, k: int, selection: Selection, vectors_of: Callable[[np.ndarray], np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of a selection by exact inner product: from its vectors gathered once (index.Gathered), or read
        block by block when they would not fit its budget."""
        matrix = self._gathered.matrix(selection, vectors_of, int(self.meta["dim"]))
        if matrix is None:
            return exact_search(vectors_of, selection.ids, vectors, k)
        return ranked(matrix, selection.ids, vectors, k)

    def _codes_within(
        self, vectors: np.ndarray, k: int, nprobe: int | None, selection: Selection
    ) -> tuple[np.ndarray, np.ndarray]:
        """Binary codes: a small selection (or one too rare for a pool to hold k of it) ranked exactly from the
        store; a larger one from a pool enlarged for its share (at most MAX_POOL), kept to its selected hits."""
        assert isinstance(self.index, CoarseToFine)
        fetch = math.ceil(2 * k / max(selection.share, 1e-12))
        if route(selection, compressed=True) == "exact" or fetch > MAX_POOL:
            return self._exact(vectors, k, selection, self.index.store.get)
        scores, ids = self.index.search(vectors, min(fetch, self.count), nprobe)
        chosen = np.isin(ids, selection.ids) & (ids >= 0)
        order = np.argsort(~chosen, axis=1, kind="stable")[:, :k]  # selected hits first, in their score order
        kept = np.take_along_axis(chosen, order, 1)
        return (
            np.where(kept, np.take_along_axis(scores, order, 1), -np.inf).astype(np.float32),
            np.where(kept, np.take_along_axis(ids, order, 1), -1),
        )

    def select(self, where: Filter | Sequence[str] | None) -> Selection | None:
        """The images a filter selects (None: no filter), kept for the next searches with the same filter.
        FilterError (exit 2, HTTP 422) for a malformed filter, an unknown field or a value of the wrong type."""
        flt = where if isinstance(where, Filter) else parse_where(list(where or []))
        if not flt:
            return None
        key = "\n".join(flt.texts())
        with self._select_lock:
            cached = self._selections.get(key)
            if cached is not None:
                self._selections.move_to_end(key)
                return cached
        only_added = [name for name in flt.keys() if name not in self.metadata.fields]
        ids: np.ndarray | None
        if only_added and self.live is not None and set(only_added) <= set(self.live.fields()):
            ids = np.zeros(0, np.int64)  # fields that only additions carry: no image of the version has them
        else:
            ids = self.metadata.select(flt)
        assert ids is not None
        selection = Selection(ids, self.count)
        with self._select_lock:
            self._selections[key] = selection
            while len(self._selections) > SELECTIONS_KEPT:
                self._selections.popitem(last=False)
        return selection

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = DEFAULT_K,
        nprobe: int | None = None,
        min_score: float | None = None,
        exclude: Sequence[QueryFile | None] | None = None,
        deadline: float | None = None,
        where: Filter | Sequence[str] | None = None,
    ) -> list[list[Hit]]:
        """Top-k hits for each feature vector; `exclude[i]` drops hits that are that query's own file
        (same path) or a byte-identical copy (same content hash). A high `min_score` costs no more
        than a plain search: faiss is asked for more only while the last score fetched passes it.

        `deadline` (a time.monotonic() value): past it, DeadlineExceeded before the next faiss search or
        id lookup starts. One faiss call is not interrupted: k and nprobe bound it.

        `where`: only images the filter selects (filters: `--where` expressions, AND-ed) are returned, with
        the same recall as an unfiltered search at any selectivity (index.filtered)."""
        if k < 1:
            raise PipelineError(f"k must be at least 1 (got {k})")
        flt = where if isinstance(where, Filter) else parse_where(list(where or []))
        selection = self.select(flt)
        live = self.live
        if live is not None:
            live.sync()  # what was added or removed up to now is seen by this search
        among = live.select(flt, self.metadata.fields) if live is not None and flt else None
        excluded = live.excluded if live is not None else frozenset()
        available = (self.count if selection is None else len(selection.ids)) + (
            (len(live) if among is None else len(among)) if live is not None else 0
        )
        exclude = exclude or [None] * len(vectors)
        fetch = k + (8 if any(exclude) or excluded else 0)
        while True:
            check_deadline(deadline, "the index search")
            scores, ids = self._search(vectors, fetch, nprobe, selection, among)
            check_deadline(deadline, "reading the hits' paths")
            rows = self.rows(ids)
            unique = np.unique(ids[ids >= 0])
            fields = dict(zip(unique.tolist(), self.fields_of(unique), strict=True))
            out, short = [], False
            for srow, irow, ex in zip(scores, ids, exclude, strict=True):  # exclude: one per query
                hits: list[Hit] = []
                for s, i in zip(srow, irow, strict=True):
                    if i < 0 or (min_score is not None and s < min_score) or int(i) in excluded:
                        continue
                    path, content_hash = rows[int(i)]
                    if ex is not None and (path == ex.path or content_hash == ex.content_hash):
                        continue
                    hits.append(Hit(len(hits) + 1, int(i), path, float(s), fields[int(i)]))
                out.append(hits[:k])
                # Too many excluded copies: ask faiss for more, unless it already gave all it has or
                # the scores (sorted) already fell below min_score, so that more cannot pass it.
                short |= (
                    len(hits) < k
                    and (irow >= 0).all()
                    and fetch < available
                    and (min_score is None or srow[-1] >= min_score)
                )
            if not short:
                return out
            fetch = min(fetch * 4, available)

    def search(
        self,
        images: Sequence[Path | str],
        k: int = DEFAULT_K,
        nprobe: int | None = None,
        min_score: float | None = None,
        exclude_self: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        where: Filter | Sequence[str] | None = None,
        verify: bool = False,
    ) -> list[QueryResult]:
        """Top-k for each query image (among the images `where` selects); a query that cannot be decoded gets
        an error, the rest still answer. `verify`: each hit is checked (Searcher.verified)."""
        if k < 1:
            raise PipelineError(f"k must be at least 1 (got {k})")
        self.select(where)  # a bad filter fails before any image is decoded
        size = self.model.info.resize_to
        results: dict[int, QueryResult] = {}
        good: list[tuple[int, np.ndarray, QueryFile]] = []
        for i, path in enumerate(images):
            try:
                decoded = load_image(path, size)
            except ImageError as exc:
                results[i] = QueryResult(str(path), error=str(exc))
                continue
            good.append((i, decoded.pixels, QueryFile(str(Path(path).absolute()), decoded.content_hash)))
        for start in range(0, len(good), batch_size):
            chunk = good[start : start + batch_size]
            feats = self.model.embed_each([px for _, px, _ in chunk], batch_size)
            excl = [q for _, _, q in chunk] if exclude_self else None
            found = self.search_vectors(feats, k, nprobe, min_score, excl, where=where)
            for (i, _, _), hits in zip(chunk, found, strict=True):
                results[i] = QueryResult(str(images[i]), hits)
                if verify:
                    results[i] = self.verified(results[i], local_features(images[i], mirrored=True))
        return [results[i] for i in range(len(images))]

    def search_like(
        self,
        paths: Sequence[Path | str],
        k: int = DEFAULT_K,
        nprobe: int | None = None,
        min_score: float | None = None,
        exclude_self: bool = False,
        deadline: float | None = None,
        where: Filter | Sequence[str] | None = None,
        verify: bool = False,
    ) -> list[QueryResult]:
        """Top-k for images already in the index, from their stored vectors (no model run); `deadline` and
        `where` as in search_vectors, `verify` as in search."""
        results: dict[int, QueryResult] = {}
        found: list[tuple[int, np.ndarray, QueryFile]] = []
        if self.live is not None:
            self.live.sync()
        for i, p in enumerate(paths):
            key = str(Path(p).absolute())
            row = self.id_table.find(key)
            added = self.live.find(key) if self.live is not None and row is None else None
            if added is not None:
                found.append((i, added.feature, QueryFile(key, added.content_hash)))
            elif row is None:
                results[i] = QueryResult(str(p), error="not in the index (--like takes an indexed image path)")
            else:
                found.append((i, self.vectors([row[0]])[0], QueryFile(key, row[1])))
        if found:
            vecs = np.stack([v for _, v, _ in found])
            excl = [q for _, _, q in found] if exclude_self else None
            found_hits = self.search_vectors(vecs, k, nprobe, min_score, excl, deadline, where)
            for (i, _, _), hits in zip(found, found_hits, strict=True):
                results[i] = QueryResult(str(paths[i]), hits)
                if verify:
                    results[i] = self.verified(results[i], local_features(paths[i], mirrored=True))
        return [results[i] for i in range(len(paths))]

    def verified(
        self, result: QueryResult, query: LocalFeatures, read: Callable[[str], LocalFeatures] | None = None
    ) -> QueryResult:
        """The result with each of its top VERIFY_AT_MOST hits checked against the query's local features
        (copies.verify_pair: matched ORB features that one similarity transform explains, the mirrored query
        too): verified hits first, then the others, each by score. A hit whose file cannot be read now is
        unverified with the reason. `read`: a candidate's local features from its path (default: the file,
        kept for the next queries). PipelineError without OpenCV (the `verify` extra)."""
        read = read or self._local_features
        checked = result.hits[:VERIFY_AT_MOST]
        with ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="verify") as pool:  # OpenCV releases the GIL
            verdicts = list(pool.map(lambda h: verify_pair(query, read(h.path)), checked))
        hits = [
            replace(h, verified=v.verified, inliers=v.inliers, unverified=v.reason)
            for h, v in zip(checked, verdicts, strict=True)
        ] + result.hits[VERIFY_AT_MOST:]
        hits.sort(key=lambda h: (not h.verified, -h.score))
        return replace(result, hits=[replace(h, rank=r) for r, h in enumerate(hits, 1)])

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of indexed images, by id: from the vector store when the version has one
        (exact up to float16), else from the index (for compressed codes: decoded)."""
        return self.store.get(ids) if self.store is not None else self.decoded(ids)

    def decoded(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The vectors the index itself holds, by id (for compressed codes: decoded, as its scores see them)."""
        if isinstance(self.index, CoarseToFine):
            raise PipelineError("binary codes cannot be decoded to vectors; use the exact ones (Searcher.vectors)")
        with self._map_lock:
            self._make_direct_map(self.index)
        return self.index.reconstruct_batch(np.asarray(ids, np.int64))

    def _make_direct_map(self, index: faiss.Index) -> None:
        if not self._direct_map:
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan):
                # faiss 1.15 crashes (segfault) reconstructing from fast-scan lists read from a file
                raise PipelineError(
                    f"the codes of {self.meta.get('factory')} (fast-scan) cannot be decoded; "
                    "use the exact vectors (Searcher.vectors) or an index of another kind"
                )
            try:  # ids are sparse (the catalog's): an IVF index finds them through a hash table
                hashtable = faiss.DirectMap.Hashtable  # type: ignore[attr-defined]  # faiss stub: no DirectMap
                faiss.extract_index_ivf(index).set_direct_map_type(hashtable)
            except RuntimeError:
                pass  # not an IVF index: reconstruct works directly (IndexIDMap2 maps ids itself)
            self._direct_map = True

"""Filling an index from the shards, with the exact neighbours of the recall queries gathered on the way.

Also the rows a build reads by position or by id (training samples, recall queries, an update's added
rows).

fill_range is the one fill: a local build calls it on all the shards, a distributor (FillDistributor,
e.g. distributed.RayDistributor) on ranges of them, each into a copy of the trained empty index.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import NamedTuple, Protocol

import faiss
import numpy as np

from ..features import ShardInfo, read_rows, read_shard
from ..progress import Progress
from .idtable import AddedRows, write_ids
from .store import StoreWriter

TRUTH_DEPTH = 32  # exact neighbours kept per recall query: updates drop removed ones and stay exact to depth k+1
SAMPLE_READS = 4096  # reads a training sample is drawn in (sample_runs)
Parts = list[tuple[ShardInfo, np.ndarray]]  # shards and the rows of each to index


class Truth(NamedTuple):
    """The exact top-k of each recall query, best first (ids -1 and scores -inf past the rows offered)."""

    ids: np.ndarray  # int64 [queries, k]
    scores: np.ndarray  # float32 [queries, k], inner products


class ExactNeighbours:
    """The exact top-k (max inner product) of `queries` among every row offered so far."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries = queries
        self.heap = faiss.ResultHeap(len(queries), k, keep_max=True)

    def offer_rows(self, feats: np.ndarray, ids: np.ndarray) -> None:
        """Rows `feats`, which have `ids`: their scores are computed here."""
        d, i = faiss.knn(self.queries, feats, min(self.heap.k, len(feats)), metric=faiss.METRIC_INNER_PRODUCT)
        self.heap.add_result(d, np.where(i >= 0, ids[i], -1))

    def offer(self, found: Truth) -> None:
        """Neighbours found elsewhere (a range of shards filled by another task, a published version's)."""
        self.heap.add_result(np.ascontiguousarray(found.scores, np.float32), np.ascontiguousarray(found.ids))

    def result(self) -> Truth:
        self.heap.finalize()
        return Truth(self.heap.I, self.heap.D)


class Fillable(Protocol):
    """What a fill adds rows to: a faiss index, or a sink of codes (binary.py)."""

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray, /) -> None: ...


def fill_range(
    index: Fillable,
    parts: Parts,
    ids: np.ndarray,
    queries: np.ndarray | None,
    k: int,
    features: Iterable[np.ndarray] | None = None,
    advance: Callable[[int], None] | None = None,
) -> Truth | None:
    """Add the live rows of these shards, under their `ids` (in order), to `index`, and return the exact
    top-k of `queries` among them (None without queries). `features`: those rows, shard by shard, when
    a reader already has them; else the shards are read here. `advance(rows)` after each shard."""
    near = ExactNeighbours(queries, k) if queries is not None else None
    offset = 0
    for (_, rows), feats in zip(parts, features if features is not None else shard_rows(parts), strict=True):
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        block = ids[offset : offset + len(rows)]
        index.add_with_ids(feats, block)
        if near is not None:
            near.offer_rows(feats, block)
        offset += len(rows)
        if advance is not None:
            advance(len(rows))
    return None if near is None else near.result()


def shard_rows(parts: Parts) -> Iterator[np.ndarray]:
    """The live feature rows of each shard, read one shard at a time."""
    for info, rows in parts:
        yield read_shard(info.path).features[rows]


class FillDistributor(Protocol):
    """Fills an index on workers of its own (distributed.RayDistributor): what build_index(distributor=...)
    calls in place of the local fill. The result must be the local fill's: the same rows under the same
    ids in the same lists, in the same order (fill_range over ranges of shards, merged in id order)."""

    def fill(
        self,
        index: faiss.Index,
        parts: Parts,
        ids: np.ndarray,
        queries: np.ndarray | None,
        k: int,
        progress: bool | None,
    ) -> Truth | None:
        """Add the live rows of `parts` under `ids` to the trained empty `index`; return the exact top-k of
        `queries` among them (None without queries)."""


class _Stopped(Exception):
    """The fill failed: the id table's writer stops at its next shard."""


def fill_index(
    index: Fillable,
    parts: Parts,
    ids: np.ndarray,
    ids_path: Path,
    queries: np.ndarray | None,
    progress: bool | None,
    pool: Executor,
    store: StoreWriter | None = None,
    distributor: FillDistributor | None = None,
) -> tuple[Truth | None, Future]:
    """Add every shard to the index under `ids` while a thread of `pool` writes the id table (and the
    vector `store`, if given: the caller closes it). Returns the exact top-TRUTH_DEPTH neighbours of
    `queries` (for recall) and the writer's future: its result() is due before publishing.

    Locally the writer reads each shard once and hands its rows over (at most two shards in memory
    beyond the index); with a `distributor`, its workers read and fill while the writer reads here."""
    if distributor is not None:
        assert isinstance(index, faiss.Index), "a distributor fills a faiss index"
        writer = pool.submit(write_ids, parts, ids, ids_path, None if store is None else store.add)
        return distributor.fill(index, parts, ids, queries, TRUTH_DEPTH, progress), writer
    blocks: queue.Queue = queue.Queue(maxsize=2)
    stopped = threading.Event()

    def hand_over(block_ids: np.ndarray, feats: np.ndarray) -> None:
        if stopped.is_set():
            raise _Stopped
        if store is not None:
            store.add(block_ids, feats)
        blocks.put(feats)

    def write() -> None:
        try:
            write_ids(parts, ids, ids_path, hand_over)
        except BaseException:
            blocks.put(None)  # wakes the fill, which raises this error
            raise

    def received() -> Iterator[np.ndarray]:
        for _ in parts:
            feats = blocks.get()
            if feats is None:
                writer.result()
            yield feats

    writer = pool.submit(write)
    try:
        with Progress(sum(len(rows) for _, rows in parts), "index", enabled=progress) as bar:
            return fill_range(index, parts, ids, queries, TRUTH_DEPTH, received(), bar.update), writer
    except BaseException:
        stopped.set()
        while not writer.done():  # take what it hands over until it stops, so that it never waits on us
            try:
                blocks.get(timeout=0.1)
            except queue.Empty:
                pass
        raise


def sample_runs(rng: np.random.Generator, n: int, size: int, reads: int = SAMPLE_READS) -> np.ndarray:
    """`size` distinct positions of `n`, sorted, drawn at random as runs of consecutive positions, so that
    reading them from the shards costs about `reads` reads, not one per row: on this project's disk a
    random read costs ~6 ms, and 262,144 rows one by one took minutes of a 10M build. Positions
    follow the extraction order (a folder's images are neighbours); runs of 64 among 4,096 spread
    over the whole collection keep the k-means sample representative."""
    if size >= n:
        return np.arange(n)
    run = -(-size // reads)
    if run == 1:
        return np.sort(rng.choice(n, size=size, replace=False))
    starts = np.sort(rng.choice(n // run, size=-(-size // run), replace=False)) * run
    return (starts[:, None] + np.arange(run)).ravel()[:size]


def rows_at(parts: Parts, positions: np.ndarray) -> np.ndarray:
    """Feature rows by position (sorted; positions count the indexed rows in order), read shard by shard
    (whole shards when many of their rows are wanted)."""
    starts = np.concatenate([[0], np.cumsum([len(rows) for _, rows in parts])])
    out = []
    for s, (info, rows) in enumerate(parts):
        wanted = rows[positions[(positions >= starts[s]) & (positions < starts[s + 1])] - starts[s]]
        if len(wanted) > info.count // 8:
            out.append(read_shard(info.path).features[wanted])
        elif len(wanted):
            out.append(read_rows(info.path, wanted))
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def rows_with_ids(parts: Parts, ids: np.ndarray, wanted: np.ndarray) -> Iterator[AddedRows]:
    """Features, ids, paths and content hashes of the indexed rows whose id is in `wanted`, shard by shard."""
    take = np.isin(ids, wanted)
    offset = 0
    for info, rows in parts:
        mine = take[offset : offset + len(rows)]
        if mine.any():
            data = read_shard(info.path)
            sel = rows[mine]
            yield (
                np.ascontiguousarray(data.features[sel], dtype=np.float32),
                ids[offset : offset + len(rows)][mine],
                [data.paths[r] for r in sel],
                [data.hashes[r] for r in sel],
            )
        offset += len(rows)

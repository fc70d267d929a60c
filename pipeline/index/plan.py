"""What index to build for a collection (IndexPlan), and the faiss index object it names.

The plan: factory, lists, training size, re-ranking; what a factory means is asked of faiss, never
parsed by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from ..errors import PipelineError

MIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid
DEFAULT_FLAT_BELOW = 20_000  # under this, exact search over 512-d is about a millisecond: IVF buys nothing
# Candidates a compressed index proposes for exact re-ranking (store.py). Measured with bench
# vectors at the density of 10M (1,000 per cluster; docs/history/benchmarks-log-before-2026-12.md): the
# share of the true top-10 among the top-c candidates of PQ256x4fs codes is 0.66 / 0.95 / 0.997 /
# 1.0 at c = 50 / 200 / 500 / 1000 (PQ128x4fs: 0.37 / 0.73 / 0.95 / 1.0; SQ4: 0.96 / 0.9995 at 50 /
# 200, but it scans 50x slower than fast-scan). 500 float16 rows re-rank in well under a millisecond.
DEFAULT_RERANK = 500
# An exact (flat) coarse quantizer up to this many lists: at 4096 lists it costs 4 MFLOP a query (about
# 0.05 ms) and ranks the lists exactly. An HNSW quantizer at its default efSearch (16) probed the wrong
# lists at 10M: with 64 lists probed only 0.84 of the true top-10 were in them (0.95 at efSearch 256),
# where an exact quantizer had 0.99 at 8 lists (docs/history/benchmarks-log-before-2026-12.md, 10M).
HNSW_QUANTIZER_FROM = 16384
HNSW_QUANTIZER_EF = 256  # efSearch given to an HNSW coarse quantizer (its lists, at add and search)


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    nlist: int  # 0 when the index has no IVF layer
    train_size: int
    reason: str
    bytes_estimate: int = 0  # memory of the filled index, estimated before building it
    rerank: int = 0  # candidates re-ranked exactly from the version's vector store (compressed codes); 0: none


def parse_size(text: str) -> int:
    """'16G', '500M', '2.5GB', '1024' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(float(t))
    except ValueError:
        raise PipelineError(f"cannot read memory size {text!r}: use e.g. 500M or 16G") from None


def factory_facts(factory: str, dim: int) -> tuple[int, int]:
    """(nlist, bytes per stored vector) of a factory string, asked of the faiss object it builds
    (never parsed by hand: 'IVF65536_HNSW32,Flat' has nlist 65536). IVF lists store an 8-byte id
    beside each code."""
    index = _from_factory(factory, dim)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # no IVF layer
        try:
            return 0, int(index.sa_code_size())
        except RuntimeError:
            return 0, 4 * dim
    return int(ivf.nlist), int(ivf.code_size) + 8


def plan_index(
    n: int,
    dim: int = 512,
    *,
    factory: str | None = None,
    nlist: int | None = None,
    flat_below: int = DEFAULT_FLAT_BELOW,
    train_per_list: int = 64,
    max_memory: int | str | None = None,
    rerank: int | None = None,
) -> IndexPlan:
    """Choose the index for n vectors of `dim`, with the reasoning.

    Exact (Flat) below `flat_below`; else IVF with nlist the power of two >= 4 sqrt(n) (faiss
    guidance: 4..16 sqrt(n)), capped so each list has >= 39 training points. With `max_memory`
    (bytes), the vectors are compressed until the index fits: SQ8, then 4-bit PQ codes scanned with
    fast-scan (PQ{dim/2}x4fs, then fewer bytes). Compressed codes are followed by exact re-ranking of
    `rerank` candidates (default DEFAULT_RERANK) from a float16 store on disk, memory-mapped, which
    the budget does not count: it is page cache, not the index's memory. PQ codes scan so fast that
    a finer IVF buys little and costs training time quadratic in nlist (2 cores: hours at 65k
    lists): they get nlist the power of two >= sqrt(n), and an HNSW quantizer only from
    HNSW_QUANTIZER_FROM lists on (with its efSearch raised: quantizer_search_depth).
    """
    if n < 1:
        raise PipelineError("no features to index: the shards hold no images")
    if isinstance(max_memory, str):
        max_memory = parse_size(max_memory)
    if rerank is not None and rerank < 0:
        raise PipelineError(f"--rerank must be at least 0 (got {rerank})")
    if factory:
        return _given_plan(factory, n, dim, train_per_list, rerank)
    auto_nlist = nlist is None
    ivf, nlist, reason = _ivf_layer(n, nlist, flat_below)
    fac, code, nlist, need = _fitting_code(n, dim, ivf, nlist, auto_nlist, max_memory)
    compressed = code != "Flat"
    rerank = _rerank(compressed, rerank)
    if compressed:
        reason = _compressed_reason(n, dim, fac, code, nlist, need, auto_nlist, rerank)
    train = min(n, max(max(MIN_POINTS_PER_LIST, train_per_list) * nlist, 20_000 if compressed else 0))
    return IndexPlan(fac, nlist, train, reason, need, rerank)


def _given_plan(factory: str, n: int, dim: int, train_per_list: int, rerank: int | None) -> IndexPlan:
    """The plan of a factory given with --factory: its lists and code size are asked of faiss."""
    nl, per_vector = factory_facts(factory, dim)
    compressed = per_vector - (8 if nl else 0) < 4 * dim
    train = min(n, max(max(MIN_POINTS_PER_LIST, train_per_list) * nl, 20_000 if compressed else 0) or 100_000)
    return IndexPlan(
        factory,
        nl,
        train,
        f"factory {factory!r} given with --factory",
        n * per_vector + nl * dim * 4,
        _rerank(compressed, rerank),
    )


def _ivf_layer(n: int, nlist: int | None, flat_below: int) -> tuple[str, int, str]:
    """The IVF prefix ('' for exact search), nlist and why, chosen by size before a budget compresses the codes."""
    if nlist is None and n < flat_below:
        return "", 0, f"{n} vectors < {flat_below}: exact inner-product search is fast at this size, so no IVF"
    if nlist is None:
        nlist = min(2 ** math.ceil(math.log2(4 * math.sqrt(n))), n // MIN_POINTS_PER_LIST)
        reason = (
            f"{n} vectors: nlist {nlist} (about 4*sqrt(N) = {4 * math.sqrt(n):.0f}, "
            f"at least {MIN_POINTS_PER_LIST} training points per list)"
        )
    else:
        reason = f"nlist {nlist} given with --nlist"
    if nlist < 1 or nlist * MIN_POINTS_PER_LIST > n:
        raise PipelineError(
            f"nlist {nlist} needs at least {max(nlist, 1) * MIN_POINTS_PER_LIST} vectors to train; have {n}"
        )
    return f"IVF{nlist},", nlist, reason


def _fitting_code(
    n: int, dim: int, ivf: str, nlist: int, auto_nlist: bool, max_memory: int | None
) -> tuple[str, str, int, int]:
    """(factory, code, nlist, bytes) of the least compressed code whose index fits `max_memory`, else an error."""
    codes = ["Flat", "SQ8"] + [f"PQ{m}x4fs" for m in (dim // 2, dim // 4, dim // 8, dim // 16) if m and dim % m == 0]
    for code in codes:
        if code.startswith("PQ") and auto_nlist and ivf:
            nlist = min(2 ** math.ceil(math.log2(math.sqrt(n))), n // MIN_POINTS_PER_LIST)
            ivf = f"IVF{nlist}_HNSW32," if nlist >= HNSW_QUANTIZER_FROM else f"IVF{nlist},"
        fac = ivf + code
        need = n * factory_facts(fac, dim)[1] + nlist * dim * 4
        if max_memory is None or need <= max_memory:
            return fac, code, nlist, need
    assert max_memory is not None, "without a memory budget the first code fits"
    raise PipelineError(
        f"{n} vectors do not fit in {max_memory / 2**20:.0f} MiB even as {fac} "
        f"({need / 2**20:.0f} MiB); raise --max-memory"
    )


def _compressed_reason(
    n: int, dim: int, fac: str, code: str, nlist: int, need: int, auto_nlist: bool, rerank: int
) -> str:
    """Why a compressed index was chosen, for meta.json: the budget it had to fit and what it gave up."""
    how = (
        "given with --nlist"
        if not auto_nlist
        else "the power of two >= sqrt(N)"
        if code.startswith("PQ")
        else "about 4*sqrt(N)"
    )
    reason = (
        f"{n} vectors as flat floats need {n * 4 * dim / 2**20:.0f} MiB > --max-memory, so {fac} "
        f"({need / 2**20:.0f} MiB: codes, ids and quantizer), {nlist} lists (nlist {how})"
    )
    if rerank:
        reason += (
            f"; the top {rerank} candidates re-ranked exactly from a float16 store on disk "
            f"({n * 2 * dim / 2**20:.0f} MiB, memory-mapped, not resident)"
        )
    return reason


def _rerank(compressed: bool, rerank: int | None) -> int:
    """Candidates to re-rank: compressed codes rank approximately, so DEFAULT_RERANK unless told."""
    return 0 if not compressed else DEFAULT_RERANK if rerank is None else rerank


def index_is_flat(plan: IndexPlan) -> bool:
    """Exact search: nothing to train, recall 1 by construction."""
    return plan.factory == "Flat"


def new_index(plan: IndexPlan, dim: int) -> tuple[faiss.Index, str]:
    """The empty index of `plan` and its kind (index_kind, what an update must keep). An index without
    IVF lists is wrapped in an id map: IVF lists store the ids themselves, other indexes do not."""
    index = _from_factory(plan.factory, dim)
    quantizer_search_depth(index)
    kind = index_kind(index)
    return (index if plan.nlist else faiss.IndexIDMap2(index)), kind


def _from_factory(factory: str, dim: int) -> faiss.Index:
    """faiss.index_factory, with its error as one line."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise PipelineError(f"faiss cannot build factory {factory!r}: {str(exc).strip().splitlines()[-1]}") from None


def quantizer_search_depth(index: faiss.Index, ef: int = HNSW_QUANTIZER_EF) -> None:
    """Give an HNSW coarse quantizer an efSearch deep enough for the lists it must rank (the value is
    saved with the index, so adding and every later search use it): at faiss's default (16) it
    returns approximate nearest lists, and the vectors they miss are lost to any nprobe."""
    try:
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    except RuntimeError:  # no IVF layer
        return
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, ef)


def index_kind(index: faiss.Index) -> str:
    """What an update must keep of the published index (asked of faiss): its classes and the code
    size of its vectors. The number of IVF lists may differ from what a new plan would choose."""
    top = type(faiss.downcast_index(index)).__name__
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return top
    return f"{top}/{type(faiss.downcast_index(ivf)).__name__}/{ivf.code_size}"


def stored_ids(index: faiss.Index) -> np.ndarray:
    """The ids an index holds, asked of the index itself (its inverted lists, in list order, or its id
    map): an update needs no pass over the id table."""
    try:
        invlists = faiss.extract_index_ivf(index).invlists
    except RuntimeError:  # no IVF layer: an IndexIDMap2
        id_map = faiss.downcast_index(index)
        assert isinstance(id_map, faiss.IndexIDMap), f"an index without IVF lists is built with ids: {id_map}"
        return faiss.vector_to_array(id_map.id_map)
    assert invlists is not None, "an IVF index has inverted lists"
    return np.concatenate(
        [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)) for i in range(invlists.nlist)]
        + [np.zeros(0, np.int64)]
    )

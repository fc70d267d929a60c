"""The index stage: shards -> a FAISS inner-product index, tuned, saved and published atomically as a version.

One module per job, and this package as the one door others use:
  plan.py         what index to build for a collection, and the faiss object it names
  tune.py         recall against exact search; the nprobe that reaches the target
  fill.py         filling an index from the shards (fill_range; FillDistributor for other workers)
  idtable.py      ids.sqlite, a version's id -> path table: the only module that touches it
  versions.py     the version folder and its meta.json, CURRENT, publishing and pruning
  build.py        build_index: a full build, or an update when asked and possible
  update.py       the nightly update of the published version, without training again
  ivf_rewrite.py  an IVF index's next version written straight from the published file
  store.py        the float16 re-rank vector store
  codes.py        binary codes and their coarse-to-fine search; binary.py builds such a version
  metatable.py    a user's metadata file (--metadata) as a table: CSV or JSON lines, rows without a path reported
  userfields.py   the user's metadata files read into typed fields of the indexed images, bad rows reported
  metadata.py     metadata/ in a version: typed columns of every image's fields; the ids a filter selects
  annotate.py     a version's fields made: metadata files read whole or where they changed; republish_metadata
  filtered.py     search within a selection: exact, or an id selector over the lists holding it
  livepart.py     a version's live part: the journal's additions it lacks, searchable beside it; removals
"""

from .annotate import metadata_changed, metadata_files, republish_metadata
from .build import build_index
from .codes import CODES_FILE, DEFAULT_BITS, ITQ_FILE, MAX_POOL, CoarseToFine, parse_codes
from .fill import TRUTH_DEPTH, ExactNeighbours, FillDistributor, Truth, fill_range, sample_runs
from .filtered import (
    ALPHA,
    EXACT_BELOW,
    GATHER_BYTES,
    PROBE_ABOVE,
    RERANK,
    STORE_EXACT_BELOW,
    STORE_PROBE_ABOVE,
    Centroids,
    Codebook,
    Gathered,
    ListMap,
    Route,
    Selection,
    codes_possible,
    codes_search,
    exact_search,
    filtered_nprobe,
    ivf_search,
    ranked,
    route,
    search_preassigned,
)
from .idtable import IDS_FILE, IdTable
from .livepart import MAX_LIVE, LivePart, added_fields
from .metadata import METADATA_DIR, Metadata, collect_facts, write_metadata
from .plan import (
    DEFAULT_FLAT_BELOW,
    DEFAULT_RERANK,
    HNSW_QUANTIZER_EF,
    IndexPlan,
    factory_facts,
    index_kind,
    parse_size,
    plan_index,
    quantizer_search_depth,
)
from .store import VECTOR_IDS_FILE, VECTORS_FILE, Reranked, VectorStore, has_store, update_store, write_store
from .tune import DEFAULT_TARGET_RECALL, NPROBE_GRID, ivf_params, lower_bound, recall_at, tune_nprobe
from .update import DEFAULT_RETRAIN_ABOVE, HOLD_SLACK
from .userfields import BUILTIN_FIELDS, KnownRows, SourceReport, UserField, read_metadata_files
from .versions import (
    CURRENT_FILE,
    DEFAULT_KEEP,
    INDEX_FILE,
    META_FILE,
    RECALL_FILE,
    VERSIONS_DIR,
    IndexReport,
    current_version,
    damaged,
    prune_versions,
    published_name,
    read_meta,
    recorded_model,
    version_damage,
    version_dirs,
)

__all__ = [
    "MAX_LIVE",
    "LivePart",
    "added_fields",
    "MAX_POOL",
    "route",
    "Route",
    "codes_possible",
    "codes_search",
    "Codebook",
    "PROBE_ABOVE",
    "STORE_PROBE_ABOVE",
    "RERANK",
    "search_preassigned",
    "metadata_changed",
    "metadata_files",
    "republish_metadata",
    "ALPHA",
    "EXACT_BELOW",
    "GATHER_BYTES",
    "Gathered",
    "ranked",
    "STORE_EXACT_BELOW",
    "Centroids",
    "ListMap",
    "Selection",
    "exact_search",
    "filtered_nprobe",
    "ivf_search",
    "METADATA_DIR",
    "Metadata",
    "collect_facts",
    "write_metadata",
    "BUILTIN_FIELDS",
    "KnownRows",
    "SourceReport",
    "UserField",
    "read_metadata_files",
    "CODES_FILE",
    "CURRENT_FILE",
    "DEFAULT_BITS",
    "DEFAULT_FLAT_BELOW",
    "DEFAULT_KEEP",
    "DEFAULT_RERANK",
    "DEFAULT_RETRAIN_ABOVE",
    "DEFAULT_TARGET_RECALL",
    "HNSW_QUANTIZER_EF",
    "HOLD_SLACK",
    "IDS_FILE",
    "INDEX_FILE",
    "ITQ_FILE",
    "META_FILE",
    "NPROBE_GRID",
    "RECALL_FILE",
    "TRUTH_DEPTH",
    "VECTORS_FILE",
    "VECTOR_IDS_FILE",
    "VERSIONS_DIR",
    "CoarseToFine",
    "ExactNeighbours",
    "FillDistributor",
    "IdTable",
    "IndexPlan",
    "IndexReport",
    "Reranked",
    "Truth",
    "VectorStore",
    "build_index",
    "current_version",
    "published_name",
    "damaged",
    "factory_facts",
    "fill_range",
    "has_store",
    "index_kind",
    "ivf_params",
    "lower_bound",
    "parse_codes",
    "parse_size",
    "plan_index",
    "prune_versions",
    "quantizer_search_depth",
    "read_meta",
    "recall_at",
    "recorded_model",
    "sample_runs",
    "tune_nprobe",
    "update_store",
    "version_damage",
    "version_dirs",
    "write_store",
]

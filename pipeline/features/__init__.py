"""The features folder: HDF5 shards, their SQLite catalog, the errors file and the lock.

Its modules, one format or job each, and this package as the one door others use:
  shards.py   the shard file (HDF5): write, read, list, remove, check the model that made it
  catalog.py  catalog.sqlite: every image, where its feature lives, which rows are live (all its SQL)
  folder.py   the folder as a whole: writing under the lock, compaction, live rows, exact features
  live.py     live.sqlite: the journal of images added and removed between nightly builds
  fold.py     the journal folded into shards and the catalog (the nightly job's first step)
"""

from .catalog import CATALOG_FILE, Catalog, Entry, catalog_damage
from .fold import ADDED_FIELDS_FILE, FoldReport, added_fields_file, fold_live
from .folder import (
    DEFAULT_COMPACT_BELOW,
    DEFAULT_SHARD_SIZE,
    ERRORS_FILE,
    LiveParts,
    Lookup,
    RowMeta,
    ShardWriter,
    compact,
    exact_features,
    live_digest,
    live_parts,
    scrub,
    write_errors_file,
    writing,
)
from .live import JOURNAL_FILE, LIVE_FIRST_ID, Journal, LiveImage, ingest_folder
from .shards import (
    SCHEMA_VERSION,
    ShardData,
    ShardInfo,
    check_model,
    list_shards,
    next_shard_number,
    read_facts,
    read_rows,
    read_shard,
    remove_shard,
    shard_damage,
    shard_info,
    shard_model,
    shard_name,
    write_shard,
)

__all__ = [
    "ADDED_FIELDS_FILE",
    "FoldReport",
    "Lookup",
    "added_fields_file",
    "fold_live",
    "JOURNAL_FILE",
    "LIVE_FIRST_ID",
    "Journal",
    "ingest_folder",
    "LiveImage",
    "CATALOG_FILE",
    "DEFAULT_COMPACT_BELOW",
    "DEFAULT_SHARD_SIZE",
    "ERRORS_FILE",
    "SCHEMA_VERSION",
    "Catalog",
    "Entry",
    "catalog_damage",
    "RowMeta",
    "ShardData",
    "ShardInfo",
    "ShardWriter",
    "check_model",
    "compact",
    "exact_features",
    "list_shards",
    "live_digest",
    "LiveParts",
    "live_parts",
    "next_shard_number",
    "read_rows",
    "read_facts",
    "read_shard",
    "remove_shard",
    "scrub",
    "shard_damage",
    "shard_info",
    "shard_model",
    "shard_name",
    "write_errors_file",
    "write_shard",
    "writing",
]

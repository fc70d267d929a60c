"""Near-duplicate groups of a whole collection, found with its published index (`pipeline duplicates`).

A group is a connected component of the graph "cosine >= threshold" over every indexed image;
byte-identical files (same content hash) are always in one group, whatever the threshold.

Six modules, one step each, and this package as the door others use:
  thresholds.py  the cosine calibrated for each feature recipe, and which one applies to an index
  pairs.py       candidate pairs above a cut, from the index (flat blocks, or IVF lists and their probers)
  groups.py      union-find over positions: pairs -> connected components, largest first
  describe.py    DuplicateGroup / DuplicateImage: each group's files, best quality first, scored to the first
  verified.py    --verify: candidates above a lower floor, each pair checked with local features, joined
                 without chaining two groups on one pair
  find.py        find_groups: the steps above, in order, with re-ranking for compressed codes
"""

from __future__ import annotations

from .describe import DuplicateGroup, DuplicateImage, describe_groups
from .find import DEFAULT_MIN_SIZE, find_groups
from .groups import components, root_of, roots, union
from .pairs import MAX_PROBES, PROBE_GAP, Probing, pairs_above, pre_transform, probe_table, probers_by_list, probing_for
from .thresholds import DEFAULT_THRESHOLD, DEFAULT_WHITENED_THRESHOLD, THRESHOLDS, default_threshold, threshold_for
from .verified import NEIGHBOURS, POSSIBLE, STRONG_INLIERS, VerifyReport, possible_for

__all__ = [
    "DEFAULT_MIN_SIZE",
    "DEFAULT_THRESHOLD",
    "MAX_PROBES",
    "PROBE_GAP",
    "THRESHOLDS",
    "DuplicateGroup",
    "DuplicateImage",
    "Probing",
    "components",
    "default_threshold",
    "threshold_for",
    "DEFAULT_WHITENED_THRESHOLD",
    "describe_groups",
    "find_groups",
    "pairs_above",
    "pre_transform",
    "probe_table",
    "probers_by_list",
    "probing_for",
    "roots",
    "root_of",
    "NEIGHBOURS",
    "POSSIBLE",
    "STRONG_INLIERS",
    "VerifyReport",
    "possible_for",
    "union",
]

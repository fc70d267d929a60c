"""The cosine threshold calibrated for each feature recipe, and which one applies to an index."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import PipelineError
from ..features import list_shards, shard_model
from ..index import recorded_model
from ..model import POOLINGS, ModelInfo
from ..search import Searcher

LOG = logging.getLogger(__name__)

# The cosine at or above which two images are one picture, per (pooling, regions whitened) of the index's
# recipe: each the best F0.5 of copy pairs on ../shared/eval/copies-dev (docs/quality.md, "Near-duplicate
# groups"). Recipes score alike pairs differently: at 0.80, block4 + block5 R-MAC groups 942 pairs of
# copies-dev at precision 0.37; whitening spreads the scale, so the whitened default's threshold is lower.
THRESHOLDS = {(POOLINGS["rmac"], False): 0.80, (POOLINGS["rmac45"], False): 0.86, (POOLINGS["rmac45"], True): 0.75}
DEFAULT_THRESHOLD = 0.80  # a recipe not calibrated: that of block5 R-MAC, the nearest
DEFAULT_WHITENED_THRESHOLD = 0.75  # a whitened recipe not calibrated: that of the whitened default, the nearest


def threshold_for(info: ModelInfo) -> float:
    """The threshold calibrated for a recipe (THRESHOLDS), or the nearest calibrated one's."""
    whitened = bool(info.whitening)
    fallback = DEFAULT_WHITENED_THRESHOLD if whitened else DEFAULT_THRESHOLD
    return THRESHOLDS.get((info.pooling, whitened), fallback)


def default_threshold(searcher: Searcher) -> float:
    """The threshold calibrated for the recipe of the index's features (THRESHOLDS), as its meta.json
    records it. A version written before meta.json kept the whole recipe: read from the first readable
    shard of its features folder, if the index's model made it (the shards the index lists may have been
    compacted away since; a folder holds one model's shards)."""
    recorded = recorded_model(searcher.meta)
    if recorded is not None:
        return threshold_for(recorded)
    made_by = searcher.meta["model"].get("checksum")
    for path in list_shards(Path(searcher.meta.get("features_dir", ""))):
        try:
            info = shard_model(path)[0]
        except (OSError, PipelineError):
            continue
        if made_by in (None, info.checksum):
            return threshold_for(info)
        break
    LOG.warning(
        "the recipe of %s cannot be read from its features folder: threshold %.2f",
        searcher.version_dir,
        DEFAULT_THRESHOLD,
    )
    return DEFAULT_THRESHOLD

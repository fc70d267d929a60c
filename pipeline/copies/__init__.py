"""Same picture, verified: local features of an image and a geometric check of a pair of images.

A global descriptor ranks copies well but cannot say "same picture" surely; matching local features and
fitting one transform to them can. Modules, upstream first: `opencv` (OpenCV imported on first use, from the
optional extra `verify`), `local` (an image's local features, from a file or from pixels), `check` (a pair
verified: matches, a robust fit, the calibrated threshold, lightness kept), `cache` (local features as compact bytes).
"""

from .cache import CACHE_VERSION, features_from_bytes, features_to_bytes
from .check import (
    INLIER_THRESHOLD,
    MAX_LIGHTNESS_SHIFT,
    MIN_SPREAD,
    Fit,
    Verdict,
    fit,
    matches,
    verify_candidates,
    verify_pair,
)
from .local import MAX_FEATURES, WORK_SIDE, LocalFeatures, local_features, unreadable
from .opencv import opencv

__all__ = [
    "CACHE_VERSION",
    "INLIER_THRESHOLD",
    "MIN_SPREAD",
    "MAX_LIGHTNESS_SHIFT",
    "Fit",
    "matches",
    "MAX_FEATURES",
    "WORK_SIDE",
    "LocalFeatures",
    "Verdict",
    "features_from_bytes",
    "features_to_bytes",
    "fit",
    "local_features",
    "opencv",
    "unreadable",
    "verify_candidates",
    "verify_pair",
]

"""A pair of pictures verified: mutual nearest-neighbour matches that pass the ratio test, one similarity
transform fitted by RANSAC, and the verdict from its inlier count against a threshold calibrated on copies-dev,
with the inliers spread over the pictures (not a shared banner's strip), found across the part of the picture
the two share and its centre (not in a shared banner's or frame's cells alone), and their lightness the same up
to what copies do to it (not a darker or lighter variant of one wallpaper).

A similarity (rotation, uniform scale, shift) covers the copies people make (crops, rotations, resizes,
borders); the mirrored query covers mirrors. A transform that squeezes the picture by more than 5x, or
stretches one axis 3x more than the other, is no copy: RANSAC's degenerate fits (every match sent to one
point) would otherwise count hundreds of inliers between unrelated pictures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

from .local import LocalFeatures
from .opencv import opencv

# Inliers needed to call a pair the same picture. Calibrated on copies-dev only (scripts/eval/copies_verify.py
# --choose): no count reaches the precisions there (its recoloured variants of one wallpaper are
# "distinct pictures" that match geometrically), so the count with the best F0.5 of the "verified" flag on
# each query's top 20 (docs/quality.md, "Verified copies"; with MIN_SPREAD: precision 0.89, recall 0.67).
INLIER_THRESHOLD = 13
# The least share of each picture the inliers' convex hull must cover (fit's spread): copies of two pictures that
# carry the same text banner or border match in a thin strip. The best F0.5 of duplicates --verify's pairs on
# copies-dev over 0-0.2 (scripts/eval/duplicates_verify.py); 95% of its true verified pairs spread wider.
MIN_SPREAD = 0.05
# The largest median |lightness difference| of the inlier pairs (CIELAB's L, 0-255) that a copy makes: brightness
# and contrast changes shift it; the dark and light variants of one wallpaper, which copies-dev counts as distinct
# pictures, further. The best F0.5 of duplicates --verify's pairs on copies-dev only (scripts/eval/
# duplicates_verify.py --choose-colour; a hue limit, tried with it, changed no group there and is left out).
MAX_LIGHTNESS_SHIFT = 60.0
# The least share of the overlap's textured cells (COVER_GRID x COVER_GRID over the query; a cell textured with
# COVER_KEYPOINTS of its keypoints mapped inside the candidate) that must hold an inlier: copies of two pictures
# that carry the same text banner (and border) match in the banner's cells alone, a copy across the picture it
# shows. The best mean F0.5 of duplicates --verify's pairs over {0, 0.2, 0.3, 0.4, 0.5} on two dev sets:
# copies-dev, and copies of holidays-dev's photographs (one a scene), where shared banners joined groups
# (precision 0.788 -> 1.0, recall 0.901 -> 0.883; copies-dev 0.893 / 0.675 -> 0.892 / 0.651). A banner over a
# third of the picture, whose text takes most of ORB's keypoints, still fools it.
MIN_COVERAGE = 0.5
# The same share among the grid's inner cells alone: pictures in one shared frame match in every outer cell. The
# best mean F0.5 of duplicates --verify's pairs over {0, 0.25, 0.5, 0.75} on copies-dev, hol-copies and a dev set
# of holidays-dev photographs in one frame, hol-frames (precision 0.031 -> 1.0, recall 0.946 -> 0.928; the other
# two unchanged).
MIN_CENTRE = 0.5
COVER_GRID, COVER_KEYPOINTS = 4, 8
_INNER_CELLS = np.pad(np.ones((COVER_GRID - 2, COVER_GRID - 2), bool), 1).ravel()  # (row-major, as _coverage's cells)
RATIO = 0.8  # Lowe's ratio test: the best match must be clearly nearer than the second
REPROJECTION_PX = 5.0  # RANSAC's inlier distance, in working pixels
MIN_SCALE, MAX_SCALE, MAX_ANISOTROPY = 0.2, 5.0, 3.0  # a fitted transform outside these is not a copy
MIN_MATCHES = 4

Geometry = Literal["similarity", "affine", "homography"]


@dataclass(frozen=True)
class Fit:
    """One transform fitted to a pair's matches: its inliers; the smaller share of the two pictures' areas that
    the inliers' convex hull covers (a shared text banner or border matches in a thin strip; a copy across the
    part of the picture it shows); the median lightness difference of the inlier pairs; the share of the
    overlap's textured cells holding an inlier, and of its inner cells (_coverage)."""

    inliers: int = 0
    spread: float = 0.0
    lightness_shift: float = 0.0
    coverage: float = 0.0
    centre: float = 0.0

    def holds(self, threshold: int = INLIER_THRESHOLD) -> bool:
        """The verdict: the same picture."""
        return (
            self.inliers >= threshold
            and self.spread >= MIN_SPREAD
            and self.lightness_shift <= MAX_LIGHTNESS_SHIFT
            and self.coverage >= MIN_COVERAGE
            and self.centre >= MIN_CENTRE
        )


@dataclass(frozen=True)
class Verdict:
    """Whether a candidate is the query's picture (its fit `holds`), the fit it was judged on (why not, where it
    does not hold), and why there is no fit where either picture could not be read (`reason`)."""

    verified: bool
    fit: Fit = Fit()
    reason: str | None = None

    @property
    def inliers(self) -> int:
        return self.fit.inliers


def matches(query: LocalFeatures, candidate: LocalFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Indices of matched keypoints (query [m], candidate [m]): each the other's nearest by Hamming distance,
    and nearer than RATIO times the query descriptor's second nearest."""
    empty = np.zeros(0, np.int64)
    if len(query) < 2 or len(candidate) < 2:
        return empty, empty
    distances, nearest = hamming_knn(candidate.descriptors, query.descriptors, 2)
    mine = np.flatnonzero(distances[:, 0] < RATIO * distances[:, 1])
    if not len(mine):
        return empty, empty
    best = nearest[mine, 0]
    # mutual: asked only of the candidate descriptors that a ratio-tested match names (a tenth of them between
    # unrelated pictures), the search back that took half of a pair's time when asked of all
    back = hamming_knn(query.descriptors, candidate.descriptors[best], 1)[1][:, 0]
    keep = back == mine
    return mine[keep], best[keep]


def hamming_knn(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) of each query descriptor's k nearest base descriptors by Hamming distance (binary
    descriptors, one row of bytes each), nearest first: faiss's binary flat search, a quarter of the time of
    OpenCV's brute-force matcher on 1,000 x 1,000 ORB descriptors, where verifying spent most of its time."""
    index = faiss.IndexBinaryFlat(base.shape[1] * 8)
    index.add(np.ascontiguousarray(base, np.uint8))
    distances, indices = index.search(np.ascontiguousarray(queries, np.uint8), k)
    return distances, indices.astype(np.int64)


def plausible(matrix: np.ndarray) -> bool:
    """Whether a fitted transform's linear part is a copy's: scale within bounds, not squashed flat."""
    linear = matrix[:2, :2] / (matrix[2, 2] if matrix.shape[0] == 3 and matrix[2, 2] else 1.0)
    low, high = np.linalg.svd(linear, compute_uv=False)[[-1, 0]]
    return bool(MIN_SCALE <= low and high <= MAX_SCALE and high <= MAX_ANISOTROPY * max(low, 1e-9))


def inliers(query: LocalFeatures, candidate: LocalFeatures, geometry: Geometry = "similarity", needed: int = 0) -> int:
    """The inliers of the transform fitted to the pair's matches (0 when no plausible transform fits, or when
    there are fewer matches than `needed` inliers: RANSAC's 2,000 tries are spent only where they can verify)."""
    return fit(query, candidate, geometry, needed).inliers


def fit(query: LocalFeatures, candidate: LocalFeatures, geometry: Geometry = "similarity", needed: int = 0) -> Fit:
    """The transform fitted to the pair's matches (Fit; no inliers: see `inliers`)."""
    qi, ci = matches(query, candidate)
    if len(qi) < max(MIN_MATCHES, needed):
        return Fit()
    qp, cp = query.points[qi], candidate.points[ci]
    cv2 = opencv()
    if geometry == "similarity":
        matrix, mask = cv2.estimateAffinePartial2D(
            qp, cp, method=cv2.RANSAC, ransacReprojThreshold=REPROJECTION_PX, maxIters=2000
        )
    elif geometry == "affine":
        matrix, mask = cv2.estimateAffine2D(qp, cp, method=cv2.RANSAC, ransacReprojThreshold=REPROJECTION_PX)
    else:
        matrix, mask = cv2.findHomography(qp, cp, cv2.USAC_MAGSAC, REPROJECTION_PX)
    if matrix is None or mask is None or not plausible(matrix):
        return Fit()
    kept = mask.ravel().astype(bool)
    spread = min(_hull_share(qp[kept], query.size), _hull_share(cp[kept], candidate.size))
    shift = np.abs(query.lightness[qi[kept]].astype(np.int16) - candidate.lightness[ci[kept]])
    coverage, centre = _coverage(query, candidate.size, matrix, qp[kept])
    return Fit(int(kept.sum()), spread, float(np.median(shift)), coverage, centre)


def _coverage(
    query: LocalFeatures, size: tuple[int, int], matrix: np.ndarray, inlier_points: np.ndarray
) -> tuple[float, float]:
    """The share of the overlap's textured cells (Fit) that hold an inlier, and that share among the central
    cells alone (the grid's inner cells): the query's keypoints that the transform maps inside the candidate
    picture (of `size`), counted per cell of a COVER_GRID grid. 1.0 where no cell is textured."""
    mapped = query.points @ matrix[:2, :2].T + matrix[:2, 2]
    if matrix.shape[0] == 3:  # a homography: projected
        mapped = mapped / np.maximum(query.points @ matrix[2, :2] + matrix[2, 2], 1e-9)[:, None]
    inside = (mapped >= 0).all(axis=1) & (mapped[:, 0] < size[0]) & (mapped[:, 1] < size[1])
    cells = COVER_GRID * COVER_GRID

    def cell(points: np.ndarray) -> np.ndarray:
        scaled = np.floor(points / np.array(query.size, np.float32) * COVER_GRID).astype(np.int64)
        scaled = np.clip(scaled, 0, COVER_GRID - 1)
        return scaled[:, 1] * COVER_GRID + scaled[:, 0]

    textured = np.bincount(cell(query.points[inside]), minlength=cells) >= COVER_KEYPOINTS
    covered = np.bincount(cell(inlier_points), minlength=cells) > 0

    def share(cells_: np.ndarray) -> float:
        return float((cells_ & covered).sum() / cells_.sum()) if cells_.any() else 1.0

    return share(textured), share(textured & _INNER_CELLS)


def _hull_share(points: np.ndarray, size: tuple[int, int]) -> float:
    """The share of a (width, height) picture that the convex hull of `points` covers."""
    if len(points) < 3:
        return 0.0
    cv2 = opencv()
    area = float(cv2.contourArea(cv2.convexHull(np.ascontiguousarray(points, np.float32))))
    return area / max(size[0] * size[1], 1)


def verify_pair(
    query: LocalFeatures,
    candidate: LocalFeatures,
    threshold: int = INLIER_THRESHOLD,
    geometry: Geometry = "similarity",
) -> Verdict:
    """Is `candidate` the query's picture? The query as it is, then its mirror image where its features
    hold one (`local_features(..., mirrored=True)`); the verdict of the better fit."""
    reason = query.reason or candidate.reason
    if reason:
        return Verdict(False, reason=reason)

    best = fit(query, candidate, geometry, threshold)
    if not best.holds(threshold) and query.mirror is not None:
        mirrored = fit(query.mirror, candidate, geometry, threshold)
        if mirrored.holds(threshold) or mirrored.inliers > best.inliers:
            best = mirrored
    return Verdict(best.holds(threshold), best)


def verify_candidates(
    query: LocalFeatures, candidates: Sequence[LocalFeatures], threshold: int = INLIER_THRESHOLD
) -> list[Verdict]:
    """The verdict of each candidate (a search's top k), in their order."""
    return [verify_pair(query, c, threshold) for c in candidates]

"""An image's local features: ORB keypoints and binary descriptors of its grey picture at a working size, and
the lightness around each keypoint, which tells a copy from a darker or lighter variant of one picture.

ORB at a long side of 480 px, 1,000 features, was measured against SIFT (several sizes and counts) on
copies-dev: it found more true copies at every inlier threshold, at an eighth of SIFT's time per image
(scripts/eval/copies_verify.py). The mirrored picture's features are computed too where asked, for the
query side: descriptors are not mirror-invariant, and a mirrored copy must verify.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageError
from ..images import DEFAULT_MAX_PIXELS, decode_rgb, read_file
from .opencv import opencv

WORK_SIDE = 480  # px, the long side features are computed at
# px: a picture with a shorter long side is enlarged to it first. A thumbnail-sized copy (160 px) otherwise
# gives ORB too few corners at the scales its original shows them: on copies-dev the best F0.5 of duplicates
# --verify's pairs over {none, 240, 320, 400} (recall 0.643 -> 0.675, precision 0.888 -> 0.893; the search
# flag's precision kept), chosen there only (scripts/eval/duplicates_verify.py).
MIN_SIDE = 400
MAX_FEATURES = 1000  # keypoints kept per picture (ORB's strongest)
FAST_THRESHOLD = 5  # ORB's corner threshold: OpenCV's 20 finds too few corners on smooth artwork
LIGHTNESS_BLUR = 9  # px, the box a keypoint's lightness is averaged over (working pixels)

Source = Path | str | np.ndarray


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """Keypoints (float32 [n, 2], x and y in working pixels), their ORB descriptors (uint8 [n, 32]) and the
    lightness around each (uint8 [n]: CIELAB's L as OpenCV scales it, 0-255) of one picture, its working size,
    the mirrored picture's features where computed, and why there are none (`reason`: the file could not be read
    or decoded) where there are none for that cause."""

    points: np.ndarray
    descriptors: np.ndarray
    size: tuple[int, int]  # (width, height) of the working picture
    lightness: np.ndarray
    mirror: LocalFeatures | None = None
    reason: str | None = None

    def __len__(self) -> int:
        return len(self.points)


def unreadable(reason: str) -> LocalFeatures:
    """The features of a picture that could not be read: none, and the reason."""
    return LocalFeatures(
        np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8), (0, 0), np.zeros(0, np.uint8), None, reason
    )


def working_rgb(picture: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB [h, w, 3], long side at most WORK_SIDE and at least MIN_SIDE (bilinear, as the product
    resizes)."""
    im = picture if isinstance(picture, Image.Image) else Image.fromarray(np.ascontiguousarray(picture))
    im = im.convert("RGB")
    scale = WORK_SIDE / max(im.size) if max(im.size) > WORK_SIDE else max(1.0, MIN_SIDE / max(im.size))
    if scale != 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def detect(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ORB keypoints and descriptors of a grey picture; empty arrays where it has no corners."""
    cv2 = opencv()
    orb = cv2.ORB_create(nfeatures=MAX_FEATURES, fastThreshold=FAST_THRESHOLD)
    keypoints, descriptors = orb.detectAndCompute(grey, None)
    if descriptors is None or not keypoints:
        return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    return np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2), np.asarray(descriptors, np.uint8)


def features_of_rgb(rgb: np.ndarray, mirrored: bool = False) -> LocalFeatures:
    """The features of a working-size RGB picture, and of its mirror image if `mirrored`."""
    cv2 = opencv()
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    lightness = cv2.blur(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[:, :, 0], (LIGHTNESS_BLUR, LIGHTNESS_BLUR))
    # the mirror's grey and lightness are these flipped (per pixel, and a centred box blur): not converted again
    mirror = _features(np.ascontiguousarray(grey[:, ::-1]), lightness[:, ::-1]) if mirrored else None
    return _features(grey, lightness, mirror)


def _features(grey: np.ndarray, lightness: np.ndarray, mirror: LocalFeatures | None = None) -> LocalFeatures:
    """ORB features of a working-size grey picture, each keypoint with the lightness around it."""
    points, descriptors = detect(grey)
    at = np.clip(np.round(points).astype(np.int64), 0, [grey.shape[1] - 1, grey.shape[0] - 1])
    return LocalFeatures(points, descriptors, (grey.shape[1], grey.shape[0]), lightness[at[:, 1], at[:, 0]], mirror)


def local_features(source: Source, mirrored: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> LocalFeatures:
    """The local features of an image file (read and decoded by the product's safe decoder, within
    `max_pixels`) or of decoded pixels (uint8 RGB [h, w, 3] or grey [h, w]). A file that cannot be read
    gives features with its `reason` and no keypoints, never an exception: one bad file must not end a run.
    `mirrored`: also the mirror image's features (for a query; a candidate needs only its own).
    PipelineError if OpenCV is not installed."""
    opencv()  # fail on the missing extra first, not as a reason per file
    if isinstance(source, np.ndarray):
        return features_of_rgb(working_rgb(source), mirrored)
    try:
        data, _ = read_file(Path(source))
        rgb = decode_rgb(data, draft=WORK_SIDE, max_pixels=max_pixels)
    except ImageError as exc:
        return unreadable(str(exc))
    return features_of_rgb(working_rgb(rgb), mirrored)

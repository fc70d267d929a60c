"""Local features as compact bytes, for a per-image cache: verifying 20 candidates then reads 20 small
records instead of decoding 20 files.

Layout (little-endian): version byte, width and height (uint16 each), count n (uint16), then n keypoints as
float16 (x, y), n ORB descriptors of 32 bytes and n lightness bytes: 7 + 37 n bytes, at most 37,007 with
MAX_FEATURES 1,000.
float16 keeps a working-pixel coordinate (at most 480) within 0.25 px, well inside RANSAC's 5 px.
"""

from __future__ import annotations

import struct

import numpy as np

from ..errors import PipelineError
from .local import LocalFeatures

CACHE_VERSION = 2
HEADER = struct.Struct("<BHHH")
DESCRIPTOR_BYTES = 32


def features_to_bytes(features: LocalFeatures) -> bytes:
    """One picture's own features (not its mirror's, nor a reason) as bytes of the layout above."""
    n = len(features)
    width, height = features.size
    return b"".join(
        (
            HEADER.pack(CACHE_VERSION, width, height, n),
            np.asarray(features.points, "<f2").tobytes(),
            np.asarray(features.descriptors, np.uint8).tobytes(),
            np.asarray(features.lightness, np.uint8).tobytes(),
        )
    )


def features_from_bytes(data: bytes) -> LocalFeatures:
    """The features stored by features_to_bytes; PipelineError for another version or a short record."""
    if len(data) < HEADER.size:
        raise PipelineError(f"local features record of {len(data)} bytes is too short")
    version, width, height, n = HEADER.unpack_from(data)
    if version != CACHE_VERSION:
        raise PipelineError(f"local features record of version {version}; this pipeline reads {CACHE_VERSION}")
    expected = HEADER.size + n * (4 + DESCRIPTOR_BYTES + 1)
    if len(data) != expected:
        raise PipelineError(f"local features record of {len(data)} bytes; {expected} expected for {n} keypoints")
    points = np.frombuffer(data, "<f2", 2 * n, HEADER.size).astype(np.float32).reshape(n, 2)
    descriptors = np.frombuffer(data, np.uint8, n * DESCRIPTOR_BYTES, HEADER.size + 4 * n).reshape(n, 32)
    lightness = np.frombuffer(data, np.uint8, n, HEADER.size + (4 + DESCRIPTOR_BYTES) * n)
    return LocalFeatures(points, descriptors, (width, height), lightness)

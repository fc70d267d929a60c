"""Describing groups for people: their images with the files' facts, best quality first, and each
image's cosine to the first."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage

from ..search import Searcher


@dataclass(frozen=True)
class DuplicateImage:
    path: str
    score_to_first: float  # cosine to the group's first (best-quality) image
    width: int | None  # None when the file cannot be read now
    height: int | None
    bytes: int | None


@dataclass(frozen=True)
class DuplicateGroup:
    group: int  # 1 for the largest group
    images: list[DuplicateImage]  # best quality first: most pixels, then most bytes

    def to_dict(self) -> dict:
        return {"group": self.group, "images": [vars(i) for i in self.images]}


def describe_groups(
    searcher: Searcher, groups: list[np.ndarray], vectors: Callable[[np.ndarray], np.ndarray]
) -> list[DuplicateGroup]:
    """The groups (arrays of indexed ids), numbered from 1 in their order, each with its images' paths and
    file facts, best quality first. `vectors(ids)`: exact features by id, read once for all groups (from
    shards: one pass)."""
    wanted = np.sort(np.concatenate(groups)) if groups else np.zeros(0, np.int64)
    features = dict(zip(wanted.tolist(), vectors(wanted), strict=True))
    return [_describe(searcher, features, g + 1, ids) for g, ids in enumerate(groups)]


def _describe(searcher: Searcher, features: dict[int, np.ndarray], number: int, ids: np.ndarray) -> DuplicateGroup:
    """A group's images with their file facts, best quality first, and their cosine to the first."""
    facts = searcher.rows(ids)
    files = sorted(
        ((facts[int(i)][0], int(i), *_file_facts(facts[int(i)][0])) for i in ids),
        key=lambda f: (-(f[2] or 0) * (f[3] or 0), -(f[4] or 0), f[0]),
    )
    v = np.stack([features[f[1]] for f in files])
    scores = v @ v[0]
    return DuplicateGroup(
        number,
        [
            DuplicateImage(path, round(float(s), 4), w, h, size)
            for (path, _, w, h, size), s in zip(files, scores, strict=True)
        ],
    )


def _file_facts(path: str) -> tuple[int | None, int | None, int | None]:
    """Width, height (from the header: no decode) and bytes of a file; None for what cannot be read."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return None, None, None
    try:
        with PILImage.open(path) as im:
            return im.width, im.height, size
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError):
        return None, None, size

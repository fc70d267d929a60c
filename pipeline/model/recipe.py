"""The feature recipes, as data: the poolings, the profiles `model export --profile` builds, the aspect
buckets and the R-MAC regions and maps. The graph builds what these name; whitening learns on them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..images import Shape
from .weights import VGG16_BLOCKS

L2_EPS = 1e-12  # what an L2 normalisation divides by at least, in the graph and in numpy alike

POOLINGS = {
    "max": "global max pooling of block5_conv3, L2-normalised",
    "rmac": "R-MAC: max pooling of block5_conv3 over a fixed grid of regions at 3 scales (Tolias et al. 2016), "
    "each L2-normalised, summed, L2-normalised",
    "rmac45": "R-MAC of block4_conv3 and of block5_conv3 (each: max pooling over a fixed grid of regions at 3 "
    "scales, Tolias et al. 2016, each region L2-normalised, summed, L2-normalised), concatenated, "
    "L2-normalised",
}
# Layers an R-MAC pooling reads (block index, stride of its map), before that block's max-pool.
RMAC_LAYERS = {"rmac": ((4, 16),), "rmac45": ((3, 8), (4, 16))}
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9)  # aspect buckets (landscape; portrait ones are their transposes)


@dataclass(frozen=True)
class Recipe:
    """A feature recipe: what `model export --profile` builds (docs/quality.md has how each was measured)."""

    input_size: int  # the square side, or the side of the square an aspect bucket has about the pixels of
    pooling: str  # a key of POOLINGS
    aspect: bool = False  # aspect kept (buckets of aspect_shapes) instead of squashed to a square
    frame: bool = False  # a uniform frame trimmed at decode (images.trim_frame)
    whitened: bool = False  # ships a learned whitening of its regions (pipeline/model/data/whitening-PROFILE.npz)


PROFILES = {
    "seed": Recipe(224, "max"),  # the classic recipe
    # The default: aspect kept in 7 buckets of about 192x192 pixels, R-MAC of block4 and block5, a uniform frame
    # trimmed at decode, each region whitened as learned on independent photos. 0.75x the seed's compute
    # (docs/quality.md: how each choice was made, on which sets).
    "balanced": Recipe(192, "rmac45", aspect=True, frame=True, whitened=True),
    # The default before it: one fixed 224x224 input shape, for runtimes that want a single shape.
    "square": Recipe(224, "rmac45"),
    # Block5 R-MAC, aspect kept at about 384x384, regions whitened: the best on scenes at <= 3x, weaker on copies.
    "large": Recipe(384, "rmac", aspect=True, whitened=True),
}
DEFAULT_PROFILE = "balanced"


def aspect_shapes(size: int) -> tuple[Shape, ...]:
    """The fixed input shapes (height, width) of an aspect-kept recipe: for each of ASPECTS, landscape
    and portrait, the shape of that aspect with about size x size pixels, sides multiples of 8."""
    shapes: list[Shape] = []
    for aspect in ASPECTS:
        h, w = 8 * round(size / aspect**0.5 / 8), 8 * round(size * aspect**0.5 / 8)
        shapes += [(h, w), (w, h)]
    return tuple(dict.fromkeys(shapes))  # in order, once (small sizes round several aspects alike)


def rmac_regions(h: int, w: int, levels: int = 3) -> list[tuple[int, int, int, int]]:
    """R-MAC regions (y0, x0, y1, x1) of an h x w map: the whole map, then square regions of side
    2*min(h,w)/(l+1) at levels l = 1..levels, spread evenly with about 40% overlap."""
    regions = [(0, 0, h, w)]
    m = min(h, w)
    for level in range(1, levels + 1):
        size = max(1, int(2 * m / (level + 1)))
        ny = max(1, round((h - size) / (size * 0.6)) + 1) if h > size else 1
        nx = max(1, round((w - size) / (size * 0.6)) + 1) if w > size else 1
        ys = np.linspace(0, h - size, ny).astype(int) if ny > 1 else [max(0, (h - size) // 2)]
        xs = np.linspace(0, w - size, nx).astype(int) if nx > 1 else [max(0, (w - size) // 2)]
        regions += [(int(y), int(x), min(h, int(y) + size), min(w, int(x) + size)) for y in ys for x in xs]
    return regions


def rmac_maps(pooling: str) -> tuple[str, ...]:
    """Names of the maps (graph tensors) a pooling's R-MAC reads: the last conv of each block it taps."""
    return tuple(f"block{b + 1}_conv{VGG16_BLOCKS[b]}/relu" for b, _ in RMAC_LAYERS.get(pooling, ()))

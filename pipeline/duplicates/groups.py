"""Grouping: pairs of positions joined into connected components (a vectorised union-find), listed
largest first."""

from __future__ import annotations

import numpy as np


def union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the sets of a[i] and b[i] in the forest `parent` (parent[x] == x for a root), in place.
    Links always point to the smaller position, so there are no cycles and a set's root is its smallest
    member; each round hooks every root to the smallest root it is paired with, and pairs already
    joined drop out (vectorised: a few rounds of array operations, not one step per pair)."""
    while len(a):
        ra, rb = _find(parent, a), _find(parent, b)
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Roots of x; their paths are shortened to point at the root directly."""
    r = parent[x]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            parent[x] = r
            return r
        r = up


def root_of(parent: np.ndarray, x: int) -> int:
    """The root of one element (its set's smallest member)."""
    while parent[x] != x:
        x = int(parent[x])
    return x


def roots(parent: np.ndarray) -> np.ndarray:
    """The root of every element of the forest (pointer jumping over the whole forest; `parent` itself
    is left as it is)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up


def components(parent: np.ndarray, min_size: int) -> list[np.ndarray]:
    """The positions of every set of the forest with at least `min_size` members, each ascending; the
    largest set first, sets of one size by their smallest position."""
    root = roots(parent)
    sizes = np.bincount(root, minlength=len(parent))
    members = np.flatnonzero(sizes[root] >= min_size)
    order = np.lexsort((members, root[members], -sizes[root[members]]))  # largest first, then by smallest id
    members = members[order]
    splits = np.flatnonzero(np.diff(root[members])) + 1
    return np.split(members, splits) if len(members) else []

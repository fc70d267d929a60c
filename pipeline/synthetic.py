"""Synthetic features for tests and benchmarks: clustered unit vectors and real shard files holding them.

The product never calls this module; tests/helpers.py and scripts/benchmarks/ do, so that the tests and
the benchmark figures draw their vectors the same way. With `positive_centres` (the benchmarks' 10,000)
and the default spread the vectors are distributed about as VGG16 max-pooled features are: in the
positive orthant, random pairs at cosine ~0.47 and a query's nearest neighbour at ~0.76 (at 100k).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from .features import ShardData, next_shard_number, shard_name, write_shard
from .model import ModelInfo

SPREAD = 0.6  # norm of the noise added to a (unit) centre


def positive_centres(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random unit vectors in the positive orthant (float32), like max-pooled ReLU features
    (random pairs of them have cosine ~0.6)."""
    centres = np.abs(rng.normal(size=(count, dim))).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return centres


def clustered(n: int, centres: np.ndarray, rng: np.random.Generator, spread: float = SPREAD) -> np.ndarray:
    """n unit vectors (float32): each a random one of `centres` plus Gaussian noise of norm about `spread`
    (spread / sqrt(dim) per coordinate), L2-normalised. Seeded by `rng`, which it advances."""
    dim = centres.shape[1]
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def model_info(
    dim: int, weights_sha256: str = "s" * 64, input_size: int = 224, pooling: str | None = None
) -> ModelInfo:
    """The model a synthetic shard says it was made by (`pooling`: a recipe's, a POOLINGS value)."""
    info = ModelInfo(name="synthetic", weights_sha256=weights_sha256, input_size=input_size, dim=dim)
    return info if pooling is None else replace(info, pooling=pooling)


def write_shards(
    folder: Path,
    vectors: np.ndarray | Iterable[np.ndarray],
    info: ModelInfo,
    shard_size: int | None = None,
    *,
    first: int = 0,
    path_format: str = "/synthetic/{:07d}.jpg",
    hash_format: str = "{:032x}",
    hashes: list[str] | None = None,
    first_shard: int | None = None,
) -> list[str]:
    """Real shard files holding `vectors`: an array, cut into shards of `shard_size` rows (one shard when
    None), or an iterable of arrays, one shard each (drawn as they are written: 10M vectors need not fit
    in memory). Row i, counting from `first`, gets the path path_format.format(i) and the content hash
    hash_format.format(i) (or hashes[i - first]), size and mtime 0. Shards are numbered from
    `first_shard`, by default after those already in the folder. Returns the paths."""
    if isinstance(vectors, np.ndarray):
        step = shard_size or max(1, len(vectors))
        chunks: Iterable[np.ndarray] = [vectors[start : start + step] for start in range(0, len(vectors), step)]
    else:
        chunks = vectors
    folder.mkdir(parents=True, exist_ok=True)
    number = next_shard_number(folder) if first_shard is None else first_shard
    paths: list[str] = []
    row = first
    for s, chunk in enumerate(chunks):
        n = len(chunk)
        rows = range(row, row + n)
        names = [path_format.format(i) for i in rows]
        digests = hashes[row - first : row - first + n] if hashes is not None else [hash_format.format(i) for i in rows]
        data = ShardData(chunk, names, digests, np.zeros(n, np.int64), np.zeros(n), [], [])
        write_shard(folder / shard_name(number + s), data, info)
        paths += names
        row += n
    return paths

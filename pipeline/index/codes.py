"""Learned binary codes and the coarse-to-fine search over them (a version built by binary.py).

Lin et al., CVPR-W 2015, "Deep Learning of Binary Hash Codes for Fast Image Retrieval": compact codes
find a candidate pool by Hamming distance, then the full features (the version's vector store,
memory-mapped) re-rank that pool by exact cosine.

The codes are learned without labels from the collection's own features: centre, project on the
top BITS principal components, then rotate them by ITQ (Gong & Lazebnik, "Iterative Quantization",
CVPR 2011) so that their signs lose as little as possible; bit j is the sign of rotated component j.
faiss.ITQTransform does the same but took 3x longer here (16 s against 5 s for 256 bits from 5,120
vectors, one thread) and cannot leave the rotation out, which the tests compare against.

Building, tuning and publishing a version of this kind is binary.py's (build_index(codes=...)).
Files of a binary version, beside ids.sqlite, meta.json and recall.npz:
  codes.faiss                  faiss binary index over the codes; its positions are the store's rows
  itq.npz                      the learned centre and projection (PCA then rotation), dim x BITS
  vectors.npy, vector_ids.npy  the vector store (store.py)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np

from ..errors import PipelineError
from .store import VectorStore
from .tune import ivf_params

CODES_FILE, ITQ_FILE = "codes.faiss", "itq.npz"
DEFAULT_BITS = 256
ITQ_TRAIN = 10_000  # vectors to learn PCA + rotation from (20 per dimension): 256 bits take seconds
ITQ_ITERATIONS = 50  # as in the ITQ paper; the quantisation loss flattens well before
# Candidates re-ranked (flat codes: the tuned setting); capped
POOL_GRID = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
DEFAULT_POOL = 100  # candidates re-ranked when the tuned setting is nprobe or efSearch
MAX_POOL = 10_000  # most candidates a query re-ranks, whatever it asks: 40 MB of float32 features at 1024-d
MAX_EF_SEARCH = 4096  # most efSearch a query may ask of an HNSW over codes
EF_GRID = (100, 128, 192, 256, 384, 512, 768, 1024)


def parse_codes(text: str, dim: int) -> int:
    """'binary' or 'binary:BITS' -> BITS (a multiple of 8 up to the feature dimension)."""
    kind, _, bits = text.partition(":")
    if kind != "binary":
        raise PipelineError(f"--codes {text!r}: the only kind is binary[:BITS], e.g. binary:{DEFAULT_BITS}")
    try:
        b = int(bits) if bits else DEFAULT_BITS
    except ValueError:
        b = -1
    if b < 8 or b % 8 or b > dim:
        raise PipelineError(f"--codes {text!r}: BITS must be a multiple of 8 from 8 to the feature dimension {dim}")
    return b


def learn_itq(
    sample: np.ndarray, bits: int, iterations: int = ITQ_ITERATIONS, seed: int = 0, rotate: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(centre, projection dim x bits) learned from `sample`: PCA, then the ITQ rotation (none when
    not `rotate`: plain PCA sign codes). ITQ alternates codes B = sign(V R) with the orthogonal R
    closest to mapping V onto B (Procrustes: the SVD of V^T B)."""
    x = sample.astype(np.float64)
    centre = x.mean(axis=0)
    x -= centre
    _, vecs = np.linalg.eigh(x.T @ x)
    pca = vecs[:, ::-1][:, :bits]  # eigh sorts eigenvalues ascending
    v = (x @ pca).astype(np.float32)
    r = (
        np.linalg.qr(np.random.default_rng(seed).normal(size=(bits, bits)))[0].astype(np.float32)
        if rotate
        else np.eye(bits, dtype=np.float32)
    )
    for _ in range(iterations if rotate else 0):
        u, _, wt = np.linalg.svd(v.T @ np.where(v @ r >= 0, np.float32(1), np.float32(-1)))
        r = u @ wt
    return centre.astype(np.float32), (pca @ r).astype(np.float32)


def quantisation_error(projected: np.ndarray) -> float:
    """Mean share of each projected vector its sign code cannot express, 1 - cos^2(y, sign(y)): scale-free,
    0 when every component has the same magnitude. ITQ's rotation lowers it."""
    y = projected.astype(np.float64)
    return float(np.mean(1 - np.abs(y).sum(axis=1) ** 2 / (y.shape[1] * (y**2).sum(axis=1))))


def encode(x: np.ndarray, centre: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Binary codes of x, 8 bits per byte (bit j of byte j // 8 at j % 8, as faiss's binary indexes read them)."""
    return np.packbits((x - centre) @ projection >= 0, axis=1, bitorder="little")


class CoarseToFine:
    """Hamming candidates from the binary index, re-ranked by exact inner product from the vector store.

    `setting` is what the build tuned: nprobe (IVF over codes), efSearch (HNSW) or, for an exhaustive
    scan, the pool size itself; the pool is `pool` candidates (at least k)."""

    def __init__(
        self,
        index: faiss.IndexBinary,
        centre: np.ndarray,
        projection: np.ndarray,
        store: VectorStore,
        pool: int,
        setting: int | None = None,
    ) -> None:
        self.index, self.centre, self.projection, self.store = index, centre, projection, store
        self.pool, self.setting = pool, setting
        b = faiss.downcast_IndexBinary(index)
        self.setting_name = (
            "nprobe"
            if isinstance(b, faiss.IndexBinaryIVF)
            else "efSearch"
            if isinstance(b, faiss.IndexBinaryHNSW)
            else "pool"
        )

    @classmethod
    def open(cls, version_dir: Path, meta: dict) -> CoarseToFine:
        codes = meta["codes"]
        with np.load(version_dir / ITQ_FILE) as itq:
            centre, projection = itq["centre"], itq["projection"]
        if rotation_checksum(centre, projection) != codes["rotation_sha256"]:
            raise PipelineError(f"{version_dir / ITQ_FILE} does not match its meta.json (rotation checksum)")
        return cls(
            faiss.read_index_binary(str(version_dir / CODES_FILE)),
            centre,
            projection,
            VectorStore.open(version_dir),
            codes["pool"],
            codes["setting"],
        )

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, setting: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top k by exact inner product among each query's Hamming candidates."""
        setting = setting or self.setting
        pool = min(setting if self.setting_name == "pool" and setting else self.pool, MAX_POOL)
        params: faiss.SearchParameters | None = None  # without a setting: the index's own
        if setting and self.setting_name == "nprobe":
            params = ivf_params(int(setting))
        elif setting and self.setting_name == "efSearch":
            ef = min(int(setting), MAX_EF_SEARCH)
            params = faiss.SearchParametersHNSW(efSearch=ef)  # type: ignore[attr-defined]  # faiss stub: no HNSW
        queries = np.ascontiguousarray(queries, np.float32)
        _, pos = self.index.search(
            encode(queries, self.centre, self.projection), min(max(pool, k), self.ntotal, MAX_POOL), params=params
        )
        return self.store.rerank(queries, np.where(pos >= 0, self.store.ids[pos], -1), k)


def rotation_checksum(centre: np.ndarray, projection: np.ndarray) -> str:
    """Recorded in meta.json: a search must encode its queries with the rotation the codes were made with."""
    return hashlib.sha256(centre.tobytes() + projection.tobytes()).hexdigest()

"""The search stage: load a published index and its model once, answer top-k queries by image."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from .errors import ImageError, ModelMismatchError, PipelineError
from .images import load_image
from .index import IDS_FILE, INDEX_FILE, META_FILE, current_version
from .model import FeatureModel

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    rank: int
    path: str
    score: float


@dataclass(frozen=True)
class QueryResult:
    query: str
    hits: list[Hit] = field(default_factory=list)
    error: str | None = None  # set when the query image could not be used

    def to_dict(self) -> dict:
        d: dict = {"query": self.query, "results": [vars(h) for h in self.hits]}
        if self.error is not None:
            d["error"] = self.error
        return d


class Searcher:
    """A published index, its id -> path table and the model that made its features.

    The index version is resolved once at construction: a later publish does not affect this
    Searcher. The model must carry the same weights checksum as the index, else ModelMismatchError.
    """

    def __init__(self, index_dir: Path | str, model: Path | str | None = None, threads: int = 0) -> None:
        for attempt in range(5):
            try:
                self.version_dir = current_version(Path(index_dir))
                self._open()
                break
            except PipelineError:
                # A newer build may have published and pruned this version between our reading
                # CURRENT and opening it: resolve the pointer again, a few times.
                if attempt == 4:
                    raise
                time.sleep(0.02)
        self.nprobe = self.meta.get("nprobe")
        self._model_arg = model
        self._threads = threads
        self._model: FeatureModel | None = None

    def _open(self) -> None:
        try:
            self.meta = json.loads((self.version_dir / META_FILE).read_text())
            self.index = faiss.read_index(str(self.version_dir / INDEX_FILE))
        except (OSError, ValueError, RuntimeError) as exc:
            raise PipelineError(f"index at {self.version_dir} is missing or corrupt: {str(exc).strip().splitlines()[-1]}") from None
        try:
            # Opened now so that this version stays readable even if a later build prunes it.
            self._db = sqlite3.connect(f"file:{self.version_dir / IDS_FILE}?mode=ro", uri=True, check_same_thread=False)
            self._db.execute("SELECT 1 FROM images LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise PipelineError(f"id table of {self.version_dir} is missing or corrupt: {exc}") from None

    @property
    def model(self) -> FeatureModel:
        """The feature model (given, else the one recorded in the index, else the default), loaded on
        first use and checked against the index."""
        if self._model is None:
            recorded = self.meta["model"].get("path")
            use = self._model_arg or (recorded if recorded and Path(recorded).is_file() else None)
            fm = FeatureModel(use, threads=self._threads)
            want = self.meta["model"]
            if fm.info.weights_sha256 != want["weights_sha256"]:
                raise ModelMismatchError(
                    f"the index was built with model {want['name']} (weights sha256 {want['weights_sha256'][:12]}) "
                    f"but {fm.path} is {fm.info.short()}; rebuild the index or pass the right --model"
                )
            self._model = fm
        return self._model

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def _paths(self, ids: np.ndarray) -> dict[int, str]:
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        out: dict[int, str] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            rows = self._db.execute(f"SELECT id, path FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            out.update(rows)
        return out

    def search_vectors(self, vectors: np.ndarray, k: int = 10, nprobe: int | None = None) -> list[list[Hit]]:
        """Top-k hits for each feature vector (rows of an [n, dim] float32 array)."""
        if k < 1:
            raise PipelineError(f"k must be at least 1 (got {k})")
        nprobe = nprobe or self.nprobe
        params = faiss.SearchParametersIVF(nprobe=int(nprobe)) if nprobe and self.meta.get("nlist") else None
        scores, ids = self.index.search(np.ascontiguousarray(vectors, np.float32), min(k, self.count), params=params)
        paths = self._paths(ids)
        return [
            [Hit(r + 1, paths[int(i)], float(s)) for r, (s, i) in enumerate(zip(srow, irow)) if i >= 0]
            for srow, irow in zip(scores, ids)
        ]

    def search(self, images: Sequence[Path | str], k: int = 10, nprobe: int | None = None,
               batch_size: int = 8) -> list[QueryResult]:
        """Top-k for each query image; a query that cannot be decoded gets an error, the rest still answer."""
        if k < 1:
            raise PipelineError(f"k must be at least 1 (got {k})")
        size = self.model.info.input_size
        results: dict[int, QueryResult] = {}
        good: list[tuple[int, np.ndarray]] = []
        for i, path in enumerate(images):
            try:
                good.append((i, load_image(path, size).pixels))
            except ImageError as exc:
                results[i] = QueryResult(str(path), error=str(exc))
        for start in range(0, len(good), batch_size):
            chunk = good[start:start + batch_size]
            feats = self.model.embed(np.stack([px for _, px in chunk]))
            for (i, _), hits in zip(chunk, self.search_vectors(feats, k, nprobe)):
                results[i] = QueryResult(str(images[i]), hits)
        return [results[i] for i in range(len(images))]

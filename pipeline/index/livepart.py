"""A version's live part: the images added since it was built, searchable beside it, and its images removed since.

The journal (features.Journal) records every addition with its feature and every removal; a searcher keeps,
per version, the additions the version lacks in a small faiss index of its own and the version's ids to leave
out. It checks the journal before each search (SQLite's data_version: microseconds), so the search after an
addition's acknowledgement finds it. For an IVF version the additions go to an IVF-Flat on the version's own
coarse quantizer and are probed like the version's lists, so 10,000 additions cost a search a few dozen
vectors, not a scan of all of them; other versions get a flat index (their additions are few by design:
MAX_LIVE bounds them until the nightly fold).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..errors import PipelineError
from ..features import Journal, LiveImage
from ..filters import FieldType, Filter, check_key, parse_date, parse_number, typed_values, value_matches, value_type
from .filtered import search_preassigned
from .idtable import IdTable
from .tune import ivf_params

LOG = logging.getLogger(__name__)
MAX_LIVE = 100_000  # additions not yet folded; more are refused (ingest.Collection.add) until the nightly fold
HOLD_AT_MOST = 2 * MAX_LIVE  # additions a searcher holds beside its version (4 KB each at 1024-d): folded ones
# wait for the next version too, and a failed build leaves them beside the published one
BUILT_IN: dict[str, FieldType] = {"mtime": "date", "size": "number", "width": "number", "height": "number"}


class LivePart:
    """The additions the version of `id_table` lacks, and the ids to drop from its results, read from the journal
    of `features_dir` (when it has one; it may appear later). `ivf`: the version's IVF index, whose quantizer
    places the additions (None: a flat index)."""

    def __init__(
        self, features_dir: Path, dim: int, id_table: IdTable, ivf: faiss.IndexIVF | None, model: str | None
    ) -> None:
        """`model`: the checksum of the version's model; additions embedded by another are left out."""
        self.features_dir, self.dim, self.id_table, self.ivf, self.model = features_dir, dim, id_table, ivf, model
        self.images: dict[int, LiveImage] = {}  # id -> addition read (searchable unless in _gone)
        self._gone: set[int] = set()  # additions removed since they were read
        self.excluded: frozenset[int] = frozenset()  # the version's ids (and additions) removed or hidden
        self.ingest: Path | None = None
        self._by_path: dict[str, int] = {}
        self._journal: Journal | None = None
        self._seen: int | None = None
        self._last = 0  # the highest addition id read
        self._lock = threading.Lock()
        self._index = self._empty()
        self._fields: dict[str, FieldType] = {"path": "string", **BUILT_IN}
        self.sync()

    def _empty(self) -> faiss.Index:
        if self.ivf is not None:
            # (the version's quantizer, shared: self.ivf keeps its owner alive)
            return faiss.IndexIVFFlat(self.ivf.quantizer, self.dim, self.ivf.nlist, faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def __len__(self) -> int:
        """The additions searchable now."""
        return len(self.images) - len(self._gone)

    def _searchable(self) -> list[LiveImage]:
        return [a for i, a in list(self.images.items()) if i not in self._gone]

    def sync(self) -> None:
        """Read what the journal committed since the last call (nothing to read: one SQLite pragma)."""
        with self._lock:
            if self._journal is None:
                if not Journal.exists(self.features_dir):
                    return
                try:
                    self._journal = Journal(self.features_dir)
                except PipelineError as exc:  # its removals cannot be applied: answer nothing rather than them
                    raise PipelineError(
                        f"cannot read the additions and removals of {self.features_dir} ({exc}); no search runs "
                        "without them"
                    ) from None
            changes = self._journal.changes()
            if changes == self._seen:
                return
            self._seen = changes
            info = self._journal.info()
            self.ingest = Path(info["ingest"]) if "ingest" in info else None
            made_by = info.get("model", self.model)
            if made_by != self.model:
                LOG.error(
                    "the additions in %s were embedded by model %s, not by this version's: they are not searched "
                    "until a rebuild with their model folds them in",
                    self.features_dir,
                    str(made_by)[:12],
                )
            new: list[LiveImage] = []
            if made_by == self.model:
                fresh = self._journal.live_ids(after=self._last)  # ids first: most are in the version already
                if fresh:
                    self._last = max(fresh)
                    built = self.id_table.known(fresh)
                    new = self._journal.rows([i for i in fresh if i not in built])
                    # a version made from a catalog rebuilt from its shards knows folded additions by path only
                    indexed = self.id_table.ids_of([a.path for a in new])
                    new = [a for a in new if a.path not in indexed]
            if len(self) + len(new) > HOLD_AT_MOST:
                LOG.error("over %d additions since the version was built: run `pipeline rebuild`", HOLD_AT_MOST)
                new = new[: max(0, HOLD_AT_MOST - len(self))]
            if new:
                ids = np.array([a.id for a in new], np.int64)
                self._index.add_with_ids(np.stack([a.feature for a in new]).astype(np.float32), ids)
                for a in new:
                    self.images[a.id] = a
                    self._by_path[a.path] = a.id
            removed = self._journal.removed()
            hidden = self._journal.hidden()
            gone = [idx for idx, _, _ in removed if idx in self.images and idx not in self._gone]
            if gone:  # kept in `images` (a search in flight may still name them), out of the index
                self._index.remove_ids(faiss.IDSelectorBatch(np.array(gone, np.int64)))
                self._gone.update(gone)
                for idx in gone:
                    if self._by_path.get(self.images[idx].path) == idx:
                        del self._by_path[self.images[idx].path]
            if new or gone:  # (a filter asks for them at every search: typed here, once per change)
                self._fields = _typed_fields(self._searchable())
            excluded = {idx for idx, _, _ in removed}
            excluded.update(self.id_table.ids_of(hidden).values())
            hidden_set = set(hidden)
            excluded.update(i for p, i in self._by_path.items() if p in hidden_set)
            self.excluded = frozenset(excluded)

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        nprobe: int | None,
        among: np.ndarray | None = None,
        probes: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k additions per query (ids -1 where fewer), probing `nprobe` lists of an IVF version's quantizer,
        or the lists `probes` names (coarse scores, lists: the version's own search chose them); `among`: only
        these addition ids, ranked exactly."""
        n = len(vectors)
        with self._lock:
            if among is not None:
                return self._exact(vectors, k, among)
            if not len(self):
                return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
            if probes is not None and isinstance(self._index, faiss.IndexIVF):
                scores, ids = search_preassigned(self._index, vectors, k, *probes)
            else:
                params = ivf_params(int(nprobe or 1)) if self.ivf is not None else None
                scores, ids = self._index.search(vectors, k, params=params)
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids

    def _exact(self, vectors: np.ndarray, k: int, among: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.array([i for i in among.tolist() if i in self.images and i not in self._gone], np.int64)
        scores = np.full((len(vectors), k), -np.inf, np.float32)
        out = np.full((len(vectors), k), -1, np.int64)
        if len(ids):
            sims = vectors @ np.stack([self.images[i].feature for i in ids.tolist()]).T
            order = np.argsort(-sims, axis=1)[:, :k]
            take = order.shape[1]
            scores[:, :take] = np.take_along_axis(sims, order, 1)
            out[:, :take] = ids[order]
        return scores, out

    def find(self, path: str) -> LiveImage | None:
        """The live addition recorded under `path`."""
        idx = self._by_path.get(path)
        return None if idx is None else self.images.get(idx)

    def fields(self) -> dict[str, FieldType]:
        """The built-in fields and those the additions carry, typed from their values."""
        return dict(self._fields)

    def select(self, where: Filter, fields: Mapping[str, FieldType]) -> np.ndarray:
        """The addition ids `where` selects (fields: the version's types, which an addition's values take)."""
        known = {**self._fields, **fields}
        types = [check_key(c, known) for c in where.conditions]
        conds = [(c, t, typed_values(c, t)) for c, t in zip(where.conditions, types, strict=True)]
        return np.array(
            sorted(
                a.id
                for a in self._searchable()
                if all(value_matches(c, values, _value(a, c.key, t)) for c, t, values in conds)
            ),
            np.int64,
        )


def added_fields(a: LiveImage) -> dict[str, Any]:
    """An addition's fields for people, as a version shows its images' (dates in ISO 8601 UTC)."""
    when = datetime.fromtimestamp(a.mtime, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {"mtime": when, "size": a.size, "width": a.width, "height": a.height, **a.fields}


def _typed_fields(additions: list[LiveImage]) -> dict[str, FieldType]:
    out: dict[str, FieldType] = {"path": "string", **BUILT_IN}
    for a in additions:
        for key, value in a.fields.items():
            out.setdefault(key, "number" if isinstance(value, (int, float)) else value_type(str(value)))
    return out


def _value(a: LiveImage, key: str, ftype: FieldType) -> float | str | None:
    """An addition's value of `key` as a field of type `ftype` compares (None: it has none)."""
    if key == "path":
        return a.path
    raw: Any = {"mtime": a.mtime, "size": a.size, "width": a.width, "height": a.height}.get(key, a.fields.get(key))
    if raw is None or isinstance(raw, bool):
        return None
    if ftype == "string":
        return str(raw)
    if isinstance(raw, (int, float)):
        return float(raw)
    return parse_number(str(raw)) if ftype == "number" else parse_date(str(raw))

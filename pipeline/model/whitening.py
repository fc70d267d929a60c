"""Learned PCA-whitening of the R-MAC regions (Tolias et al. 2016): the Whitening record that a feature
graph puts in and records, learning one on independent images, and saving and loading one as an .npz."""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ImageError, PipelineError
from ..fsutil import atomic_write_bytes
from ..images import InputSize, load_image
from .info import ModelInfo
from .recipe import L2_EPS, rmac_maps, rmac_regions

if TYPE_CHECKING:
    import onnx
    import onnxruntime

LOG = logging.getLogger(__name__)

# Eigenvalues raised to -WHITEN_POWER (0.5 = full whitening) after WHITEN_SHRINK x their mean is added to each
# (a few hundred images estimate a 512-d covariance poorly: of the full whitenings measured, the shrinkage
# that lost least, docs/quality.md, second push).
WHITEN_POWER, WHITEN_SHRINK = 0.5, 1.0
NPZ_FORMAT = 1  # the layout save_whitening writes; load_whitening refuses others
DATA_DIR = Path(__file__).resolve().parent / "data"  # the whitenings the profiles ship (package data)


@dataclass(frozen=True, eq=False)
class Whitening:
    """A PCA-whitening of R-MAC regions and how it was learned, said once: build_feature_graph puts the
    matrices in the graph and `note` in the model's metadata (and so in its checksum).

    `maps`: per pooled map (its tensor name, e.g. block5_conv3/relu), (mean [C], projection [C, C]); a region
    vector v becomes (v - mean) @ projection, L2-normalised, before the regions are summed.
    `provenance`: how the matrices were learned, in the words that follow "PCA-whitening of each R-MAC region"
    in the metadata, e.g. "(power 0.5, shrinkage 1.0), learned on 9,800 region vectors of 104 images".
    """

    maps: Mapping[str, tuple[np.ndarray, np.ndarray]]
    provenance: str = ""

    def __post_init__(self) -> None:
        if not self.maps:
            raise PipelineError("a whitening needs the matrices of at least one map")
        for name, (mean, projection) in self.maps.items():
            if np.ndim(mean) != 1 or np.shape(projection) != (len(mean), len(mean)):
                raise PipelineError(
                    f"whitening of {name}: mean {np.shape(mean)} and projection "
                    f"{np.shape(projection)} are not [C] and [C, C]"
                )
        object.__setattr__(self, "maps", MappingProxyType(dict(self.maps)))  # frozen all the way down

    @property
    def note(self) -> str:
        """What the model's metadata records (ModelInfo.whitening): the method, its provenance, the sha256."""
        learned = f" {self.provenance}" if self.provenance else ""
        return f"PCA-whitening of each R-MAC region{learned}; sha256 {whitening_checksum(self)}"


def whitening_checksum(whitening: Whitening) -> str:
    """sha256 of a whitening's matrices: recorded in the model, so two whitenings never share a checksum."""
    digest = hashlib.sha256()
    for name in sorted(whitening.maps):
        for array in whitening.maps[name]:
            digest.update(np.ascontiguousarray(array, np.float32).tobytes())
    return digest.hexdigest()


def save_whitening(path: Path | str, whitening: Whitening) -> None:
    """Write a whitening as an .npz (float32 matrices, map names, provenance), atomically: loading it gives
    the same checksum, so a model built from the file is the model built from the record."""
    arrays: dict[str, np.ndarray] = {
        "format": np.array(NPZ_FORMAT),
        "names": np.array(list(whitening.maps)),
        "provenance": np.array(whitening.provenance),
    }
    for i, (mean, projection) in enumerate(whitening.maps.values()):
        arrays[f"mean{i}"] = np.asarray(mean, np.float32)
        arrays[f"projection{i}"] = np.asarray(projection, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy stub: ** might bind allow_pickle; no key is that
    atomic_write_bytes(Path(path), buf.getvalue())


def load_whitening(path: Path | str) -> Whitening:
    """The whitening save_whitening wrote to `path`; PipelineError for anything else (no pickles are read)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if int(npz["format"]) != NPZ_FORMAT:
                raise PipelineError(
                    f"{path}: whitening file format {int(npz['format'])}, this pipeline reads {NPZ_FORMAT}"
                )
            names = [str(n) for n in npz["names"]]
            maps = {n: (npz[f"mean{i}"], npz[f"projection{i}"]) for i, n in enumerate(names)}
            return Whitening(maps, str(npz["provenance"]))
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise PipelineError(f"{path} is not a whitening file ({type(exc).__name__}: {exc})") from None


def shipped_whitening_path(profile: str) -> Path:
    """Where the whitening a profile ships with lives (scripts/eval/learn_whitening.py writes it; data/README.md
    says how and on what each was learned)."""
    return DATA_DIR / f"whitening-{profile}.npz"


def maps_session(model: onnx.ModelProto, maps: Sequence[str]) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session of a feature graph (`model`, from build_feature_graph; its outputs are extended)
    that also returns the `maps` (conv layers' ReLU outputs, e.g. rmac_maps(pooling)): what R-MAC pools, to learn
    or measure on it outside the graph."""
    import onnx
    import onnxruntime as ort

    model.graph.output.extend(onnx.helper.make_tensor_value_info(m, onnx.TensorProto.FLOAT, None) for m in maps)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def region_vectors(fmap: np.ndarray, levels: int = 3) -> np.ndarray:
    """R-MAC's regional vectors of one [C, h, w] map, as the graph makes them before summing: max-pooled over
    each region of rmac_regions, L2-normalised. [regions, C]."""
    _, h, w = fmap.shape
    r = np.stack([fmap[:, y0:y1, x0:x1].max(axis=(1, 2)) for y0, x0, y1, x1 in rmac_regions(h, w, levels)])
    return r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), L2_EPS)


def learn_whitening(model: onnx.ModelProto, pooling: str, files: Sequence[Path]) -> Whitening:
    """PCA-whitening of the R-MAC region vectors of `files`, per map, decoded and pooled as `model` (the feature
    graph of the recipe to whiten, from build_feature_graph with `pooling`, not whitened; its outputs are
    extended) does. The images must be independent of the collection and of any evaluation set (whitening fitted to
    what it is scored on flatters it). Unreadable files are skipped."""
    maps = rmac_maps(pooling)
    if not maps:
        raise PipelineError(f"whitening needs an R-MAC pooling (rmac or rmac45), not {pooling!r}")
    info = ModelInfo.from_metadata({p.key: p.value for p in model.metadata_props})
    regions, used = _region_samples(maps_session(model, maps), maps, files, info.resize_to)
    if not used:
        raise PipelineError(f"whitening: none of the {len(files)} files is a readable image")
    fitted = {name: _fit(name, np.asarray(vectors, np.float64), used) for name, vectors in regions.items()}
    n = len(next(iter(regions.values())))
    return Whitening(
        fitted, f"(power {WHITEN_POWER}, shrinkage {WHITEN_SHRINK}), learned on {n} region vectors of {used} images"
    )


def _region_samples(
    session: onnxruntime.InferenceSession, maps: Sequence[str], files: Sequence[Path], size: InputSize
) -> tuple[dict[str, list[np.ndarray]], int]:
    """The region vectors of each map over the readable `files`, and how many files were readable."""
    regions: dict[str, list[np.ndarray]] = {m: [] for m in maps}
    used = 0
    for path in files:
        try:
            pixels = load_image(path, size).pixels
        except ImageError as exc:
            LOG.warning("whitening: skipped %s: %s", path, exc)
            continue
        used += 1
        for name, fmap in zip(maps, session.run(list(maps), {"image": pixels[None]}), strict=True):
            regions[name].extend(region_vectors(fmap[0]))
    return regions, used


def _fit(name: str, r: np.ndarray, images: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, projection) whitening the rows of `r` (the region vectors of map `name` over `images` images)."""
    if len(r) < r.shape[1]:  # fewer vectors than dimensions: most directions would be made up by the shrinkage
        raise PipelineError(
            f"whitening of {name} needs at least {r.shape[1]} region vectors (its channels); "
            f"{images} readable images gave {len(r)}: give it more images"
        )
    mean = r.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(np.cov((r - mean).T))
    eigval = np.maximum(eigval, 1e-9) + WHITEN_SHRINK * eigval.mean()
    return mean.astype(np.float32), (eigvec / eigval**WHITEN_POWER).astype(np.float32)

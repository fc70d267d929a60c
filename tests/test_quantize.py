"""Int8 quantization: a separate model (own checksum) whose features stay close to fp32."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import TINY_SIZE, save_pattern
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.images import load_image
from pipeline.model import FeatureModel, read_model_info
from pipeline.quantize import quantize_model


def test_quantized_model_is_close_and_distinct(tmp_path, tiny_model):
    for i in range(16):
        save_pattern(tmp_path / "calib" / f"{i}.png", 200 + i)
    info = quantize_model([tmp_path / "calib"], tmp_path / "int8.onnx", tiny_model)
    base = read_model_info(tiny_model)
    assert info.name == f"{base.name}-int8" and info.weights_sha256 != base.weights_sha256
    assert read_model_info(tmp_path / "int8.onnx") == info
    for i in range(8):
        save_pattern(tmp_path / "q" / f"{i}.png", 300 + i)
    x = np.stack([load_image(p, TINY_SIZE).pixels for p in sorted((tmp_path / "q").iterdir())])
    a, b = FeatureModel(tiny_model).embed(x), FeatureModel(tmp_path / "int8.onnx").embed(x)
    assert (a * b).sum(axis=1).mean() > 0.95


def test_quantize_cli_and_errors(tmp_path, tiny_model):
    save_pattern(tmp_path / "calib" / "a.png", 1)
    result = CliRunner().invoke(app, ["model", "quantize", str(tmp_path / "calib"), "--out", str(tmp_path / "q.onnx"),
                                      "--model", str(tiny_model)])
    assert result.exit_code == 0 and "-int8" in result.stdout
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no calibration images"):
        quantize_model([tmp_path / "empty"], tmp_path / "x.onnx", tiny_model)

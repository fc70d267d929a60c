"""Int8 quantization: a separate model (own checksum) whose features stay close to fp32."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import TINY_SIZE, save_pattern
from pipeline import quantize
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.images import load_image
from pipeline.model import FeatureModel, read_model_info
from pipeline.quantize import SpeedCheck, measure_speed, quantize_model


def test_quantized_model_is_close_and_distinct(tmp_path, tiny_model):
    for i in range(16):
        save_pattern(tmp_path / "calib" / f"{i}.png", 200 + i)
    info = quantize_model([tmp_path / "calib"], tmp_path / "int8.onnx", tiny_model).info
    base = read_model_info(tiny_model)
    assert info.name == f"{base.name}-int8" and info.weights_sha256 != base.weights_sha256
    assert read_model_info(tmp_path / "int8.onnx") == info
    for i in range(8):
        save_pattern(tmp_path / "q" / f"{i}.png", 300 + i)
    x = np.stack([load_image(p, TINY_SIZE).pixels for p in sorted((tmp_path / "q").iterdir())])
    a, b = FeatureModel(tiny_model).embed(x), FeatureModel(tmp_path / "int8.onnx").embed(x)
    assert (a * b).sum(axis=1).mean() > 0.95


def test_advice_follows_the_measured_ratio():
    assert SpeedCheck(1.0, 2.9).use_int8 and SpeedCheck(1.0, 2.9).advice == "int8 is 2.9x faster here: use it"
    same = SpeedCheck(fp32_images_per_second=2.32, int8_images_per_second=2.36)
    assert not same.use_int8 and same.advice == "int8 is no faster on this CPU (1.02x): keep the fp32 model"
    assert not SpeedCheck(1.0, 0.5).use_int8 and "no faster on this CPU (0.50x)" in SpeedCheck(1.0, 0.5).advice
    assert not SpeedCheck(1.0, 1.1).use_int8 and "only 1.10x faster" in SpeedCheck(1.0, 1.1).advice
    assert SpeedCheck(1.0, 1.2).use_int8 and SpeedCheck(1.0, 1.2).to_dict()["speedup"] == 1.2


def test_speed_is_images_over_timed_seconds(tiny_model):
    clock = itertools.accumulate(itertools.cycle([2.0, 0.0, 1.0, 0.0]), initial=0.0)  # fp32 calls take 2 s, int8 1 s
    batches = [np.zeros((4, TINY_SIZE, TINY_SIZE, 3), np.uint8)] * 3
    speed = measure_speed(tiny_model, tiny_model, batches, timer=lambda: next(clock))
    assert (speed.fp32_images_per_second, speed.int8_images_per_second, speed.use_int8) == (2.0, 4.0, True)


def test_quantize_cli_and_errors(tmp_path, tiny_model, monkeypatch):
    save_pattern(tmp_path / "calib" / "a.png", 1)
    args = ["model", "quantize", str(tmp_path / "calib"), "--out", str(tmp_path / "q.onnx"), "--model", str(tiny_model)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "-int8" in result.stdout and "img/s on this machine: int8 is " in result.stdout
    monkeypatch.setattr(quantize, "measure_speed", lambda *args: SpeedCheck(2.36, 2.32))  # a CPU without int8 gains
    result = CliRunner().invoke(app, args + ["--json"])
    speed = json.loads(result.stdout)["speed"]
    assert speed["use_int8"] is False
    assert speed["advice"] == "int8 is no faster on this CPU (0.98x): keep the fp32 model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no calibration images"):
        quantize_model([tmp_path / "empty"], tmp_path / "x.onnx", tiny_model)

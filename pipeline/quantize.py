"""Int8 feature model: ONNX Runtime static QDQ quantization, per-channel weights, calibrated on images.

The quantized file is a different model: its own name and weights checksum (over the
quantized initializers), so shards and indexes never mix int8 and fp32 features silently.
Whether int8 is faster depends on the CPU (its int8 instructions: AVX2, VNNI, AVX-512 VNNI,
AMX) and on ONNX Runtime's kernels for it: 3x on one 2-core machine, nothing on another. So both
models are timed where the quantization runs, and the report says which one to use there.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ImageError, PipelineError
from .images import InputSize, find_images, load_image
from .model import DEFAULT_BATCH_SIZE, FeatureModel, ModelInfo, read_model_info, resolve_model_path, save_model

if TYPE_CHECKING:
    import onnx

LOG = logging.getLogger(__name__)
MIN_INT8_SPEEDUP = 1.2  # below this, int8 is not worth features slightly less exact than fp32's
SPEED_BATCHES = 2  # timed batches per model, after one warm-up batch each
DEFAULT_CALIBRATION_IMAGES = 64  # calibration images used (a seeded sample of those given)


@dataclass(frozen=True)
class SpeedCheck:
    """fp32 and int8 throughput measured on one machine, and the advice that follows from them."""

    fp32_images_per_second: float
    int8_images_per_second: float

    @property
    def speedup(self) -> float:
        return self.int8_images_per_second / self.fp32_images_per_second

    @property
    def use_int8(self) -> bool:
        return self.speedup >= MIN_INT8_SPEEDUP

    @property
    def advice(self) -> str:
        if self.use_int8:
            return f"int8 is {self.speedup:.1f}x faster here: use it"
        if self.speedup >= 1.05:
            return (
                f"int8 is only {self.speedup:.2f}x faster on this CPU: keep the fp32 model "
                "(int8 features are slightly less exact)"
            )
        return f"int8 is no faster on this CPU ({self.speedup:.2f}x): keep the fp32 model"

    def to_dict(self) -> dict[str, Any]:
        return {
            "fp32_images_per_second": round(self.fp32_images_per_second, 3),
            "int8_images_per_second": round(self.int8_images_per_second, 3),
            "speedup": round(self.speedup, 3),
            "use_int8": self.use_int8,
            "advice": self.advice,
        }


@dataclass(frozen=True)
class QuantizeReport:
    """What `model quantize` made, and whether to use it on this machine."""

    info: ModelInfo  # of the int8 model
    speed: SpeedCheck


def measure_speed(
    fp32: Path | str, int8: Path | str, batches: list[np.ndarray], timer: Callable[[], float] = time.perf_counter
) -> SpeedCheck:
    """Images per second of both models on `batches` here: one warm-up batch each (session start,
    memory), then the batches timed in turns, fp32 then int8, so drifting load hits both alike."""
    models = FeatureModel(fp32), FeatureModel(int8)
    for m in models:
        m.embed(batches[0])
    seconds = [0.0, 0.0]
    for batch in batches:
        for k, m in enumerate(models):
            t0 = timer()
            m.embed(batch)
            seconds[k] += timer() - t0
    n = sum(len(b) for b in batches)
    return SpeedCheck(n / seconds[0], n / seconds[1])


def _calibration_batches(images: list[Path], size: InputSize, batch_size: int = DEFAULT_BATCH_SIZE) -> list[np.ndarray]:
    """Batches of the calibration images, one input shape each."""
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for path in images:
        try:
            px = load_image(path, size).pixels
        except ImageError as exc:
            LOG.warning("calibration: skipping %s: %s", path, exc)
            continue
        by_shape.setdefault(px.shape, []).append(px)
    if not by_shape:
        raise PipelineError("no usable calibration images")
    return [np.stack(p[i : i + batch_size]) for p in by_shape.values() for i in range(0, len(p), batch_size)]


def initializers_checksum(model: onnx.ModelProto) -> str:
    """sha256 over every initializer's name, type and bytes: identifies a quantized model's weights."""
    from onnx import numpy_helper

    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        arr = numpy_helper.to_array(init)
        h.update(f"{init.name}/{arr.dtype.str}{list(arr.shape)}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def quantize_model(
    calibration: Sequence[Path | str],
    out: Path | str,
    model: Path | str | None = None,
    *,
    max_images: int = DEFAULT_CALIBRATION_IMAGES,
    seed: int = 0,
) -> QuantizeReport:
    """Write an int8 (QDQ, per-channel) copy of a feature model, calibrated on up to `max_images` images,
    then time both models on a few calibration batches (see measure_speed)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src = resolve_model_path(model)
    info = read_model_info(src)
    images = find_images(calibration)
    if not images:
        raise PipelineError(f"no calibration images found under {', '.join(map(str, calibration))}")
    if len(images) > max_images:
        rng = np.random.default_rng(seed)
        images = [images[i] for i in sorted(rng.choice(len(images), max_images, replace=False))]
    batches = _calibration_batches(images, info.resize_to)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.it, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory() as tmp:
        q_path = Path(tmp) / "int8.onnx"
        quantize_static(
            str(src),
            str(q_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "MaxPool"],
            calibrate_method=CalibrationMethod.MinMax,
        )
        q = onnx.load(str(q_path))
    # The rest of the recipe is kept.
    int8 = replace(info, name=f"{info.name}-int8", weights_sha256=initializers_checksum(q))
    del q.metadata_props[:]
    for key, value in int8.to_metadata().items():
        q.metadata_props.add(key=key, value=value)
    method = f"static QDQ, per-channel int8 weights, uint8 activations, MinMax on {len(images)} images"
    q.metadata_props.add(key="pipeline.quantization", value=method)
    q.metadata_props.add(key="pipeline.base_weights_sha256", value=info.weights_sha256)
    save_model(q, Path(out))
    LOG.info("wrote %s: %s, calibrated on %d images", out, int8.short(), len(images))
    speed = measure_speed(src, out, batches[:SPEED_BATCHES])
    LOG.info(
        "fp32 %.2f img/s, int8 %.2f img/s: %s", speed.fp32_images_per_second, speed.int8_images_per_second, speed.advice
    )
    return QuantizeReport(int8, speed)

"""Int8 feature model: ONNX Runtime static QDQ quantization, per-channel weights, calibrated on images.

The quantized file is a different model: its own name and weights checksum (over the
quantized initializers), so shards and indexes never mix int8 and fp32 features silently.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from .errors import ImageError, PipelineError
from .images import find_images, load_image
from .model import ModelInfo, read_model_info, resolve_model_path, save_model

LOG = logging.getLogger(__name__)


def _calibration_batches(images: list[Path], size: int, batch_size: int = 8) -> list[np.ndarray]:
    pixels = []
    for path in images:
        try:
            pixels.append(load_image(path, size).pixels)
        except ImageError as exc:
            LOG.warning("calibration: skipping %s: %s", path, exc)
    if not pixels:
        raise PipelineError("no usable calibration images")
    return [np.stack(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]


def initializers_checksum(model) -> str:
    """sha256 over every initializer's name, type and bytes: identifies a quantized model's weights."""
    from onnx import numpy_helper

    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        arr = numpy_helper.to_array(init)
        h.update(f"{init.name}/{arr.dtype.str}{list(arr.shape)}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def quantize_model(
    calibration: list[Path | str],
    out: Path | str,
    model: Path | str | None = None,
    *,
    max_images: int = 64,
    seed: int = 0,
) -> ModelInfo:
    """Write an int8 (QDQ, per-channel) copy of a feature model, calibrated on up to `max_images` images."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    src = resolve_model_path(model)
    info = read_model_info(src)
    images = find_images(calibration)
    if not images:
        raise PipelineError(f"no calibration images found under {', '.join(map(str, calibration))}")
    if len(images) > max_images:
        rng = np.random.default_rng(seed)
        images = [images[i] for i in sorted(rng.choice(len(images), max_images, replace=False))]
    batches = _calibration_batches(images, info.input_size)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            batch = next(self.it, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory() as tmp:
        q_path = Path(tmp) / "int8.onnx"
        quantize_static(
            str(src), str(q_path), Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "MaxPool"],
            calibrate_method=CalibrationMethod.MinMax,
        )
        q = onnx.load(str(q_path))
    int8 = ModelInfo(
        name=f"{info.name}-int8",
        weights_sha256=initializers_checksum(q),
        input_size=info.input_size,
        dim=info.dim,
        preprocessing=info.preprocessing,
        pooling=info.pooling,
        resize=info.resize,
    )
    del q.metadata_props[:]
    for key, value in int8.to_metadata().items():
        q.metadata_props.add(key=key, value=value)
    q.metadata_props.add(key="pipeline.quantization",
                         value=f"static QDQ, per-channel int8 weights, uint8 activations, MinMax on {len(images)} images")
    q.metadata_props.add(key="pipeline.base_weights_sha256", value=info.weights_sha256)
    save_model(q, Path(out))
    LOG.info("wrote %s: %s, calibrated on %d images", out, int8.short(), len(images))
    return int8

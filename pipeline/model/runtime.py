"""Running a feature model: where its file is (--model, $PIPELINE_MODEL, ./models, the user data folder)
and FeatureModel, its ONNX Runtime session."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import PipelineError
from ..images import input_shapes
from .info import ModelInfo

DEFAULT_MODEL_PATH = Path("models/vgg16.onnx")  # in a source checkout, relative to the current folder
MODEL_ENV, HOME_ENV = "PIPELINE_MODEL", "PIPELINE_HOME"  # a model file; the folder of per-user data
DEFAULT_BATCH_SIZE = 8  # images per model call (extract, search, the service, quantize's calibration)
DEFAULT_THREADS = 0  # ONNX Runtime intra-op threads; 0 = one per core
DEFAULT_DEVICE = "cpu"  # or "cuda" (onnxruntime-gpu)


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
    raise PipelineError(
        f"model file not found: {candidate} ({why}); create it with `pipeline model export`, or pass --model"
    )


def resolve_model_path(path: Path | str | None) -> Path:
    """The model file to use: the given path, else the default location (see locate_model)."""
    return locate_model(path)[0]


class FeatureModel:
    """An ONNX Runtime session of a feature model: uint8 RGB batches in, L2-normalised features out."""

    def __init__(
        self, path: Path | str | None = None, threads: int = DEFAULT_THREADS, device: str = DEFAULT_DEVICE
    ) -> None:
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
            raise PipelineError(
                f"{self.path} could not be loaded by ONNX Runtime: {str(exc).splitlines()[0]}"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_metadata(meta, self.path)
        self.input_name = self.session.get_inputs()[0].name

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Features [N, dim] float32 of a uint8 batch [N, H, W, 3] (RGB) of one of the model's input shapes."""
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3, "expected uint8 [N,H,W,3]"
        if len(images) == 0:
            return np.zeros((0, self.info.dim), np.float32)
        if self.info.input_shapes and images.shape[1:3] not in input_shapes(self.info.resize_to):
            raise PipelineError(
                f"{self.info.short()} takes images of shapes {self.info.input_shapes}, "
                f"not {images.shape[1]}x{images.shape[2]}"
            )
        return self.session.run(None, {self.input_name: images})[0]

    def embed_each(self, images: Sequence[np.ndarray], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Features [N, dim] of images [H, W, 3] of possibly different shapes, in order: one batch per
        shape (up to batch_size images)."""
        out = np.zeros((len(images), self.info.dim), np.float32)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(im.shape, []).append(i)
        for rows in by_shape.values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                out[chunk] = self.embed(np.stack([images[i] for i in chunk]))
        return out

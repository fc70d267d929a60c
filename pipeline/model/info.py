"""What a feature model file says about itself: its ONNX metadata, read and written as a ModelInfo,
and the checksum that names the features it makes."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import PipelineError
from ..images import InputSize, Shape, TrimFrame, input_shapes

METADATA_SCHEMA = 1


@dataclass(frozen=True)
class ModelInfo:
    """What a feature model file says about itself (read from its ONNX metadata)."""

    name: str
    weights_sha256: str
    input_size: int
    dim: int
    preprocessing: str = "caffe: RGB->BGR, minus mean [103.939, 116.779, 123.68], no scaling"
    pooling: str = "global max pooling of block5_conv3, L2-normalised"
    resize: str = "squash to input_size x input_size, bilinear (Pillow)"
    schema_version: int = METADATA_SCHEMA
    input_shapes: str = ""  # "HxW,HxW,..." of an aspect-kept recipe; "" = input_size x input_size
    frame: str = ""  # graph.FRAME_TRIM: a uniform frame is trimmed before the resize (images.trim_frame); "" = not
    whitening: str = ""  # how the regions are whitened in the graph and the sha256 of its matrices; "" = not

    def to_metadata(self) -> dict[str, str]:
        """The ONNX metadata_props that record it in the model file (keys "pipeline.<field>")."""
        return {f"pipeline.{k}": str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path | str = "?") -> ModelInfo:
        """Read back what to_metadata wrote; a file without it is not a feature model (PipelineError)."""
        try:
            return cls(
                name=meta["pipeline.name"],
                weights_sha256=meta["pipeline.weights_sha256"],
                input_size=int(meta["pipeline.input_size"]),
                dim=int(meta["pipeline.dim"]),
                preprocessing=meta["pipeline.preprocessing"],
                pooling=meta["pipeline.pooling"],
                resize=meta["pipeline.resize"],
                schema_version=int(meta["pipeline.schema_version"]),
                input_shapes=meta.get("pipeline.input_shapes", ""),
                frame=meta.get("pipeline.frame", ""),
                whitening=meta.get("pipeline.whitening", ""),
            )
        except KeyError as exc:
            raise PipelineError(
                f"{path} is not a pipeline feature model (metadata {exc} missing); "
                "make one with `pipeline model export`"
            ) from None

    @property
    def checksum(self) -> str:
        """Identity of the features this model makes: its weights and its whole recipe. Shards and
        indexes record it; features are only ever compared with features of the same checksum."""
        recipe = "|".join(
            [self.weights_sha256, str(self.input_size), str(self.dim), self.preprocessing, self.pooling, self.resize]
            + [x for x in (self.input_shapes, self.frame, self.whitening) if x]
        )
        return hashlib.sha256(recipe.encode()).hexdigest()

    def short(self) -> str:
        """Name and checksum prefix, for messages and logs."""
        return f"{self.name} (checksum {self.checksum[:12]})"

    @property
    def resize_to(self) -> InputSize:
        """What decoding resizes an image to (images.nearest_shape): a square side or the fixed shapes,
        wrapped in TrimFrame when the recipe trims frames first."""
        size: int | tuple[Shape, ...] = (
            self.input_size
            if not self.input_shapes
            else tuple((int(h), int(w)) for h, w in (s.split("x") for s in self.input_shapes.split(",")))
        )
        return TrimFrame(size) if self.frame else size

    def relative_compute(self) -> float:
        """Pixels one image sends through the conv base (at most: its largest shape), relative to the
        seed recipe's 224 x 224: the cost of a recipe per image whatever the host (the conv base is
        nearly all of it)."""
        return max(h * w for h, w in input_shapes(self.resize_to)) / 224**2


def read_model_info(path: Path | str) -> ModelInfo:
    """The metadata of a model file, without building an inference session."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for garbage
        raise PipelineError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    return ModelInfo.from_metadata({p.key: p.value for p in model.metadata_props}, path)

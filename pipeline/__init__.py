"""pipeline: search by image. images -> decode -> VGG16 (ONNX) -> HDF5 shards -> FAISS index -> search."""

from .version import __version__

__all__ = ["__version__"]

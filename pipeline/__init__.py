"""pipeline: search by image. images -> decode -> VGG16 (ONNX) -> HDF5 shards -> FAISS index -> search."""

__version__ = "0.1.0"

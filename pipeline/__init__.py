"""pipeline: search by image. images -> decode -> VGG16 (ONNX) -> HDF5 shards -> FAISS index -> search.

The library API, one call per step (the CLI is a thin layer over the same calls)::

    from pipeline import Searcher, build_index, extract
    extract(["photos/"], "features/")  # decode and embed every image, into HDF5 shards
    build_index("features/", "index/")  # a FAISS inner-product index, nprobe tuned for recall
    for hit in Searcher("index/").search(["query.jpg"], k=5)[0].hits:
        print(f"{hit.score:.3f}  {hit.path}")

Also: `rebuild` (the nightly job: extract what changed, rebuild or update the index), `find_groups`
(near-duplicate groups), `evaluate` (mAP and recall@k against ground truth), `Service` (the warm
query service behind `pipeline serve`; needs the `serve` extra, FastAPI), and the error types:
every problem a user can fix is a `PipelineError` (one sentence), an image that cannot be decoded
an `ImageError`.

The functions and classes are imported on first use (PEP 562), so `import pipeline.errors` or a
decoder worker process does not pay for FAISS, ONNX Runtime and HDF5. `pipeline.extract`,
`pipeline.evaluate` and `pipeline.rebuild` are always the functions, whatever was imported first
(the modules of the same names: `from pipeline.extract import ...`). Submodules never import from
here: they import from each other, and `__version__` from pipeline.version.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import BusyError, ImageError, ModelMismatchError, PipelineError
from .version import __version__

if TYPE_CHECKING:
    from .duplicates import find_groups
    from .evaluate import evaluate
    from .extract import extract
    from .index import build_index
    from .rebuild import rebuild
    from .search import Searcher
    from .serve import Service

# Name -> the module that defines it, imported by __getattr__ on first use.
_LAZY = {
    "Searcher": "search",
    "extract": "extract",
    "build_index": "index",
    "rebuild": "rebuild",
    "find_groups": "duplicates",
    "evaluate": "evaluate",
    "Service": "serve",  # the serve extra: FastAPI, uvicorn, python-multipart
}

__all__ = [
    "BusyError",
    "ImageError",
    "ModelMismatchError",
    "PipelineError",
    "Searcher",
    "Service",
    "__version__",
    "build_index",
    "evaluate",
    "extract",
    "find_groups",
    "rebuild",
]


class _FrontDoor(types.ModuleType):
    """The package's module type: importing the submodule pipeline.extract binds it to the package's
    attribute `extract`, the name of the function it defines; the function is kept there instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _FrontDoor


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module == "serve":
        try:
            from .serve import Service
        except ImportError as exc:
            raise ImportError(f"pipeline.Service needs the serve extra: pip install 'pipeline[serve]' ({exc})") from exc
        value: Any = Service
    else:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

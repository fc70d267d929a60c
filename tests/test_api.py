"""The front door: `pipeline` exports the library API, imports it on first use, and works end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pipeline
from pipeline import version


def test_every_exported_name_imports():
    for name in pipeline.__all__:
        if name == "Service" and not has_fastapi():
            continue
        assert getattr(pipeline, name) is not None, name
    assert set(pipeline.__all__) <= set(dir(pipeline))
    assert issubclass(pipeline.ModelMismatchError, pipeline.PipelineError)
    assert issubclass(pipeline.BusyError, pipeline.PipelineError)
    assert pipeline.__version__ == version.__version__


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        getattr(pipeline, "nope")  # noqa: B009


def test_functions_shadow_their_modules_whatever_is_imported_first():
    """pipeline.extract is the function, even after `import pipeline.extract` (the module)."""
    code = (
        "import pipeline.extract, pipeline.evaluate, pipeline.rebuild, pipeline, sys\n"
        "assert callable(pipeline.extract) and pipeline.extract.__module__ == 'pipeline.extract'\n"
        "assert callable(pipeline.evaluate) and callable(pipeline.rebuild)\n"
        "assert sys.modules['pipeline.extract'].extract is pipeline.extract\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_submodules_stay_light():
    """A decoder worker imports pipeline.decode_pool: the front door must not drag FAISS, ONNX or HDF5 in."""
    code = (
        "import sys, pipeline.decode_pool\n"
        "heavy = [m for m in ('faiss', 'onnxruntime', 'h5py', 'fastapi', 'pipeline.search') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def has_fastapi() -> bool:
    try:
        import fastapi  # noqa: F401
    except ImportError:
        return False
    return True


def test_service_is_imported_lazily():
    pytest.importorskip("fastapi")
    from pipeline.serve import Service

    assert pipeline.Service is Service


def test_end_to_end_through_the_front_door(tmp_path, gallery, tiny_model):
    from pipeline import Searcher, build_index, extract

    extract([gallery], tmp_path / "features", tiny_model, workers=0, progress=False)
    build_index(tmp_path / "features", tmp_path / "index", progress=False)
    query = sorted(gallery.rglob("img03.*"))[0]
    [result] = Searcher(tmp_path / "index", model=tiny_model).search([query], k=3)
    assert result.error is None and result.hits[0].path == str(query)

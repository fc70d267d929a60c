"""OpenCV, imported on first use: the core package installs and imports without it (extra `verify`)."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import PipelineError

INSTALL_HINT = "verifying copies needs OpenCV: pip install 'pipeline[verify]'"


def opencv() -> ModuleType:
    """The cv2 module, or a PipelineError saying how to install it."""
    try:
        return importlib.import_module("cv2")
    except ImportError:
        raise PipelineError(INSTALL_HINT) from None

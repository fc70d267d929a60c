"""Writing a feature model file: weights in, optionally a whitening learned, the graph built, the file written."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from ..errors import PipelineError
from ..fsutil import atomic_write_bytes
from ..images import find_images
from .graph import build_feature_graph
from .info import ModelInfo
from .recipe import DEFAULT_PROFILE, PROFILES, Recipe
from .runtime import default_model_location
from .weights import load_layers
from .whitening import Whitening, learn_whitening, load_whitening, shipped_whitening_path

if TYPE_CHECKING:
    import onnx

LOG = logging.getLogger(__name__)


class _GraphRecipe(TypedDict):
    """What export_model asks build_feature_graph for, besides the layers and the whitening."""

    input_size: int
    pooling: str
    aspect: bool
    frame: bool


def save_model(model: onnx.ModelProto, out: Path) -> None:
    """Write an ONNX model atomically (temporary name, fsync, rename)."""
    atomic_write_bytes(Path(out), model.SerializeToString())


def export_model(
    out: Path | None = None,
    source: Path | None = None,
    profile: str = DEFAULT_PROFILE,
    input_size: int | None = None,
    pooling: str | None = None,
    frame: bool | None = None,
    whiten_on: Sequence[Path] = (),
    whiten: bool | None = None,
) -> ModelInfo:
    """Write the ImageNet VGG16 feature model to `out` (default: default_model_location()) from a
    weights source (see load_layers).

    `profile` picks the recipe (see PROFILES and docs/quality.md); `input_size` / `pooling` / `frame`
    override it. The regions are whitened by `whiten_on` (folders or images to learn PCA-whitening of the
    R-MAC regions on, learn_whitening), else by the whitening the profile ships (offline, package data) unless
    `whiten` is False. The shipped one was learned for the profile's own recipe: with an override, the
    model is not whitened unless `whiten_on` is given.
    """
    if profile not in PROFILES:
        raise PipelineError(f"unknown profile {profile!r}: use {', '.join(PROFILES)}")
    if whiten_on and whiten is False:
        raise PipelineError("--whiten-on learns a whitening and --no-whiten refuses one: give one of them")
    recipe = PROFILES[profile]
    layers, origin = load_layers(source)
    args: _GraphRecipe = {
        "input_size": input_size or recipe.input_size,
        "pooling": pooling or recipe.pooling,
        "aspect": recipe.aspect,
        "frame": recipe.frame if frame is None else frame,
    }
    whitening = None
    if whiten_on:
        files = find_images(whiten_on)
        if not files:
            raise PipelineError(f"no images to learn whitening on in {', '.join(map(str, whiten_on))}")
        whitening = learn_whitening(build_feature_graph(layers, **args)[0], args["pooling"], files)
    elif whiten is not False:
        whitening = _shipped(profile, recipe, args, explicit=whiten is True)
    model, info = build_feature_graph(layers, **args, whitening=whitening)
    model.metadata_props.add(key="pipeline.weights_source", value=origin)
    out = default_model_location()[0] if out is None else out
    save_model(model, out)
    LOG.info("wrote %s: %s from %s", out, info.short(), origin)
    return info


def _shipped(profile: str, recipe: Recipe, args: _GraphRecipe, explicit: bool) -> Whitening | None:
    """The whitening `profile` ships, when the recipe asked for is the profile's own (None otherwise)."""
    if not recipe.whitened:
        if explicit:
            raise PipelineError(f"profile {profile!r} ships no whitening: learn one with --whiten-on DIR")
        return None
    own: _GraphRecipe = {
        "input_size": recipe.input_size,
        "pooling": recipe.pooling,
        "aspect": recipe.aspect,
        "frame": recipe.frame,
    }
    if args != own:
        if explicit:
            raise PipelineError(
                f"the whitening profile {profile!r} ships was learned for its own recipe, not with "
                "--input-size/--pooling/--trim-frame changed: learn one with --whiten-on DIR"
            )
        LOG.info("the recipe differs from profile %s's: its shipped whitening is not applied", profile)
        return None
    return load_whitening(shipped_whitening_path(profile))

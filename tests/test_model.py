"""The feature graph computes the recipe: checked against an independent NumPy implementation."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from helpers import TINY_SIZE, save_pattern, tiny_layers, write_tiny_model
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.model import (
    VGG16_BLOCKS,
    FeatureModel,
    Whitening,
    aspect_shapes,
    build_feature_graph,
    export_model,
    layers_from_keras_onnx,
    learn_whitening,
    load_layers,
    load_whitening,
    maps_session,
    read_model_info,
    region_vectors,
    resolve_model_path,
    rmac_maps,
    rmac_regions,
    save_model,
    save_whitening,
    weights_checksum,
    whitening_checksum,
)


def numpy_rmac(x: np.ndarray) -> np.ndarray:
    """R-MAC of maps [N, C, h, w]: each region max-pooled and L2-normalised, summed, L2-normalised."""
    vec = np.zeros(x.shape[:2])
    for y0, x0, y1, x1 in rmac_regions(*x.shape[2:]):
        r = x[:, :, y0:y1, x0:x1].max(axis=(2, 3))
        vec += r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    return vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)


def numpy_reference(images: np.ndarray, layers, pooling: str = "max") -> np.ndarray:
    """The recipe written out plainly: caffe preprocessing, VGG convs/pools, global max (or R-MAC of
    block5_conv3, or R-MAC of block4_conv3 and block5_conv3 concatenated), L2."""
    x = images.astype(np.float64)[..., ::-1] - np.array([103.939, 116.779, 123.68])  # RGB->BGR, minus mean
    x = x.transpose(0, 3, 1, 2)  # NCHW
    i, block4 = 0, None
    for b, n in enumerate(VGG16_BLOCKS):
        for _ in range(n):
            _, kernel, bias = layers[i]
            i += 1
            padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
            h, w = x.shape[2:]
            out = np.zeros((x.shape[0], kernel.shape[0], h, w))
            for dy in range(3):
                for dx in range(3):
                    out += np.einsum("nchw,oc->nohw", padded[:, :, dy : dy + h, dx : dx + w], kernel[:, :, dy, dx])
            x = np.maximum(out + bias[None, :, None, None], 0)
        if pooling == "rmac45" and b == 3:  # block4_conv3, before its pool
            block4 = numpy_rmac(x)
        if pooling.startswith("rmac") and i == len(layers):  # R-MAC on block5_conv3, before its pool
            if block4 is None:
                return numpy_rmac(x)
            both = np.concatenate([block4, numpy_rmac(x)], axis=1)
            return both / np.linalg.norm(both, axis=1, keepdims=True)
        h2, w2 = x.shape[2] // 2, x.shape[3] // 2
        x = x[:, :, : h2 * 2, : w2 * 2].reshape(x.shape[0], x.shape[1], h2, 2, w2, 2).max(axis=(3, 5))
    pooled = x.max(axis=(2, 3))
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


@pytest.fixture(scope="module")
def session(tiny_model):
    return FeatureModel(tiny_model, threads=1)


def test_graph_matches_numpy_reference(session):
    images = np.random.default_rng(1).integers(0, 256, (3, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    got = session.embed(images)
    want = numpy_reference(images, tiny_layers(0))
    assert got.shape == (3, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 4), st.sampled_from([32, 48, 64]), st.integers(0, 2**31 - 1))
def test_any_batch_and_size_match_reference(session, n, size, seed):
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.testing.assert_allclose(session.embed(images), numpy_reference(images, tiny_layers(0)), rtol=1e-4, atol=1e-5)


def test_rmac_graph_matches_numpy_reference(tmp_path):
    model, info = build_feature_graph(tiny_layers(0), input_size=64, pooling="rmac")
    save_model(model, tmp_path / "rmac.onnx")
    images = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    got = FeatureModel(tmp_path / "rmac.onnx").embed(images)
    np.testing.assert_allclose(got, numpy_reference(images, tiny_layers(0), "rmac"), rtol=1e-4, atol=1e-5)
    assert len(rmac_regions(4, 4)) > 3 and "R-MAC" in info.pooling
    assert info.checksum != build_feature_graph(tiny_layers(0), input_size=64)[1].checksum


@pytest.mark.parametrize("aspect", [False, True])
def test_two_layer_rmac_matches_numpy_reference(tmp_path, aspect):
    model, info = build_feature_graph(tiny_layers(0), input_size=64, pooling="rmac45", aspect=aspect)
    save_model(model, tmp_path / "rmac45.onnx")
    fm = FeatureModel(tmp_path / "rmac45.onnx")
    assert fm.info.dim == 2 * 64 and "block4_conv3 and of block5_conv3" in fm.info.pooling
    rmac = build_feature_graph(tiny_layers(0), input_size=64, pooling="rmac", aspect=aspect)[1]
    assert info.checksum != rmac.checksum and info.relative_compute() == rmac.relative_compute()
    rng = np.random.default_rng(4)
    # with aspect: each layer's If chain picks the shape's regions
    for h, w in info.resize_to if aspect else [(64, 64)]:
        images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        got = fm.embed(images)
        np.testing.assert_allclose(got, numpy_reference(images, tiny_layers(0), "rmac45"), rtol=1e-4, atol=1e-5)
        # the layers weigh alike
        np.testing.assert_allclose(np.linalg.norm(got[:, :64], axis=1), np.sqrt(0.5), rtol=1e-5)


def test_aspect_graph_pools_each_shape_with_its_regions(tmp_path):
    model, info = build_feature_graph(tiny_layers(0), input_size=64, pooling="rmac", aspect=True)
    save_model(model, tmp_path / "aspect.onnx")
    assert info.resize_to == aspect_shapes(64) == ((64, 64), (56, 72), (72, 56), (56, 80), (80, 56), (48, 88), (88, 48))
    assert "aspect kept" in info.resize
    assert info.relative_compute() == pytest.approx(56 * 80 / 224**2)  # its largest shape
    fm = FeatureModel(tmp_path / "aspect.onnx")
    square = build_feature_graph(tiny_layers(0), input_size=64, pooling="rmac")[1]
    assert fm.info.checksum == info.checksum != square.checksum
    rng = np.random.default_rng(3)
    for h, w in info.resize_to:  # the If chain picks the regions of the input's own shape
        images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        np.testing.assert_allclose(
            fm.embed(images), numpy_reference(images, tiny_layers(0), "rmac"), rtol=1e-4, atol=1e-5
        )
    with pytest.raises(PipelineError, match="takes images of shapes 64x64,56x72,.*, not 64x72"):
        fm.embed(np.zeros((1, 64, 72, 3), np.uint8))
    mixed = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(56, 80), (64, 64), (56, 80), (88, 48)]]
    np.testing.assert_allclose(
        fm.embed_each(mixed, batch_size=1), np.concatenate([fm.embed(m[None]) for m in mixed]), rtol=1e-5, atol=1e-6
    )  # in order, one batch per shape


def test_frame_trimming_is_part_of_the_recipe(tmp_path):
    from pipeline.images import TrimFrame

    model, info = build_feature_graph(tiny_layers(0), input_size=64, pooling="rmac45", aspect=True, frame=True)
    save_model(model, tmp_path / "frame.onnx")
    plain = build_feature_graph(tiny_layers(0), input_size=64, pooling="rmac45", aspect=True)[1]
    assert read_model_info(tmp_path / "frame.onnx") == info and "trimmed" in info.frame and info.name.endswith("-frame")
    assert info.resize_to == TrimFrame(plain.resize_to) and plain.frame == ""
    assert info.checksum != plain.checksum  # features of the two never mix
    assert info.relative_compute() == plain.relative_compute()  # trimming is decoding, not model work
    weights = write_keras_h5(tmp_path / "weights.h5", tiny_layers(0))
    out = CliRunner().invoke(
        app,
        [
            "model",
            "export",
            "--weights",
            str(weights),
            "--profile",
            "seed",
            "--trim-frame",
            "--out",
            str(tmp_path / "seed-frame.onnx"),
        ],
    )
    assert out.exit_code == 0 and "frames trimmed" in out.stdout, out.stdout
    assert model_info_cli("--model", tmp_path / "seed-frame.onnx")["frame"] == info.frame


def test_metadata_records_recipe(tiny_model):
    info = read_model_info(tiny_model)
    assert info.name == "tiny-vgg"
    assert info.weights_sha256 == weights_checksum(tiny_layers(0))
    assert (info.input_size, info.dim) == (TINY_SIZE, 64)
    assert "BGR" in info.preprocessing and "103.939" in info.preprocessing
    assert "max" in info.pooling and "L2" in info.pooling
    m = onnx.load(str(tiny_model))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_checksum_identifies_weights():
    a, b = tiny_layers(0), tiny_layers(1)
    assert weights_checksum(a) == weights_checksum(tiny_layers(0))
    assert weights_checksum(a) != weights_checksum(b)


def write_keras_h5(path: Path, layers) -> Path:
    """Weights in the layout of the Keras notop .h5: a group per layer, HWIO kernels."""
    with h5py.File(path, "w") as f:
        for name, kernel, bias in layers:
            g = f.create_group(name).create_group(name)
            g["kernel:0"] = kernel.transpose(2, 3, 1, 0)
            g["bias:0"] = bias
    return path


def test_keras_h5_loader_transposes_hwio(tmp_path):
    layers = tiny_layers(3)
    path = write_keras_h5(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", layers)
    loaded, origin = load_layers(path)
    assert origin == str(path)
    assert weights_checksum(loaded) == weights_checksum(layers)
    large = export_model(tmp_path / "large.onnx", path, profile="large")
    assert (large.input_size, large.weights_sha256) == (384, weights_checksum(layers)) and "R-MAC" in large.pooling
    assert large.relative_compute() <= 3.0 and "aspect kept" in large.resize
    assert read_model_info(tmp_path / "large.onnx").checksum == large.checksum
    with pytest.raises(PipelineError, match="unknown profile"):
        export_model(tmp_path / "x.onnx", path, profile="turbo")


def test_tf2onnx_loader_reads_named_initializers(tmp_path):
    layers = tiny_layers(4)
    inits = []
    for name, kernel, bias in layers:
        inits.append(numpy_helper.from_array(kernel, f"functional_1/{name}_1/convolution/ReadVariableOp:0"))
        inits.append(numpy_helper.from_array(bias, f"functional_1/{name}_1/Squeeze:0"))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        initializer=inits,
    )
    path = tmp_path / "keras.onnx"
    onnx.save(helper.make_model(graph), path)
    assert weights_checksum(layers_from_keras_onnx(path.read_bytes())) == weights_checksum(layers)


def test_bad_weights_are_refused(tmp_path):
    with pytest.raises(PipelineError, match="13 VGG16 conv layers"):
        build_feature_graph(tiny_layers(0)[:-1])
    with pytest.raises(PipelineError, match="not found"):
        load_layers(tmp_path / "missing.h5")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(PipelineError, match="unknown weights format"):
        load_layers(tmp_path / "w.txt")


def test_model_errors(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(PipelineError, match="could not be loaded"):
        FeatureModel(garbage)
    with pytest.raises(PipelineError, match="model file not found"):
        FeatureModel(tmp_path / "nope.onnx")
    with pytest.raises(PipelineError, match="no CUDA execution provider"):
        FeatureModel(write_tiny_model(tmp_path / "t.onnx"), device="cuda")


@pytest.fixture()
def user_env(tmp_path, monkeypatch) -> Path:
    """A home folder of the test's own, no model variables, and a current folder without models/."""
    for name in ("PIPELINE_MODEL", "PIPELINE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return tmp_path / "home"


def model_info_cli(*args) -> dict:
    result = CliRunner().invoke(app, ["model", "info", *map(str, args)])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_installed_user_finds_the_exported_model_from_any_folder(user_env, tmp_path, monkeypatch):
    with pytest.raises(PipelineError, match="model file not found: .*/home/.local/share/pipeline/models/vgg16.onnx"):
        resolve_model_path(None)
    weights = write_keras_h5(tmp_path / "weights.h5", tiny_layers(0))
    result = CliRunner().invoke(app, ["model", "export", "--weights", str(weights), "--profile", "seed"])
    stored = user_env / ".local" / "share" / "pipeline" / "models" / "vgg16.onnx"
    assert result.exit_code == 0 and f"wrote {stored} (user data folder)" in result.stdout, result.stdout
    assert not (tmp_path / "elsewhere" / "models").exists()
    monkeypatch.chdir(tmp_path)  # another folder: the same model
    assert resolve_model_path(None) == stored
    assert model_info_cli() == {**model_info_cli("--model", stored), "source": "user data folder"}

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    with pytest.raises(PipelineError, match="xdg/pipeline/models/vgg16.onnx"):
        resolve_model_path(None)
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "ph"))
    with pytest.raises(PipelineError, match="ph/models/vgg16.onnx"):
        resolve_model_path(None)


def test_model_sources_in_order(user_env, tmp_path, tiny_model, monkeypatch):
    checkout = write_tiny_model(tmp_path / "elsewhere" / "models" / "vgg16.onnx", seed=1)
    assert model_info_cli()["source"] == "./models" and model_info_cli()["path"] == str(checkout)
    monkeypatch.setenv("PIPELINE_MODEL", str(tiny_model))
    assert (model_info_cli()["source"], model_info_cli()["path"]) == ("PIPELINE_MODEL", str(tiny_model))
    assert model_info_cli("--model", checkout)["source"] == "--model"
    monkeypatch.setenv("PIPELINE_MODEL", str(tmp_path / "gone.onnx"))
    with pytest.raises(PipelineError, match=r"gone.onnx \(PIPELINE_MODEL\)"):
        resolve_model_path(None)


def numpy_whitened_rmac(x: np.ndarray, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """numpy_rmac with each L2-normalised region whitened ((v - mean) @ projection) and L2-normalised again."""
    vec = np.zeros((x.shape[0], projection.shape[1]))
    for y0, x0, y1, x1 in rmac_regions(*x.shape[2:]):
        r = x[:, :, y0:y1, x0:x1].max(axis=(2, 3))
        r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12) - mean
        r = r @ projection
        vec += r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    return vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)


def block_maps(images: np.ndarray, layers) -> dict[str, np.ndarray]:
    """block4_conv3's and block5_conv3's ReLU maps, from the graph itself (extra outputs)."""
    names = rmac_maps("rmac45")
    session = maps_session(build_feature_graph(layers, pooling="max")[0], names)  # any input size
    return dict(zip(names, session.run(list(names), {"image": images}), strict=True))


def test_whitening_is_in_the_graph_and_the_checksum(tmp_path):
    layers = tiny_layers(0)
    rng = np.random.default_rng(5)
    names = rmac_maps("rmac45")
    assert names == ("block4_conv3/relu", "block5_conv3/relu") and rmac_maps("max") == ()
    whitening = Whitening(
        {n: (rng.normal(0, 0.05, 64).astype(np.float32), rng.normal(0, 1, (64, 64)).astype(np.float32)) for n in names}
    )
    model, info = build_feature_graph(layers, input_size=64, pooling="rmac45", whitening=whitening)
    save_model(model, tmp_path / "white.onnx")
    plain = build_feature_graph(layers, input_size=64, pooling="rmac45")[1]
    assert info.name.endswith("-whitened") and info.whitening == whitening.note
    assert info.whitening == f"PCA-whitening of each R-MAC region; sha256 {whitening_checksum(whitening)}"
    assert read_model_info(tmp_path / "white.onnx") == info and info.checksum != plain.checksum
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    maps = block_maps(images, layers)
    parts = [numpy_whitened_rmac(maps[n].astype(np.float64), *whitening.maps[n]) for n in names]
    want = np.concatenate(parts, axis=1) / np.sqrt(2)  # each layer's part is unit length
    np.testing.assert_allclose(FeatureModel(tmp_path / "white.onnx").embed(images), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(PipelineError, match="does not fit pooling 'rmac'"):
        build_feature_graph(layers, input_size=64, pooling="rmac", whitening=whitening)


@pytest.mark.slow
def test_learned_whitening_decorrelates_regions_of_its_images(tmp_path):
    layers = tiny_layers(0)
    photos = tmp_path / "independent"
    for i in range(12):
        save_pattern(photos / f"p{i:02d}.jpg", seed=100 + i, size=(72, 96))
    (photos / "broken.jpg").write_bytes(b"not an image")  # skipped, not fatal
    plain, info = build_feature_graph(layers, input_size=64, pooling="rmac45", aspect=True, frame=True)
    whitening = learn_whitening(plain, "rmac45", sorted(photos.iterdir()))
    note = whitening.note
    assert whitening.provenance.startswith("(power 0.5, shrinkage 1.0), learned on ")
    assert whitening.provenance.endswith(" region vectors of 12 images")
    assert note.endswith(whitening_checksum(whitening))
    # the same regions the graph pools, decoded as the recipe decodes them
    from pipeline.images import load_image

    pixels = [load_image(p, info.resize_to).pixels for p in sorted(photos.glob("p*.jpg"))]
    name = "block5_conv3/relu"
    mean, projection = whitening.maps[name]
    regions = np.concatenate([region_vectors(block_maps(px[None], layers)[name][0]) for px in pixels])
    white = (regions - mean) @ projection
    cov = np.cov(white.T)
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).max() < 1e-3 * np.abs(np.diag(cov)).max()  # decorrelated: the covariance is diagonal
    assert np.abs(white.mean(axis=0)).max() < 1e-4  # and centred
    weights = write_keras_h5(tmp_path / "weights.h5", layers)
    out = CliRunner().invoke(
        app,
        [
            "model",
            "export",
            "--weights",
            str(weights),
            "--profile",
            "balanced",
            "--input-size",
            "64",
            "--whiten-on",
            str(photos),
            "--out",
            str(tmp_path / "w.onnx"),
        ],
    )
    assert out.exit_code == 0 and "regions whitened" in out.stdout, out.stdout
    assert model_info_cli("--model", tmp_path / "w.onnx")["whitening"] == note
    few = CliRunner().invoke(
        app,
        [
            "model",
            "export",
            "--weights",
            str(weights),
            "--profile",
            "balanced",
            "--input-size",
            "64",
            "--whiten-on",
            str(photos / "p00.jpg"),
            "--out",
            str(tmp_path / "few.onnx"),
        ],
    )
    assert few.exit_code != 0 and "needs at least 64 region vectors" in few.output
    seed = CliRunner().invoke(
        app,
        [
            "model",
            "export",
            "--weights",
            str(weights),
            "--profile",
            "seed",
            "--whiten-on",
            str(photos),
            "--out",
            str(tmp_path / "s.onnx"),
        ],
    )
    assert seed.exit_code != 0 and "needs an R-MAC pooling" in seed.output and not (tmp_path / "s.onnx").exists()


def test_a_whitening_saved_and_loaded_builds_the_same_model(tmp_path):
    layers = tiny_layers(0)
    rng = np.random.default_rng(7)
    whitening = Whitening(
        {n: (rng.normal(0, 0.05, 64), rng.normal(0, 1, (64, 64))) for n in rmac_maps("rmac45")},
        "(power 0.5, shrinkage 1.0), learned on 900 region vectors of 9 images",
    )
    save_whitening(tmp_path / "w.npz", whitening)
    loaded = load_whitening(tmp_path / "w.npz")
    assert loaded.provenance == whitening.provenance and list(loaded.maps) == list(whitening.maps)
    for name, (mean, projection) in whitening.maps.items():
        assert loaded.maps[name][0].dtype == loaded.maps[name][1].dtype == np.float32
        np.testing.assert_array_equal(loaded.maps[name][0], mean.astype(np.float32))
        np.testing.assert_array_equal(loaded.maps[name][1], projection.astype(np.float32))
    assert whitening_checksum(loaded) == whitening_checksum(whitening) and loaded.note == whitening.note
    built = [build_feature_graph(layers, input_size=64, pooling="rmac45", whitening=w) for w in (whitening, loaded)]
    assert built[0][1] == built[1][1] and built[0][0].SerializeToString() == built[1][0].SerializeToString()
    save_whitening(tmp_path / "again.npz", loaded)  # a loaded whitening saves to the same file
    assert (tmp_path / "again.npz").read_bytes() == (tmp_path / "w.npz").read_bytes()
    with pytest.raises(TypeError):
        loaded.maps["block5_conv3/relu"] = loaded.maps["block4_conv3/relu"]  # the record is frozen, maps too
    for junk in (b"not a zip", b""):
        (tmp_path / "junk.npz").write_bytes(junk)
        with pytest.raises(PipelineError, match="is not a whitening file"):
            load_whitening(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", names=np.array(["x"]))
    with pytest.raises(PipelineError, match="is not a whitening file"):
        load_whitening(tmp_path / "other.npz")
    with pytest.raises(PipelineError, match="are not"):
        Whitening({"block5_conv3/relu": (np.zeros(64), np.zeros((64, 32)))})

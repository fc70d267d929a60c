"""The feature graph in ONNX: the whole recipe lives in the graph, so every consumer computes the same features.

uint8 RGB [N, H, W, 3] -> float -> RGB to BGR -> minus the caffe mean -> 13 conv layers with
ReLU and 4 or 5 max-pools -> pooling (global max, or R-MAC regions) -> L2 normalisation -> float32 [N, D].
Aspect-kept recipes take a few fixed input shapes (aspect buckets, see aspect_shapes); their
R-MAC regions differ per shape, so the graph picks the regions of the input's shape with If nodes.
The ONNX metadata records the model name, a checksum of the weights and the recipe.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ..errors import PipelineError
from ..images import Shape
from .info import ModelInfo
from .recipe import L2_EPS, POOLINGS, RMAC_LAYERS, aspect_shapes, rmac_maps, rmac_regions
from .weights import VGG16_BLOCKS, ConvLayer, check_layers, weights_checksum
from .whitening import Whitening

if TYPE_CHECKING:
    import onnx

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
FRAME_TRIM = (
    "a uniform frame (letterbox, pillarbox, mat: both opposite sides, about one width and one colour) "
    "trimmed before the resize (images.trim_frame)"
)

# A map R-MAC pools: its tensor name, its stride (input pixels per map cell) and its channels.
Tap = tuple[str, int, int]


def build_feature_graph(
    layers: list[ConvLayer],
    name: str | None = None,
    input_size: int = 224,
    pooling: str = "max",
    aspect: bool = False,
    frame: bool = False,
    whitening: Whitening | None = None,
) -> tuple[onnx.ModelProto, ModelInfo]:
    """The ONNX feature graph (opset 17) for the given VGG-shaped conv layers, and what its metadata records.

    pooling "max": global max pooling, height and width dynamic (the conv base accepts any
    size). pooling "rmac": R-MAC over regions fixed for the input shape: input_size x input_size,
    or with `aspect` the shapes of aspect_shapes(input_size) (height and width dynamic, one of those).
    `frame`: decoding trims a uniform frame before the resize (recorded in the metadata, not the graph).
    pooling "rmac45": the same on block4_conv3 and on block5_conv3, concatenated: block4's finer map
    keeps the detail that tells one scene from a similar one, block5 the invariance copies need.
    `whitening` (learn_whitening, load_whitening): each R-MAC region whitened in the graph, its note in the
    metadata (and so in the checksum).
    """
    from onnx import helper

    if pooling not in POOLINGS:
        raise PipelineError(f"unknown pooling {pooling!r}: use {' or '.join(POOLINGS)}")
    if whitening is not None and set(whitening.maps) != set(rmac_maps(pooling)):
        raise PipelineError(
            f"a whitening of {', '.join(sorted(whitening.maps))} does not fit pooling "
            f"{pooling!r} (R-MAC of {', '.join(rmac_maps(pooling)) or 'no map'})"
        )
    shapes = aspect_shapes(input_size) if aspect else ((input_size, input_size),)
    if name is None:
        name = _default_name(input_size, pooling, aspect, frame, whitening is not None)
    layers = check_layers(layers)
    nodes, inits = _preprocess_nodes()
    x, taps, base_nodes, base_inits = _conv_base(layers, pooling)
    nodes, inits = nodes + base_nodes, inits + base_inits
    if pooling == "max":
        dim = layers[-1][1].shape[0]
        nodes += [
            helper.make_node("GlobalMaxPool", [x], ["gmp"]),
            helper.make_node("Flatten", ["gmp"], ["pooled"], axis=1),
        ]
        fixed = None  # height and width: any
    else:
        dim = sum(channels for _, _, channels in taps)
        fixed = input_size if len(shapes) == 1 else None
        pool_nodes, pool_inits = _rmac_pooling(taps, shapes, whitening)
        nodes, inits = nodes + pool_nodes, inits + pool_inits
    nodes += _l2_nodes("pooled", "features")
    info = ModelInfo(
        name=name, weights_sha256=weights_checksum(layers), input_size=input_size, dim=dim, pooling=POOLINGS[pooling]
    )
    info = _with_recipe(info, shapes if aspect else (), frame, whitening)
    return _model(nodes, inits, info, fixed), info


def _default_name(input_size: int, pooling: str, aspect: bool, frame: bool, whitened: bool) -> str:
    """The model name a recipe gets when none is given, e.g. vgg16-imagenet-rmac45-192-aspect-frame."""
    name = {"max": "vgg16-imagenet-gmp", "rmac": f"vgg16-imagenet-rmac{input_size}"}.get(
        pooling, f"vgg16-imagenet-{pooling}-{input_size}"
    )
    return name + "-aspect" * aspect + "-frame" * frame + "-whitened" * whitened


def _preprocess_nodes() -> tuple[list, list]:
    """uint8 RGB NHWC in, float BGR minus the caffe mean NCHW out ("x_nchw"); and the shared L2 epsilon."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Cast", ["image"], ["x_float"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["x_float", "bgr_index"], ["x_bgr"], axis=3),
        helper.make_node("Sub", ["x_bgr", "caffe_mean"], ["x_centred"]),
        helper.make_node("Transpose", ["x_centred"], ["x_nchw"], perm=[0, 3, 1, 2]),
    ]
    inits = [
        numpy_helper.from_array(np.array([2, 1, 0], np.int64), "bgr_index"),
        numpy_helper.from_array(np.array(CAFFE_MEAN_BGR, np.float32).reshape(1, 1, 1, 3), "caffe_mean"),
        numpy_helper.from_array(np.array([L2_EPS], np.float32), "l2_eps"),
    ]
    return nodes, inits


def _conv_base(layers: list[ConvLayer], pooling: str) -> tuple[str, list[Tap], list, list]:
    """The conv layers with ReLU and the max-pools after "x_nchw": the last tensor, the maps R-MAC pools
    (an R-MAC pooling stops before block5's max-pool), the nodes and the initializers."""
    from onnx import helper, numpy_helper

    nodes, inits, taps = [], [], []
    x = "x_nchw"
    i = 0
    strides = dict(RMAC_LAYERS.get(pooling, ()))
    for b, n in enumerate(VGG16_BLOCKS):
        for _ in range(n):
            lname, kernel, bias = layers[i]
            i += 1
            inits += [
                numpy_helper.from_array(kernel, f"{lname}/kernel"),
                numpy_helper.from_array(bias, f"{lname}/bias"),
            ]
            nodes += [
                helper.make_node(
                    "Conv",
                    [x, f"{lname}/kernel", f"{lname}/bias"],
                    [f"{lname}/conv"],
                    kernel_shape=[3, 3],
                    pads=[1, 1, 1, 1],
                    strides=[1, 1],
                    name=lname,
                ),
                helper.make_node("Relu", [f"{lname}/conv"], [f"{lname}/relu"]),
            ]
            x = f"{lname}/relu"
        if b in strides:  # R-MAC pools this block's last conv map itself, before its max-pool
            taps.append((x, strides[b], kernel.shape[0]))
        if b == len(VGG16_BLOCKS) - 1 and taps:
            break
        pool = f"block{b + 1}_pool"
        nodes.append(helper.make_node("MaxPool", [x], [pool], kernel_shape=[2, 2], strides=[2, 2], name=pool))
        x = pool
    return x, taps, nodes, inits


def _rmac_pooling(taps: list[Tap], shapes: tuple[Shape, ...], whitening: Whitening | None) -> tuple[list, list]:
    """R-MAC of each tapped map into "pooled" (each L2-normalised and concatenated when there are several),
    with the regions of the input's shape, each region whitened when `whitening` is given."""
    from onnx import helper, numpy_helper

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    parts: list[str] = []
    for tap, stride, channels in taps:
        prefix, out = ("", "pooled") if len(taps) == 1 else (f"{tap.split('_')[0]}/", f"{tap.split('_')[0]}/rmac")
        whiten = f"{tap}/whiten" if whitening is not None else ""
        if whitening is not None:
            mean, projection = whitening.maps[tap]
            inits += [
                numpy_helper.from_array(np.asarray(mean, np.float32), f"{whiten}/mean"),
                numpy_helper.from_array(np.asarray(projection, np.float32), f"{whiten}/projection"),
            ]
        if len(shapes) == 1:
            h, w = shapes[0]
            pool_nodes, pool_inits = _rmac_nodes(tap, h // stride, w // stride, prefix, out, whiten)
        else:
            pool_nodes, pool_inits = _rmac_by_shape(tap, shapes, channels, stride, prefix, out, whiten)
        nodes, inits = nodes + pool_nodes, inits + pool_inits
        if len(taps) > 1:  # each layer's R-MAC L2-normalised, so both weigh alike in the concatenation
            nodes += _l2_nodes(out, f"{out}_l2")
            parts.append(f"{out}_l2")
    if parts:
        nodes.append(helper.make_node("Concat", parts, ["pooled"], axis=1))
    return nodes, inits


def _l2_nodes(src: str, dst: str) -> list:
    from onnx import helper

    return [
        helper.make_node("ReduceL2", [src], [f"{dst}/norm"], axes=[1], keepdims=1),
        helper.make_node("Max", [f"{dst}/norm", "l2_eps"], [f"{dst}/safe"]),
        helper.make_node("Div", [src, f"{dst}/safe"], [dst]),
    ]


def _rmac_nodes(x: str, h: int, w: int, prefix: str, out: str, whiten: str = "") -> tuple[list, list]:
    """Nodes and initializers of R-MAC over the regions of an h x w map `x`, summed into `out` (not normalised).
    `whiten`: the prefix of a whitening's `mean` and `projection` initializers, applied to each region."""
    from onnx import helper, numpy_helper

    nodes, inits, regional = [], [], []
    for r, (y0, x0, y1, x1) in enumerate(rmac_regions(h, w)):
        reg = f"{prefix}region{r}"
        inits += [
            numpy_helper.from_array(np.array(v, np.int64), f"{reg}/{k}")
            for k, v in (("starts", [y0, x0]), ("ends", [y1, x1]), ("axes", [2, 3]))
        ]
        nodes += [
            helper.make_node("Slice", [x, f"{reg}/starts", f"{reg}/ends", f"{reg}/axes"], [f"{reg}/map"]),
            helper.make_node("ReduceMax", [f"{reg}/map"], [f"{reg}/max"], axes=[2, 3], keepdims=0),
            *_l2_nodes(f"{reg}/max", f"{reg}/vec"),
        ]
        if whiten:
            nodes += [
                helper.make_node("Sub", [f"{reg}/vec", f"{whiten}/mean"], [f"{reg}/centred"]),
                helper.make_node("MatMul", [f"{reg}/centred", f"{whiten}/projection"], [f"{reg}/projected"]),
                *_l2_nodes(f"{reg}/projected", f"{reg}/white"),
            ]
        regional.append(f"{reg}/white" if whiten else f"{reg}/vec")
    nodes.append(helper.make_node("Sum", regional, [out]))
    return nodes, inits


def _rmac_by_shape(
    x: str, shapes: tuple[Shape, ...], dim: int, stride: int, prefix: str, out: str, whiten: str = ""
) -> tuple[list, list]:
    """R-MAC of map `x` (`stride` input pixels per map cell) into `out` with the regions of whichever
    of `shapes` the input has: a chain of If nodes on the map's shape (the last shape is the final
    else; FeatureModel.embed refuses others)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Shape", [x], [f"{prefix}map_hw"], start=2, end=4)]
    inits = []
    for k, (h, w) in enumerate(shapes[:-1]):
        sk = f"{prefix}shape{k}"
        inits.append(numpy_helper.from_array(np.array([h // stride, w // stride], np.int64), f"{sk}/hw"))
        nodes += [
            helper.make_node("Equal", [f"{prefix}map_hw", f"{sk}/hw"], [f"{sk}/eq"]),
            helper.make_node("Cast", [f"{sk}/eq"], [f"{sk}/eq_int"], to=TensorProto.INT64),
            helper.make_node("ReduceMin", [f"{sk}/eq_int"], [f"{sk}/all"], keepdims=0),
            helper.make_node("Cast", [f"{sk}/all"], [f"{sk}/is"], to=TensorProto.BOOL),
        ]

    def branch(k: int) -> object:
        h, w = shapes[k]
        sk = f"{prefix}shape{k}"
        body, body_inits = _rmac_nodes(x, h // stride, w // stride, f"{sk}/", f"{sk}/pooled", whiten)
        inits.extend(body_inits)  # in the main graph: subgraphs see outer-scope values
        return helper.make_graph(
            body, sk, [], [helper.make_tensor_value_info(f"{sk}/pooled", TensorProto.FLOAT, ["batch", dim])]
        )

    def chain(k: int) -> object:
        """A graph of shape k's pooling when the input has shape k, else of the chain of k + 1."""
        if k == len(shapes) - 1:
            return branch(k)
        node = helper.make_node(
            "If",
            [f"{prefix}shape{k}/is"],
            [f"{prefix}chain{k}/pooled"],
            then_branch=branch(k),
            else_branch=chain(k + 1),
        )
        return helper.make_graph(
            [node],
            f"{prefix}chain{k}",
            [],
            [helper.make_tensor_value_info(f"{prefix}chain{k}/pooled", TensorProto.FLOAT, ["batch", dim])],
        )

    nodes.append(helper.make_node("If", [f"{prefix}shape0/is"], [out], then_branch=branch(0), else_branch=chain(1)))
    return nodes, inits


def _with_recipe(info: ModelInfo, shapes: tuple[Shape, ...], frame: bool, whitening: Whitening | None) -> ModelInfo:
    """`info` with what else the recipe records: the aspect buckets' `shapes` (none: squashed to a square), the
    frame trimming, the whitening's note."""
    if shapes:
        info = replace(
            info,
            input_shapes=",".join(f"{h}x{w}" for h, w in shapes),
            resize=f"aspect kept: resized (bilinear, Pillow) to the shape (HxW) of nearest aspect ratio "
            f"among {', '.join(f'{h}x{w}' for h, w in shapes)}",
        )
    if frame:
        info = replace(info, frame=FRAME_TRIM)
    if whitening is not None:
        info = replace(info, whitening=whitening.note)
    return info


def _model(nodes: list, inits: list, info: ModelInfo, fixed: int | None) -> onnx.ModelProto:
    """The checked ONNX model of the graph, its input `fixed` x `fixed` (None: height and width dynamic),
    its metadata `info`."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        info.name,
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", fixed or "height", fixed or "width", 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", info.dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pipeline")
    model.ir_version = 8
    for key, value in info.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model

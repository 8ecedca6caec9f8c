"""Export a NumPy ``Sequential`` to ONNX (the ``onnx`` package's helper API, imported lazily).

The graph (opset :data:`OPSET`, IR version the lowest that opset allows):

- input ``"input"``: float32 ``(N, H, W, C)`` NHWC, **already preprocessed**
  with ``meta["preprocess"]`` (exactly what ``Sequential.predict`` takes:
  ``breastcnn.data.images.preprocess``), batch dimension dynamic (``N``);
- output ``"probabilities"``: float32 ``(N, num_classes)``, the model's
  output (its final Softmax).

Why preprocessed floats rather than raw uint8 with the preprocessing inside:
every breastcnn classifier (NumPy, Keras, ONNX Runtime) then has the same
``predict`` contract, so ``inference``/``bench`` treat them alike; the
preprocessing is one documented line (see :func:`preprocess_description`,
written into the model's ``doc_string`` and ``metadata_props``).

Inside, the first node transposes NHWC to NCHW (ONNX ``Conv``/``MaxPool`` are
NCHW); ``Flatten`` transposes back to NHWC first, so the Dense weights apply
unchanged (the engine flattens in NHWC order). Conv2D + BatchNorm fold into
one ``Conv`` with the moving statistics (``W * s``, ``(b - mean) * s + beta``,
``s = gamma / sqrt(var + eps)``, in float64 then cast); a BatchNorm without a
conv before it becomes a per-channel ``Mul`` + ``Add``. Dropout is the
identity at inference and is left out. Only the engine's whitelisted layer
classes export; any other layer is refused by name.

Nothing is pickled: the file is one ONNX protobuf (weights inside, no
external data), written atomically; models at or over the 2 GiB protobuf
limit are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from breastcnn import __version__
from breastcnn.data.images import IMAGENET_MEAN_BGR, preprocess
from breastcnn.errors import MissingDependencyError, UserInputError
from breastcnn.fsutil import atomic_write
from breastcnn.models.classifier import model_spec
from breastcnn.nn import functional as F
from breastcnn.nn import layers as L
from breastcnn.nn.model import Sequential

OPSET = 17
"""ONNX opset of exported models (ONNX 1.12+, ONNX Runtime 1.13+)."""

FORMAT = "breastcnn-onnx"
FORMAT_VERSION = 1
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
INPUT_LAYOUT = "NHWC"
MAX_BYTES = 2**31 - 1
"""Largest model one protobuf file can hold (no external data is written)."""

#: metadata_props keys every breastcnn ONNX file carries (all values are strings; JSON for lists/dicts)
METADATA_KEYS = (
    "format",
    "format_version",
    "arch",
    "classes",
    "image_size",
    "preprocess",
    "input_layout",
    "input_name",
    "output_name",
    "breastcnn_version",
    "params_trainable",
    "params_non_trainable",
    "source_meta",
)


def require_onnx(purpose: str = "ONNX export"):
    """Import and return ``onnx``, or raise MissingDependencyError saying how to install it."""
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the onnx package: pip install 'breastcnn[onnx]' ({exc})"
        ) from None
    return onnx


def preprocess_description(mode: str, image_size: int) -> str:
    """One line saying how to turn an RGB image into this model's input (matches ``data.images.preprocess``)."""
    resize = f"RGB image resized to {image_size}x{image_size}, as float32"
    if mode == "caffe":
        mean = ", ".join(f"{v:g}" for v in IMAGENET_MEAN_BGR)
        return f"{resize}; channels reordered RGB -> BGR, then the ImageNet mean [{mean}] (BGR) subtracted, no scaling"
    if mode == "minmax":
        return f"{resize}; divided by 255 (values in [0, 1]), RGB order"
    raise UserInputError(f"preprocess mode {mode!r} is unknown; cannot describe it")


# --------------------------------------------------------------------------- the graph


class _Graph:
    """Nodes and initializers of the graph being built, with unique tensor names."""

    def __init__(self, helper, numpy_helper):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers = [], []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name=name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}:out"
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=name, **attrs))
        return out


def _exportable_classes() -> dict:
    return {
        cls: cls.__name__
        for cls in (
            L.Conv2D,
            L.BatchNorm,
            L.ReLU,
            L.LeakyReLU,
            L.MaxPool2D,
            L.GlobalAveragePooling2D,
            L.Flatten,
            L.Dense,
            L.Dropout,
            L.Softmax,
        )
    }


def check_exportable(model) -> None:
    """Raise UserInputError naming the first layer that cannot be exported (checked before any work)."""
    if not isinstance(model, Sequential):
        raise UserInputError(f"ONNX export takes a NumPy breastcnn model (Sequential), received {type(model).__name__}")
    if not model.built or not model.layers:
        raise UserInputError("ONNX export needs a built model with at least one layer")
    known = _exportable_classes()
    for i, layer in enumerate(model.layers):
        if type(layer) not in known:  # exact classes: a subclass could compute something else
            raise UserInputError(
                f"cannot export layer {i} {layer.name!r} ({type(layer).__name__}) to ONNX; supported layers: "
                f"{', '.join(sorted(known.values()))}"
            )
    if len(model.input_shape) != 3:
        raise UserInputError(f"ONNX export needs an image model (H, W, C input), this one takes {model.input_shape}")


def _bn_affine64(bn) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) (C,) float64 of a BatchNorm in inference mode (moving statistics)."""
    gamma, beta = (bn.params[k].astype(np.float64) for k in ("gamma", "beta"))
    mean, var = (bn.state[k].astype(np.float64) for k in ("moving_mean", "moving_variance"))
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - mean * scale


def _conv_pads(layer, in_shape: tuple) -> list[int]:
    """ONNX pads [top, left, bottom, right] equal to the engine's padding of a (H, W, C) input."""
    if layer.padding == "valid":
        return [0, 0, 0, 0]
    (top, bottom), (left, right) = (F.same_padding(d, layer.kernel_size, layer.strides) for d in in_shape[:2])
    return [top, left, bottom, right]


def build_graph_nodes(graph: _Graph, model) -> tuple[str, bool]:
    """Append the nodes of ``model``'s layers (inference mode) to ``graph``.

    Returns ``(name of the last tensor, whether it is still 4-D NCHW)``.
    """
    x = graph.node("Transpose", [INPUT_NAME], "input_to_nchw", perm=[0, 3, 1, 2])
    spatial = True  # x is (N, C, H, W); else (N, features)
    layers = model.layers
    i = 0
    while i < len(layers):
        layer = layers[i]
        if type(layer) is L.Conv2D:
            bn = layers[i + 1] if i + 1 < len(layers) and type(layers[i + 1]) is L.BatchNorm else None
            x = _conv_node(graph, x, layer, bn)
            i += 2 if bn is not None else 1
            continue
        x, spatial = _layer_nodes(graph, x, layer, spatial)
        i += 1
    return x, spatial


def _conv_node(graph: _Graph, x: str, layer, bn) -> str:
    """One ``Conv`` for a Conv2D, with the BatchNorm ``bn`` after it (or None) folded in."""
    w = layer.params["W"].astype(np.float64)  # (kh, kw, c_in, f)
    b = layer.params["b"].astype(np.float64) if layer.use_bias else np.zeros(layer.filters)
    name = layer.name
    if bn is not None:
        scale, shift = _bn_affine64(bn)
        w, b, name = w * scale, b * scale + shift, f"{layer.name}+{bn.name}"
    k, s = layer.kernel_size, layer.strides
    return graph.node(
        "Conv",
        [
            x,
            graph.const(f"{name}.W", w.transpose(3, 2, 0, 1)),  # (f, c_in, kh, kw)
            graph.const(f"{name}.b", b),
        ],
        name,
        kernel_shape=[k, k],
        strides=[s, s],
        pads=_conv_pads(layer, layer.input_shape),
    )


def _layer_nodes(graph: _Graph, x: str, layer, spatial: bool) -> tuple[str, bool]:
    """The nodes of any other layer: ``(its output tensor, whether that is still NCHW)``."""
    kind = type(layer)
    if kind is L.BatchNorm:
        scale, shift = _bn_affine64(layer)
        shape = (-1, 1, 1) if spatial else (-1,)
        x = graph.node("Mul", [x, graph.const(f"{layer.name}.scale", scale.reshape(shape))], f"{layer.name}.mul")
        x = graph.node("Add", [x, graph.const(f"{layer.name}.shift", shift.reshape(shape))], layer.name)
    elif kind is L.ReLU:
        x = graph.node("Relu", [x], layer.name)
    elif kind is L.LeakyReLU:
        x = graph.node("LeakyRelu", [x], layer.name, alpha=layer.negative_slope)
    elif kind is L.MaxPool2D:
        p, s = layer.pool_size, layer.strides
        x = graph.node("MaxPool", [x], layer.name, kernel_shape=[p, p], strides=[s, s], pads=[0, 0, 0, 0])
    elif kind is L.GlobalAveragePooling2D:
        x = graph.node("GlobalAveragePool", [x], f"{layer.name}.pool")  # (N, C, 1, 1)
        x, spatial = graph.node("Flatten", [x], layer.name, axis=1), False
    elif kind is L.Flatten:
        if spatial:  # the engine flattens NHWC: back to NHWC first so Dense weights apply as they are
            x = graph.node("Transpose", [x], f"{layer.name}.to_nhwc", perm=[0, 2, 3, 1])
            x, spatial = graph.node("Flatten", [x], layer.name, axis=1), False
    elif kind is L.Dense:
        inputs = [x, graph.const(f"{layer.name}.W", layer.params["W"])]
        if layer.use_bias:
            inputs.append(graph.const(f"{layer.name}.b", layer.params["b"]))
        x = graph.node("Gemm", inputs, layer.name)
    elif kind is L.Softmax:
        x = graph.node("Softmax", [x], layer.name, axis=1 if spatial else -1)  # the channel axis
    elif kind is not L.Dropout:  # Dropout: the identity at inference
        # pragma: no cover - check_exportable refuses these first
        raise UserInputError(f"cannot export layer {layer.name!r} ({kind.__name__}) to ONNX")
    return x, spatial


def onnx_metadata(model, source: str | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an exported model (strings; lists/dicts as JSON): its spec, and the rest
    of its meta as ``source_meta``."""
    spec = model_spec(model)
    counts = model.count_params()
    source_meta = {k: v for k, v in model.meta.items() if k not in ("classes", "image_size", "preprocess", "arch")}
    if source is not None:
        source_meta["exported_from"] = str(source)
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "arch": spec.arch,
        "classes": json.dumps(list(spec.classes)),
        "image_size": str(spec.image_size),
        "preprocess": spec.preprocess,
        "input_layout": INPUT_LAYOUT,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "breastcnn_version": __version__,
        "params_trainable": str(counts["trainable"]),
        "params_non_trainable": str(counts["non_trainable"]),
        "source_meta": json.dumps(source_meta, sort_keys=True, default=str),
    }


def to_onnx(model, source: str | os.PathLike | None = None):
    """An ``onnx.ModelProto`` computing ``model.predict`` (inference mode), checked by ``onnx.checker``.

    ``source``: the model file it came from (recorded in the metadata).
    Raises UserInputError for a layer that cannot be exported, MissingDependencyError without ``onnx``.
    """
    check_exportable(model)
    onnx = require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    graph = _Graph(helper, numpy_helper)
    last, spatial = build_graph_nodes(graph, model)
    out_shape = tuple(int(d) for d in model.output_shape)
    if spatial:  # a model ending on feature maps: hand them back NHWC like the engine
        last = graph.node("Transpose", [last], "output_to_nhwc", perm=[0, 2, 3, 1])
    graph.nodes[-1].output[0] = OUTPUT_NAME  # nothing reads the last node's output: rename it
    props = onnx_metadata(model, None if source is None else str(source))
    how = preprocess_description(props["preprocess"], int(props["image_size"]))
    h, w, c = model.input_shape
    input_doc = f"float32 (N, {h}, {w}, {c}) NHWC, preprocessed: {how}"
    output_doc = f"float32 (N, {', '.join(map(str, out_shape))}): probabilities of classes {props['classes']}"
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", h, w, c], doc_string=input_doc)]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", *out_shape], doc_string=output_doc)]
    onnx_graph = helper.make_graph(graph.nodes, str(props["arch"]), inputs, outputs, initializer=graph.initializers)
    opset = [helper.make_opsetid("", OPSET)]
    proto = helper.make_model(
        onnx_graph,
        opset_imports=opset,
        ir_version=helper.find_min_ir_version_for(opset),
        producer_name="breastcnn",
        producer_version=__version__,
        doc_string=(
            f"breastcnn {props['arch']} classifier exported from the NumPy engine (BatchNorm folded, "
            f"inference mode). Input {INPUT_NAME!r}: {input_doc}. Output {OUTPUT_NAME!r}: {output_doc}."
        ),
    )
    helper.set_model_props(proto, props)
    if proto.ByteSize() >= MAX_BYTES:
        raise UserInputError(f"the model is {proto.ByteSize()} bytes, over the 2 GiB a single ONNX file holds")
    onnx.checker.check_model(proto, full_check=True)
    return proto


def save_onnx(proto, path: str | os.PathLike) -> int:
    """Write ``proto`` (a ModelProto or its serialized bytes) to ``path`` atomically (one protobuf, no pickle,
    no external data); returns its bytes."""
    data = proto if isinstance(proto, bytes) else proto.SerializeToString()
    with atomic_write(Path(path), "wb") as handle:
        handle.write(data)
    return len(data)


VERIFY_ATOL = 1e-4
"""Largest |probability difference| between ONNX Runtime and ``Sequential.predict`` an export accepts."""


def export_onnx(
    model, path: str | os.PathLike, source: str | os.PathLike | None = None, verify: bool = True, seed: int = 0
) -> dict:
    """Convert ``model`` (:func:`to_onnx`), check it against ``model.predict``, write ``path`` atomically.

    With ``verify`` and onnxruntime installed, 4 random images (seeded by ``seed``,
    preprocessed with the model's mode) go through both; a difference over
    :data:`VERIFY_ATOL` is an error and nothing is written.

    Returns ``{"opset", "size_bytes", "max_abs_diff"}`` (``max_abs_diff`` None when not verified).
    """
    proto = to_onnx(model, source)
    data = proto.SerializeToString()
    diff = None
    if verify:
        diff = _max_abs_diff(model, data, seed)
        if diff is not None and diff > VERIFY_ATOL:
            raise UserInputError(
                f"the ONNX graph's probabilities differ from the NumPy model's by {diff:.2e} "
                f"(> {VERIFY_ATOL:g}); {path} not written"
            )
    return {"opset": OPSET, "size_bytes": save_onnx(data, path), "max_abs_diff": diff}


def _max_abs_diff(model, data: bytes, seed: int) -> float | None:
    """max |ONNX Runtime - Sequential.predict| on 4 random preprocessed images; None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(4, *model.input_shape), dtype=np.uint8)
    x = (
        preprocess(images, model_spec(model).preprocess)
        if model.input_shape[-1] == 3
        else images.astype(np.float32) / 255.0
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return float(np.max(np.abs(got - model.predict(x, batch_size=len(x)))))

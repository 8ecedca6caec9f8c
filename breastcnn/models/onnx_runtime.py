"""ONNX Runtime as a deployment peer: an exported ``.onnx`` behind the classifier interface.

:class:`OnnxClassifier` has what ``inference``/``bench`` use of a classifier
(``framework``, ``meta`` with ``classes``/``image_size``/``preprocess``,
``input_shape``, ``predict(x, batch_size)`` on float32 NHWC preprocessed
images -> probabilities, ``count_params``), so a NumPy model and its ONNX
export are used the same way.

Loading never runs code (ONNX Runtime has no Python ops), and the file is
checked before a session is made: it must be a breastcnn export (its
``metadata_props``), use only the standard ONNX operator domain (no custom
ops, no model-local functions), keep any external weight data inside its own
folder, and pass ``onnx.checker``. ``onnx`` and ``onnxruntime`` are the
optional extra ``breastcnn[onnx]``, imported on first use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from breastcnn.errors import MissingDependencyError, UserInputError
from breastcnn.models.classifier import predict_in_batches
from breastcnn.models.onnx_export import (
    FORMAT,
    FORMAT_VERSION,
    INPUT_NAME,
    MAX_BYTES,
    OUTPUT_NAME,
    require_onnx,
    save_onnx,
)
from breastcnn.models.spec import ModelSpec

STANDARD_DOMAINS = ("", "ai.onnx")
"""Operator domains a loaded model may use (the standard ONNX operators)."""


def require_onnxruntime():
    """Import and return ``onnxruntime``, or raise MissingDependencyError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            f"running ONNX models needs onnxruntime: pip install 'breastcnn[onnx]' ({exc})"
        ) from None
    return onnxruntime


# --------------------------------------------------------------------------- checks


def _graphs(graph):
    """``graph`` and every subgraph held in node attributes (If/Loop/Scan bodies), recursively."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(sub)


def _tensors(graph):
    """Every TensorProto stored in the graphs: initializers and tensor-valued attributes."""
    for g in _graphs(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def check_operators(proto, path) -> None:
    """Refuse custom operator domains and model-local functions (only standard ONNX ops run)."""
    for opset in proto.opset_import:
        if opset.domain not in STANDARD_DOMAINS:
            raise UserInputError(
                f"{path}: uses the custom operator domain {opset.domain!r}; only standard ONNX operators are accepted"
            )
    if len(proto.functions):
        raise UserInputError(
            f"{path}: defines model-local functions ({proto.functions[0].name!r}, ...); "
            "only standard ONNX operators are accepted"
        )
    for g in _graphs(proto.graph):
        for node in g.node:
            if node.domain not in STANDARD_DOMAINS:
                raise UserInputError(
                    f"{path}: node {node.name!r} is the custom operator "
                    f"{node.domain}.{node.op_type}; only standard ONNX operators are accepted"
                )


def check_external_data(proto, path: Path) -> bool:
    """Whether ``proto`` keeps weights in external files; each must be a file inside ``path``'s folder."""
    from onnx import TensorProto

    folder = path.resolve().parent
    external = False
    for tensor in _tensors(proto.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        external = True
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder) or not target.is_file():
            raise UserInputError(
                f"{path}: tensor {tensor.name!r} reads external data from {location!r}, which is "
                f"not a file inside {folder}; refusing to load it"
            )
    return external


def read_metadata(proto, path) -> tuple[dict, dict]:
    """``(meta, params)`` from a breastcnn export's ``metadata_props``, checked: the classifier ``meta``
    (its values as a :class:`ModelSpec`) and the source model's ``{"trainable", "non_trainable"}`` parameter
    counts."""
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("format") != FORMAT:
        raise UserInputError(
            f"{path}: not a breastcnn ONNX model (metadata format {props.get('format')!r}, expected "
            f"{FORMAT!r}); export one with `breastcnn export --to onnx`"
        )
    if props.get("format_version") != str(FORMAT_VERSION):
        raise UserInputError(
            f"{path}: unsupported format_version {props.get('format_version')!r} (this version reads {FORMAT_VERSION})"
        )
    try:
        classes = json.loads(props["classes"])
        image_size = int(props["image_size"])
        source_meta = json.loads(props.get("source_meta", "{}"))
        params = {
            "trainable": int(props.get("params_trainable", 0)),
            "non_trainable": int(props.get("params_non_trainable", 0)),
        }
    except (KeyError, ValueError, TypeError) as exc:
        raise UserInputError(f"{path}: malformed breastcnn metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(source_meta, dict):
        raise UserInputError(f"{path}: metadata source_meta must be a JSON object")
    meta = {
        **source_meta,
        "arch": props.get("arch", "custom"),
        "classes": classes,
        "image_size": image_size,
        "preprocess": props.get("preprocess"),
        "input_layout": props.get("input_layout"),
        "breastcnn_version": props.get("breastcnn_version"),
        "opset": _opset(proto),
    }
    ModelSpec.from_meta(meta, framework="onnx", source=path)
    return meta, params


def _opset(proto) -> int | None:
    return next((int(o.version) for o in proto.opset_import if o.domain in STANDARD_DOMAINS), None)


def _dims(value_info) -> list:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value_info.type.tensor_type.shape.dim
    ]


def _check_signature(proto, path, meta: dict) -> tuple[tuple, tuple]:
    """(input shape, output shape) without batch; the graph must take (N, S, S, C) and give (N, classes)."""
    from onnx import TensorProto

    initializers = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in initializers]
    outputs = list(proto.graph.output)
    if [v.name for v in inputs] != [INPUT_NAME] or [v.name for v in outputs] != [OUTPUT_NAME]:
        raise UserInputError(
            f"{path}: expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}, got "
            f"{[v.name for v in inputs]} -> {[v.name for v in outputs]}"
        )
    in_dims, out_dims = _dims(inputs[0]), _dims(outputs[0])
    size, k = meta["image_size"], len(meta["classes"])
    float_io = all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in (inputs[0], outputs[0]))
    if (
        not float_io
        or len(in_dims) != 4
        or in_dims[1:3] != [size, size]
        or not isinstance(in_dims[3], int)
        or len(out_dims) != 2
        or out_dims[1] != k
    ):
        raise UserInputError(
            f"{path}: the graph takes {in_dims} and gives {out_dims}; its metadata says float32 "
            f"(N, {size}, {size}, C) NHWC -> (N, {k})"
        )
    return tuple(in_dims[1:]), (k,)


# --------------------------------------------------------------------------- the classifier


class OnnxClassifier:
    """An exported breastcnn model run by ONNX Runtime (CPU), behind the classifier interface.

    Attributes:
        meta: ``classes``, ``image_size``, ``preprocess``, ``arch``, ``opset``,
            ``input_layout`` and what the source model's meta held.
        framework: ``"onnx"``.
        threads / inter_op_threads: ONNX Runtime's intra-op / inter-op thread
            counts (None: its default, one per physical core).
    """

    framework = "onnx"

    def __init__(
        self,
        model_bytes: bytes | None,
        path: Path,
        meta: dict,
        params: dict,
        input_shape: tuple,
        output_shape: tuple,
        threads: int | None = None,
        inter_op_threads: int | None = None,
    ):
        self.path = Path(path)
        self.meta = dict(meta)
        self._bytes = model_bytes  # None: the model has external data and loads from its path
        self._params = dict(params)
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        self.threads = threads
        self.inter_op_threads = inter_op_threads
        self.session = None
        self.set_threads(threads, inter_op_threads)

    @property
    def spec(self) -> ModelSpec:
        """The :class:`ModelSpec` read from ``meta`` (checked; an error names the model's file)."""
        return ModelSpec.from_meta(
            self.meta,
            framework="onnx",
            source=self.path,
            input_shape=self.input_shape,
            num_classes=self.output_shape[-1],
        )

    def set_threads(self, threads: int | None, inter_op_threads: int | None = None) -> OnnxClassifier:
        """(Re)create the session with ``threads`` intra-op threads (None: ONNX Runtime's default) and
        ``inter_op_threads`` (the graph runs sequentially, so these matter only to parallel execution)."""
        ort = require_onnxruntime()
        for option, value in (("threads", threads), ("inter_op_threads", inter_op_threads)):
            if value is not None and int(value) < 1:
                raise UserInputError(f"{option} must be >= 1 (or None for ONNX Runtime's default), got {value}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or 0)  # 0: ONNX Runtime's default
        options.inter_op_num_threads = int(inter_op_threads or 0)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no optimizer chatter on stderr
        source = self._bytes if self._bytes is not None else str(self.path)
        try:
            self.session = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented...)
            raise UserInputError(
                f"{self.path}: ONNX Runtime cannot load this model ({type(exc).__name__}: {' '.join(str(exc).split())})"
            ) from None
        self.threads, self.inter_op_threads = threads, inter_op_threads
        return self

    def predict(self, x: np.ndarray, batch_size: int = 64, jobs: int = 1, progress=None) -> np.ndarray:
        """Class probabilities for preprocessed images, like ``Sequential.predict``.

        Args:
            x: ``(N, S, S, C)`` float32 NHWC, preprocessed with ``spec.preprocess``.
            batch_size: images per session run.
            jobs: accepted for interface parity; ONNX Runtime uses ``threads``.
            progress: optional ``callable(advance: int)`` called after each batch.

        Returns:
            float32 ``(N, num_classes)``.
        """
        return predict_in_batches(
            x,
            input_shape=self.input_shape,
            num_classes=self.output_shape[-1],
            batch_size=batch_size,
            run=lambda batch: self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0],
            progress=progress,
            what=f"{self.meta.get('arch', 'onnx')} ONNX model",
        )

    def count_params(self) -> dict:
        """``{"trainable", "non_trainable"}`` of the source model (recorded at export; folding merges BN)."""
        return dict(self._params)

    def save(self, path: str | os.PathLike, optimizer=None, extra=None) -> Path:
        """Write the (checked) model file to ``path`` (``.onnx``) atomically; ``optimizer``/``extra`` are
        accepted for ``models.save_model``'s signature and ignored (an inference graph has neither)."""
        path = Path(path)
        if path.suffix.lower() != ".onnx":
            raise UserInputError(f"an ONNX model is saved as .onnx, received {path}")
        if self._bytes is None:
            raise UserInputError(f"{self.path} keeps its weights in external files: copy its folder instead")
        save_onnx(self._bytes, path)
        return path

    def summary(self) -> str:
        """The graph's nodes, one per line (op type, name)."""
        onnx = require_onnx("reading an ONNX model")
        proto = (
            onnx.load_model_from_string(self._bytes)
            if self._bytes is not None
            else onnx.load(str(self.path), load_external_data=False)
        )
        return "\n".join(f"{n.op_type:<18} {n.name}" for n in proto.graph.node)

    def __repr__(self) -> str:
        return f"OnnxClassifier({self.path}, arch={self.meta.get('arch')!r}, threads={self.threads})"


def load_onnx_model(
    path: str | os.PathLike, threads: int | None = None, inter_op_threads: int | None = None
) -> OnnxClassifier:
    """Check a ``.onnx`` written by ``breastcnn export --to onnx`` and open it with ONNX Runtime (CPU).

    Raises UserInputError naming the file when it is missing, not ONNX, not a
    breastcnn export, uses custom operators or external data outside its
    folder, or fails ``onnx.checker``; MissingDependencyError without the extra.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--model {path}: no such file")
    if path.suffix.lower() != ".onnx":
        raise UserInputError(f"--model {path}: an ONNX model file ends in .onnx")
    if path.stat().st_size >= MAX_BYTES:
        raise UserInputError(f"--model {path}: {path.stat().st_size} bytes, over the 2 GiB an ONNX protobuf holds")
    require_onnxruntime()
    onnx = require_onnx("checking an ONNX model")
    data = path.read_bytes()
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise UserInputError(f"--model {path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    meta, params = read_metadata(proto, path)
    check_operators(proto, path)
    external = check_external_data(proto, path)
    try:
        if external:  # the checker reads the external files relative to the model's folder
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise UserInputError(f"--model {path}: invalid ONNX model ({' '.join(str(exc).split())})") from None
    input_shape, output_shape = _check_signature(proto, path, meta)
    return OnnxClassifier(
        None if external else data,
        path,
        meta,
        params,
        input_shape,
        output_shape,
        threads=threads,
        inter_op_threads=inter_op_threads,
    )


__all__ = ["OnnxClassifier", "load_onnx_model", "require_onnxruntime"]

"""The NumPy classifier and its ``.npz`` file (no pickle); :func:`save_model` / :func:`load_model` for every format.

:class:`NumpyClassifier` is the engine's ``Sequential`` as the models layer
hands it out (``create_model``, ``load_model``, ``load_checkpoint``): it adds
the :class:`~breastcnn.models.spec.ModelSpec` read from its ``meta``, which
makes it a :class:`~breastcnn.models.classifier.Classifier`.
:func:`save_model` is the one way to write a model: ``.npz`` for a NumPy
model, the format's own writer (``.keras`` + sidecar, ``.onnx``) for the others;
:func:`load_model` picks the reader by file type.

File layout (format version 1):

- ``__config__``: 0-d unicode array holding JSON: ``{"format": "breastcnn-npz",
  "format_version": 1, "input_shape": [...], "layers": [layer configs],
  "meta": {...}, "arrays": {key: {"shape": [...], "dtype": "<f4"}}}``;
- ``layers.{i}.{key}``: parameters and buffers (float32);
- ``optimizer.{key}``: optional ``Optimizer.state_dict()`` (resume);
- ``extra.{key}``: optional caller arrays (rng state, epoch/step, history...).

Loading never unpickles (``allow_pickle=False``), builds only whitelisted
layer classes and checks every array's key, shape and dtype against the
config and against the architecture *before* decompressing any array or
allocating any layer; what a file may declare is capped (:data:`MAX_PARAMS`
and the other ``MAX_*`` limits), and values are checked (finite, BatchNorm
variances >= 0). Anything off is a UserInputError naming the file.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write
from breastcnn.models.keras_models import load_keras_model
from breastcnn.models.onnx_runtime import load_onnx_model
from breastcnn.models.spec import ModelSpec
from breastcnn.nn.layers import BatchNorm, Conv2D, Dense, layer_from_config
from breastcnn.nn.model import Sequential

FORMAT = "breastcnn-npz"
FORMAT_VERSION = 1
_ALLOWED_DTYPE_KINDS = "biufU"  # bool, ints, floats, unicode: never objects


def _plain_array(key: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in _ALLOWED_DTYPE_KINDS:
        raise UserInputError(f"cannot save {key!r}: dtype {arr.dtype} is not a plain numeric/string type")
    return arr


class NumpyClassifier(Sequential):
    """A NumPy-engine model with its :class:`ModelSpec`: what ``create_model``/``load_model`` return.

    ``spec`` is read from ``meta`` on each access (the training loop adds to ``meta``), and checked:
    a bad value raises UserInputError naming ``source`` (the model's file, once loaded).
    """

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_meta(
            self.meta,
            framework="numpy",
            source=getattr(self, "source", None) or "the model",
            input_shape=self.input_shape,
            num_classes=int(self.output_shape[-1]) if self.built else None,
        )


def save_model(model, path, optimizer=None, extra: dict | None = None) -> Path:
    """Write ``model`` to ``path`` atomically, in its framework's format; returns ``path``.

    A NumPy model (any ``Sequential``) is an ``.npz``, with optionally the
    optimizer state (``optimizer``: an Optimizer, whose ``state_dict()`` is
    stored, or a state dict) and ``extra`` arrays (``{name: array-like}``,
    stored as ``extra.{name}``) of a resumable checkpoint. A Keras model is its
    ``.keras`` file plus the sidecar JSON, an ONNX model its ``.onnx`` file
    (``optimizer``/``extra`` are not stored for those).
    """
    if not isinstance(model, Sequential):
        if not hasattr(model, "framework") or not callable(getattr(model, "save", None)):
            raise TypeError(f"save_model expects a breastcnn model, got {type(model).__name__}")
        return Path(model.save(path))
    arrays: dict[str, np.ndarray] = {}
    for i, layer in enumerate(model.layers):
        for store in (layer.params, layer.state):
            for key, value in store.items():
                arrays[f"layers.{i}.{key}"] = np.ascontiguousarray(value, dtype=np.float32)
    if optimizer is not None:
        state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        for key, value in state.items():
            arrays[f"optimizer.{key}"] = _plain_array(f"optimizer.{key}", value)
    for key, value in (extra or {}).items():
        arrays[f"extra.{key}"] = _plain_array(f"extra.{key}", value)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **model.get_config(),
        "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str} for k, v in arrays.items()},
    }
    arrays["__config__"] = np.array(json.dumps(config))
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **arrays)
    return Path(path)


# --------------------------------------------------------------------------- limits

MAX_LAYERS = 256
"""Most layers a model file may declare (the custom model has 15)."""
MAX_INPUT_SIDE = 4096
"""Largest input height/width (``train --image-size`` allows up to 2048)."""
MAX_INPUT_CHANNELS = 64
MAX_WIDTH = 16_384
"""Most filters of a Conv2D / units of a Dense layer (the custom model's widest is 128)."""
MAX_WINDOW = 64
"""Largest kernel, pool or stride size."""
MAX_PARAMS = 64_000_000
"""Most parameters (weights and BatchNorm statistics) a model file may declare: the custom model at the
largest ``--image-size`` (2048 px) has 32.5 M, VGG16 14.7 M; float32 makes this 256 MB."""
MAX_CONFIG_CHARS = 4_000_000
"""Longest ``__config__`` JSON text (the custom model's is about 3,000 characters)."""
MAX_SMALL_ARRAY = 1_000_000
"""Most elements of an ``optimizer.*`` entry that is not a parameter slot, or of all ``extra.*`` entries together
(a resume checkpoint's are a JSON string and a permutation of the training set)."""


def _refuse(path: Path, message: str) -> UserInputError:
    return UserInputError(f"{path}: {message}")


def _member_header(zf: zipfile.ZipFile, name: str, path: Path) -> tuple[tuple, np.dtype]:
    """``(shape, dtype)`` from the ``.npy`` header of member ``name``, decompressing only the header."""
    try:
        with zf.open(name) as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, KeyError) as exc:
        raise _refuse(path, f"unreadable member {name} ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject or dtype.kind not in _ALLOWED_DTYPE_KINDS:
        raise _refuse(
            path, f"unreadable or unsafe model file (member {name} has dtype {dtype}; objects are never unpickled)"
        )
    return tuple(int(d) for d in shape), dtype


def _read_member(zf: zipfile.ZipFile, name: str, path: Path) -> np.ndarray:
    """The array of member ``name`` (its header already checked), never unpickling."""
    try:
        with zf.open(name) as handle:
            return np.lib.format.read_array(handle, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError) as exc:
        # truncation, bad CRC...
        raise _refuse(path, f"unreadable or unsafe model file ({type(exc).__name__}: {exc})") from None


def _parse_config(path: Path, raw: np.ndarray) -> dict:
    if raw.shape != () or raw.dtype.kind != "U":
        raise UserInputError(f"{path}: missing or malformed __config__ entry; not a breastcnn model file")
    try:
        config = json.loads(str(raw[()]))
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: __config__ is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserInputError(
            f"{path}: not a breastcnn model file (format {config.get('format')!r})"
            if isinstance(config, dict)
            else f"{path}: __config__ is not a JSON object"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise UserInputError(
            f"{path}: unsupported format_version {config.get('format_version')!r} (this version reads {FORMAT_VERSION})"
        )
    for field, kind in (("layers", list), ("input_shape", list), ("arrays", dict), ("meta", dict)):
        if not isinstance(config.get(field), kind):
            raise UserInputError(f"{path}: __config__ field {field!r} missing or not a {kind.__name__}")
    return config


def _check_layer_caps(path: Path, i: int, cfg) -> None:
    """Refuse layer ``i``'s config when a width or window exceeds the caps (before the layer exists)."""
    if not isinstance(cfg, dict):
        raise _refuse(path, f"layer {i} config is not an object")
    for key, cap in (
        ("filters", MAX_WIDTH),
        ("units", MAX_WIDTH),
        ("kernel_size", MAX_WINDOW),
        ("pool_size", MAX_WINDOW),
        ("strides", MAX_WINDOW),
    ):
        value = cfg.get(key)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None and key in ("strides",):
                continue
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= cap):
                raise _refuse(path, f"layer {i} ({cfg.get('class')}): {key} {v!r} is outside 1..{cap}")


def _parameter_shapes(layer, input_shape: tuple) -> dict[str, tuple]:
    """The shapes ``layer.build(input_shape)`` gives its params and state, computed without allocating.

    Kept equal to the layers' ``build`` by ``tests/models/test_io_limits.py``.
    """
    if isinstance(layer, Conv2D):
        shapes = {"W": (layer.kernel_size, layer.kernel_size, input_shape[-1], layer.filters)}
        return {**shapes, "b": (layer.filters,)} if layer.use_bias else shapes
    if isinstance(layer, Dense):
        shapes = {"W": (input_shape[0], layer.units)}
        return {**shapes, "b": (layer.units,)} if layer.use_bias else shapes
    if isinstance(layer, BatchNorm):
        c = (input_shape[-1],)
        return {"gamma": c, "beta": c, "moving_mean": c, "moving_variance": c}
    return {}


def _expected_arrays(path: Path, config: dict) -> tuple[list, tuple, tuple, dict[str, tuple]]:
    """Layers (constructed, not built), input and output shapes, and ``layers.{i}.{key}`` -> shape, all within
    the caps."""
    if len(config["layers"]) > MAX_LAYERS:
        raise _refuse(path, f"declares {len(config['layers'])} layers (at most {MAX_LAYERS})")
    shape = config["input_shape"]
    if (
        not 1 <= len(shape) <= 3
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or not all(1 <= d <= MAX_INPUT_SIDE for d in shape)
        or (len(shape) == 3 and shape[2] > MAX_INPUT_CHANNELS)
    ):
        raise _refuse(
            path,
            f"input_shape {shape} is outside the limits (1 to 3 dimensions, sides up to "
            f"{MAX_INPUT_SIDE}, up to {MAX_INPUT_CHANNELS} channels)",
        )
    for i, cfg in enumerate(config["layers"]):
        _check_layer_caps(path, i, cfg)
    layers = [layer_from_config(cfg) for cfg in config["layers"]]
    expected: dict[str, tuple] = {}
    current = tuple(shape)
    total = 0
    try:
        for i, layer in enumerate(layers):
            for key, param_shape in _parameter_shapes(layer, current).items():
                expected[f"layers.{i}.{key}"] = param_shape
                total += math.prod(param_shape)
            if total > MAX_PARAMS:
                raise _refuse(
                    path,
                    f"declares more than {MAX_PARAMS:,} parameters (by layer {i}, "
                    f"{type(layer).__name__}); not a model of this tool",
                )
            current = tuple(int(d) for d in layer.compute_output_shape(current))
    except UserInputError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise _refuse(path, f"cannot build the model from its config ({exc})") from None
    except (TypeError, ValueError, IndexError) as exc:
        raise _refuse(path, f"cannot build the model from its config ({exc})") from None
    return layers, tuple(shape), current, expected


def _check_declared(path: Path, declared: dict, expected: dict[str, tuple]) -> None:
    """Compare the config's array list with what the architecture needs; cap optimizer and extra entries."""
    for key, spec in declared.items():
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("shape"), list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec["shape"])
            or not isinstance(spec.get("dtype"), str)
        ):
            raise _refuse(path, f"config entry for array {key} is malformed ({spec!r})")
    weights = {k for k in declared if k.startswith("layers.")}
    missing, unknown = sorted(set(expected) - weights), sorted(weights - set(expected))
    if missing or unknown:
        raise _refuse(
            path, f"weights do not match the architecture (missing {missing or 'none'}, unexpected {unknown or 'none'})"
        )
    extra_elements = 0
    for key, spec in declared.items():
        shape = tuple(spec["shape"])
        if key.startswith("layers."):
            if shape != expected[key] or spec["dtype"] != "<f4":
                raise _refuse(
                    path,
                    f"{key} has shape {shape} dtype {spec['dtype']}, the architecture needs {expected[key]} float32",
                )
        elif key.startswith("optimizer."):
            _check_optimizer_entry(path, key, shape, expected)
        elif key.startswith("extra."):
            extra_elements += math.prod(shape)
            if extra_elements > MAX_SMALL_ARRAY:
                raise _refuse(path, f"extra arrays (at {key}) declare more than {MAX_SMALL_ARRAY:,} elements")
        else:
            raise _refuse(path, f"unexpected array {key}")


def _check_optimizer_entry(path: Path, key: str, shape: tuple, expected: dict[str, tuple]) -> None:
    """A parameter's slot (``m.layers.0.W``) has its parameter's shape; any other entry is small."""
    slot_of = next((p for p in expected if key.endswith("." + p)), None)
    if slot_of is not None:
        if shape != expected[slot_of]:
            raise _refuse(path, f"{key} has shape {shape}, its parameter {slot_of} has {expected[slot_of]}")
    elif math.prod(shape) > MAX_SMALL_ARRAY:
        raise _refuse(path, f"{key} declares {math.prod(shape):,} elements (at most {MAX_SMALL_ARRAY:,})")


def _check_values(path: Path, key: str, arr: np.ndarray) -> None:
    """Weights must be finite; BatchNorm moving variances must not be negative."""
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise _refuse(path, f"{key} contains NaN or infinite values")
    if key.endswith(".moving_variance") and np.any(arr < 0):
        raise _refuse(path, f"{key} has negative values (a variance is >= 0; min {arr.min():.4g})")


def _open_archive(path: Path) -> zipfile.ZipFile:
    """The ``.npz`` as an open zip archive; a missing, special or non-zip file is refused by name."""
    if not path.is_file():
        if path.exists():
            raise UserInputError(f"{path}: not a regular file (a device, pipe or socket is not a model file)")
        raise UserInputError(f"model file {path} does not exist")
    try:
        if not zipfile.is_zipfile(path):
            raise _refuse(path, "not a breastcnn model file (expected an .npz zip archive)")
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise _refuse(path, f"unreadable model file ({type(exc).__name__}: {exc})") from None


def _members(zf: zipfile.ZipFile, path: Path) -> dict[str, str]:
    """``{array name: member name}``: only ``.npy`` members, no duplicates, a ``__config__`` among them."""
    names = zf.namelist()
    if len(names) != len(set(names)) or not all(n.endswith(".npy") for n in names):
        raise _refuse(path, "not a breastcnn model file (unexpected or duplicate archive members)")
    members = {n[: -len(".npy")]: n for n in names}
    if "__config__" not in members:
        raise _refuse(path, "missing or malformed __config__ entry; not a breastcnn model file")
    return members


def _load(path) -> tuple[NumpyClassifier, dict, dict]:
    """Check then read a model file, cheapest checks first, so that a hostile file costs almost nothing.

    1. the archive's member list and the ``__config__`` header (size capped) and JSON;
    2. the declared keys against the members; the layers' widths and the input shape against the caps;
       the architecture's parameter shapes (computed, not allocated) against the declared shapes;
    3. every member's ``.npy`` header against its declaration (only the header is decompressed);
    4. the arrays, read one by one (each bounded by its checked header), and their values;
    5. the model is built and the weights set.
    """
    path = Path(path)
    with _open_archive(path) as zf:
        members = _members(zf, path)
        shape, dtype = _member_header(zf, members["__config__"], path)
        if shape != () or dtype.kind != "U" or dtype.itemsize // 4 > MAX_CONFIG_CHARS:
            raise _refuse(
                path,
                f"missing or malformed __config__ entry (shape {shape}, dtype {dtype}, at most "
                f"{MAX_CONFIG_CHARS:,} characters); not a breastcnn model file",
            )
        config = _parse_config(path, _read_member(zf, members["__config__"], path))

        declared = config["arrays"]
        present = set(members) - {"__config__"}
        missing, undeclared = sorted(set(declared) - present), sorted(present - set(declared))
        if missing:
            raise _refuse(path, f"missing array(s) {', '.join(missing)}")
        if undeclared:
            raise _refuse(path, f"unexpected array(s) {', '.join(undeclared)}")
        layers, input_shape, output_shape, expected = _expected_arrays(path, config)
        ModelSpec.from_meta(
            config["meta"],
            framework="numpy",
            source=path,
            input_shape=input_shape,
            num_classes=output_shape[-1] if output_shape else None,
        )
        _check_declared(path, declared, expected)
        for key, spec in declared.items():
            shape, dtype = _member_header(zf, members[key], path)
            if list(shape) != spec["shape"] or dtype.str != spec["dtype"]:
                raise _refuse(path, f"array {key} has shape {shape} and dtype {dtype.str}, config says {spec}")
        arrays = {}
        for key in declared:
            arrays[key] = _read_member(zf, members[key], path)
            if not key.startswith("extra."):
                _check_values(path, key, arrays[key])

    try:
        model = NumpyClassifier(layers, input_shape=input_shape, seed=0, meta=config["meta"])
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{path}: cannot build the model from its config ({exc})") from None
    model.set_weights({k: v for k, v in arrays.items() if k.startswith("layers.")})
    model.source = str(path)  # messages about what this model computes name its file

    optimizer_state = {k[len("optimizer.") :]: v for k, v in arrays.items() if k.startswith("optimizer.")}
    extra = {k[len("extra.") :]: v for k, v in arrays.items() if k.startswith("extra.")}
    return model, optimizer_state, extra


def load_checkpoint(path) -> tuple[NumpyClassifier, dict, dict]:
    """``(model, optimizer_state, extra)`` from an ``.npz`` written by save_model.

    ``optimizer_state`` is ``Optimizer.state_dict()`` (empty when none was
    saved); rebuild with ``breastcnn.nn.optimizer_from_state(state)`` or
    ``opt.load_state_dict(state)``. ``extra`` maps names to arrays.
    """
    return _load(path)


def load_model(path):
    """The classifier in ``path``, by file type: ``.npz`` -> :class:`NumpyClassifier`; ``.keras`` ->
    ``KerasClassifier`` (TensorFlow imported on first use); ``.onnx`` -> ``OnnxClassifier``
    (``breastcnn[onnx]``). Each reader checks the model's spec (a bad one names the file)."""
    path = Path(os.fspath(path))
    if path.suffix.lower() == ".keras":
        return load_keras_model(path)
    if path.suffix.lower() == ".onnx":
        return load_onnx_model(path)
    return _load(path)[0]

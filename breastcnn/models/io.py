"""Save and load NumPy models as ``.npz`` (no pickle), and dispatch ``.keras`` and ``.onnx`` files.

File layout (format version 1):

- ``__config__``: 0-d unicode array holding JSON: ``{"format": "breastcnn-npz",
  "format_version": 1, "input_shape": [...], "layers": [layer configs],
  "meta": {...}, "arrays": {key: {"shape": [...], "dtype": "<f4"}}}``;
- ``layers.{i}.{key}``: parameters and buffers (float32);
- ``optimizer.{key}``: optional ``Optimizer.state_dict()`` (resume);
- ``extra.{key}``: optional caller arrays (rng state, epoch/step, history...).

Loading never unpickles (``allow_pickle=False``), builds only whitelisted
layer classes and checks every array's key, shape and dtype against the
config and against the freshly built model. Anything off is a UserInputError.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write
from breastcnn.nn.layers import layer_from_config
from breastcnn.nn.model import Sequential

FORMAT = "breastcnn-npz"
FORMAT_VERSION = 1
_ALLOWED_DTYPE_KINDS = "biufU"  # bool, ints, floats, unicode: never objects


def _plain_array(key: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in _ALLOWED_DTYPE_KINDS:
        raise UserInputError(f"cannot save {key!r}: dtype {arr.dtype} is not a plain numeric/string type")
    return arr


def save_model(model: Sequential, path, optimizer=None, extra: dict | None = None) -> None:
    """Write ``model`` (and optionally optimizer state and extra arrays) to ``path`` atomically.

    ``optimizer``: an Optimizer (its ``state_dict()`` is stored) or a state dict.
    ``extra``: {name: array-like} stored as ``extra.{name}``.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"save_model expects a breastcnn Sequential, got {type(model).__name__}")
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


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz, without unpickling anything; errors -> UserInputError."""
    try:
        if not zipfile.is_zipfile(path):
            raise UserInputError(f"{path}: not a breastcnn model file (expected an .npz zip archive)")
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except UserInputError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, RuntimeError) as exc:
        # object arrays ("Object arrays cannot be loaded when allow_pickle=False"), truncation, bad CRC...
        raise UserInputError(f"{path}: unreadable or unsafe model file ({type(exc).__name__}: {exc})") from None


def _parse_config(path: Path, arrays: dict) -> dict:
    raw = arrays.get("__config__")
    if raw is None or raw.shape != () or raw.dtype.kind != "U":
        raise UserInputError(f"{path}: missing or malformed __config__ entry; not a breastcnn model file")
    try:
        config = json.loads(str(raw[()]))
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: __config__ is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserInputError(f"{path}: not a breastcnn model file (format {config.get('format')!r})"
                             if isinstance(config, dict) else f"{path}: __config__ is not a JSON object")
    if config.get("format_version") != FORMAT_VERSION:
        raise UserInputError(f"{path}: unsupported format_version {config.get('format_version')!r} "
                             f"(this version reads {FORMAT_VERSION})")
    for field, kind in (("layers", list), ("input_shape", list), ("arrays", dict), ("meta", dict)):
        if not isinstance(config.get(field), kind):
            raise UserInputError(f"{path}: __config__ field {field!r} missing or not a {kind.__name__}")
    return config


def _load(path) -> tuple[Sequential, dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"model file {path} does not exist")
    arrays = _read_npz(path)
    config = _parse_config(path, arrays)
    arrays.pop("__config__")

    declared = config["arrays"]
    missing = sorted(set(declared) - set(arrays))
    undeclared = sorted(set(arrays) - set(declared))
    if missing:
        raise UserInputError(f"{path}: missing array(s) {', '.join(missing)}")
    if undeclared:
        raise UserInputError(f"{path}: unexpected array(s) {', '.join(undeclared)}")
    for key, spec in declared.items():
        arr = arrays[key]
        if not isinstance(spec, dict) or list(arr.shape) != spec.get("shape") or arr.dtype.str != spec.get("dtype"):
            raise UserInputError(f"{path}: array {key} has shape {arr.shape} and dtype {arr.dtype.str}, "
                                 f"config says {spec}")
        if arr.dtype.kind not in _ALLOWED_DTYPE_KINDS:
            raise UserInputError(f"{path}: array {key} has unsupported dtype {arr.dtype}")

    layers = [layer_from_config(cfg) for cfg in config["layers"]]
    try:
        input_shape = tuple(int(d) for d in config["input_shape"])
        model = Sequential(layers, input_shape=input_shape, seed=0, meta=config["meta"])
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{path}: cannot build the model from its config ({exc})") from None

    weights = {k: v for k, v in arrays.items() if k.startswith("layers.")}
    expected = {}
    for i, layer in enumerate(model.layers):
        for store in (layer.params, layer.state):
            for key, value in store.items():
                expected[f"layers.{i}.{key}"] = value
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing or unknown:
        raise UserInputError(f"{path}: weights do not match the architecture "
                             f"(missing {missing or 'none'}, unexpected {unknown or 'none'})")
    for key, value in expected.items():
        arr = weights[key]
        if arr.shape != value.shape or arr.dtype != np.float32:
            raise UserInputError(f"{path}: {key} has shape {arr.shape} dtype {arr.dtype}, "
                                 f"the architecture needs {value.shape} float32")
        if not np.all(np.isfinite(arr)):
            raise UserInputError(f"{path}: {key} contains NaN or infinite values")
    model.set_weights(weights)

    optimizer_state = {k[len("optimizer."):]: v for k, v in arrays.items() if k.startswith("optimizer.")}
    extra = {k[len("extra."):]: v for k, v in arrays.items() if k.startswith("extra.")}
    return model, optimizer_state, extra


def load_checkpoint(path) -> tuple[Sequential, dict, dict]:
    """``(model, optimizer_state, extra)`` from an ``.npz`` written by save_model.

    ``optimizer_state`` is ``Optimizer.state_dict()`` (empty when none was
    saved); rebuild with ``breastcnn.nn.optimizer_from_state(state)`` or
    ``opt.load_state_dict(state)``. ``extra`` maps names to arrays.
    """
    return _load(path)


def load_model(path):
    """``.npz`` -> Sequential; ``.keras`` -> the Keras classifier (TensorFlow imported lazily);
    ``.onnx`` -> the ONNX Runtime classifier (``breastcnn[onnx]``, imported lazily)."""
    path = Path(os.fspath(path))
    if path.suffix.lower() == ".keras":
        from breastcnn.models.keras_models import load_keras_model

        return load_keras_model(path)
    if path.suffix.lower() == ".onnx":
        from breastcnn.models.onnx_runtime import load_onnx_model

        return load_onnx_model(path)
    return _load(path)[0]

"""VGG16 / ResNet50 / custom-on-Keras behind the classifier interface.

TensorFlow is an optional extra: nothing here imports it at module import
time; :func:`require_keras` does, on first use, and turns its absence into a
:class:`~breastcnn.errors.MissingDependencyError`.

Models are plain functional ``keras.Model`` objects whose layers are flat (the
``keras.applications`` base is not nested), so every layer, including the
Grad-CAM one, is reachable with ``model.get_layer(name)``. They are wrapped in
:class:`KerasClassifier`, which satisfies the same ``Classifier`` protocol as the
NumPy model (``framework``, ``meta``, ``spec``, ``predict``, ``count_params``)
so ``evaluate``/``predict``/``bench``/``featuremaps`` treat both alike.

On disk a Keras model is ``model.keras`` (Keras v3 zip, without optimizer
state) plus the sidecar ``model.keras.json`` next to it (classes,
preprocessing, image size, architecture, split hash, seed, versions; named
after the model so that several models share a folder; a ``breastcnn.json``
written by earlier versions is still read); it is loaded with Keras
``safe_mode=True`` (no lambda deserialisation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import socket
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from breastcnn import __version__
from breastcnn.errors import MissingDependencyError, UserInputError
from breastcnn.fsutil import atomic_write_json, default_mode
from breastcnn.models.classifier import model_spec, predict_in_batches
from breastcnn.models.convert import from_keras, to_keras
from breastcnn.models.registry import create_model, list_models
from breastcnn.models.spec import DEFAULT_INPUT_SHAPE, DEFAULT_PREPROCESS, ModelSpec, default_classes
from breastcnn.models.structure import choose_gradcam_layer

LEGACY_SIDECAR_NAME = "breastcnn.json"
"""The one-per-folder sidecar name of earlier versions: still read (:func:`find_sidecar`), never written."""

SIDECAR_FORMAT = 1

KERAS_ARCHS = tuple(list_models(framework="keras"))
"""Architectures built here (registered in ``models.registry`` as Keras models)."""

SIDECAR_ONLY_KEYS = ("format", "framework", "model_file")
"""Keys the sidecar adds to a Keras model's meta (what the file is); not part of the model's own meta."""

GRADCAM_LAYERS = {"vgg16": "block5_conv3", "resnet50": "conv5_block3_out"}
"""Grad-CAM target layer per architecture (custom-keras: the NumPy model's rule, explain.choose_gradcam_layer)."""

IMAGENET_WEIGHTS = {
    # arch: (file name in the Keras cache, download URL, md5 published by keras.applications)
    "vgg16": (
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc",
    ),
    "resnet50": (
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626",
    ),
}

OFFLINE_ENV = "BREASTCNN_OFFLINE"
"""Set to 1 to never try a download (the missing-weights error comes at once)."""

DOWNLOAD_TIMEOUT_S = 20.0
"""Socket timeout for the ImageNet weights download (a dead network fails this fast)."""

DEFAULT_DROPOUT = 0.5
DEFAULT_TRAINABLE_LAYERS = 20


# --------------------------------------------------------------------------- lazy TensorFlow


def require_keras():
    """Import and return ``keras`` (TensorFlow backend), or raise MissingDependencyError.

    TensorFlow is imported here only (every other module calls this first), quietly:
    ``TF_CPP_MIN_LOG_LEVEL=3`` (unless the user set it) keeps its C++ logging off
    stderr, and the lines absl writes during the import before its logging is set
    up (which ignore that variable) go to a temporary file instead of stderr; they
    are shown only when the import fails and ``--debug`` is on.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        with _stderr_fd_captured() as captured:
            import keras
            import tensorflow  # noqa: F401  (the backend must be importable, not just keras)
    except ImportError as exc:
        if os.environ.get("BREASTCNN_DEBUG", "") not in ("", "0"):
            sys.stderr.write(captured.getvalue())
        raise MissingDependencyError(f"TensorFlow is not installed: pip install 'breastcnn[keras]' ({exc})") from None
    if keras.backend.backend() != "tensorflow":
        raise MissingDependencyError(
            f"the Keras models need the TensorFlow backend, but KERAS_BACKEND={keras.backend.backend()}; "
            "unset KERAS_BACKEND or set it to tensorflow"
        )
    return keras


@contextlib.contextmanager
def _stderr_fd_captured():
    """Point file descriptor 2 at a temporary file for the block (C++ code writes there, not to sys.stderr).

    Yields an object whose ``getvalue()`` returns what was written. A no-op once
    TensorFlow is imported (nothing more to hide) or when fd 2 cannot be duplicated.
    """

    class Captured:
        text = ""

        def getvalue(self) -> str:
            return self.text

    captured = Captured()
    if "tensorflow" in sys.modules:
        yield captured
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace")


def _tf():
    require_keras()
    import tensorflow as tf

    return tf


def library_versions() -> dict:
    """Versions recorded in the sidecar (TensorFlow/Keras included: they are loaded here)."""
    keras = require_keras()
    tf = _tf()
    return {
        "breastcnn": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


# --------------------------------------------------------------------------- the classifier


class KerasClassifier:
    """A ``keras.Model`` (probabilities out) behind the breastcnn classifier interface.

    Attributes:
        model: the functional ``keras.Model``; input ``(N, S, S, 3)`` float32
            already preprocessed with ``meta["preprocess"]``, output ``(N, 2)``
            softmax probabilities.
        meta: ``classes``, ``preprocess``, ``image_size``, ``arch``,
            ``gradcam_layer``, and when trained ``split_hash``, ``seed``,
            ``versions``, ... (written to the sidecar, :func:`sidecar_path`).
        framework: ``"keras"``.
    """

    framework = "keras"

    def __init__(self, model, meta: dict):
        self.model = model
        self.meta = dict(meta)
        self._infer = None  # compiled tf.function, built on first predict

    # -- shape / names ---------------------------------------------------------------

    @property
    def spec(self) -> ModelSpec:
        """The :class:`ModelSpec` read from ``meta`` (checked; an error names the model's file)."""
        return ModelSpec.from_meta(
            self.meta,
            framework="keras",
            source=getattr(self, "source", None) or "the model",
            input_shape=self.input_shape,
            num_classes=self.output_shape[-1],
        )

    @property
    def input_shape(self) -> tuple:
        """Input shape without the batch axis, e.g. ``(224, 224, 3)``."""
        return tuple(int(d) for d in self.model.input_shape[1:])

    @property
    def output_shape(self) -> tuple:
        return tuple(int(d) for d in self.model.output_shape[1:])

    @property
    def gradcam_layer(self) -> str:
        """Name of the layer Grad-CAM uses (``model.get_layer(name)``)."""
        return self.meta["gradcam_layer"]

    @property
    def layers(self) -> list:
        """The Keras layers in order (input layer included)."""
        return list(self.model.layers)

    # -- inference -------------------------------------------------------------------

    def _inference_fn(self):
        """A tf.function over the model in inference mode (one trace for any batch size)."""
        if self._infer is None:
            tf = _tf()
            model = self.model

            @tf.function(
                input_signature=[tf.TensorSpec((None, *self.input_shape), tf.float32)],
                reduce_retracing=True,
            )
            def infer(x):
                return model(x, training=False)

            self._infer = infer
        return self._infer

    def predict(self, x: np.ndarray, batch_size: int = 64, jobs: int = 1, progress=None) -> np.ndarray:
        """Class probabilities for preprocessed images.

        Args:
            x: ``(N, S, S, 3)`` float32, preprocessed with ``spec.preprocess``.
            batch_size: images per forward pass.
            jobs: accepted for the classifier interface (``Sequential`` shards batches); TensorFlow
                manages its own thread pools.
            progress: optional ``callable(advance: int)`` called after each batch.

        Returns:
            float32 ``(N, num_classes)``.
        """
        infer = self._inference_fn()
        return predict_in_batches(
            x,
            input_shape=self.input_shape,
            num_classes=self.output_shape[-1],
            batch_size=batch_size,
            run=lambda batch: infer(batch).numpy(),
            progress=progress,
            what=f"{self.meta.get('arch', 'keras')} model",
        )

    # -- introspection ---------------------------------------------------------------

    def count_params(self) -> dict:
        """``{"trainable": int, "non_trainable": int}`` (frozen layers and BN statistics are non-trainable)."""
        trainable = sum(int(np.prod(w.shape)) for w in self.model.trainable_weights)
        frozen = sum(int(np.prod(w.shape)) for w in self.model.non_trainable_weights)
        return {"trainable": trainable, "non_trainable": frozen}

    def summary(self) -> str:
        """Keras' summary table as text."""
        lines: list[str] = []
        self.model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
        return "\n".join(lines)

    # -- saving ----------------------------------------------------------------------

    def save(self, path: str | os.PathLike, optimizer=None, extra=None) -> Path:
        """Write ``path`` (``.keras``) and its sidecar ``<path>.json`` next to it, both atomically.

        The optimizer state is not saved (an inference model, a third of the
        size for a fully trainable network); ``optimizer``/``extra`` are
        accepted for ``models.save_model``'s signature and ignored.
        """
        keras = require_keras()
        path = Path(path)
        if path.suffix != ".keras":
            raise UserInputError(f"a Keras model is saved as .keras, received {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        model = self.model
        if getattr(model, "optimizer", None) is not None:
            # A compiled model would drag its optimizer variables into the file.
            # (clone_model would compile the clone too; from_config does not.)
            model = keras.Model.from_config(self.model.get_config())
            model.set_weights(self.model.get_weights())
        # Keras insists on the .keras suffix, so the temporary file keeps it.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.keras", dir=path.parent)
        os.close(fd)
        try:
            model.save(tmp)
            os.chmod(tmp, default_mode())  # mkstemp makes it 0600; a model file is shareable
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        sidecar = dict(self.meta)
        sidecar.update({"format": SIDECAR_FORMAT, "framework": "keras", "model_file": path.name})
        atomic_write_json(sidecar_path(path), _jsonable(sidecar))
        return path


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """The metadata file written beside ``model_path``: ``b.keras`` -> ``b.keras.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def find_sidecar(model_path: str | os.PathLike) -> Path | None:
    """The sidecar to read for ``model_path``: ``<name>.keras.json``, else a legacy ``breastcnn.json``
    beside it unless that one names another model file present in the folder; ``None`` when neither."""
    model_path = Path(model_path)
    side = sidecar_path(model_path)
    if side.is_file():
        return side
    legacy = model_path.with_name(LEGACY_SIDECAR_NAME)
    if not legacy.is_file():
        return None
    try:
        named = json.loads(legacy.read_text(encoding="utf-8")).get("model_file")
    except (OSError, ValueError, AttributeError):
        return legacy  # read_sidecar reports what is wrong with it
    if isinstance(named, str) and named != model_path.name and (model_path.parent / named).is_file():
        return None  # it describes its own model
    return legacy


def _jsonable(obj: Any):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_keras_model(path: str | os.PathLike) -> KerasClassifier:
    """Load ``model.keras`` + its sidecar (:func:`find_sidecar`) with Keras safe mode on.

    Raises UserInputError when the file or its sidecar is missing or invalid.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise UserInputError(f"--model {path}: not a regular file (a device, pipe or socket is not a model file)")
        raise UserInputError(f"--model {path}: no such file")
    if path.suffix != ".keras":
        raise UserInputError(f"--model {path}: a Keras model file ends in .keras")
    if not zipfile.is_zipfile(path):  # Keras would call a text or truncated file "File not found"
        with open(path, "rb") as handle:
            damaged = handle.read(2) == b"PK"
        raise UserInputError(
            f"--model {path}: not a Keras model file (a .keras file is a zip archive; this one is "
            f"{'truncated or damaged' if damaged else 'not a zip archive'})"
        )
    meta = read_sidecar(path)
    keras = require_keras()
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # corrupt zip, unknown layer, unsafe lambda under safe mode...
        raise UserInputError(f"--model {path}: cannot load this Keras model ({' '.join(str(exc).split())})") from None
    classifier = KerasClassifier(model, meta)
    classifier.source = str(path)  # messages about what this model computes name its file
    spec = ModelSpec.from_meta(
        meta,
        framework="keras",
        source=find_sidecar(path),
        input_shape=classifier.input_shape,
        num_classes=classifier.output_shape[-1],
    )
    meta["image_size"] = spec.image_size
    if meta.get("gradcam_layer") not in {layer.name for layer in model.layers}:
        meta["gradcam_layer"] = _default_gradcam_layer(model)
    return classifier


def read_sidecar(model_path: str | os.PathLike) -> dict:
    """The sidecar JSON object of a ``.keras`` model (:func:`find_sidecar`); its values are checked as the
    model's :class:`ModelSpec` once the model is loaded (:func:`load_keras_model`)."""
    side = find_sidecar(model_path)
    if side is None:
        raise UserInputError(
            f"--model {model_path}: its metadata file {sidecar_path(model_path)} is missing (a breastcnn Keras "
            f"model is saved as {Path(model_path).name} + {sidecar_path(model_path).name}); "
            "re-export or copy both files"
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{side}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise UserInputError(f"{side}: expected a JSON object, received {type(meta).__name__}")
    return meta


def _default_gradcam_layer(model) -> str | None:
    """custom-keras' Grad-CAM layer: the rule of a NumPy model (:func:`~breastcnn.models.structure.
    choose_gradcam_layer`) so a model and its export explain the same layer; ``None`` without a conv layer."""
    try:
        return choose_gradcam_layer(model)
    except UserInputError:
        return None


# --------------------------------------------------------------------------- ImageNet weights


def keras_cache_dir() -> Path:
    """Where Keras caches downloads: ``$KERAS_HOME`` or ``~/.keras`` (read now, not at TF import)."""
    home = os.environ.get("KERAS_HOME")
    return Path(home).expanduser() if home else Path.home() / ".keras"


def imagenet_weights_path(arch: str) -> Path:
    """The cached ImageNet (no-top) weights file of ``arch``; downloaded if absent and online.

    Raises UserInputError with one line naming the file, where to put it and
    the ``--weights PATH`` / ``--weights none`` alternatives when the file is
    absent and cannot be downloaded (offline machines; set BREASTCNN_OFFLINE=1
    to skip the attempt altogether).
    """
    fname, url, md5 = IMAGENET_WEIGHTS[arch]
    cache = keras_cache_dir()
    cached = cache / "models" / fname
    if cached.is_file():
        return cached

    def missing(reason: str) -> UserInputError:
        return UserInputError(
            f"--weights imagenet: the ImageNet weights for {arch} ({fname}) are not in the Keras cache "
            f"and {reason}; download {url} and put it in {cache / 'models'} "
            f"(the cache is $KERAS_HOME/models or ~/.keras/models), or pass --weights PATH to a local "
            f"copy, or --weights none to start from random weights"
        )

    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise missing(f"{OFFLINE_ENV} is set (no download attempted)")
    keras = require_keras()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # Keras prints "Downloading data from ..." on stdout; stdout is for data.
        with contextlib.redirect_stdout(sys.stderr):
            got = keras.utils.get_file(fname, url, cache_subdir="models", file_hash=md5, cache_dir=str(cache))
    except Exception as exc:  # URL errors, timeouts, hash mismatch, unwritable cache
        reason = " ".join(str(exc).split()).rsplit(" -- ", 1)[-1]  # Keras repeats the URL before " -- "
        raise missing(f"the download failed ({reason[:160]})") from None
    finally:
        socket.setdefaulttimeout(previous)
    return Path(got)


def _resolve_weights(weights: str | os.PathLike | None, arch: str) -> Path | None:
    """``"imagenet"`` -> the cached file, ``"none"``/None -> None, a path -> that file (checked)."""
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        if arch not in IMAGENET_WEIGHTS:
            raise UserInputError(
                f"--weights imagenet: there are no ImageNet weights for {arch}; use --weights none or PATH"
            )
        return imagenet_weights_path(arch)
    path = Path(weights)
    if not path.is_file():
        raise UserInputError(f"--weights {weights}: no such file (expected imagenet, none or a weights file)")
    return path


def _load_weights(target, path: Path, option_value) -> None:
    try:
        target.load_weights(str(path))
    except Exception as exc:
        raise UserInputError(
            f"--weights {option_value}: cannot load {path} into {target.name} ({' '.join(str(exc).split())[:200]})"
        ) from None


# --------------------------------------------------------------------------- builders


def _check_common(input_shape, num_classes: int, trainable_layers: int, dropout: float) -> tuple:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or shape[-1] != 3 or shape[0] != shape[1]:
        raise UserInputError(f"input_shape must be (S, S, 3), received {tuple(input_shape)}")
    if shape[0] < 32:
        raise UserInputError(f"--image-size must be at least 32 for VGG16/ResNet50, received {shape[0]}")
    if num_classes < 2:
        raise UserInputError(f"num_classes must be >= 2, received {num_classes}")
    if trainable_layers < 0:
        raise UserInputError(f"--trainable-layers must be >= 0, received {trainable_layers}")
    if not 0.0 <= dropout < 1.0:
        raise UserInputError(f"dropout must be in [0, 1), received {dropout}")
    return shape


def _pretrained(arch: str, app_fn, input_shape, num_classes, seed, weights, trainable_layers, dropout):
    """Base from keras.applications + GAP -> Dropout -> Dense softmax; last layers trainable."""
    keras = require_keras()
    shape = _check_common(input_shape, num_classes, trainable_layers, dropout)
    weights_file = _resolve_weights(weights, arch)
    keras.utils.set_random_seed(int(seed))
    base = app_fn(include_top=False, weights=None, input_shape=shape)
    if weights_file is not None:
        _load_weights(base, weights_file, weights)
    # Freeze all but the last `trainable_layers` layers of `base.layers` (the weightless input
    # and pooling layers count too). Frozen BatchNorm layers run in inference mode (Keras 3).
    n_base = len(base.layers)
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= n_base - trainable_layers
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    out = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(base.input, out, name=arch)
    spec = ModelSpec(
        arch=arch,
        framework="keras",
        classes=default_classes(num_classes),
        image_size=shape[0],
        preprocess=DEFAULT_PREPROCESS,
    )
    meta = {
        **spec.to_meta(),
        "seed": int(seed),
        "weights": (
            "none" if weights_file is None else "imagenet" if str(weights).lower() == "imagenet" else str(weights)
        ),
        "trainable_layers": int(trainable_layers),
        "base_layers": n_base,
        "dropout": float(dropout),
        "gradcam_layer": GRADCAM_LAYERS[arch],
        "versions": library_versions(),
    }
    return KerasClassifier(model, meta)


def create_vgg16(
    input_shape=DEFAULT_INPUT_SHAPE,
    num_classes: int = 2,
    seed: int = 0,
    weights: str | os.PathLike | None = "imagenet",
    trainable_layers: int = DEFAULT_TRAINABLE_LAYERS,
    dropout: float = DEFAULT_DROPOUT,
) -> KerasClassifier:
    """VGG16 (no top) + GAP + dropout + dense softmax.

    The VGG16 base has 19 layers (input, 13 conv, 5 pool), so the report's 20
    trainable layers make the whole network trainable; the report's 7.08 M
    trainable parameters correspond to ``trainable_layers=4`` (block5 only).
    ``weights``: ``"imagenet"`` (Keras cache or download), ``"none"``, or a
    path to a no-top weights file (``.h5``/``.weights.h5``).
    """
    keras = require_keras()
    return _pretrained(
        "vgg16", keras.applications.VGG16, input_shape, num_classes, seed, weights, trainable_layers, dropout
    )


def create_resnet50(
    input_shape=DEFAULT_INPUT_SHAPE,
    num_classes: int = 2,
    seed: int = 0,
    weights: str | os.PathLike | None = "imagenet",
    trainable_layers: int = DEFAULT_TRAINABLE_LAYERS,
    dropout: float = DEFAULT_DROPOUT,
) -> KerasClassifier:
    """ResNet50 (no top, 175 layers) + GAP + dropout + dense softmax; last layers trainable."""
    keras = require_keras()
    return _pretrained(
        "resnet50", keras.applications.ResNet50, input_shape, num_classes, seed, weights, trainable_layers, dropout
    )


def create_custom_keras(
    input_shape=DEFAULT_INPUT_SHAPE,
    num_classes: int = 2,
    seed: int = 0,
    weights: str | os.PathLike | None = "none",
    trainable_layers: int | None = None,
    dropout: float | None = None,
    l2: float = 0.0,
    **custom_kwargs,
) -> KerasClassifier:
    """The report's custom CNN in Keras, converted from the NumPy definition (one source of truth).

    Built as ``convert.to_keras(create_model("custom", ...))``, so its initial
    weights equal the NumPy model's for the same seed. ``trainable_layers``
    and ``dropout`` are accepted and ignored (the whole network trains; the
    architecture has no dropout). ``l2``: ``keras.regularizers.L2(l2)`` on the
    conv/dense kernels, the NumPy engine's convention (``l2 * sum(W**2)`` added
    to the loss). ``weights``: ``"none"`` or a path
    to a Keras weights file (``.weights.h5``) or a ``.keras`` model of this
    architecture. ``custom_kwargs`` go to the NumPy builder.
    """
    keras = require_keras()
    shape = tuple(int(d) for d in input_shape)
    if str(weights).lower() == "imagenet":
        raise UserInputError("--weights imagenet: custom-keras has no ImageNet weights; use --weights none or PATH")
    weights_file = _resolve_weights(weights, "custom-keras")
    numpy_model = create_model("custom", input_shape=shape, num_classes=num_classes, seed=seed, **custom_kwargs)
    keras.utils.set_random_seed(int(seed))
    kmodel = to_keras(numpy_model, l2=float(l2))
    if weights_file is not None:
        _load_weights(kmodel, weights_file, weights)
    meta = _converted_meta(numpy_model, kmodel)
    meta.update({"seed": int(seed), "weights": "none" if weights_file is None else str(weights)})
    return KerasClassifier(kmodel, meta)


# --------------------------------------------------------------------------- NumPy <-> Keras (export)

NUMPY_EXPORTABLE = ("custom-keras", "custom")
"""Keras architectures that convert back to the NumPy engine (a custom model exported to Keras is custom-keras)."""


def _converted_meta(numpy_model, kmodel) -> dict:
    """The meta of ``kmodel``, converted from ``numpy_model``: the NumPy model's meta, its spec as a
    custom-keras model, the Grad-CAM layer of the NumPy model's rule (same map on both sides), versions."""
    spec = dataclasses.replace(
        model_spec(numpy_model), arch="custom-keras", framework="keras", image_size=int(numpy_model.input_shape[0])
    )
    return {
        **numpy_model.meta,
        **spec.to_meta(),
        "gradcam_layer": _default_gradcam_layer(kmodel),
        "versions": library_versions(),
    }


def keras_from_numpy(numpy_model, source: str | os.PathLike | None = None) -> KerasClassifier:
    """The NumPy model as a custom-keras :class:`KerasClassifier` with the same weights (``convert.to_keras``)
    and metadata (its spec, ``source_arch``, ``exported_from``: ``source``), ready for ``save_model``."""
    require_keras()
    kmodel = to_keras(numpy_model)
    meta = _converted_meta(numpy_model, kmodel)
    meta["source_arch"] = numpy_model.meta.get("arch")
    if source is not None:
        meta["exported_from"] = str(source)
    return KerasClassifier(kmodel, meta)


def numpy_from_keras(classifier: KerasClassifier, source: str | os.PathLike | None = None):
    """A custom-keras classifier as a NumPy ``Sequential`` (``convert.from_keras``) with its meta (arch
    ``custom``, ``exported_from``: ``source``); other architectures raise UserInputError naming ``source``."""
    arch = classifier.spec.arch
    if arch not in NUMPY_EXPORTABLE:
        raise UserInputError(
            f"--model {source or 'the model'}: --to numpy exports custom-keras models only (the NumPy engine runs "
            f"the report's custom architecture), this one is {arch!r}"
        )
    keep = {k: v for k, v in classifier.meta.items() if k not in (*SIDECAR_ONLY_KEYS, "gradcam_layer", "versions")}
    keep["arch"] = "custom"
    if source is not None:
        keep["exported_from"] = str(source)
    return from_keras(classifier.model, meta=keep)


BUILDERS = {"vgg16": create_vgg16, "resnet50": create_resnet50, "custom-keras": create_custom_keras}

"""``ModelSpec``: what a classifier's input and output mean, typed and checked once.

Every model file carries its metadata (``meta``: the ``.npz`` config, the
``.keras`` sidecar, the ONNX ``metadata_props``). The fields every consumer
needs are read from it here, once, where a model is loaded or built:

- ``arch``: the architecture name (``"custom"``, ``"vgg16"``, ...);
- ``framework``: ``"numpy"`` | ``"keras"`` | ``"onnx"`` (set by the classifier
  class, never read from the file);
- ``classes``: class names in label order (``breastcnn.CLASSES`` for the binary task);
- ``image_size``: the square input side the images are resized to;
- ``preprocess``: one of :data:`breastcnn.data.images.PREPROCESS_MODES`;
- ``task``: ``"binary"`` (benign/malignant) or ``"subtype"`` (the 8 BreakHis
  classes, :mod:`breastcnn.data.tasks`); the classes must be the task's;
- ``stain``: None, or the stain settings the model was trained with
  (:func:`breastcnn.data.stain.stain_meta`: the normalisation method and its
  fitted target as plain numbers, the HED jitter used); ``spec.normaliser``
  is the fitted normaliser every consumer applies to images before
  ``preprocess``, None without normalisation.

``model.meta`` stays a plain dict (the file format and scripts use it; the
training loop adds keys to it), and the spec is read from it:
``ModelSpec.from_meta(meta, framework=..., source=...)``; ``spec.to_meta()``
gives the keys back. A bad value is a :class:`UserInputError` that starts
with the file it came from.

What a framework can do (threads, train step, layer outputs) is
:data:`CAPABILITIES`, reached as ``spec.capabilities``: consumers branch on
that, in one place, rather than on the framework's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from breastcnn import CLASSES
from breastcnn.data.images import PREPROCESS_MODES
from breastcnn.data.stain import check_stain_meta
from breastcnn.data.tasks import DEFAULT_TASK, TASK_CLASSES, TASKS
from breastcnn.errors import UserInputError

DEFAULT_IMAGE_SIZE = 224
"""Input side of the report's models (``train``/``finetune``/``bench`` default ``--image-size``)."""

DEFAULT_INPUT_SHAPE = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3)
"""``create_model``'s default ``input_shape`` (height, width, RGB channels)."""

DEFAULT_PREPROCESS = "caffe"
"""What every builder records (ImageNet BGR mean subtraction, as the Keras VGG16/ResNet50 expect)."""


FRAMEWORKS = ("numpy", "keras", "onnx")

REQUIRED_FIELDS = {"numpy": (), "keras": ("classes", "preprocess"), "onnx": ("classes", "image_size", "preprocess")}
"""Meta keys a model of each framework must carry. A NumPy model's builders always wrote them, so a missing
one takes its default (older files, hand-built ``Sequential``s); a Keras sidecar and an ONNX export have
always had to say them. ``image_size`` is required too whenever the model's input shape is unknown."""

_DEFAULT_ARCH = {"numpy": "custom", "onnx": "custom"}
"""Architecture assumed when the meta names none: the NumPy engine builds the custom family (and ONNX
files are its exports); a Keras model without one is ``"unknown"``."""


@dataclass(frozen=True)
class Capabilities:
    """What a framework's classifier can do, so that consumers test a capability, not a name."""

    engine_threads: bool
    """``--threads`` sets the NumPy engine's threads (``model.using_threads(n)``, ``model.threads``)."""
    session_threads: bool
    """``--threads`` sets the runtime session's intra-op threads (``model.set_threads(n)``: ONNX Runtime)."""
    train_step: bool
    """The model can take an optimizer step (``bench`` times one)."""
    layer_outputs: bool
    """Layer outputs and gradients are reachable (feature maps, Grad-CAM)."""
    suffix: str
    """File suffix of this framework's model files."""


CAPABILITIES = {
    "numpy": Capabilities(
        engine_threads=True, session_threads=False, train_step=True, layer_outputs=True, suffix=".npz"
    ),
    "keras": Capabilities(
        engine_threads=False, session_threads=False, train_step=True, layer_outputs=True, suffix=".keras"
    ),
    "onnx": Capabilities(
        engine_threads=False, session_threads=True, train_step=False, layer_outputs=False, suffix=".onnx"
    ),
}


def default_classes(num_classes: int) -> tuple[str, ...]:
    """``breastcnn.CLASSES`` for two outputs, else ``("0", "1", ...)``."""
    return tuple(CLASSES) if num_classes == len(CLASSES) else tuple(str(i) for i in range(num_classes))


@dataclass(frozen=True)
class ModelSpec:
    """A classifier's typed description (see the module docstring); build it with :meth:`from_meta`."""

    arch: str
    framework: str
    classes: tuple[str, ...]
    image_size: int
    preprocess: str
    task: str = DEFAULT_TASK
    stain: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES[self.framework]

    @property
    def normaliser(self):
        """The fitted stain normaliser (Macenko/Reinhard) to apply to uint8 images before ``preprocess``, or None."""
        return None if self.stain is None else check_stain_meta(self.stain)[0]

    def to_meta(self) -> dict:
        """The meta keys this spec owns (``task``/``stain`` only when not the defaults, so that files written
        before they existed and files written now are the same)."""
        meta: dict[str, Any] = {
            "arch": self.arch,
            "classes": list(self.classes),
            "preprocess": self.preprocess,
            "image_size": self.image_size,
        }
        if self.task != DEFAULT_TASK:
            meta["task"] = self.task
        if self.stain is not None:
            meta["stain"] = dict(self.stain)
        return meta

    @classmethod
    def from_meta(
        cls,
        meta: Mapping,
        framework: str,
        source: object = "the model",
        input_shape: tuple | None = None,
        num_classes: int | None = None,
    ) -> ModelSpec:
        """The spec of a ``framework`` model from its ``meta``, checked.

        ``input_shape`` (without batch) and ``num_classes`` are what the model itself says: a missing
        ``image_size`` is its input side and must equal it when given; missing ``classes`` are named
        for ``num_classes`` outputs and must number that many when given. Other missing keys take their
        defaults unless :data:`REQUIRED_FIELDS` requires them. Raises UserInputError starting with ``source``
        (the file the meta came from) naming the key and the value received.
        """
        if framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
        if not isinstance(meta, Mapping):
            raise UserInputError(f"{source}: the model's metadata must be a JSON object, got {type(meta).__name__}")
        side = _input_side(input_shape)
        required = set(REQUIRED_FIELDS[framework]) | ({"image_size"} if side is None else set())
        missing = sorted(key for key in required if meta.get(key) is None)
        if missing:
            raise UserInputError(
                f"{source}: the model's metadata lacks {', '.join(missing)} (it has "
                f"{', '.join(sorted(map(str, meta))) or 'no keys'}); it cannot prepare images"
            )
        return cls(
            arch=_arch(meta.get("arch"), framework, source),
            framework=framework,
            classes=_classes(meta.get("classes"), num_classes, source),
            image_size=_image_size(meta.get("image_size"), side, input_shape, source),
            preprocess=_preprocess(meta.get("preprocess"), source),
            task=_task(meta.get("task"), meta.get("classes"), source),
            stain=_stain(meta.get("stain"), source),
        )


# ------------------------------------------------------------------ field checks (one per field)
def _input_side(input_shape) -> int | None:
    if input_shape is None or len(input_shape) != 3 or input_shape[0] is None:
        return None
    return int(input_shape[0])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _arch(value, framework: str, source) -> str:
    if value is None:
        return _DEFAULT_ARCH.get(framework, "unknown")
    if not isinstance(value, str) or not value:
        raise UserInputError(f"{source}: 'arch' must be a non-empty string, received {value!r}")
    return value


def _classes(value, num_classes: int | None, source) -> tuple[str, ...]:
    if value is None:
        return default_classes(num_classes if num_classes is not None else len(CLASSES))
    if (
        not isinstance(value, (list, tuple))
        or len(value) < 2
        or not all(isinstance(c, str) and c for c in value)
        or len(set(value)) != len(value)
    ):
        raise UserInputError(
            f"{source}: 'classes' must be a list of at least two distinct class names, received {value!r}"
        )
    if num_classes is not None and len(value) != num_classes:
        raise UserInputError(
            f"{source}: 'classes' names {len(value)} classes but the model has {num_classes} outputs ({value!r})"
        )
    return tuple(value)


def _image_size(value, side: int | None, input_shape, source) -> int:
    if value is None:
        return side  # from_meta required it when the side is unknown
    if not _is_int(value) or value < 1:
        raise UserInputError(f"{source}: 'image_size' must be a positive integer, received {value!r}")
    if side is not None and value != side:
        # inference resizes images to image_size: it must be the input the model takes
        raise UserInputError(
            f"{source}: image_size {value!r} does not match the model's input shape {list(input_shape)}"
        )
    return value


def _preprocess(value, source) -> str:
    if value is None:
        return DEFAULT_PREPROCESS
    if value not in PREPROCESS_MODES:
        raise UserInputError(f"{source}: 'preprocess' must be {' or '.join(PREPROCESS_MODES)}, received {value!r}")
    return value


def _task(value, classes, source) -> str:
    if value is None:
        return DEFAULT_TASK
    if value not in TASKS:
        raise UserInputError(f"{source}: 'task' must be one of {', '.join(TASKS)}, received {value!r}")
    if value != DEFAULT_TASK and (classes is None or tuple(classes) != TASK_CLASSES[value]):
        raise UserInputError(
            f"{source}: a {value} model's 'classes' must be {list(TASK_CLASSES[value])}, received {classes!r}"
        )
    return value


def _stain(value, source) -> dict | None:
    if value is None:
        return None
    check_stain_meta(dict(value) if isinstance(value, Mapping) else value, str(source))
    return dict(value)


__all__ = [
    "CAPABILITIES",
    "Capabilities",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_INPUT_SHAPE",
    "DEFAULT_PREPROCESS",
    "DEFAULT_TASK",
    "FRAMEWORKS",
    "ModelSpec",
    "REQUIRED_FIELDS",
    "TASKS",
    "default_classes",
]

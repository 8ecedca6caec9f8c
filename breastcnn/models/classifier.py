"""The classifier interface that evaluate / predict / bench / featuremaps / export use.

:class:`Classifier` is a structural :class:`typing.Protocol`: the NumPy model
(``models.io.NumpyClassifier``, a ``Sequential``), ``KerasClassifier`` and
``OnnxClassifier`` satisfy it without inheriting from it. Consumers read a
model's :class:`~breastcnn.models.spec.ModelSpec` through :func:`model_spec`
(which also accepts a stand-in that has only ``meta``, as the tests' fake
classifiers do) and branch on ``spec.capabilities``, not on names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from breastcnn.errors import UserInputError
from breastcnn.models.spec import CAPABILITIES, Capabilities, ModelSpec


@runtime_checkable
class Classifier(Protocol):
    """What every breastcnn model offers (NumPy, Keras, ONNX Runtime).

    ``predict`` takes images already resized to ``spec.image_size`` and
    preprocessed with ``spec.preprocess`` (``data.images.preprocess``):
    float32 ``(N, S, S, 3)`` NHWC -> float32 ``(N, spec.num_classes)``
    probabilities. ``meta`` is the model file's metadata as a dict (the keys
    of ``spec.to_meta()`` plus provenance: split hash, seed, versions...).
    Saving goes through ``breastcnn.models.save_model``.
    """

    framework: str
    meta: dict

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def input_shape(self) -> tuple: ...

    def predict(self, x: np.ndarray, batch_size: int = 64, jobs: int = 1, progress: Any = None) -> np.ndarray: ...

    def count_params(self) -> dict: ...

    def summary(self) -> str: ...


def model_source(model) -> str:
    """The model's file for messages (the loaders record it as ``source``), else a generic name."""
    return str(getattr(model, "source", None) or "the model")


def framework_of(model) -> str:
    """``"numpy"`` | ``"keras"`` | ``"onnx"``; a bare ``keras.Model`` (explain accepts one) is ``"keras"``."""
    return getattr(model, "framework", None) or "keras"


def capabilities(model) -> Capabilities:
    """What ``model``'s framework can do (:data:`breastcnn.models.spec.CAPABILITIES`)."""
    return CAPABILITIES[framework_of(model)]


def model_spec(model) -> ModelSpec:
    """``model.spec`` of a breastcnn classifier; for another object with the classifier's ``meta``
    (a stand-in, a ``Sequential`` built by hand) the spec read from that meta, checked the same way."""
    spec = getattr(model, "spec", None)
    if isinstance(spec, ModelSpec):
        return spec
    output = getattr(model, "output_shape", None)
    return ModelSpec.from_meta(
        getattr(model, "meta", None) or {},
        framework=framework_of(model),
        source=model_source(model),
        input_shape=getattr(model, "input_shape", None),
        num_classes=int(output[-1]) if output else None,
    )


def predict_in_batches(
    x,
    *,
    input_shape: tuple,
    num_classes: int,
    batch_size: int,
    run: Callable[[np.ndarray], np.ndarray],
    progress: Callable[[int], None] | None = None,
    what: str = "model",
) -> np.ndarray:
    """float32 ``(N, num_classes)`` of ``x`` ``(N, *input_shape)`` by ``run(batch)`` on float32 C-contiguous
    batches of ``batch_size``, ``progress(n)`` after each: the batching of the Keras and ONNX classifiers.

    A wrong image shape or batch size is a ``UserInputError`` naming ``what`` and the shapes.
    """
    x = np.asarray(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise UserInputError(
            f"{what} expects images of shape (N, {', '.join(map(str, input_shape))}), received {tuple(x.shape)}"
        )
    if batch_size < 1:
        raise UserInputError(f"batch_size must be >= 1, received {batch_size}")
    out = np.empty((x.shape[0], num_classes), dtype=np.float32)
    for start in range(0, x.shape[0], batch_size):
        batch = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
        out[start : start + len(batch)] = run(batch)
        if progress is not None:
            progress(len(batch))
    return out


__all__ = ["Classifier", "capabilities", "framework_of", "model_source", "model_spec", "predict_in_batches"]

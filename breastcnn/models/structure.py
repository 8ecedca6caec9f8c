"""A model's conv blocks and the Grad-CAM layer rule (NumPy ``Sequential``, ``KerasClassifier``, ``keras.Model``).

The models layer records each Keras model's Grad-CAM layer when it is built
or exported (``KerasClassifier.gradcam_layer``), and :mod:`breastcnn.explain`
uses the same rule for a NumPy model, so a model and its export explain the
same layer. Reads layer names, classes and output shapes only: no TensorFlow
import, no computation.
"""

from __future__ import annotations

from breastcnn.errors import UserInputError
from breastcnn.models.classifier import framework_of

MIN_GRADCAM_GRID = 8
"""Grad-CAM's default layer has an output at least this many cells across. The report's custom model
ends on a 4x4 map at 160 px (6x6 at 224): one cell covers a sixteenth of the image and the map is one
blob; its second block (19x19 at 160 px, 27x27 at 224) localises."""

# Layers that belong to a conv block when they directly follow a Conv2D.
_BLOCK_TAIL_CLASSES = ("BatchNorm", "ReLU", "LeakyReLU")
_KERAS_BLOCK_TAIL_CLASSES = ("BatchNormalization", "ReLU", "LeakyReLU", "Activation")


def keras_model(model):
    """The underlying ``keras.Model`` of a KerasClassifier (or the model itself)."""
    for attr in ("model", "keras_model", "kmodel"):
        inner = getattr(model, attr, None)
        if inner is not None and hasattr(inner, "layers"):
            return inner
    return model


def keras_output_rank(layer) -> int:
    """Rank of a Keras layer's output (batch axis included); -1 when it has no single output."""
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return -1


def layer_index(model, name: str) -> int:
    """Position of the NumPy layer ``name``; an unknown name lists the model's layers."""
    names = [layer.name for layer in model.layers]
    if name not in names:
        raise UserInputError(f"--layers: no layer named {name!r} in the model; layers: {', '.join(names)}")
    return names.index(name)


def conv_blocks(model) -> list[tuple[str, str]]:
    """The conv blocks of a model: ``[(conv_layer_name, block_output_layer_name), ...]``.

    A block is a conv layer plus the BatchNorm/activation layers right after it;
    its output is what feature maps show and what Grad-CAM weighs. Works for
    NumPy ``Sequential`` models, ``KerasClassifier`` and plain ``keras.Model``
    (where a conv with a fused activation, as in VGG16, is its own block).
    """
    if framework_of(model) == "numpy":
        layers = list(model.layers)
        tails = _BLOCK_TAIL_CLASSES
    else:
        layers = [layer for layer in keras_model(model).layers if keras_output_rank(layer) == 4]
        tails = _KERAS_BLOCK_TAIL_CLASSES
    names = [layer.name for layer in layers]
    classes = [type(layer).__name__ for layer in layers]
    blocks = []
    for i, cls in enumerate(classes):
        if cls != "Conv2D":
            continue
        end = i
        while end + 1 < len(classes) and classes[end + 1] in tails:
            end += 1
        blocks.append((names[i], names[end]))
    return blocks


def spatial_size(model, name: str) -> tuple[int, int]:
    """``(H', W')`` of a 4-D layer output."""
    if framework_of(model) == "numpy":
        shape = model.layers[layer_index(model, name)].output_shape
    else:
        shape = tuple(keras_model(model).get_layer(name).output.shape)[1:]
    return int(shape[0]), int(shape[1])


def choose_gradcam_layer(model) -> str:
    """The output layer of the last conv block whose map is at least :data:`MIN_GRADCAM_GRID` cells
    across (else of the last block): fine enough to localise, as deep as that allows."""
    blocks = conv_blocks(model)
    if not blocks:
        arch = (getattr(model, "meta", None) or {}).get("arch", type(model).__name__)
        raise UserInputError(f"model {arch!r} has no conv layer for Grad-CAM")
    for _, output in reversed(blocks):
        if min(spatial_size(model, output)) >= MIN_GRADCAM_GRID:
            return output
    return blocks[-1][1]


__all__ = [
    "MIN_GRADCAM_GRID",
    "choose_gradcam_layer",
    "conv_blocks",
    "keras_model",
    "keras_output_rank",
    "layer_index",
    "spatial_size",
]

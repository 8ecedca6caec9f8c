"""The report's custom CNN on the NumPy engine, and a variant that sees every pixel.

``"custom"`` (the report's architecture, kept exactly to reproduce it):
conv 3x3/s4 16 -> BN -> act; conv 3x3/s2 32 -> BN -> act; maxpool 2;
conv 3x3/s2 64 -> BN -> act; flatten (6x6x64 = 2304 at 224); dense 128 -> act;
dense num_classes -> softmax. Valid padding, biases on the convolutions.
At 224x224x3: 319,106 trainable and 224 non-trainable parameters.

``"custom-k4"``: the same network with a 4x4/s4 first convolution. A 3x3
kernel with stride 4 never sees 7 of every 16 input pixels (the 4th row and
column of each 4x4 block: report defect 7); 4x4 windows with stride 4 tile
the image, so every pixel is seen exactly once, with the same output shapes
(56x56x16 at 224). At 224x224x3: 319,442 trainable (336 more first-layer
weights) and 224 non-trainable parameters; the smallest input is 52x52.
Same options (``activation``) and meta (``arch`` = "custom-k4").
"""

from __future__ import annotations

from breastcnn.errors import UserInputError
from breastcnn.models.io import NumpyClassifier
from breastcnn.models.spec import DEFAULT_INPUT_SHAPE, DEFAULT_PREPROCESS, ModelSpec, default_classes
from breastcnn.nn import BatchNorm, Conv2D, Dense, Flatten, LeakyReLU, MaxPool2D, ReLU, ShapeError, Softmax

ACTIVATIONS = ("relu", "leaky_relu")
"""Hidden-layer activations of the custom models (``train --activation``)."""


def custom_layers(num_classes: int = 2, activation: str = "relu", first_kernel: int = 3) -> list:
    """Fresh (unbuilt) layers of the report's architecture (``first_kernel=4``: the "custom-k4" variant)."""
    if activation not in ACTIVATIONS:
        raise UserInputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    act = (lambda: ReLU()) if activation == "relu" else (lambda: LeakyReLU(0.01))
    conv = dict(kernel_size=3, padding="valid", use_bias=True, kernel_initializer="he_normal")
    return [
        Conv2D(16, strides=4, **{**conv, "kernel_size": first_kernel}),
        BatchNorm(),
        act(),
        Conv2D(32, strides=2, **conv),
        BatchNorm(),
        act(),
        MaxPool2D(2),
        Conv2D(64, strides=2, **conv),
        BatchNorm(),
        act(),
        Flatten(),
        Dense(128, kernel_initializer="he_normal"),
        act(),
        Dense(num_classes, kernel_initializer="glorot_uniform"),
        Softmax(),
    ]


def minimum_input_size(layers: list, channels: int = 3, limit: int = 4096) -> int:
    """Smallest square input side for which every layer has a non-empty output."""
    for side in range(1, limit + 1):
        shape = (side, side, channels)
        try:
            for layer in layers:
                shape = layer.compute_output_shape(shape)
        except ShapeError:
            continue
        return side
    raise ValueError("no input size up to {limit} fits these layers")


def create_custom(
    input_shape=DEFAULT_INPUT_SHAPE, num_classes: int = 2, seed: int = 0, activation: str = "relu", **kwargs
) -> NumpyClassifier:
    """The report's architecture as a built :class:`NumpyClassifier` (deterministic for ``seed``)."""
    return _create("custom", 3, input_shape, num_classes, seed, activation, kwargs)


def create_custom_k4(
    input_shape=DEFAULT_INPUT_SHAPE, num_classes: int = 2, seed: int = 0, activation: str = "relu", **kwargs
) -> NumpyClassifier:
    """ "custom-k4": the report's architecture with a 4x4/s4 first convolution (sees every pixel once)."""
    return _create("custom-k4", 4, input_shape, num_classes, seed, activation, kwargs)


def _create(
    arch: str, first_kernel: int, input_shape, num_classes: int, seed: int, activation: str, kwargs: dict
) -> NumpyClassifier:
    if kwargs:
        raise UserInputError(f"unexpected options for the {arch} model: {', '.join(sorted(kwargs))}")
    layers = custom_layers(num_classes, activation, first_kernel)
    h, w, c = input_shape
    minimum = minimum_input_size(layers, c)
    if min(h, w) < minimum:
        raise UserInputError(
            f"input size {h}x{w} is too small for the {arch} model: its valid-padding stack needs at least "
            f"{minimum}x{minimum}"
        )
    spec = ModelSpec(
        arch=arch,
        framework="numpy",
        classes=default_classes(num_classes),
        image_size=int(h),
        preprocess=DEFAULT_PREPROCESS,
    )
    return NumpyClassifier(layers, input_shape=(h, w, c), seed=seed, meta={**spec.to_meta(), "activation": activation})

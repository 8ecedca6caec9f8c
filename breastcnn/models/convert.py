"""Conversion between the NumPy ``Sequential`` and Keras models (keras imported lazily).

Weights are laid out alike, so conversion copies arrays: Conv2D ``W``/``b`` =
Keras ``kernel``/``bias``; BatchNorm ``gamma, beta, moving_mean,
moving_variance`` = Keras BatchNormalization weights in the same order.
"""

from __future__ import annotations

import numpy as np

from breastcnn.errors import MissingDependencyError, UserInputError
from breastcnn.nn import layers as L
from breastcnn.nn.model import Sequential


def _keras():
    try:
        import keras
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "converting to/from Keras needs TensorFlow: pip install 'breastcnn[keras]'"
        ) from exc
    return keras


def _to_keras_layer(keras, layer: L.Layer, l2: float):
    kl = keras.layers
    reg = keras.regularizers.L2(l2) if l2 else None
    name = layer.name
    if isinstance(layer, L.Conv2D):
        return kl.Conv2D(
            layer.filters,
            layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            use_bias=layer.use_bias,
            kernel_regularizer=reg,
            name=name,
        )
    if isinstance(layer, L.BatchNorm):
        return kl.BatchNormalization(axis=-1, momentum=layer.momentum, epsilon=layer.epsilon, name=name)
    if isinstance(layer, L.ReLU):
        return kl.ReLU(name=name)
    if isinstance(layer, L.LeakyReLU):
        return kl.LeakyReLU(negative_slope=layer.negative_slope, name=name)
    if isinstance(layer, L.MaxPool2D):
        return kl.MaxPooling2D(layer.pool_size, strides=layer.strides, padding="valid", name=name)
    if isinstance(layer, L.GlobalAveragePooling2D):
        return kl.GlobalAveragePooling2D(name=name)
    if isinstance(layer, L.Flatten):
        return kl.Flatten(name=name)
    if isinstance(layer, L.Dense):
        return kl.Dense(layer.units, use_bias=layer.use_bias, kernel_regularizer=reg, name=name)
    if isinstance(layer, L.Dropout):
        return kl.Dropout(layer.rate, name=name)
    if isinstance(layer, L.Softmax):
        return kl.Softmax(name=name)
    raise UserInputError(f"cannot convert layer {layer.name} ({type(layer).__name__}) to Keras")


def _weight_order(layer: L.Layer) -> list[np.ndarray]:
    if isinstance(layer, L.BatchNorm):
        return [layer.params["gamma"], layer.params["beta"], layer.state["moving_mean"], layer.state["moving_variance"]]
    return [layer.params[k] for k in ("W", "b") if k in layer.params]


def to_keras(model: Sequential, l2: float = 0.0):
    """A functional ``keras.Model`` with the same layers (names, configs) and weights."""
    keras = _keras()
    inputs = keras.Input(shape=model.input_shape, name="input")
    x = inputs
    built = []
    for layer in model.layers:
        klayer = _to_keras_layer(keras, layer, l2 if layer.regularized else 0.0)
        x = klayer(x)
        built.append((klayer, layer))
    kmodel = keras.Model(inputs, x, name=str(model.meta.get("arch", "sequential")))
    for klayer, layer in built:
        weights = _weight_order(layer)
        if weights:
            klayer.set_weights([np.asarray(w, np.float32) for w in weights])
        klayer.trainable = layer.trainable
    return kmodel


_ACTIVATIONS = {"linear": None, "relu": L.ReLU, "softmax": L.Softmax}


def _activation_layer(klayer, activation) -> list[L.Layer]:
    name = getattr(activation, "__name__", str(activation))
    if name not in _ACTIVATIONS:
        raise UserInputError(
            f"cannot convert Keras layer {klayer.name!r} ({type(klayer).__name__}): activation {name!r} "
            f"is not supported (supported: {', '.join(_ACTIVATIONS)})"
        )
    cls = _ACTIVATIONS[name]
    return [] if cls is None else [cls(name=f"{klayer.name}_{name}")]


def _unsupported(klayer, reason: str) -> UserInputError:
    return UserInputError(f"cannot convert Keras layer {klayer.name!r} ({type(klayer).__name__}): {reason}")


def _with_activation(klayer, layer: L.Layer, weights: list) -> list[tuple[L.Layer, list]]:
    return [(layer, weights)] + [(a, []) for a in _activation_layer(klayer, klayer.activation)]


def _conv2d(klayer, cfg: dict, weights: list):
    ks, st = tuple(cfg["kernel_size"]), tuple(cfg["strides"])
    if (
        ks[0] != ks[1]
        or st[0] != st[1]
        or tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1)
        or cfg.get("groups", 1) != 1
        or cfg.get("data_format", "channels_last") != "channels_last"
    ):
        raise _unsupported(klayer, f"only square kernels/strides, no dilation/groups, channels_last (config {cfg})")
    layer = L.Conv2D(cfg["filters"], ks[0], st[0], cfg["padding"], cfg["use_bias"], name=klayer.name)
    return _with_activation(klayer, layer, weights)


def _dense(klayer, cfg: dict, weights: list):
    return _with_activation(klayer, L.Dense(cfg["units"], use_bias=cfg["use_bias"], name=klayer.name), weights)


def _batch_norm(klayer, cfg: dict, weights: list):
    axis = cfg["axis"]
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
    if axis not in (-1, 3, 1) or not cfg.get("center", True) or not cfg.get("scale", True):
        raise _unsupported(klayer, "only channel-last BatchNormalization with center and scale")
    return [(L.BatchNorm(cfg["momentum"], cfg["epsilon"], name=klayer.name), weights)]


def _relu(klayer, cfg: dict, weights: list):
    if cfg.get("max_value") is not None or cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
        raise _unsupported(klayer, "only plain ReLU (no max_value/negative_slope/threshold)")
    return [(L.ReLU(name=klayer.name), [])]


def _activation(klayer, cfg: dict, weights: list):
    acts = _activation_layer(klayer, klayer.activation)
    for a in acts:
        a.name = klayer.name
    return [(a, []) for a in acts]


def _max_pool(klayer, cfg: dict, weights: list):
    ps, st = tuple(cfg["pool_size"]), tuple(cfg["strides"] or cfg["pool_size"])
    if ps[0] != ps[1] or st[0] != st[1] or cfg["padding"] != "valid":
        raise _unsupported(klayer, "only square, valid max pooling")
    return [(L.MaxPool2D(ps[0], st[0], name=klayer.name), [])]


def _global_average_pool(klayer, cfg: dict, weights: list):
    if cfg.get("keepdims"):
        raise _unsupported(klayer, "keepdims=True is not supported")
    return [(L.GlobalAveragePooling2D(name=klayer.name), [])]


_CONVERTERS = {
    "InputLayer": lambda klayer, cfg, weights: [],
    "Conv2D": _conv2d,
    "Dense": _dense,
    "BatchNormalization": _batch_norm,
    "ReLU": _relu,
    "LeakyReLU": lambda klayer, cfg, weights: [(L.LeakyReLU(cfg["negative_slope"], name=klayer.name), [])],
    "Activation": _activation,
    "MaxPooling2D": _max_pool,
    "GlobalAveragePooling2D": _global_average_pool,
    "Flatten": lambda klayer, cfg, weights: [(L.Flatten(name=klayer.name), [])],
    "Dropout": lambda klayer, cfg, weights: [(L.Dropout(cfg["rate"], name=klayer.name), [])],
    "Softmax": lambda klayer, cfg, weights: [(L.Softmax(name=klayer.name), [])],
}
"""Keras layer class name -> ``(klayer, config, weights) -> [(our layer, weights in _weight_order)]``."""


def _from_keras_layer(klayer) -> list[tuple[L.Layer, list]]:
    """[(our layer, weights in _weight_order)] for one Keras layer."""
    convert = _CONVERTERS.get(type(klayer).__name__)
    if convert is None:
        supported = ", ".join(name for name in _CONVERTERS if name != "InputLayer")
        raise _unsupported(klayer, f"layer type not supported by the NumPy engine (supported: {supported})")
    return convert(klayer, klayer.get_config(), [np.asarray(w) for w in klayer.get_weights()])


def from_keras(kmodel, meta: dict | None = None) -> Sequential:
    """A ``Sequential`` with the same computation as a Keras model built from supported layers only."""
    _keras()
    pairs = []
    for klayer in kmodel.layers:
        if len(getattr(klayer, "_inbound_nodes", [])) > 1:
            raise UserInputError(f"cannot convert Keras layer {klayer.name!r}: shared layers are not supported")
        for layer, weights in _from_keras_layer(klayer):
            layer.trainable = bool(klayer.trainable) and layer.trainable
            pairs.append((layer, weights))
    input_shape = tuple(int(d) for d in kmodel.input_shape[1:])
    model = Sequential([p[0] for p in pairs], input_shape=input_shape, seed=0, meta=meta or {})
    for layer, weights in pairs:
        if isinstance(layer, L.BatchNorm):
            keys = [
                (layer.params, "gamma"),
                (layer.params, "beta"),
                (layer.state, "moving_mean"),
                (layer.state, "moving_variance"),
            ]
        else:
            keys = [(layer.params, k) for k in ("W", "b") if k in layer.params]
        if len(weights) != len(keys):
            raise UserInputError(f"Keras layer {layer.name!r}: expected {len(keys)} weight arrays, got {len(weights)}")
        for (store, key), w in zip(keys, weights, strict=True):
            if w.shape != store[key].shape:
                raise UserInputError(
                    f"Keras layer {layer.name!r}: {key} has shape {w.shape}, expected {store[key].shape}"
                )
            store[key] = w.astype(np.float32)
    return model

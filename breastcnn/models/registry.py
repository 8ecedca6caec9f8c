"""Models by name: ``register_model(name, factory, framework=...)``, ``create_model(name, ...)``, ``list_models()``.

A factory is a callable ``(input_shape, num_classes, seed, **kwargs) -> model``
or a lazy ``"package.module:function"`` string, imported only when that model
is created (so listing models or creating "custom" never imports TensorFlow).
The registry knows each architecture's framework, so the lists of NumPy and
Keras architectures derive from it: ``list_models(framework="keras")``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from breastcnn.errors import UserInputError
from breastcnn.models.spec import DEFAULT_INPUT_SHAPE, FRAMEWORKS

_REGISTRY: dict[str, Callable | str] = {}
_FRAMEWORKS: dict[str, str | None] = {}


def register_model(name: str, factory: Callable | str, overwrite: bool = False, framework: str | None = None) -> None:
    """Register ``factory`` (callable or ``"module:function"``) under ``name``.

    ``framework``: ``"numpy"``, ``"keras"`` or ``"onnx"``, what the factory builds (then ``create_model``
    checks it and ``list_models(framework=...)`` lists the name); None when not declared.
    """
    if not overwrite and name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"model {name!r} is already registered")
    if isinstance(factory, str) and ":" not in factory:
        raise ValueError(f"lazy factory must look like 'package.module:function', got {factory!r}")
    if framework is not None and framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)} or None, got {framework!r}")
    _REGISTRY[name] = factory
    _FRAMEWORKS[name] = framework


def list_models(framework: str | None = None) -> list[str]:
    """Registered model names, sorted; with ``framework``, only those declared to build that framework."""
    if framework is not None and framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    return sorted(name for name in _REGISTRY if framework is None or _FRAMEWORKS[name] == framework)


def model_framework(name: str) -> str | None:
    """The framework ``name`` was registered with (None: not declared); unknown names raise UserInputError."""
    _check_known(name)
    return _FRAMEWORKS[name]


def _check_known(name: str) -> None:
    if name not in _REGISTRY:
        raise UserInputError(f"unknown model {name!r}; known models: {', '.join(list_models())}")


def _resolve(name: str) -> Callable:
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    return factory


def create_model(name: str, input_shape=DEFAULT_INPUT_SHAPE, num_classes: int = 2, seed: int = 0, **kwargs):
    """Build model ``name``; unknown names raise UserInputError listing the known ones.

    A breastcnn classifier's spec is checked here, once (its framework must be the registered one).
    """
    _check_known(name)
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise UserInputError(f"input_shape must be (height, width, channels), got {input_shape}")
    if int(num_classes) < 2:
        raise UserInputError(f"num_classes must be >= 2, got {num_classes}")
    model = _resolve(name)(input_shape=input_shape, num_classes=int(num_classes), seed=int(seed), **kwargs)
    try:
        spec = getattr(model, "spec", None)  # a classifier of this package (a test factory may return anything)
    except UserInputError as exc:
        raise UserInputError(f"model {name!r} was built with bad metadata: {exc}") from None
    declared = _FRAMEWORKS[name]
    if spec is not None and declared is not None and spec.framework != declared:
        raise ValueError(f"model {name!r} is registered as a {declared} model but built a {spec.framework} one")
    return model


def _register_builtins() -> None:
    register_model("custom", "breastcnn.models.custom:create_custom", framework="numpy")
    register_model("custom-k4", "breastcnn.models.custom:create_custom_k4", framework="numpy")
    register_model("vgg16", "breastcnn.models.keras_models:create_vgg16", framework="keras")
    register_model("resnet50", "breastcnn.models.keras_models:create_resnet50", framework="keras")
    register_model("custom-keras", "breastcnn.models.keras_models:create_custom_keras", framework="keras")


_register_builtins()

"""Models by name: ``register_model(name, factory)``, ``create_model(name, ...)``, ``list_models()``.

A factory is a callable ``(input_shape, num_classes, seed, **kwargs) -> model``
or a lazy ``"package.module:function"`` string, imported only when that model
is created (so listing models or creating "custom" never imports TensorFlow).
"""

from __future__ import annotations

import importlib
from typing import Callable

from breastcnn.errors import UserInputError

_REGISTRY: dict[str, Callable | str] = {}


def register_model(name: str, factory: Callable | str, overwrite: bool = False) -> None:
    """Register ``factory`` (callable or ``"module:function"``) under ``name``."""
    if not overwrite and name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"model {name!r} is already registered")
    if isinstance(factory, str) and ":" not in factory:
        raise ValueError(f"lazy factory must look like 'package.module:function', got {factory!r}")
    _REGISTRY[name] = factory


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _resolve(name: str) -> Callable:
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    return factory


def create_model(name: str, input_shape=(224, 224, 3), num_classes: int = 2, seed: int = 0, **kwargs):
    """Build model ``name``; unknown names raise UserInputError listing the known ones."""
    if name not in _REGISTRY:
        raise UserInputError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise UserInputError(f"input_shape must be (height, width, channels), got {input_shape}")
    if int(num_classes) < 2:
        raise UserInputError(f"num_classes must be >= 2, got {num_classes}")
    return _resolve(name)(input_shape=input_shape, num_classes=int(num_classes), seed=int(seed), **kwargs)


def _register_builtins() -> None:
    register_model("custom", "breastcnn.models.custom:create_custom")
    register_model("custom-k4", "breastcnn.models.custom:create_custom_k4")
    register_model("vgg16", "breastcnn.models.keras_models:create_vgg16")
    register_model("resnet50", "breastcnn.models.keras_models:create_resnet50")
    register_model("custom-keras", "breastcnn.models.keras_models:create_custom_keras")


_register_builtins()

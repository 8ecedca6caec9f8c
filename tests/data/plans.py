"""Synthetic BreakHis trees and records without drawing tissue: the plan of ``breastcnn synth``, for split tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from breastcnn.data import synth
from breastcnn.data.breakhis import Record


def make_plan_tree(root: Path, scale: float = 0.01, mags=("40X", "100X", "200X", "400X"), seed: int = 0) -> Path:
    """``root/BreaKHis_v1`` with tiny (8x8) PNGs at the paths ``breastcnn synth`` would draw: the 82 patients
    with the real per-subtype counts, every subtype, the given magnifications (fast: no tissue is drawn)."""
    rng = np.random.default_rng(seed)
    data = root / "BreaKHis_v1"
    for spec in synth.plan(scale, mags):
        path = data / spec.path
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    (data / "README.txt").write_text(synth.MARKER)
    return data


def plan_records(scale: float = 1.0, mags=("200X",)) -> list[Record]:
    """The records a split of ``breastcnn synth --scale SCALE --mags MAGS`` sees, without drawing any image."""
    return [
        Record(s.path, s.patient.label, s.patient.subtype, s.patient.folder, s.magnification)
        for s in synth.plan(scale, mags)
    ]

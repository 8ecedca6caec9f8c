"""Magnification: which pyramid level to read, and how many level-0 pixels a tile covers.

Conventions (stated, not measured here):

- BreakHis magnifications are total magnifications of a 10x eyepiece view:
  40X/100X/200X/400X were taken with 4x/10x/20x/40x objectives (issue 14).
- A slide scanner's objective power maps to microns per pixel as
  ``mpp = 10 / objective`` (40x ~ 0.25 um/px, 20x ~ 0.5 um/px; the CMU-1
  Aperio scan is 20x at 0.499 um/px). So BreakHis ``200X`` = 20x = 0.5 um/px:
  ``mpp = 100 / magnification``. ``/work/shared/reference/breakhis.md`` gives
  no pixel size; BreakHis' own camera (Spanhol et al. 2016) samples finer than a
  scanner at the same objective, so this is the scanner-equivalent resolution.
- The model's magnification: its metadata (``meta["magnification"]``), else
  the ``split.json`` of the split its run was trained on, else 200X (the
  project's default split) with a note.
- The slide's level-0 resolution: ``--mpp`` or ``--mag`` when given, else
  ``openslide.mpp-x`` / TIFF resolution tags, else the objective power, else
  unknown: taken to be the model's magnification (a plain PNG), with a note.

Tiling: ``--tile`` and ``--stride`` are pixels at the model's magnification.
``scale`` = level-0 pixels per model pixel; the level read is the coarsest
whose downsample does not exceed ``scale`` (within 2%), so a tile is read at
``read_size`` pixels of that level (never upsampled from a coarser level) and
resized once to the model's input size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from breastcnn.errors import UserInputError

DEFAULT_MODEL_MAGNIFICATION = "200X"
LEVEL_TOLERANCE = 1.02
"""A level whose downsample exceeds the wanted scale by <= 2% is still read (then upsampled that little)."""


def parse_magnification(text: str | float, option: str = "--mag") -> float:
    """``"200X"``, ``"200x"``, ``"200"`` -> 200.0 (BreakHis-style total magnification = 10 x objective)."""
    raw = str(text).strip().upper().removesuffix("X")
    try:
        value = float(raw)
    except ValueError:
        raise UserInputError(f"{option}: {text!r} is not a magnification such as 40X, 100X, 200X or 400X") from None
    if not (value > 0 and math.isfinite(value)):
        raise UserInputError(f"{option} must be positive, got {text!r}")
    return value


def magnification_to_mpp(magnification: float) -> float:
    """BreakHis-style total magnification -> scanner microns per pixel (200X = 20x objective = 0.5 um/px)."""
    return 100.0 / magnification


def mpp_to_magnification(mpp: float) -> float:
    return 100.0 / mpp


def format_magnification(magnification: float) -> str:
    return f"{magnification:g}X"


@dataclass(frozen=True)
class Resolution:
    """Microns per pixel and where the figure came from (shown to the user)."""

    mpp: float
    source: str
    assumed: bool = False


def model_magnification(model, model_path: str | os.PathLike | None = None) -> Resolution:
    """The magnification the model was trained at, as a :class:`Resolution` (``mpp`` of that magnification).

    Looks at ``model.meta["magnification"]``, then the run's ``config.json`` ->
    split directory -> ``split.json`` ``magnification``; else 200X, ``assumed``.
    """
    meta = getattr(model, "meta", None) or {}
    for key in ("magnification", "mag"):
        if meta.get(key):
            try:
                mag = parse_magnification(meta[key], option=f"model metadata {key}")
            except UserInputError:
                break
            return Resolution(magnification_to_mpp(mag), f"model metadata ({format_magnification(mag)})")
    found = _split_magnification(model_path)
    if found is not None:
        mag, split_json = found
        return Resolution(magnification_to_mpp(mag), f"{split_json} ({format_magnification(mag)})")
    mag = parse_magnification(DEFAULT_MODEL_MAGNIFICATION)
    return Resolution(
        magnification_to_mpp(mag),
        f"not recorded in the model or its run; assumed {DEFAULT_MODEL_MAGNIFICATION}",
        assumed=True,
    )


def _split_magnification(model_path) -> tuple[float, Path] | None:
    if model_path is None:
        return None
    config_path = Path(model_path).parent / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        split_dir = Path((config.get("split") or {}).get("dir") or config.get("options", {}).get("split"))
        split_json = split_dir / "split.json"
        mag = json.loads(split_json.read_text(encoding="utf-8")).get("magnification")
        return parse_magnification(mag), split_json
    except (OSError, ValueError, TypeError, AttributeError, UserInputError):
        return None  # no run around the model, or a split over "all" magnifications


def slide_resolution(reader, model: Resolution, mpp: float | None = None, mag: str | None = None) -> Resolution:
    """Level-0 resolution of the slide: ``--mpp``/``--mag``, the file's metadata, else the model's (assumed)."""
    if mpp is not None and mag is not None:
        raise UserInputError("--mpp and --mag both give the slide's resolution; pass one")
    if mpp is not None:
        if not (mpp > 0 and math.isfinite(mpp)):
            raise UserInputError(f"--mpp must be a positive number of microns per pixel, got {mpp}")
        return Resolution(float(mpp), f"--mpp {mpp:g}")
    if mag is not None:
        value = parse_magnification(mag)
        return Resolution(magnification_to_mpp(value), f"--mag {format_magnification(value)}")
    if reader.mpp:
        return Resolution(float(reader.mpp), "the file's microns per pixel")
    if reader.objective_power:
        power = float(reader.objective_power)
        return Resolution(10.0 / power, f"the file's objective power ({power:g}x)")
    return Resolution(
        model.mpp,
        "unknown in the file; taken to be the model's magnification (pass --mpp or --mag to say otherwise)",
        assumed=True,
    )


@dataclass(frozen=True)
class TilePlan:
    """Where and how tiles are read. Sizes: ``tile``/``stride`` at the model's magnification,
    ``tile0``/``stride0`` in level-0 pixels, ``read_size`` in pixels of ``level``."""

    level: int
    downsample: float
    scale: float
    tile: int
    stride: int
    tile0: int
    stride0: int
    read_size: int
    columns: int
    rows: int

    @property
    def count(self) -> int:
        return self.columns * self.rows

    def origins(self, indices: np.ndarray) -> np.ndarray:
        """Level-0 ``(x, y)`` ``(n, 2)`` int64 of tile indices (raster order, row-major)."""
        indices = np.asarray(indices, dtype=np.int64)
        return np.stack([(indices % self.columns) * self.stride0, (indices // self.columns) * self.stride0], axis=1)


def choose_level(level_downsamples, scale: float) -> int:
    """The coarsest level whose downsample is <= ``scale`` (2% tolerance); level 0 when all are coarser."""
    best = 0
    for level, d in enumerate(level_downsamples):
        if d <= scale * LEVEL_TOLERANCE and d > level_downsamples[best]:
            best = level
    return best


def plan_tiles(
    dimensions: tuple[int, int], level_downsamples, slide_mpp: float, model_mpp: float, tile: int, stride: int
) -> TilePlan:
    """The :class:`TilePlan` of a slide: full tiles only, from the top-left corner, in raster order."""
    if tile < 1 or stride < 1:
        raise UserInputError(f"--tile and --stride must be >= 1 pixel, got {tile} and {stride}")
    scale = model_mpp / slide_mpp
    level = choose_level(level_downsamples, scale)
    downsample = float(level_downsamples[level])
    tile0 = max(1, round(tile * scale))
    stride0 = max(1, round(stride * scale))
    read_size = max(1, round(tile0 / downsample))
    width, height = dimensions
    columns = (width - tile0) // stride0 + 1 if width >= tile0 else 0
    rows = (height - tile0) // stride0 + 1 if height >= tile0 else 0
    return TilePlan(level, downsample, scale, tile, stride, tile0, stride0, read_size, columns, rows)

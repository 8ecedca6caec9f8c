"""Tissue detection on a thumbnail: Otsu's threshold on saturation, tile tissue fractions.

H&E tissue is coloured, glass is white or grey: on the HSV saturation of a
thumbnail, Otsu's threshold (``skimage.filters.threshold_otsu``) separates
them. The threshold is kept within ``[min_threshold, max_threshold]``: below,
Otsu is splitting the noise of a blank slide (no tissue); above, it is
splitting tissue from tissue (an image without background, such as a
BreakHis patch), where all of it is tissue.

The thumbnail is built by streaming a pyramid level in blocks and reducing each
block by an integer factor (box average, Pillow ``Image.reduce``), so a slide
without a pyramid never sits whole in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from breastcnn.errors import MissingDependencyError
from breastcnn.wsi.magnification import TilePlan, choose_level


@dataclass(frozen=True)
class TissueSettings:
    """How tissue is found. Defaults live here (the CLI exposes ``--tissue-threshold`` only)."""

    min_threshold: float = 0.05
    max_threshold: float = 0.15
    mask_pixels_per_tile: int = 16
    """Thumbnail pixels along a tile's side, at least (the resolution of its tissue fraction)..."""
    thumbnail_side: int = 1024
    """...or finer, up to this longest side (a sharper heatmap background for small slides)..."""
    thumbnail_max_side: int = 4096
    """...and never longer than this (memory stays bounded for gigapixel slides)."""
    block: int = 2048
    """Level pixels per side of a block read while building the thumbnail."""


@dataclass
class Thumbnail:
    """``pixels`` uint8 RGB ``(h, w, 3)``; one thumbnail pixel = ``downsample`` level-0 pixels."""

    pixels: np.ndarray
    downsample: float
    level: int
    factor: int


def require_skimage():
    try:
        from skimage.filters import threshold_otsu
    except ImportError as exc:
        raise MissingDependencyError(f"scikit-image is not installed: pip install 'breastcnn[slide]' ({exc})") from None
    return threshold_otsu


def thumbnail_plan(reader, tile0: int, settings: TissueSettings = TissueSettings()) -> tuple[int, int]:
    """``(level, integer reduce factor)`` of the thumbnail: see :class:`TissueSettings`."""
    longest = max(reader.dimensions)
    wanted = max(
        1.0,
        min(tile0 / settings.mask_pixels_per_tile, longest / settings.thumbnail_side),
        longest / settings.thumbnail_max_side,
    )
    level = choose_level(reader.level_downsamples, wanted)
    factor = max(1, int(math.floor(wanted / reader.level_downsamples[level] + 1e-9)))
    # the thumbnail side cap wins over the wanted resolution
    level_w, level_h = reader.level_dimensions[level]
    while max(-(-level_w // factor), -(-level_h // factor)) > settings.thumbnail_max_side:
        factor += 1
    return level, factor


def read_thumbnail(reader, tile0: int, settings: TissueSettings = TissueSettings()) -> Thumbnail:
    """Stream ``reader``'s thumbnail level in blocks, each box-reduced by the factor."""
    from PIL import Image

    level, k = thumbnail_plan(reader, tile0, settings)
    d = reader.level_downsamples[level]
    level_w, level_h = reader.level_dimensions[level]
    out = np.empty((-(-level_h // k), -(-level_w // k), 3), dtype=np.uint8)
    block = max(k, settings.block // k * k)  # a multiple of k: blocks reduce exactly like the whole level
    for by in range(0, level_h, block):
        for bx in range(0, level_w, block):
            bw, bh = min(block, level_w - bx), min(block, level_h - by)
            region = reader.read_region(round(bx * d), round(by * d), level, bw, bh)
            small = np.asarray(Image.fromarray(region).reduce(k)) if k > 1 else region
            out[by // k : by // k + small.shape[0], bx // k : bx // k + small.shape[1]] = small
    return Thumbnail(out, d * k, level, k)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` in [0, 1] of uint8 RGB ``(..., 3)``; 0 for black."""
    rgb = np.asarray(rgb, dtype=np.float32)
    top = rgb.max(axis=-1)
    spread = top - rgb.min(axis=-1)
    return np.divide(spread, top, out=np.zeros_like(top), where=top > 0)


def tissue_mask(rgb: np.ndarray, settings: TissueSettings = TissueSettings()) -> tuple[np.ndarray, float]:
    """``(mask, threshold)``: bool ``(h, w)``, True where saturation > threshold (Otsu, clipped)."""
    threshold_otsu = require_skimage()
    sat = saturation(rgb)
    if sat.size == 0 or float(sat.max() - sat.min()) < 1e-6:
        threshold = settings.min_threshold  # flat image: Otsu has nothing to split
    else:
        threshold = float(threshold_otsu(sat))
    threshold = float(np.clip(threshold, settings.min_threshold, settings.max_threshold))
    return sat > threshold, threshold


def tile_tissue_fractions(mask: np.ndarray, downsample: float, plan: TilePlan) -> np.ndarray:
    """Tissue fraction ``(rows, columns)`` float64 of every tile of ``plan``.

    A tile covers the mask pixels whose centres fall inside its level-0
    footprint (at least the pixel under its centre); the fraction is their
    mean, computed for all tiles at once from an integral image.
    """
    if plan.count == 0:
        return np.zeros((plan.rows, plan.columns))
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)

    def spans(count: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        start = np.arange(count) * plan.stride0
        first = np.ceil(start / downsample - 0.5).astype(np.int64)
        last = np.ceil((start + plan.tile0) / downsample - 0.5).astype(np.int64)
        first = np.clip(first, 0, limit - 1)
        last = np.clip(np.maximum(last, first + 1), 1, limit)
        return first, last

    c0, c1 = spans(plan.columns, mask.shape[1])
    r0, r1 = spans(plan.rows, mask.shape[0])
    total = integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0] + integral[r0][:, c0]
    area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    return total / area

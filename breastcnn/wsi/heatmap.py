"""``heatmap.png``: tile probabilities over the slide's thumbnail, with a colour bar (matplotlib Agg)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from breastcnn.plots import _figure, _save
from breastcnn.wsi.magnification import TilePlan
from breastcnn.wsi.tissue import Thumbnail

DISPLAY_MAX_SIDE = 1200
"""The thumbnail is shrunk to at most this many pixels per side for the figure."""
OVERLAY_ALPHA = 0.55
COLOUR_MAP = "RdYlBu_r"


def plot_heatmap(
    thumbnail: Thumbnail, plan: TilePlan, grid: np.ndarray, path: str | os.PathLike, title: str | None = None
) -> Path:
    """Draw the thumbnail and, over each classified tile, its P(malignant) (untiled areas stay clear).

    ``grid`` ``(rows, columns)`` float with NaN where no tile was classified;
    cell ``(r, c)`` is a ``stride0``-wide square centred on its tile (the tile's
    footprint when ``stride == tile``). Both images are placed in level-0
    coordinates, so they line up whatever their resolutions.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from PIL import Image

    pixels = thumbnail.pixels
    height, width = pixels.shape[:2]
    shrink = max(1.0, max(height, width) / DISPLAY_MAX_SIDE)
    if shrink > 1.0:
        size = (max(1, round(width / shrink)), max(1, round(height / shrink)))
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
    extent_w, extent_h = width * thumbnail.downsample, height * thumbnail.downsample
    aspect = extent_h / max(extent_w, 1.0)
    fig, ax = _figure(8.0, max(3.0, min(14.0, 8.0 * aspect)) + 0.6)
    ax.imshow(pixels, extent=(0, extent_w, extent_h, 0), interpolation="bilinear")
    if plan.count:
        overlay = np.ma.masked_invalid(np.asarray(grid, dtype=np.float64))
        offset = (plan.tile0 - plan.stride0) / 2  # cells centred on their tiles when tiles overlap
        ax.imshow(
            overlay,
            extent=(offset, offset + plan.columns * plan.stride0, offset + plan.rows * plan.stride0, offset),
            cmap=COLOUR_MAP,
            vmin=0.0,
            vmax=1.0,
            alpha=OVERLAY_ALPHA,
            interpolation="nearest",
        )
    # the bar is drawn even with no tile (its scale is fixed: probabilities)
    scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=COLOUR_MAP)
    bar = fig.colorbar(scale, ax=ax, fraction=0.046, pad=0.04, alpha=OVERLAY_ALPHA)
    bar.set_label("P(malignant)")
    ax.set_xlim(0, extent_w)
    ax.set_ylim(extent_h, 0)
    ax.set_xlabel("x (level-0 pixels)")
    ax.set_ylabel("y (level-0 pixels)")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)

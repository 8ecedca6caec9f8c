"""Tissue: saturation, the clipped Otsu mask, tile fractions, the streamed thumbnail."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from breastcnn.wsi.magnification import plan_tiles
from breastcnn.wsi.tissue import (
    TissueSettings,
    read_thumbnail,
    saturation,
    thumbnail_plan,
    tile_tissue_fractions,
    tissue_mask,
)
from tests.slides import tissue_image


def test_saturation_values():
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [200, 100, 50], [255, 0, 0]]], np.uint8)
    np.testing.assert_allclose(saturation(rgb), [[0.0, 0.0, 0.75, 1.0]])


def test_mask_of_glass_tissue_and_all_tissue(slide_deps):
    image = tissue_image()
    mask, threshold = tissue_mask(image)
    expected = np.zeros(image.shape[:2], bool)
    expected[448:896, 448:1344] = True
    expected[896:1344, 1344:1568] = True
    np.testing.assert_array_equal(mask, expected)
    assert 0.05 <= threshold <= 0.15
    # a blank slide (glass noise only): Otsu would split the noise; the floor says no tissue
    glass = np.random.default_rng(1).integers(246, 256, (64, 64, 3), dtype=np.uint8)
    assert not tissue_mask(glass)[0].any()
    # no background at all (a BreakHis-like patch): Otsu would split tissue in two; the cap keeps it all
    patch = image[448:896, 448:896]
    mask, threshold = tissue_mask(patch)
    assert threshold == 0.15 and mask.all()
    # flat images
    assert not tissue_mask(np.full((8, 8, 3), 255, np.uint8))[0].any()
    assert tissue_mask(np.full((8, 8, 3), (200, 100, 150), np.uint8))[0].all()


def _fractions_by_loop(mask, downsample, plan):
    """Reference: mean of the mask pixels whose centres fall in each tile (at least the centre pixel)."""
    out = np.zeros((plan.rows, plan.columns))
    centres_y = (np.arange(mask.shape[0]) + 0.5) * downsample
    centres_x = (np.arange(mask.shape[1]) + 0.5) * downsample
    for r in range(plan.rows):
        for c in range(plan.columns):
            y, x = r * plan.stride0, c * plan.stride0
            rows = (centres_y >= y) & (centres_y < y + plan.tile0)
            cols = (centres_x >= x) & (centres_x < x + plan.tile0)
            if not rows.any():
                rows[min(int((y + plan.tile0 / 2) // downsample), mask.shape[0] - 1)] = True
            if not cols.any():
                cols[min(int((x + plan.tile0 / 2) // downsample), mask.shape[1] - 1)] = True
            out[r, c] = mask[np.ix_(rows, cols)].mean()
    return out


@pytest.mark.parametrize(
    "downsample, tile, stride", [(28.0, 224, 224), (7.3, 224, 112), (2.0, 100, 37), (40.0, 16, 16)]
)
def test_tile_fractions_match_the_direct_definition(downsample, tile, stride):
    rng = np.random.default_rng(0)
    plan = plan_tiles((2048, 1536), [1.0], 0.5, 1.0, tile, stride)  # 2 level-0 px per model px
    mask = rng.random((int(np.ceil(1536 / downsample)), int(np.ceil(2048 / downsample)))) < 0.4
    np.testing.assert_allclose(
        tile_tissue_fractions(mask, downsample, plan), _fractions_by_loop(mask, downsample, plan)
    )


class _ArrayReader:
    """A one-level in-memory reader for the thumbnail tests."""

    def __init__(self, image):
        self.image = image
        self.dimensions = (image.shape[1], image.shape[0])
        self.level_dimensions = [self.dimensions]
        self.level_downsamples = [1.0]
        self.reads = []

    def read_region(self, x, y, level, width, height):
        self.reads.append((width, height))
        out = np.full((height, width, 3), 255, np.uint8)
        part = self.image[y : y + height, x : x + width]
        out[: part.shape[0], : part.shape[1]] = part
        return out


def test_thumbnail_is_streamed_in_blocks_and_equals_the_whole_reduce():
    image = np.random.default_rng(2).integers(0, 256, (1000, 1300, 3), dtype=np.uint8)
    reader = _ArrayReader(image)
    settings = TissueSettings(block=200, thumbnail_side=100)
    thumb = read_thumbnail(reader, tile0=224, settings=settings)
    assert (thumb.level, thumb.factor, thumb.downsample) == (0, 13, 13.0)  # 1300 / 100 px side
    np.testing.assert_array_equal(thumb.pixels, np.asarray(Image.fromarray(image).reduce(13)))
    assert max(w * h for w, h in reader.reads) <= 195 * 195  # blocks of 15 x 13 px, never the whole level


def test_thumbnail_plan_uses_the_pyramid_and_caps_the_side():
    slide = SimpleNamespace(
        dimensions=(100_000, 80_000),
        level_dimensions=[(100_000, 80_000), (25_000, 20_000), (6250, 5000)],
        level_downsamples=[1.0, 4.0, 16.0],
    )
    level, factor = thumbnail_plan(slide, tile0=448)  # 28 px per mask px wanted, 4096 side max
    assert (level, factor) == (2, 2) and 6250 / factor <= 4096  # 16 x 2 = 32 >= 100000 / 4096
    small = SimpleNamespace(
        dimensions=(2048, 1536), level_dimensions=[(2048, 1536), (1024, 768)], level_downsamples=[1.0, 2.0]
    )
    assert thumbnail_plan(small, tile0=448) == (1, 1)  # 2048 / 1024 px side

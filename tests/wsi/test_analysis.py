"""The slide layout on the generated pyramid: thumbnail, tissue mask and tile fractions, exactly."""

from __future__ import annotations

import numpy as np
import pytest

from breastcnn.errors import UserInputError
from breastcnn.wsi.analysis import SlideSettings, layout_slide, output_dirs
from breastcnn.wsi.magnification import Resolution
from breastcnn.wsi.reader import open_slide
from tests.slides import HALF_TISSUE, TISSUE


def test_layout_of_the_generated_pyramid_is_exact(pyramid_tiff):
    path, levels = pyramid_tiff
    with open_slide(path) as slide:
        layout = layout_slide(slide, Resolution(0.5, "model 200X"), SlideSettings())
    # the thumbnail is level 1 itself (2048 px / 1024 px side wanted): 2 level-0 px per mask px
    assert (layout.thumbnail.level, layout.thumbnail.factor, layout.thumbnail.downsample) == (1, 1, 2.0)
    np.testing.assert_array_equal(layout.thumbnail.pixels, levels[1])
    expected = np.zeros((768, 1024), bool)
    for y0, y1, x0, x1 in (TISSUE, HALF_TISSUE):
        expected[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2] = True
    np.testing.assert_array_equal(layout.mask, expected)
    np.testing.assert_array_equal(layout.fractions, [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0.5]])
    np.testing.assert_array_equal(layout.tissue, [5, 6, 11])
    assert layout.resolution.mpp == 0.25 and layout.plan.level == 1


def test_settings_are_validated_once():
    assert SlideSettings(tile=300).validated().stride == 300
    assert SlideSettings(tile=300, stride=100).validated().stride == 100
    with pytest.raises(UserInputError, match="--threshold must be in"):
        SlideSettings(threshold=-0.1).validated()


def test_output_folders_are_unique_per_slide(tmp_path):
    assert output_dirs(["a/s1.svs", "b/s1.tif", "b/S1.ndpi", "c/s2.png"], tmp_path) == [
        tmp_path / "s1",
        tmp_path / "s1-2",
        tmp_path / "S1-3",
        tmp_path / "s2",
    ]

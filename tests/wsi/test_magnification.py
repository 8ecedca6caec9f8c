"""Magnification: parsing, model and slide resolutions, pyramid level choice, the tile grid."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from breastcnn.errors import UserInputError
from breastcnn.wsi.magnification import (
    Resolution,
    choose_level,
    magnification_to_mpp,
    model_magnification,
    parse_magnification,
    plan_tiles,
    slide_resolution,
)


@pytest.mark.parametrize(
    "text, value", [("200X", 200.0), ("200x", 200.0), (" 40 ", 40.0), ("400", 400.0), ("12.5X", 12.5)]
)
def test_parse_magnification(text, value):
    assert parse_magnification(text) == value


@pytest.mark.parametrize("text", ["", "X", "fast", "-200X", "0X", "nanX", "infX"])
def test_parse_magnification_rejects(text):
    with pytest.raises(UserInputError, match="--mag"):
        parse_magnification(text)


def test_breakhis_magnifications_map_to_scanner_microns_per_pixel():
    # 40X/100X/200X/400X = 4x/10x/20x/40x objectives = 2.5/1/0.5/0.25 um/px
    assert [magnification_to_mpp(m) for m in (40, 100, 200, 400)] == [2.5, 1.0, 0.5, 0.25]


@pytest.mark.parametrize(
    "scale, level",
    [
        (1.0, 0),
        (1.002, 0),
        (1.99, 1),
        (2.0, 1),
        (3.9, 1),  # 4 > 3.9 x 1.02: read level 1, downsample
        (3.95, 2),
        (4.0, 2),
        (100.0, 3),
        (0.5, 0),  # coarser than every level: level 0 (upsampled)
    ],
)
def test_choose_level_is_the_coarsest_not_coarser_than_needed(scale, level):
    assert choose_level([1.0, 2.0, 4.0, 16.0], scale) == level


def test_choose_level_tolerates_openslides_inexact_downsamples():
    assert choose_level([1.0, 4.000226, 16.0018], 4.0) == 1  # a scanner pyramid is never exactly 4x
    assert choose_level([1.0, 4.000226, 16.0018], 3.0) == 0


def test_plan_tiles_at_40x_for_a_200x_model():
    plan = plan_tiles((2048, 1536), [1.0, 2.0, 4.0], slide_mpp=0.25, model_mpp=0.5, tile=224, stride=224)
    assert (plan.level, plan.downsample, plan.scale) == (1, 2.0, 2.0)
    assert (plan.tile0, plan.stride0, plan.read_size) == (448, 448, 224)
    assert (plan.columns, plan.rows, plan.count) == (4, 3, 12)  # full tiles only: 4 x 448 <= 2048 < 5 x 448
    np.testing.assert_array_equal(plan.origins([0, 3, 4, 11]), [[0, 0], [1344, 0], [0, 448], [1344, 896]])


def test_plan_tiles_reads_a_finer_level_and_overlapping_strides():
    # 3 level-0 px per model px and levels 1, 2, 4: level 1 read at 336 px, resized to the input later
    plan = plan_tiles((2048, 1536), [1.0, 2.0, 4.0], slide_mpp=0.5 / 3, model_mpp=0.5, tile=224, stride=112)
    assert (plan.level, plan.tile0, plan.stride0, plan.read_size) == (1, 672, 336, 336)
    assert (plan.columns, plan.rows) == ((2048 - 672) // 336 + 1, (1536 - 672) // 336 + 1)
    # a slide smaller than one tile has no tiles
    assert plan_tiles((100, 100), [1.0], 0.5, 0.5, 224, 224).count == 0


def test_slide_resolution_precedence():
    model = Resolution(0.5, "model")
    with_mpp = SimpleNamespace(mpp=0.2467, objective_power=40.0)
    assert slide_resolution(with_mpp, model, mpp=0.3).mpp == 0.3
    assert slide_resolution(with_mpp, model, mag="400X") == Resolution(0.25, "--mag 400X")
    assert slide_resolution(with_mpp, model).mpp == 0.2467
    assert slide_resolution(SimpleNamespace(mpp=None, objective_power=20.0), model).mpp == 0.5
    unknown = slide_resolution(SimpleNamespace(mpp=None, objective_power=None), model)
    assert unknown.mpp == 0.5 and unknown.assumed and "--mpp" in unknown.source
    with pytest.raises(UserInputError, match="pass one"):
        slide_resolution(with_mpp, model, mpp=0.5, mag="200X")
    with pytest.raises(UserInputError, match="--mpp must be a positive"):
        slide_resolution(with_mpp, model, mpp=0.0)


def test_model_magnification_from_meta_then_the_runs_split_then_default(tmp_path):
    meta_model = SimpleNamespace(meta={"magnification": "400X"})
    assert model_magnification(meta_model).mpp == 0.25
    # a run directory whose config.json points at a 100X split
    split = tmp_path / "splits" / "100X"
    split.mkdir(parents=True)
    (split / "split.json").write_text(json.dumps({"magnification": "100X"}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"split": {"dir": str(split), "hash": "x"}}))
    bare = SimpleNamespace(meta={})
    found = model_magnification(bare, run / "model.npz")
    assert found.mpp == 1.0 and not found.assumed and "split.json" in found.source
    # no record anywhere (or a split over all magnifications): 200X, said to be assumed
    (split / "split.json").write_text(json.dumps({"magnification": "all"}))
    default = model_magnification(SimpleNamespace(meta={"magnification": None}), run / "model.npz")
    assert default.mpp == 0.5 and default.assumed and "200X" in default.source


def test_training_records_the_splits_magnification_in_the_model(synth_split, small_config, tmp_path):
    from breastcnn.models import load_model
    from breastcnn.training.numpy_run import run_training

    split = synth_split  # a 200X split
    run_training(small_config(split, tmp_path / "run", epochs=1, evals_per_epoch=1))
    model = load_model(tmp_path / "run" / "model.npz")
    assert model.meta["magnification"] == "200X"
    found = model_magnification(model, tmp_path / "run" / "model.npz")
    assert found.source == "model metadata (200X)" and found.mpp == 0.5 and not found.assumed

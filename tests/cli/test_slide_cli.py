"""`breastcnn slide`: tiles, tissue, level choice, outputs and errors, on a generated pyramid and a real slide."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from breastcnn.cli.app import app
from tests.slides import make_tile_model, model_probabilities, resize_tile

HEADER = ["x", "y", "level", "width", "height", "probability", "label"]
SUMMARY = ("tiles", "tissue_tiles", "malignant_fraction", "max_probability", "seconds")


def _run(args):
    return CliRunner().invoke(app, ["slide", *map(str, args)], env={"BREASTCNN_NO_PROGRESS": "1"})


def _tiles(folder):
    text = (folder / "tiles.csv").read_text()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == HEADER
    return [dict(zip(HEADER, r, strict=True)) for r in rows[1:]]


@pytest.mark.slow  # a whole pyramid (1.6 s)
def test_generated_pyramid_exact_tiles_level_and_probabilities(pyramid_tiff, tile_model, tmp_path):
    path, levels = pyramid_tiff
    result = _run([path, "--model", tile_model, "--out", tmp_path, "--json"])
    assert result.exit_code == 0, result.output
    [summary] = json.loads(result.stdout)
    for key in SUMMARY:
        assert key in summary
    # 0.25 um/px slide, 200X model (0.5 um/px): level 1 (downsample 2), 224-px reads, 448 level-0 px per tile
    assert (summary["level"], summary["read_size"], summary["tile_level0"]) == (1, 224, 448)
    assert summary["tiles"] == 12 and summary["tissue_tiles"] == 3
    rows = _tiles(tmp_path / "generated")
    # the two tiles inside the tissue rectangle and the half-covered one (fraction 0.5 >= 0.5)
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [(448, 448), (896, 448), (1344, 896)]
    assert {(r["level"], r["width"], r["height"]) for r in rows} == {("1", "224", "224")}
    # the same tiles cut straight from the level-1 array and resized are what the model saw
    tiles = np.stack(
        [
            resize_tile(levels[1][y // 2 : y // 2 + 224, x // 2 : x // 2 + 224], 64)
            for x, y in [(448, 448), (896, 448), (1344, 896)]
        ]
    )
    expected = model_probabilities(tile_model, tiles)
    np.testing.assert_allclose([float(r["probability"]) for r in rows], expected, atol=5e-7)
    assert [r["label"] for r in rows] == ["malignant" if p >= 0.5 else "benign" for p in expected]
    assert summary["max_probability"] == pytest.approx(expected.max(), abs=1e-6)
    assert summary["malignant_fraction"] == pytest.approx(np.mean(expected >= 0.5))
    assert summary["mpp"] == 0.25 and summary["model_magnification"] == "200X"
    on_disk = json.loads((tmp_path / "generated" / "summary.json").read_text())
    assert {k: on_disk[k] for k in SUMMARY} == {k: summary[k] for k in SUMMARY}
    with Image.open(tmp_path / "generated" / "heatmap.png") as heatmap:
        assert heatmap.format == "PNG" and heatmap.width > 300


@pytest.mark.slow  # (0.8 s)
def test_engine_threads_do_not_change_the_probabilities(pyramid_tiff, tile_model, tmp_path):
    path, _ = pyramid_tiff
    for threads in ("1", "2"):
        result = _run([path, "--model", tile_model, "--out", tmp_path / threads, "--threads", threads])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "1" / "generated" / "tiles.csv").read_text() == (
        tmp_path / "2" / "generated" / "tiles.csv"
    ).read_text()


@pytest.mark.slow  # (0.7 s)
def test_tissue_threshold_stride_and_a_finer_level(pyramid_tiff, tile_model, tmp_path):
    path, _ = pyramid_tiff
    strict = _run([path, "--model", tile_model, "--out", tmp_path / "a", "--tissue-threshold", "0.6", "--json"])
    assert strict.exit_code == 0, strict.output
    assert json.loads(strict.stdout)[0]["tissue_tiles"] == 2  # the half-covered tile drops out
    # --mpp says 0.1667 um/px: 3 level-0 px per model px -> level 1 read at 336 px, resized to the input
    fine = _run(
        [path, "--model", tile_model, "--out", tmp_path / "b", "--mpp", str(0.5 / 3), "--stride", "112", "--json"]
    )
    assert fine.exit_code == 0, fine.output
    summary = json.loads(fine.stdout)[0]
    assert (summary["level"], summary["read_size"], summary["tile_level0"], summary["stride_level0"]) == (
        1,
        336,
        672,
        336,
    )
    assert summary["resolution_source"].startswith("--mpp")
    rows = _tiles(tmp_path / "b" / "generated")
    assert all(int(r["x"]) % 336 == 0 and int(r["y"]) % 336 == 0 and r["width"] == "336" for r in rows)


def test_model_magnification_from_its_metadata(pyramid_tiff, tmp_path):
    path, _ = pyramid_tiff
    model = make_tile_model(tmp_path / "m400.npz", magnification="400X")  # 0.25 um/px = the slide's level 0
    result = _run([path, "--model", model, "--out", tmp_path / "o", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)[0]
    assert (summary["level"], summary["read_size"], summary["tiles"]) == (0, 224, 9 * 6)
    assert summary["tissue_tiles"] == 8 + 2  # 4 x 2 full tiles + the 1 x 2 half-rectangle tiles
    assert "assumed" not in result.stderr


@pytest.mark.slow  # the real slide at two levels (1.5 s)
def test_real_aperio_slide(cmu_slide, tile_model, tmp_path):
    import openslide

    result = _run([cmu_slide, "--model", tile_model, "--out", tmp_path, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)[0]
    # 0.499 um/px for a 0.5 um/px model: level 0, 224-px tiles, a 9 x 13 grid
    assert (summary["level"], summary["read_size"], summary["tiles"]) == (0, 224, 117)
    assert 25 <= summary["tissue_tiles"] <= 60  # the thumbnail shows ~30% tissue
    rows = _tiles(tmp_path / "cmu_small_region")
    origins = [(int(r["x"]), int(r["y"])) for r in rows]
    assert (0, 0) not in origins and (1120, 1792) in origins  # glass corner out, a tile in the tissue in
    slide = openslide.OpenSlide(str(cmu_slide))
    tiles = np.stack(
        [resize_tile(np.asarray(slide.read_region(o, 0, (224, 224)).convert("RGB")), 64) for o in origins[:5]]
    )
    np.testing.assert_allclose(
        [float(r["probability"]) for r in rows[:5]], model_probabilities(tile_model, tiles), atol=5e-7
    )
    # the same slide said to be a 40x scan: 448 level-0 px per tile, read at level 0 and downsampled
    again = _run([cmu_slide, "--model", tile_model, "--out", tmp_path / "40x", "--mag", "400X", "--json"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)[0]
    assert (summary["level"], summary["read_size"], summary["tiles"]) == (0, 448, 4 * 6)


def test_bad_slides_are_named_and_the_others_processed(pyramid_tiff, tile_model, tmp_path):
    path, _ = pyramid_tiff
    (tmp_path / "notes.svs").write_text("not a slide")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00\x08\x00\x00\x00")
    args = [tmp_path / "notes.svs", path, tmp_path / "missing.tif", tmp_path / "broken.tif"]
    result = _run([*args, "--model", tile_model, "--out", tmp_path / "out", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert [("error" in r) for r in report] == [True, False, True, True]
    assert report[1]["tissue_tiles"] == 3
    for name in ("notes.svs", "missing.tif", "broken.tif"):
        assert sum(name in line for line in result.stderr.splitlines() if line.startswith("error:")) == 1
    assert "3 slide(s) could not be processed" in result.stderr
    assert not (tmp_path / "out" / "notes").exists() or not any((tmp_path / "out" / "notes").iterdir())


@pytest.mark.slow  # (0.9 s)
def test_outputs_are_not_overwritten_without_force_and_foreign_files_survive(pyramid_tiff, tile_model, tmp_path):
    path, _ = pyramid_tiff
    assert _run([path, "--model", tile_model, "--out", tmp_path]).exit_code == 0
    mine = tmp_path / "generated" / "notes.txt"
    mine.write_text("keep me")
    before = (tmp_path / "generated" / "tiles.csv").read_text()
    refused = _run([path, "--model", tile_model, "--out", tmp_path, "--tissue-threshold", "0.9"])
    assert refused.exit_code == 2 and "--force" in refused.stderr and "tiles.csv" in refused.stderr
    assert (tmp_path / "generated" / "tiles.csv").read_text() == before
    forced = _run([path, "--model", tile_model, "--out", tmp_path, "--tissue-threshold", "0.9", "--force"])
    assert forced.exit_code == 0, forced.output
    assert len(_tiles(tmp_path / "generated")) == 2 and mine.read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "generated").iterdir()) == [
        "heatmap.png",
        "notes.txt",
        "summary.json",
        "tiles.csv",
    ]  # no temporary file left


@pytest.mark.slow  # (0.7 s)
def test_two_slides_with_the_same_name_get_two_folders(pyramid_tiff, tile_model, tmp_path):
    import shutil

    path, _ = pyramid_tiff
    (tmp_path / "a").mkdir()
    copy = shutil.copy(path, tmp_path / "a" / "generated.tif")
    result = _run([path, copy, "--model", tile_model, "--out", tmp_path / "out", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["out"] for r in json.loads(result.stdout)] == [
        str(tmp_path / "out" / "generated"),
        str(tmp_path / "out" / "generated-2"),
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tile", "4"], "--tile must be >= 8"),
        (["--stride", "0"], "--stride must be >= 1"),
        (["--tissue-threshold", "1.5"], "--tissue-threshold must be a fraction"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--mpp", "0.5", "--mag", "200X"], "pass one"),
        (["--mag", "fast"], "--mag"),
        (["--mpp", "-1"], "--mpp must be a positive"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_options_exit_2_with_one_line(pyramid_tiff, tile_model, tmp_path, args, message):
    path, _ = pyramid_tiff
    result = _run([path, "--model", tile_model, "--out", tmp_path, *args])
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # (0.7 s)
def test_plain_png_slide_assumes_the_models_magnification(tile_model, tmp_path):
    from tests.slides import tissue_image

    Image.fromarray(tissue_image()[:900, :1000]).save(tmp_path / "photo.png")
    result = _run([tmp_path / "photo.png", "--model", tile_model, "--out", tmp_path / "o", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)[0]
    assert summary["reader"] == "image" and summary["mpp"] == 0.5 and summary["tiles"] == 4 * 4
    assert "taken to be the model's magnification" in result.stderr
    assert summary["tissue_tiles"] == 4  # x, y in {448, 672} lie in the tissue rectangle


def test_a_slide_smaller_than_a_tile_has_no_tiles(tile_model, tmp_path):
    Image.fromarray(np.full((100, 120, 3), (200, 110, 175), np.uint8)).save(tmp_path / "tiny.png")
    result = _run([tmp_path / "tiny.png", "--model", tile_model, "--out", tmp_path / "o", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)[0]
    assert (summary["tiles"], summary["tissue_tiles"]) == (0, 0)
    assert summary["malignant_fraction"] is None and summary["max_probability"] is None
    assert _tiles(tmp_path / "o" / "tiny") == [] and (tmp_path / "o" / "tiny" / "heatmap.png").is_file()


def test_missing_scikit_image_is_one_line_exit_2(pyramid_tiff, tile_model, tmp_path, monkeypatch):
    import sys

    for module in ("skimage", "skimage.filters"):  # as if never installed, even when imported before
        monkeypatch.setitem(sys.modules, module, None)
    result = _run([pyramid_tiff[0], "--model", tile_model, "--out", tmp_path])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: scikit-image is not installed: pip install 'breastcnn[slide]'")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "generated").exists()


@pytest.mark.slow  # (1.1 s)
def test_a_stain_normalised_subtype_model_on_a_real_slide(cmu_slide, tmp_path):
    """slide applies the model's stain normalisation to every tile; a subtype model's heat map is P(malignant)."""
    import openslide

    from breastcnn.data.stain import MacenkoNormaliser, normalise_batch, stain_meta
    from breastcnn.data.tasks import SUBTYPE_CLASSES
    from breastcnn.models import create_model, load_model, save_model
    from tests.he_tissue import he_tiles

    tiles_for_target, _ = he_tiles()
    model = create_model("custom", input_shape=(64, 64, 3), num_classes=8, seed=4)
    model.meta.update(
        preprocess="minmax",
        classes=list(SUBTYPE_CLASSES),
        task="subtype",
        stain=stain_meta(MacenkoNormaliser().fit(tiles_for_target[:6]), "training subset"),
    )
    path = save_model(model, tmp_path / "model.npz")
    result = _run([cmu_slide, "--model", path, "--out", tmp_path / "out", "--json"])
    assert result.exit_code == 0, result.output
    rows = _tiles(tmp_path / "out" / "cmu_small_region")
    origins = [(int(r["x"]), int(r["y"])) for r in rows][:5]
    slide = openslide.OpenSlide(str(cmu_slide))
    tiles = np.stack([resize_tile(np.asarray(slide.read_region(o, 0, (224, 224)).convert("RGB")), 64) for o in origins])
    loaded = load_model(path)
    normalised, _ = normalise_batch(loaded.spec.normaliser, tiles)
    assert not np.array_equal(normalised, tiles)
    probs = loaded.predict(normalised.astype(np.float32) / 255.0)
    np.testing.assert_allclose([float(r["probability"]) for r in rows[:5]], probs[:, 4:].sum(axis=1), atol=5e-6)

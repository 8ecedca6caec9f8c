"""A model's stain settings (``ModelSpec.stain``) and the stain-normalised image cache."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from breastcnn.data import images
from breastcnn.data.images import cache_paths, load_subset, owned_cache_files
from breastcnn.data.split import load_split
from breastcnn.data.stain import (
    HEDJitter,
    MacenkoNormaliser,
    ReinhardNormaliser,
    check_stain_meta,
    normalise_batch,
    normaliser_key,
    stain_meta,
)
from breastcnn.data.stain_options import TRAIN_TARGET, check_stain_options, training_stain
from breastcnn.errors import BreastCNNWarning, UserInputError
from breastcnn.models.spec import ModelSpec


@pytest.fixture(scope="module")
def normaliser(synth_split, synth_image_size):
    x, _ = load_subset(load_split(synth_split), "train", synth_image_size)
    return MacenkoNormaliser().fit(x)


def test_stain_meta_round_trip_is_plain_json_and_rebuilds_the_same_normaliser(normaliser):
    meta = stain_meta(normaliser, TRAIN_TARGET, HEDJitter())
    text = json.dumps(meta)  # plain JSON numbers: no pickle, no numpy types
    back, jitter = check_stain_meta(json.loads(text), "m.npz")
    assert isinstance(back, MacenkoNormaliser) and jitter == HEDJitter()
    np.testing.assert_array_equal(back.stain_matrix, normaliser.stain_matrix)
    np.testing.assert_array_equal(back.max_concentrations, normaliser.max_concentrations)
    assert meta["method"] == "macenko" and meta["target"] == TRAIN_TARGET
    assert stain_meta(None, None, None) is None
    assert stain_meta(None, "ignored", HEDJitter()) == {
        "method": "none",
        "target": None,
        "normaliser": None,
        "augment": HEDJitter().to_dict(),
    }
    spec = ModelSpec.from_meta(
        {"classes": ["benign", "malignant"], "preprocess": "caffe", "image_size": 8, "stain": meta}, framework="onnx"
    )
    np.testing.assert_array_equal(spec.normaliser.stain_matrix, normaliser.stain_matrix)
    assert ModelSpec("custom", "numpy", ("a", "b"), 8, "caffe").normaliser is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(method="vahadane"), "stain 'method' must be one of none, macenko, reinhard"),
        (lambda m: m.update(method="reinhard"), "expected method 'reinhard', got 'macenko'"),
        (lambda m: m.update(normaliser=None), "stain method 'macenko' has no fitted 'normaliser'"),
        (
            lambda m: m["normaliser"].update(stain_matrix=[[1, 0, 0], [float("nan"), 1, 0]]),
            "'stain_matrix' must be finite",
        ),
        (lambda m: m.update(extra=1), r"'stain' has unknown keys \['extra'\]"),
        (lambda m: m.update(augment={"scale": 2.0}), "HED jitter scale must be a number in"),
    ],
)
def test_bad_stain_metadata_is_one_error_naming_the_file(normaliser, change, message):
    meta = json.loads(json.dumps(stain_meta(normaliser, TRAIN_TARGET, None)))
    change(meta)
    with pytest.raises(UserInputError, match=r"^m\.npz: .*" + message):
        check_stain_meta(meta, "m.npz")


def test_normalised_images_have_their_own_cache_keyed_by_the_target(normaliser, synth_split, synth_image_size):
    split = load_split(synth_split)
    plain, y = load_subset(split, "val", synth_image_size)
    x, y2 = load_subset(split, "val", synth_image_size, normaliser=normaliser)
    np.testing.assert_array_equal(y, y2)
    expected, unchanged = normalise_batch(normaliser, plain)
    np.testing.assert_array_equal(x, expected)  # what the cache holds is the normaliser's output
    x_path, _, meta_path = cache_paths(split, "val", synth_image_size, normaliser)
    assert x_path.name.endswith(f"-{normaliser_key(normaliser)}.x.npy") and x_path.is_file()
    assert x_path != cache_paths(split, "val", synth_image_size)[0]
    meta = json.loads(meta_path.read_text())
    assert meta["stain"] == normaliser.to_dict() and meta["stain_fallback"] == unchanged
    # a second load reads the cache (nothing normalised again), another target another file
    calls = []
    original = normaliser.transform
    normaliser.transform = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        np.testing.assert_array_equal(load_subset(split, "val", synth_image_size, normaliser=normaliser)[0], x)
    finally:
        del normaliser.transform
    assert calls == []
    other = ReinhardNormaliser().fit(plain)
    assert cache_paths(split, "val", synth_image_size, other)[0] != x_path
    assert normaliser_key(other).startswith("reinhard") and len(normaliser_key(other)) == len("reinhard") + 10
    # the cache's files are the tool's own (clean-up may remove them), the plain cache is kept beside them
    owned = owned_cache_files(synth_split)
    assert f"cache/{meta_path.name}" in owned and f"cache/{x_path.name}" in owned
    assert cache_paths(split, "val", synth_image_size)[0].is_file()


def test_a_normalised_cache_of_another_target_is_rebuilt_not_trusted(normaliser, synth_split, synth_image_size):
    split = load_split(synth_split)
    load_subset(split, "test", synth_image_size, normaliser=normaliser)
    _, _, meta_path = cache_paths(split, "test", synth_image_size, normaliser)
    meta = json.loads(meta_path.read_text())
    meta["stain"]["max_concentrations"] = [1.0, 1.0]
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(BreastCNNWarning, match="does not match the stain normalisation; rebuilding"):
        x, _ = load_subset(split, "test", synth_image_size, normaliser=normaliser)
    plain, _ = load_subset(split, "test", synth_image_size)
    np.testing.assert_array_equal(x, normalise_batch(normaliser, plain)[0])


@pytest.mark.slow  # builds a tree and a cache (1.6 s)
def test_background_images_fall_back_to_the_identity_with_a_count(
    normaliser, tmp_path, make_breakhis_tree, synth_split
):
    from PIL import Image

    from breastcnn.data.split import create_split

    data = make_breakhis_tree(tmp_path / "src", patients=(3, 3), images=(2, 2), traps=False)
    for i, path in enumerate(sorted(data.rglob("*200X/*.png"))):  # white glass, and one flat colour
        Image.fromarray(np.full((30, 40, 3), 250 if i % 2 else 128, np.uint8)).save(path)
    create_split(data, "200X", out=tmp_path / "s", seed=0, ratios=(0.34, 0.33, 0.33))
    split = load_split(tmp_path / "s")
    n = len(split.subset("train"))
    for _ in range(2):  # built, then read from the cache: told both times
        with pytest.warns(
            BreastCNNWarning,
            match=rf"macenko stain normalisation left {n} of {n} train images "
            "unchanged",
        ):
            x, _ = load_subset(split, "train", 16, normaliser=normaliser)
        plain, _ = load_subset(split, "train", 16)
        np.testing.assert_array_equal(x, plain)
    reinhard = ReinhardNormaliser().fit(load_subset(load_split(synth_split), "train", 16)[0])
    for method in (normaliser, reinhard):
        with np.errstate(all="raise"):  # no NaN, no division by zero, no overflow on background
            out, unchanged = normalise_batch(method, plain)
        assert unchanged == n
        np.testing.assert_array_equal(out, plain)


def test_normalise_batch_gives_the_same_with_threads(normaliser, synth_split, synth_image_size):
    x, _ = load_subset(load_split(synth_split), "train", synth_image_size)
    one, n1 = normalise_batch(normaliser, x, jobs=1)
    two, n2 = normalise_batch(normaliser, x, jobs=2, chunk=7)
    np.testing.assert_array_equal(one, two)
    assert n1 == n2
    same, none = normalise_batch(None, x)
    assert same is x and none == 0


def test_stain_options_are_checked_naming_the_option(tmp_path):
    with pytest.raises(UserInputError, match="^--stain-norm must be one of none, macenko, reinhard, got 'vahadane'"):
        check_stain_options("vahadane", None, False)
    with pytest.raises(UserInputError, match="^--stain-target t.png: needs --stain-norm macenko or reinhard"):
        check_stain_options("none", "t.png", False)
    with pytest.raises(UserInputError, match=f"^--stain-target {tmp_path}/missing.png: no such image file"):
        check_stain_options("macenko", str(tmp_path / "missing.png"), False)


def test_training_stain_fits_on_the_training_subset_or_on_a_target_image(synth_split, synth_image_size, tmp_path):
    from PIL import Image

    split = load_split(synth_split)
    off = training_stain(split, synth_image_size)
    assert off.normaliser is None and off.jitter is None and off.meta is None
    jitter_only = training_stain(split, synth_image_size, augment=True)
    assert jitter_only.normaliser is None and jitter_only.jitter == HEDJitter()
    fitted = training_stain(split, synth_image_size, "macenko")
    x, _ = load_subset(split, "train", synth_image_size)
    expected = MacenkoNormaliser().fit(x)
    np.testing.assert_allclose(fitted.normaliser.stain_matrix, expected.stain_matrix)
    assert fitted.meta["target"] == TRAIN_TARGET
    target = tmp_path / "target.png"
    Image.fromarray(x[0]).save(target)
    from_image = training_stain(split, synth_image_size, "reinhard", str(target))
    np.testing.assert_allclose(from_image.normaliser.lab_mean, ReinhardNormaliser().fit(x[0]).lab_mean)
    assert from_image.meta["target"] == str(target)
    Image.fromarray(np.full((50, 50, 3), 255, np.uint8)).save(tmp_path / "white.png")
    with pytest.raises(UserInputError, match=r"^--stain-target .*white\.png: macenko stain target: too little"):
        training_stain(split, synth_image_size, "macenko", str(tmp_path / "white.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fitting on the training images warns about nothing
        training_stain(split, synth_image_size, "reinhard")
    assert images  # the module is imported for its cache (used above through load_subset)

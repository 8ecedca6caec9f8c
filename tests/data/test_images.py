"""Decoding (modes, bomb guard), preprocessing (vs Keras), and the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from breastcnn.data import images
from breastcnn.data.images import cache_paths, decode_image, deprocess, load_subset, preprocess
from breastcnn.data.split import create_split, load_split
from breastcnn.errors import UserInputError


def test_decode_modes_all_become_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(gray).save(tmp_path / "l.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "i16.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    rgba = np.dstack([rgb, np.full((30, 40), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # one transparent pixel -> white
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    for name in ("rgb", "l", "i16", "p", "rgba"):
        out = decode_image(tmp_path / f"{name}.png", 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8, name
    # native size: no resampling, exact values
    assert np.array_equal(np.asarray(images.open_rgb(tmp_path / "rgb.png")), rgb)
    same = images.open_rgb(tmp_path / "i16.png")
    assert np.array_equal(np.asarray(same)[..., 0], gray)  # 16-bit scaled, not clipped
    assert np.array_equal(np.asarray(images.open_rgb(tmp_path / "l.png"))[..., 1], gray)
    a = np.asarray(images.open_rgb(tmp_path / "rgba.png"))
    assert tuple(a[0, 0]) == (255, 255, 255) and np.array_equal(a[1:], rgb[1:])


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 5000)
    with pytest.raises(UserInputError, match="pixel limit"):
        decode_image(tmp_path / "big.png", 8)


def test_truncated_file_raises(tmp_path):
    Image.new("RGB", (50, 50), "red").save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes()[:40])
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError
        decode_image(tmp_path / "b.png", 8)


def test_preprocess_modes_and_inverse():
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    caffe = preprocess(x, "caffe")
    assert caffe.dtype == np.float32 and caffe.shape == x.shape
    assert np.allclose(caffe[..., 0], x[..., 2] - 103.939, atol=1e-4)  # BGR order, mean subtracted
    assert np.array_equal(deprocess(caffe, "caffe"), x)
    mm = preprocess(x, "minmax")
    assert mm.min() >= 0 and mm.max() <= 1 and np.array_equal(deprocess(mm, "minmax"), x)
    with pytest.raises(UserInputError, match="caffe"):
        preprocess(x, "torch")


def test_caffe_matches_keras_vgg16(keras):
    x = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    from keras.applications.vgg16 import preprocess_input

    expected = preprocess_input(x.astype(np.float32).copy())
    np.testing.assert_allclose(preprocess(x, "caffe"), np.asarray(expected), rtol=0, atol=1e-5)


def test_cache_built_reused_and_invalidated(breakhis_tree, tmp_path, monkeypatch):
    out = tmp_path / "s"
    create_split(breakhis_tree, "200X", out=out, seed=0)
    split = load_split(out)
    x, y = load_subset(split, "train", 16, jobs=1)
    n = len(split.subset("train"))
    assert x.shape == (n, 16, 16, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(y, split.labels("train"))
    assert np.array_equal(x[0], decode_image(split.root / split.subset("train")[0].path, 16))
    x_path = cache_paths(split, "train", 16)[0]
    assert x_path.is_file()

    # reused: no decoding on the second call
    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images, "decode_many", boom)
    x2, y2 = load_subset(split, "train", 16)
    assert np.array_equal(x2, x) and np.array_equal(y2, y)
    with pytest.raises(AssertionError, match="decoded again"):  # a new size is a new cache
        load_subset(split, "train", 24)
    monkeypatch.undo()

    # a new manifest (other seed) gets a new cache; the stale one is removed
    create_split(breakhis_tree, "200X", out=out, seed=1, force=True)
    split2 = load_split(out)
    assert split2.hash != split.hash
    x3, _ = load_subset(split2, "train", 16, jobs=2)
    assert cache_paths(split2, "train", 16)[0].is_file()
    assert len(x3) == len(split2.subset("train"))


def test_cache_rebuilt_when_manifest_edited(breakhis_tree, tmp_path):
    out = tmp_path / "s"
    create_split(breakhis_tree, "200X", out=out, seed=0)
    split = load_split(out)
    load_subset(split, "test", 16)
    text = (out / "manifest.csv").read_text().splitlines()
    dropped = [line for line in text if not line.endswith(",test")] + [line for line in text if line.endswith(",test")][
        1:
    ]
    (out / "manifest.csv").write_text("\n".join(dropped) + "\n")
    edited = load_split(out)
    x, y = load_subset(edited, "test", 16)
    assert len(x) == len(split.subset("test")) - 1 == len(y)
    stale = cache_paths(split, "test", 16)[0]
    assert not stale.exists()

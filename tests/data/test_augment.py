"""Augmentation (shape, dtype, seeding, geometry) and class balance helpers."""

from __future__ import annotations

import numpy as np
import pytest

from breastcnn.data.augment import Augmenter, class_weights, oversample_indices
from breastcnn.errors import UserInputError


def _batch(n=5, h=24, w=20):
    return np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_shape_dtype_reproducible_and_fresh_draws():
    x = _batch()
    aug = Augmenter()
    a = aug(x, np.random.default_rng(7))
    assert a.shape == x.shape and a.dtype == np.uint8
    assert np.array_equal(a, aug(x, np.random.default_rng(7)))
    rng = np.random.default_rng(7)
    first, second = aug(x, rng), aug(x, rng)
    assert not np.array_equal(first, second)  # new draws on every call (every epoch)
    assert not np.array_equal(first, x)


def test_identity_when_all_ranges_zero():
    x = _batch()
    aug = Augmenter(0, 0, 0, 0, hflip=False, vflip=False)
    for interp in ("nearest", "bilinear"):
        aug.interpolation = interp
        assert np.array_equal(aug(x, np.random.default_rng(0)), x)


def test_flips_are_exact():
    x = _batch(1)
    h = Augmenter(0, 0, 0, 0, hflip=True, vflip=False)
    seen = {h(x, np.random.default_rng(s)).tobytes() for s in range(20)}
    assert seen == {x.tobytes(), x[:, :, ::-1].tobytes()}
    v = Augmenter(0, 0, 0, 0, hflip=False, vflip=True)
    seen = {v(x, np.random.default_rng(s)).tobytes() for s in range(20)}
    assert seen == {x.tobytes(), x[:, ::-1].tobytes()}


def test_rotation_90_matches_rot90_and_shift_reflects():
    x = _batch(1, 16, 16)
    aug = Augmenter(0, 0, 0, 0, hflip=False, vflip=False)
    theta = np.pi / 2
    c = 7.5
    lin = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    m = np.concatenate([lin, (np.array([c, c]) - lin @ [c, c])[:, None]], 1)[None]
    out = aug.apply(x, m)
    # out[y, x] = in[y_in, x_in] with x_in = -y + 15, y_in = x: a 90-degree rotation
    assert np.array_equal(out[0], np.rot90(x[0], k=-1)) or np.array_equal(out[0], np.rot90(x[0], k=1))
    shift = np.array([[[1.0, 0, -3], [0, 1.0, 0]]])  # x_in = x_out - 3: left border reflected
    out = aug.apply(x, shift)
    assert np.array_equal(out[0, :, 3:], x[0, :, :-3])
    assert np.array_equal(out[0, :, :3], x[0, :, 2::-1])


def test_augmenter_rejects_bad_input():
    with pytest.raises(UserInputError, match="uint8"):
        Augmenter()(np.zeros((1, 4, 4, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(UserInputError, match="zoom"):
        Augmenter(zoom=1.5)


def test_class_weights_balanced_like_sklearn():
    y = np.array([0] * 10 + [1] * 30)
    w = class_weights(y)
    assert w == pytest.approx({0: 40 / (2 * 10), 1: 40 / (2 * 30)})
    assert class_weights(y, None) is None
    with pytest.raises(UserInputError):
        class_weights(y, "weird")


def test_oversample_indices_balances_and_keeps_all():
    y = np.array([0] * 3 + [1] * 10)
    idx = oversample_indices(y, np.random.default_rng(0))
    assert len(idx) == 20 and np.bincount(y[idx]).tolist() == [10, 10]
    assert set(idx.tolist()) == set(range(13))

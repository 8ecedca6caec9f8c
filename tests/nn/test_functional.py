import numpy as np
import pytest

from breastcnn.nn import functional as F


@pytest.mark.parametrize(
    "k,s,pad",
    [
        (3, 1, "valid"),
        (3, 2, "valid"),
        (3, 4, "valid"),
        (3, 1, "same"),
        (3, 2, "same"),
        (2, 2, "same"),
        (2, 1, "valid"),
        (3, 4, "same"),
    ],
)
def test_im2col_gemm_matches_reference(k, s, pad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 11, 10, 3)).astype(np.float32)
    w = rng.normal(size=(k, k, 3, 5)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    xp = F.pad_same(x, (k, k), s)[0] if pad == "same" else x
    cols = F.im2col(xp, k, k, s)
    ho, wo = F.conv_output_size(11, k, s, pad), F.conv_output_size(10, k, s, pad)
    fast = (cols @ w.reshape(-1, 5) + b).reshape(2, ho, wo, 5)
    ref = F.conv2d_reference(x, w, b, s, pad)
    assert ref.shape == (2, ho, wo, 5)
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)


def test_im2col_non_contiguous_input_matches():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 9, 9, 8))[..., ::2]  # channel stride != 1
    np.testing.assert_array_equal(F.im2col(x, 3, 3, 2), F.im2col(np.ascontiguousarray(x), 3, 3, 2))


@pytest.mark.parametrize("k,s", [(3, 1), (3, 2), (3, 4), (2, 2), (4, 3)])
def test_col2im_is_adjoint_of_im2col(k, s):
    # <im2col(x), c> == <x, col2im(c)> for all x, c  <=>  col2im is the transpose
    rng = np.random.default_rng(2)
    shape = (2, 13, 12, 3)
    x = rng.normal(size=shape)
    cols = F.im2col(x, k, k, s)
    c = rng.normal(size=cols.shape)
    np.testing.assert_allclose(np.sum(cols * c), np.sum(x * F.col2im(c, shape, k, k, s)), rtol=1e-10)


def test_output_sizes_follow_keras():
    assert F.conv_output_size(224, 3, 4, "valid") == 56
    assert F.conv_output_size(56, 3, 2, "valid") == 27
    assert F.conv_output_size(13, 3, 2, "valid") == 6
    assert F.conv_output_size(224, 3, 4, "same") == 56
    assert F.conv_output_size(2, 3, 1, "valid") == 0
    assert F.same_padding(10, 3, 2) == (0, 1)  # TF puts the odd pixel after
    assert F.same_padding(11, 3, 1) == (1, 1)


def test_softmax_is_stable():
    p = F.softmax(np.array([[1000.0, 0.0], [-1000.0, -1000.0]]))
    np.testing.assert_allclose(p, [[1.0, 0.0], [0.5, 0.5]])


@pytest.mark.parametrize(
    "shape,k,s",
    [
        ((2, 11, 10, 3), 3, 1),
        ((2, 11, 10, 3), 3, 2),
        ((2, 13, 12, 3), 3, 4),
        ((2, 9, 9, 2), 2, 2),
        ((2, 12, 13, 3), 4, 3),
    ],
)
def test_fused_conv_input_grad_equals_col2im(shape, k, s):
    rng = np.random.default_rng(3)
    n, h, w, c = shape
    g = rng.normal(size=(n, (h - k) // s + 1, (w - k) // s + 1, 5))
    kernel = rng.normal(size=(k, k, c, 5))
    expected = F.col2im(g.reshape(-1, 5) @ kernel.reshape(-1, 5).T, shape, k, k, s)
    np.testing.assert_allclose(F.conv_input_grad(g, kernel, shape, s), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_channel_moments_combined_over_chunks_match_numpy(offset):
    """Per-chunk moments combined with Chan's formula equal a two-pass mean / biased variance, also with a
    large mean (a one-pass E[x^2] - E[x]^2 in float32 would lose every digit at offset 1e3)."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(7, 5, 6, 3)) * [1.0, 2.0, 0.5] + offset).astype(np.float32)
    rows = x.reshape(-1, 6 * 3)  # (N*H, W*C), channel vector repeated W = 6 times
    parts = [F.channel_moments(rows[a:b], 6) for a, b in [(0, 4), (4, 5), (5, 20), (20, 35)]]
    mean, var = F.combine_moments(parts)
    ref = x.astype(np.float64).reshape(-1, 3)
    np.testing.assert_allclose(mean, ref.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(var, ref.var(axis=0), rtol=1e-4)
    assert parts[0][0] == 4 * 6 and sum(p[0] for p in parts) == ref.shape[0]

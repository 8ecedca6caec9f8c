"""predict's own plan (nn/inference.py): the conv without im2col, the conv + pool columns, the row-blocked GEMM,
the ops a model compiles to, equality with the layers' own inference forward, and the folded weights kept
only while the weights they came from stay the same."""

import numpy as np
import pytest

from breastcnn.models import create_model, load_model, save_model
from breastcnn.nn import (
    BatchNorm,
    Conv2D,
    Dense,
    Flatten,
    GlobalAveragePooling2D,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Sequential,
    Softmax,
)
from breastcnn.nn import functional as F
from breastcnn.nn import inference as I
from breastcnn.nn import parallel as P

# -- functional: conv_rows, im2col_pooled, matmul_rows ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kh, kw, s, h, w",
    [
        (3, 3, 4, 13, 11),  # the custom model's first conv: kernel < stride, remainder rows and columns dropped
        (4, 4, 4, 16, 17),  # custom-k4: kernel == stride (windows tile the image), one column left over
        (2, 3, 3, 10, 9),  # a rectangular kernel, rows overlapping (kh <= stride is not needed)
        (5, 2, 3, 12, 14),  # kernel taller than the stride
        (1, 1, 1, 5, 4),  # 1x1
        (3, 3, 3, 3, 3),  # one window
    ],
)
def test_conv_rows_matches_reference(kh, kw, s, h, w):
    rng = np.random.default_rng(kh * 100 + kw * 10 + s)
    x = rng.normal(size=(2, h, w, 3))
    kernel = rng.normal(size=(kh, kw, 3, 5))
    ref = F.conv2d_reference(x, kernel, stride=s)
    np.testing.assert_allclose(F.conv_rows(x, kernel, s), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        F.conv_rows(x.astype(np.float32), kernel.astype(np.float32), s), ref, rtol=1e-4, atol=1e-4
    )
    # the first rows and columns only (what the next layer reads)
    ho, wo = ref.shape[1:3]
    part = F.conv_rows(x, kernel, s, size=(max(ho - 1, 1), wo))
    np.testing.assert_allclose(part, ref[:, : max(ho - 1, 1)], rtol=1e-12, atol=1e-12)
    # a non-contiguous input (channel stride 2) gives the same values
    wide = np.zeros((2, h, w, 6))
    wide[..., ::2] = x
    np.testing.assert_array_equal(F.conv_rows(wide[..., ::2], kernel, s), F.conv_rows(x, kernel, s))


def test_conv_rows_refuses_overlapping_windows_and_too_many_outputs():
    x = np.zeros((1, 9, 9, 2))
    with pytest.raises(ValueError, match="stride >= kernel width"):
        F.conv_rows(x, np.zeros((3, 3, 2, 4)), 2)
    with pytest.raises(ValueError, match="3x4 outputs asked, the input gives 3x3"):
        F.conv_rows(x, np.zeros((3, 3, 2, 4)), 3, size=(3, 4))


@pytest.mark.parametrize(
    "k, s, pool, h, w", [(3, 2, 2, 56, 56), (3, 2, 2, 15, 12), (3, 1, 2, 9, 8), (2, 2, 3, 20, 19), (3, 2, 2, 7, 7)]
)
def test_im2col_pooled_groups_the_windows_by_pool_offset(k, s, pool, h, w):
    rng = np.random.default_rng(h * w)
    x = rng.normal(size=(2, h, w, 4)).astype(np.float32)
    cols = F.im2col(x, k, k, s)
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    hp, wp = ho // pool, wo // pool
    grouped = F.im2col_pooled(x, k, k, s, pool)
    assert grouped.shape == (pool * pool, 2 * hp * wp, k * k * 4)
    by_pixel = cols.reshape(2, ho, wo, -1)
    for py in range(pool):
        for px in range(pool):
            expected = by_pixel[:, py : hp * pool : pool, px : wp * pool : pool].reshape(-1, k * k * 4)
            np.testing.assert_array_equal(grouped[py * pool + px], expected)


@pytest.mark.parametrize("m, k, n", [(676, 144, 32), (37, 5, 3), (3000, 27, 16), (1, 2304, 128)])
def test_matmul_rows_equals_matmul(m, k, n):
    rng = np.random.default_rng(m)
    a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)
    out = np.full((m, n), np.nan, np.float32)
    assert F.matmul_rows(a, b, out=out) is out
    np.testing.assert_allclose(out, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        F.matmul_rows(a.astype(np.float64), b.astype(np.float64)), a.astype(np.float64) @ b, rtol=1e-12
    )


# -- the plan ----------------------------------------------------------------------------------------------------------


def test_custom_model_plan():
    m = create_model("custom", input_shape=(224, 224, 3), seed=0)
    plan = m.predict_plan()
    assert [repr(op) for op in plan.ops] == [
        "ConvOp(conv2d_1, batch_norm_1, relu_1)",
        "ConvOp(conv2d_2, batch_norm_2, relu_2, max_pool2d_1)",
        "ConvOp(conv2d_3, batch_norm_3, relu_3)",
        "DenseOp(flatten_1, dense_1, relu_4)",
        "DenseOp(dense_2)",
        "LayerOp(softmax_1)",
    ]
    conv1, conv2, conv3 = plan.ops[:3]
    assert conv1.rows and not conv2.rows and not conv3.rows  # 3x3 stride 4: no im2col
    # the pool reads 26x26 of the second conv's 27x27 outputs, which read 53x53 of the first conv's 56x56
    assert (conv2.size, conv2.output_shape) == ((26, 26), (13, 13, 32))
    assert (conv1.size, conv1.output_shape) == ((53, 53), (53, 53, 16))
    assert conv3.size == (6, 6)
    assert [op.hands_bias for op in plan.ops[:3]] == [True, True, False]  # conv3 feeds Dense, not a conv
    assert plan.image_ops == 3 and plan.chunk == 4  # four 224x224 images per chunk
    assert m.predict_plan() is plan  # compiled once, kept


def _moving_stats(m, seed=1):
    """Non-trivial BatchNorm statistics and affine parameters, biases on every layer that has one."""
    rng = np.random.default_rng(seed)
    for layer in m.layers:
        if isinstance(layer, BatchNorm):
            c = layer.params["gamma"].shape[0]
            layer.params["gamma"][...] = rng.uniform(0.5, 2.0, c)
            layer.params["beta"][...] = rng.normal(size=c)
            layer.state["moving_mean"][...] = rng.normal(size=c)
            layer.state["moving_variance"][...] = rng.uniform(0.2, 3.0, c)
        elif "b" in layer.params:
            layer.params["b"][...] = rng.normal(size=layer.params["b"].shape)
    return m


def _reference(m, x, stop=None):
    """The inference forward of layers ``0..stop-1`` one by one (each layer's own code, no plan)."""
    out = x
    for layer in m.layers[:stop]:
        out = layer.forward(out, training=False, cache=False)
    return out


MODELS = {
    # first conv kernel < stride (conv_rows, bias handed over), conv + BN + ReLU + pool, a pool that drops a row
    "custom-like": (
        lambda: [
            Conv2D(6, 3, strides=4),
            BatchNorm(),
            ReLU(),
            Conv2D(8, 3, strides=2),
            BatchNorm(),
            ReLU(),
            MaxPool2D(2),
            Conv2D(5, 3, strides=2),
            BatchNorm(),
            ReLU(),
            Flatten(),
            Dense(7),
            ReLU(),
            Dense(3),
            Softmax(),
        ],
        (61, 59, 3),
    ),
    # kernel == stride, a conv without bias and without BatchNorm (ReLU fused), a conv + pool without ReLU
    "k4-no-bias": (
        lambda: [
            Conv2D(4, 4, strides=4, use_bias=False),
            ReLU(),
            Conv2D(6, 3, strides=1),
            BatchNorm(),
            MaxPool2D(2),
            Conv2D(3, 2, strides=2),
            Flatten(),
            Dense(2),
        ],
        (34, 37, 3),
    ),
    # "same" padding (no crop, no bias hand-over into it), LeakyReLU (not fused), a lone BatchNorm + ReLU step,
    # a pool with stride != pool, global average pooling
    "same-leaky": (
        lambda: [
            Conv2D(4, 3, strides=2, padding="same"),
            BatchNorm(),
            LeakyReLU(0.1),
            Conv2D(5, 3, padding="same", use_bias=False),
            ReLU(),
            BatchNorm(),
            ReLU(),
            MaxPool2D(3, strides=2),
            Conv2D(6, 3),
            GlobalAveragePooling2D(),
            Dense(4),
            BatchNorm(),
            ReLU(),
            Dense(2),
            Softmax(),
        ],
        (17, 16, 3),
    ),
    # "same"-padded convs whose outputs the next valid conv reads only in part (im2col and conv_rows paths)
    "same-cropped": (
        lambda: [
            Conv2D(4, 3, strides=2, padding="same"),
            ReLU(),
            Conv2D(5, 3, strides=2),
            ReLU(),
            Conv2D(5, 2, strides=2, padding="same"),
            BatchNorm(),
            ReLU(),
            Conv2D(3, 2, strides=2),
            Conv2D(2, 1),
            Flatten(),
            Dense(2),
        ],
        (28, 27, 3),
    ),
    # a conv straight into a pool, then a conv whose input is cropped by the next conv
    "pool-first": (
        lambda: [
            Conv2D(3, 2, strides=3),
            MaxPool2D(2),
            Conv2D(4, 3, strides=2),
            ReLU(),
            Conv2D(2, 2, strides=2),
            ReLU(),
            Flatten(),
            Dense(2),
        ],
        (47, 50, 2),
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_predict_equals_the_layers_inference_forward(name, dtype):
    layers, shape = MODELS[name]
    m = _moving_stats(Sequential(layers(), input_shape=shape, seed=0)).astype(dtype)
    x = np.random.default_rng(2).normal(size=(5, *shape)).astype(dtype)
    ref = _reference(m, x)
    got = m.predict(x, batch_size=2)
    assert got.dtype == np.float32
    if dtype == np.float64:  # the same function up to float64 rounding (predict returns float32)
        np.testing.assert_allclose(got, ref.astype(np.float32), rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(
            m.predict_plan().run(x, m.predict_plan().prepare(m.dtype)), ref, rtol=1e-9, atol=1e-12
        )
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    unfused = _moving_stats(Sequential(layers(), input_shape=shape, seed=0)).astype(dtype)
    unfused.fuse = False  # no plan: every layer's own cache-free forward
    np.testing.assert_allclose(unfused.predict(x, batch_size=2), got, rtol=1e-4, atol=1e-6)


def test_crops_and_bias_hand_over_follow_the_padding():
    layers, shape = MODELS["same-cropped"]
    plan = Sequential(layers(), input_shape=shape, seed=0).predict_plan()
    c1, c2, c3, c4, c5 = plan.ops[:5]
    assert [op.rows for op in plan.ops[:5]] == [False, False, True, True, True]
    # computed / full conv outputs: the valid 3x3/2 conv reads 13x13 of the "same" conv's 14x14, the valid
    # 2x2/2 conv 2x2 of the "same" 2x2/2 conv's 3x3
    assert [(op.size, op.conv.output_shape[:2]) for op in plan.ops[:5]] == [
        ((13, 13), (14, 14)),
        ((6, 6), (6, 6)),
        ((2, 2), (3, 3)),
        ((1, 1), (1, 1)),
        ((1, 1), (1, 1)),
    ]
    # a conv hands its bias over only to a valid conv (a "same" conv's padding zeros would not be shifted)
    assert [op.hands_bias for op in plan.ops[:5]] == [True, False, True, True, False]


@pytest.mark.parametrize("arch", ["custom", "custom-k4"])
def test_custom_models_predict_equals_forward(arch):
    m = _moving_stats(create_model(arch, input_shape=(64, 64, 3), seed=0).astype(np.float64))
    x = np.random.default_rng(3).normal(0, 40, size=(3, 64, 64, 3))
    logits = m.predict_plan().run(x, m.predict_plan().prepare(m.dtype))
    ref = _reference(m, x)
    np.testing.assert_allclose(logits, ref, rtol=1e-9, atol=1e-12)


# -- threads ----------------------------------------------------------------------------------------------------------


def test_predict_is_bit_identical_for_1_and_2_threads(monkeypatch):
    monkeypatch.setattr(I, "chunk_size", lambda bytes_per_sample, budget=0: 1)  # one image per chunk
    m = _moving_stats(create_model("custom", input_shape=(64, 64, 3), seed=0))
    x = np.random.default_rng(4).normal(0, 40, size=(7, 64, 64, 3)).astype(np.float32)
    outs = []
    for threads in (1, 2):
        m.threads = threads
        with P.observe_chunks() as log:
            outs.append(m.predict(x, batch_size=7))
        assert log.calls >= 1 and log.max_threads == threads
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(m.predict(x, batch_size=3, jobs=2), m.predict(x, batch_size=3, jobs=1))


def test_a_batch_that_fits_one_chunk_runs_as_one_and_a_larger_one_on_both_threads():
    m = create_model("custom", input_shape=(64, 64, 3), seed=0)
    m.threads = 2
    x = np.zeros((8, 64, 64, 3), np.float32)
    assert m.predict_plan().chunk >= 8
    with P.observe_chunks() as log:
        m.predict(x[:1], batch_size=1)
        m.predict(x, batch_size=8)
    assert log.calls == 0  # no chunk bookkeeping: done before a second thread would wake up
    big = create_model("custom", input_shape=(224, 224, 3), seed=0)
    big.threads = 2
    images = np.random.default_rng(0).normal(0, 50, size=(8, 224, 224, 3)).astype(np.float32)
    with P.observe_chunks() as log:
        both = big.predict(images, batch_size=8)
    assert big.predict_plan().chunk == 4 and log.calls == 1 and log.max_threads == 2
    big.threads = 1
    np.testing.assert_array_equal(big.predict(images, batch_size=8), both)  # the chunks do not depend on threads


# -- the folded weights are kept while their sources stay the same ----------------------------------------------------


@pytest.fixture
def folds(monkeypatch):
    calls = []
    orig = I.fold_batchnorm
    monkeypatch.setattr(I, "fold_batchnorm", lambda conv, bn: (calls.append(conv.name), orig(conv, bn))[1])
    return calls


def _small_custom(seed=0):
    return _moving_stats(create_model("custom", input_shape=(56, 56, 3), seed=seed), seed=seed + 1)


def _fresh_predict(m, x):
    """predict of a new model with ``m``'s weights: nothing kept from before."""
    twin = create_model("custom", input_shape=(56, 56, 3), seed=9)
    twin.set_weights(m.get_weights())
    return twin.predict(x)


def test_folding_is_kept_between_calls(folds):
    m = _small_custom()
    x = np.random.default_rng(5).normal(0, 40, size=(4, 56, 56, 3)).astype(np.float32)
    first = m.predict(x, batch_size=1)
    assert folds == ["conv2d_1", "conv2d_2", "conv2d_3"]  # once for four batches
    np.testing.assert_array_equal(m.predict(x), m.predict(x))
    assert len(folds) == 3
    np.testing.assert_allclose(first, _reference(m, x), rtol=1e-4, atol=1e-6)


def _logits(m, x):
    """The plan's output before its final Softmax (probabilities saturate), checked against the layers."""
    plan = m.predict_plan()
    out = x
    for op, weights in zip(plan.ops[:-1], plan.prepare(m.dtype)[:-1], strict=True):
        out = op.run(out, weights)
    np.testing.assert_allclose(
        out, _reference(m, x, m.logits_index + 1), rtol=1e-4, atol=1e-5 * float(np.abs(out).max())
    )
    return out


def _changes():
    """Ways the weights change after a predict; each must be seen by the next predict."""

    def set_weights(m):
        m.set_weights(_small_custom(seed=3).get_weights())

    def train(m):
        rng = np.random.default_rng(6)
        m.compile()
        m.train_on_batch(rng.normal(0, 40, size=(4, 56, 56, 3)).astype(np.float32), np.array([0, 1, 0, 1]))

    def in_place_kernel(m):
        m.layers[3].params["W"][0, 0, 0, 0] += 0.5  # the second conv's kernel, one entry

    def in_place_moving_variance(m):
        m.layers[8].state["moving_variance"][...] *= 3.0

    def replaced_gamma(m):
        m.layers[1].params["gamma"] = m.layers[1].params["gamma"] * 0.5

    def epsilon(m):
        m.layers[4].epsilon = 0.5

    def float64(m):
        m.astype(np.float64)

    return [set_weights, train, in_place_kernel, in_place_moving_variance, replaced_gamma, epsilon, float64]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_a_weight_change_after_predict_is_seen(change, folds):
    m = _small_custom()
    x = np.random.default_rng(7).normal(0, 40, size=(3, 56, 56, 3)).astype(np.float32)
    before = _logits(m, x.astype(m.dtype))
    m.predict(x)
    folded = len(folds)
    change(m)
    after = _logits(m, x.astype(m.dtype))
    assert len(folds) == folded + 3  # folded again
    if change.__name__ == "float64":  # same values, now computed in float64
        assert after.dtype == np.float64 and m.predict_plan().prepare(m.dtype)[0][0].dtype == np.float64
    else:
        assert not np.allclose(after, before, rtol=1e-3, atol=1e-6)  # the change matters, predict follows it
    np.testing.assert_allclose(m.predict(x), _fresh_predict(m, x), rtol=1e-5, atol=1e-7)


def test_a_loaded_model_predicts_like_the_saved_one(tmp_path):
    m = _small_custom()
    x = np.random.default_rng(8).normal(0, 40, size=(3, 56, 56, 3)).astype(np.float32)
    before = m.predict(x)
    save_model(m, tmp_path / "model.npz")
    loaded = load_model(tmp_path / "model.npz")
    np.testing.assert_array_equal(loaded.predict(x), before)

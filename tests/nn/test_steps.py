"""The step plan (nn/steps.py): which layers fuse, when the plan is compiled again, and the fixed return types
of the hooks between layers. Values of the fused path against separate layers are in test_fused.py."""

import numpy as np
import pytest

from breastcnn.models import create_model
from breastcnn.nn import BatchNorm, Conv2D, Dense, Flatten, LeakyReLU, MaxPool2D, ReLU, Sequential, Softmax
from breastcnn.nn.parallel import ChunkResults, Pending, engine_threads
from breastcnn.nn.steps import BNReLU, ConvBNReLU, Single, compile_steps


def _names(model):
    return [repr(s) for s in model.steps]


def test_custom_model_compiles_to_three_conv_steps():
    m = create_model("custom", input_shape=(64, 64, 3), seed=0)
    assert _names(m) == [
        "ConvBNReLU(conv2d_1, batch_norm_1, relu_1)",
        "ConvBNReLU(conv2d_2, batch_norm_2, relu_2)",
        "Single(max_pool2d_1)",
        "ConvBNReLU(conv2d_3, batch_norm_3, relu_3)",
        "Single(flatten_1)",
        "Single(dense_1)",
        "Single(relu_4)",
        "Single(dense_2)",
        "Single(softmax_1)",
    ]
    assert [s.start for s in m.steps] == [0, 3, 6, 7, 10, 11, 12, 13, 14]
    # the first conv reads the image (nothing pending), the second conv and the pool take the chunks of the
    # BatchNorm (+ ReLU) before them, the dense layers do not work in chunks
    assert [s.hooked for s in m.steps] == [True, True, True, True, False, False, False, False, False]
    # the leaky variant: the activation is not fused into the BatchNorm pass
    leaky = create_model("custom", input_shape=(64, 64, 3), seed=0, activation="leaky_relu")
    assert _names(leaky)[:2] == ["ConvBNReLU(conv2d_1, batch_norm_1)", "Single(leaky_relu_1)"]


def test_patterns_first_match_wins():
    layers = [
        BatchNorm(),
        ReLU(),
        Conv2D(2, 3),
        BatchNorm(),
        BatchNorm(),
        ReLU(),
        Conv2D(2, 1),
        ReLU(),
        Conv2D(2, 1, padding="same"),
        BatchNorm(),
        Flatten(),
        Dense(2),
    ]
    m = Sequential(layers, input_shape=(9, 9, 3))
    assert [type(s) for s in m.steps] == [BNReLU, ConvBNReLU, BNReLU, Single, Single, ConvBNReLU, Single, Single]
    assert [len(s.layers) for s in m.steps] == [2, 2, 2, 1, 1, 2, 1, 1]
    # the "same"-padded conv pads a copy of its input: it cannot write a pending input in its chunks
    assert [s.hooked for s in m.steps] == [False, True, False, True, False, False, False, False]
    assert [type(s) for s in compile_steps(m.layers, fuse=False)] == [Single] * len(layers)


class _PlainSubclass(BatchNorm):
    """A subclass that changes nothing the steps bypass: it keeps the fused path."""


class _ShiftedBatchNorm(BatchNorm):
    """A subclass whose forward differs: a fused step would skip it, so it must run alone."""

    def forward(self, x, training=False, cache=True):
        return super().forward(x, training, cache) + np.asarray(0.5, x.dtype)


def _conv_bn_model(bn_cls, seed=0):
    layers = [Conv2D(4, 3, strides=2), bn_cls(), ReLU(), Conv2D(3, 3), bn_cls(), ReLU(), Flatten(), Dense(2)]
    return Sequential(layers, input_shape=(15, 15, 3), seed=seed)


def test_subclass_keeps_the_fused_path_unless_it_overrides_forward():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 15, 15, 3)).astype(np.float32)
    base, sub = _conv_bn_model(BatchNorm), _conv_bn_model(_PlainSubclass)
    assert [type(s) for s in sub.steps] == [ConvBNReLU, ConvBNReLU, Single, Single]
    np.testing.assert_array_equal(sub.logits(x, training=True), base.logits(x, training=True))
    g = rng.normal(size=(5, 2)).astype(np.float32)
    np.testing.assert_array_equal(sub.backward(g), base.backward(g))
    np.testing.assert_array_equal(sub.predict(x), base.predict(x))

    shifted = _conv_bn_model(_ShiftedBatchNorm)
    assert [type(s) for s in shifted.steps] == [Single] * 8
    plain = _conv_bn_model(_ShiftedBatchNorm)
    plain.fuse = False
    out = shifted.logits(x, training=True)
    np.testing.assert_array_equal(out, plain.logits(x, training=True))
    # and the override really ran: without the shift the logits differ
    assert not np.allclose(out, base.logits(x, training=True))
    np.testing.assert_array_equal(shifted.predict(x), plain.predict(x))


def test_plan_follows_the_layer_list_and_fuse():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 15, 15, 3)).astype(np.float32)
    m = _conv_bn_model(BatchNorm)
    before = m.steps
    assert m.steps is before  # compiled once, kept
    m.fuse = False
    assert [type(s) for s in m.steps] == [Single] * 8
    m.fuse = True
    assert [type(s) for s in m.steps] == [ConvBNReLU, ConvBNReLU, Single, Single]
    # replace the first ReLU: the plan is compiled again and the new layer runs
    leaky = LeakyReLU(0.2, name="leaky")
    leaky.build(m.layers[2].input_shape, rng)
    m.layers[2] = leaky
    assert [repr(s) for s in m.steps][:2] == ["ConvBNReLU(conv2d_1, batch_norm_1)", "Single(leaky)"]
    reference = _conv_bn_model(BatchNorm)
    reference.layers[2] = leaky
    reference.fuse = False
    np.testing.assert_allclose(m.predict(x), reference.predict(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.logits(x, training=True), reference.logits(x, training=True), rtol=1e-4, atol=1e-5)


def test_layer_hooks_have_fixed_return_types():
    rng = np.random.default_rng(2)
    conv = Conv2D(4, 3)
    conv.build((10, 10, 3), rng)
    bn = BatchNorm()
    bn.build((8, 8, 4), rng)
    x = rng.normal(size=(6, 10, 10, 3)).astype(np.float32)
    seen = ChunkResults(lambda out, a, b: (a, b))
    with engine_threads(2):
        y = conv.forward(x, training=True, after=seen)
        assert isinstance(y, np.ndarray) and y.shape == (6, 8, 8, 4)
        assert seen.ordered()[0][0] == 0 and seen.ordered()[-1][1] == 6  # every image, in chunk order
        out = bn.forward_deferred(y, training=True, relu=True)
        assert isinstance(out, Pending) and out.fill is not None
        flat = y.reshape(-1, 4).astype(np.float64)
        expected = np.maximum((flat - flat.mean(0)) / np.sqrt(flat.var(0) + bn.epsilon), 0)
        np.testing.assert_allclose(out.complete().reshape(-1, 4), expected, rtol=1e-4, atol=1e-5)
        g = rng.normal(size=y.shape).astype(np.float32)
        assert bn.backward_deferred(g, need_input_grad=False) is None and "gamma" in bn.grads
        dx = bn.backward_deferred(g)
        assert isinstance(dx, Pending)
        np.testing.assert_array_equal(dx.complete(), bn.backward(g))
        sums = ChunkResults(lambda d, a, b: float(d[a:b].sum()))
        dconv = conv.backward(g, need_input_grad=False, after=sums)  # an after hook needs the input gradient
        assert isinstance(dconv, np.ndarray) and dconv.shape == x.shape
        assert sum(sums.ordered()) == pytest.approx(float(dconv.sum()), rel=1e-4)


def test_pending_fills_once_by_whoever_takes_it():
    calls = []
    arr = np.zeros((6, 2))

    def fill(a, b):
        calls.append((a, b))
        arr[a:b] = 1.0

    p = Pending(arr, fill, chunk=2)
    array, taken = p.take()
    assert array is arr and taken is fill and p.fill is None
    assert p.complete() is arr and calls == []  # taken: the consumer fills it, complete() does nothing
    q = Pending(arr, fill, chunk=4)
    q.complete()
    q.complete()
    assert sorted(calls) == [(0, 3), (3, 6)] and arr.min() == 1.0


def test_overlapping_pool_completes_the_pending_batchnorm_pass():
    """A BatchNorm before an overlapping pool (stride < pool) completes its own pass: no hooks there."""
    layers = [
        Conv2D(3, 3),
        BatchNorm(),
        ReLU(),
        MaxPool2D(3, strides=2),
        Conv2D(2, 3),
        BatchNorm(),
        ReLU(),
        MaxPool2D(2),
        Flatten(),
        Dense(2),
        Softmax(),
    ]
    m = Sequential(layers, input_shape=(21, 21, 3), seed=3).astype(np.float64)
    plain = Sequential(
        [
            type(layer)(**{k: v for k, v in layer.get_config().items() if k not in ("class", "name")})
            for layer in layers
        ],
        input_shape=(21, 21, 3),
        seed=3,
    ).astype(np.float64)
    plain.fuse = False
    assert [s.hooked for s in m.steps] == [True, False, True, True, False, False, False]
    x = np.random.default_rng(4).normal(size=(5, 21, 21, 3))
    for model in (m, plain):
        model.logits(x, training=True)
    np.testing.assert_allclose(m.logits(x, training=True), plain.logits(x, training=True), rtol=1e-9, atol=1e-12)
    g = np.random.default_rng(5).normal(size=(5, 2))
    np.testing.assert_allclose(m.backward(g), plain.backward(g), rtol=1e-9, atol=1e-12)
    for key, value in plain.gradients().items():
        np.testing.assert_allclose(m.gradients()[key], value, rtol=1e-9, atol=1e-12, err_msg=key)

"""Sequential's fused path (the steps of nn/steps.py: BatchNorm + ReLU fused, BatchNorm work inside the
neighbouring layers' chunks, Conv2D + BatchNorm folded in predict) equals the separate layers and passes
finite differences."""

from collections import Counter

import numpy as np
import pytest

from breastcnn.nn import BatchNorm, Conv2D, Dense, Flatten, ReLU, Sequential, Softmax, inference
from breastcnn.nn import parallel as P
from breastcnn.nn.parallel import engine_threads
from breastcnn.nn.steps import BNReLU, ConvBNReLU, Single
from tests.nn.gradcheck import assert_close_grads, numeric_grad, sample_indices


def _model(seed=0, shape=(12, 12, 3), frozen_bn=False):
    layers = [
        Conv2D(4, 3, strides=2),
        BatchNorm(),
        ReLU(),
        Conv2D(6, 3),
        BatchNorm(),
        ReLU(),
        Flatten(),
        Dense(5),
        BatchNorm(),
        ReLU(),
        Dense(2),
        Softmax(),
    ]
    m = Sequential(layers, input_shape=shape, seed=seed)
    if frozen_bn:
        m.layers[4].trainable = False
    return m


def _unfused(m):
    m.fuse = False  # instance override: every layer runs on its own
    return m


def _close(a, b, dtype, scale=None, err_msg=""):
    """Fused and separate layers sum in other orders (per-chunk moments, sums in other chunks): equal up
    to rounding. ``scale``: magnitude of the quantity (a conv bias before a BatchNorm has a gradient
    that is exactly 0 in theory, so only rounding noise relative to the other gradients is left)."""
    scale = float(np.abs(b).max()) if scale is None else scale
    if dtype == np.float64:
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * scale, err_msg=err_msg)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale, err_msg=err_msg)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("frozen_bn", [False, True])
@pytest.mark.parametrize("big", [False, True])
def test_fused_equals_unfused(training, frozen_bn, big, dtype, monkeypatch):
    fills = Counter()  # pending BatchNorm passes: written in the consumer's chunks (take) or on their own
    for name in ("take", "complete"):
        orig = getattr(P.Pending, name)
        monkeypatch.setattr(
            P.Pending,
            name,
            lambda self, _o=orig, _n=name: (fills.update([_n] if self.fill is not None else []), _o(self))[1],
        )
    shape = (60, 60, 3) if big else (12, 12, 3)  # big: tiled BN views and several chunks
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, *shape)).astype(dtype)
    fused = _model(shape=shape, frozen_bn=frozen_bn).astype(dtype)
    plain = _unfused(_model(shape=shape, frozen_bn=frozen_bn).astype(dtype))
    assert [type(s) for s in fused.steps] == [ConvBNReLU, ConvBNReLU, Single, Single, BNReLU, Single, Single]
    assert [type(s) for s in plain.steps] == [Single] * len(plain.layers)
    for _ in range(2):  # twice: running statistics updated from updated ones
        with engine_threads(2):
            fills.clear()
            out_f = fused.logits(x, training=training)
            forward_fills = fills.copy()
            out_p = plain.logits(x, training=training)
            g = rng.normal(size=out_f.shape).astype(dtype)
            fills.clear()
            dx_f = fused.backward(g)
            backward_fills = fills.copy()
            dx_p = plain.backward(g)
        # forward: only the first BatchNorm has a hooked layer after it (a conv; the others feed Flatten and
        # Dense); backward: both conv BatchNorms have their conv below them, the dense one completes alone
        assert forward_fills == Counter(take=1, complete=2)
        assert backward_fills == Counter(take=2, complete=1)
        _close(out_f, out_p, dtype)
        _close(dx_f, dx_p, dtype)
        grad_scale = max((float(np.abs(v).max()) for v in plain.gradients().values()), default=1.0)
        for (k, a), (_, b) in zip(fused.gradients().items(), plain.gradients().items(), strict=True):
            _close(a, b, dtype, scale=grad_scale, err_msg=k)
        for (k, a), (_, b) in zip(fused.buffers().items(), plain.buffers().items(), strict=True):
            _close(a, b, dtype, err_msg=k)
    assert [layer.get_config() for layer in fused.layers] == [layer.get_config() for layer in plain.layers]


def test_fused_is_deterministic_over_threads():
    """The fused chunk hooks keep the engine's promise: bit-identical results for 1 and 2 threads."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 60, 60, 3)).astype(np.float32)
    results = []
    for threads in (1, 2):
        m = _model(shape=(60, 60, 3))
        with engine_threads(threads):
            out = m.logits(x, training=True)
            dx = m.backward(np.ones_like(out))
        results.append((out, dx, m.gradients(), m.buffers()))
    (o1, d1, g1, b1), (o2, d2, g2, b2) = results
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(d1, d2)
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k], err_msg=k)
    for k in b1:
        np.testing.assert_array_equal(b1[k], b2[k], err_msg=k)


def test_fused_forward_leaves_caches_for_the_separate_backward():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 12, 12, 3)).astype(np.float32)
    fused, plain = _model(), _unfused(_model())
    fused.logits(x, training=True), plain.logits(x, training=True)
    rng.normal(size=(3, 2))  # a draw the gradients below were written after
    # starts/stops between a BatchNorm and its ReLU run the lone layer on its own
    for start, stop in [(2, 2), (2, 1), (5, 2), (4, 3), (10, 3), (10, 0), (9, 1)]:
        gs = rng.normal(size=fused.layers[start].output_shape).astype(np.float32)
        gs = np.broadcast_to(gs, (3, *gs.shape)).copy()
        _close(fused.backward(gs, start=start, stop=stop), plain.backward(gs, start=start, stop=stop), np.float32)
        grad_scale = max((float(np.abs(v).max()) for v in plain.gradients().values()), default=1.0)
        for (k, a), (_, b) in zip(fused.gradients().items(), plain.gradients().items(), strict=True):
            _close(a, b, np.float32, scale=grad_scale, err_msg=k)
    acts_f = fused.activations(x, training=False)
    acts_p = plain.activations(x, training=False)
    assert len(acts_f) == len(fused.layers)
    for a, b in zip(acts_f, acts_p, strict=True):  # moving statistics differ by rounding (training step above)
        _close(a, b, np.float32)


def test_fused_path_finite_differences():
    rng = np.random.default_rng(3)
    m = _model().astype(np.float64)
    x = rng.normal(size=(4, 12, 12, 3))
    proj = rng.normal(size=(4, 2))

    def loss():
        return float(np.sum(m.logits(x, training=True) * proj))

    m.logits(x, training=True)
    dx = m.backward(proj)
    idx = sample_indices(x.shape, rng, 20)
    assert_close_grads([dx[i] for i in idx], numeric_grad(loss, x, idx), 1e-5, 1e-7, "dL/dx")
    m.logits(x, training=True)
    m.backward(proj)
    grads = {k: v.copy() for k, v in m.gradients().items()}
    for key, p in m.parameters().items():
        idx = sample_indices(p.shape, rng, 10)
        assert_close_grads([grads[key][i] for i in idx], numeric_grad(loss, p, idx), 1e-5, 1e-7, key)


def _with_moving_stats(m, rng):
    """Give every BatchNorm non-trivial moving statistics and affine parameters (folding must use them)."""
    for layer in m.layers:
        if isinstance(layer, BatchNorm):
            c = layer.params["gamma"].shape[0]
            layer.params["gamma"][...] = rng.uniform(0.5, 2.0, c)
            layer.params["beta"][...] = rng.normal(size=c)
            layer.state["moving_mean"][...] = rng.normal(size=c)
            layer.state["moving_variance"][...] = rng.uniform(0.2, 3.0, c)
    return m


@pytest.mark.parametrize("padding, use_bias", [("valid", True), ("same", False)])
def test_predict_folds_batchnorm_into_conv(padding, use_bias, monkeypatch):
    """predict() runs Conv2D + BatchNorm (+ ReLU) as one conv with folded weights (nn/inference.py), folded
    once and kept: same probabilities as the separate inference layers, whether a ReLU follows or not."""
    rng = np.random.default_rng(4)
    layers = [
        Conv2D(4, 3, strides=2, padding=padding, use_bias=use_bias),
        BatchNorm(),
        ReLU(),
        Conv2D(6, 3, padding=padding, use_bias=use_bias),
        BatchNorm(),  # no ReLU after this one
        Flatten(),
        Dense(2),
        Softmax(),
    ]
    m = _with_moving_stats(Sequential(layers, input_shape=(13, 13, 3), seed=0), rng)
    x = rng.normal(size=(5, 13, 13, 3)).astype(np.float32)
    folded = []
    orig = inference.fold_batchnorm
    monkeypatch.setattr(
        inference, "fold_batchnorm", lambda conv, bn: (folded.append((conv.name, bn.name)), orig(conv, bn))[1]
    )
    assert [repr(op) for op in m.predict_plan().ops] == [
        "ConvOp(conv2d_1, batch_norm_1, relu_1)",
        "ConvOp(conv2d_2, batch_norm_2)",
        "DenseOp(flatten_1, dense_1)",
        "LayerOp(softmax_1)",
    ]
    expected = m.forward(x, training=False)  # cached forward: the separate layers
    assert folded == []
    got = m.predict(x, batch_size=2)
    assert folded == [("conv2d_1", "batch_norm_1"), ("conv2d_2", "batch_norm_2")]  # once for three batches
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(m.predict(x, batch_size=2), got)
    assert len(folded) == 2  # kept: the weights did not change
    # in float64 the folding is exact up to float64 rounding (predict returns float32)
    m.astype(np.float64)
    np.testing.assert_allclose(m.predict(x), m.forward(x).astype(np.float32), rtol=2e-7, atol=1e-8)
    assert len(folded) == 4  # folded again for the new dtype


@pytest.mark.parametrize("upto", [1, 3, 4])
def test_fused_with_frozen_layers_equals_unfused(upto):
    """finetune --freeze N: frozen convs / BatchNorms (inference statistics) inside the hooked chain."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(6, 30, 30, 3))
    fused, plain = _model(shape=(30, 30, 3)).astype(np.float64), _unfused(_model(shape=(30, 30, 3)).astype(np.float64))
    for m in (fused, plain):
        _with_moving_stats(m, np.random.default_rng(7))
        m.freeze(upto)
    out_f, out_p = fused.logits(x, training=True), plain.logits(x, training=True)
    g = rng.normal(size=out_f.shape)
    _close(out_f, out_p, np.float64)
    _close(fused.backward(g), plain.backward(g), np.float64)
    assert fused.gradients().keys() == plain.gradients().keys()
    for k in fused.gradients():
        _close(fused.gradients()[k], plain.gradients()[k], np.float64, err_msg=k)


def test_same_padding_convs_get_moments_but_no_chunk_hooks():
    """A "same"-padded conv pads a copy of its input, so it takes no before hook; its batch moments still feed the
    BatchNorm after it. Fused equals separate layers (float64)."""

    def build():
        layers = [
            Conv2D(4, 3, padding="same"),
            BatchNorm(),
            ReLU(),
            Conv2D(5, 3, strides=2, padding="same"),
            BatchNorm(),
            ReLU(),
            Flatten(),
            Dense(2),
        ]
        return Sequential(layers, input_shape=(9, 9, 3), seed=0).astype(np.float64)

    rng = np.random.default_rng(8)
    x = rng.normal(size=(4, 9, 9, 3))
    fused, plain = build(), _unfused(build())
    assert [type(s) for s in fused.steps] == [ConvBNReLU, ConvBNReLU, Single, Single]
    assert not any(s.hooked for s in fused.steps)
    out_f, out_p = fused.logits(x, training=True), plain.logits(x, training=True)
    _close(out_f, out_p, np.float64)
    g = rng.normal(size=out_f.shape)
    _close(fused.backward(g), plain.backward(g), np.float64)
    for k in fused.gradients():
        _close(
            fused.gradients()[k],
            plain.gradients()[k],
            np.float64,
            scale=max(float(np.abs(v).max()) for v in plain.gradients().values()),
            err_msg=k,
        )
    for k in fused.buffers():
        _close(fused.buffers()[k], plain.buffers()[k], np.float64, err_msg=k)

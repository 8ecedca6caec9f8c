"""Finite-difference gradient checks of every layer, the loss, L2 and the whole model (float64)."""

import numpy as np
import pytest

from breastcnn.models import create_model
from breastcnn.nn import (
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePooling2D,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Softmax,
    WeightedSoftmaxCrossEntropy,
)
from tests.nn.gradcheck import assert_close_grads, check_layer, numeric_grad, sample_indices


def _built(layer, shape, seed=0):
    layer.build(shape, np.random.default_rng(seed))
    return layer


@pytest.mark.parametrize("kernel", [3, 2])
@pytest.mark.parametrize("strides", [1, 2, 4])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_conv2d_gradients(kernel, strides, padding):
    rng = np.random.default_rng(kernel * 10 + strides)
    layer = _built(Conv2D(4, kernel, strides, padding), (9, 10, 3))
    layer.params["b"] = rng.normal(size=4).astype(np.float32)
    check_layer(layer, rng.normal(size=(2, 9, 10, 3)), rng)


def test_conv2d_without_bias_and_skipped_input_grad():
    rng = np.random.default_rng(3)
    layer = _built(Conv2D(3, 3, 1, "valid", use_bias=False), (6, 6, 2))
    assert set(layer.params) == {"W"}
    check_layer(layer, rng.normal(size=(2, 6, 6, 2)), rng)
    layer.forward(rng.normal(size=(2, 6, 6, 2)))
    assert layer.backward(np.ones((2, 4, 4, 3)), need_input_grad=False) is None
    assert layer.grads["W"].shape == (3, 3, 2, 3)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradients(training):
    rng = np.random.default_rng(4)
    layer = _built(BatchNorm(), (4, 3, 5))
    layer.params["gamma"] = rng.uniform(0.5, 1.5, 5).astype(np.float32)
    layer.params["beta"] = rng.normal(size=5).astype(np.float32)
    layer.state["moving_mean"] = rng.normal(size=5).astype(np.float32)
    layer.state["moving_variance"] = rng.uniform(0.5, 2, 5).astype(np.float32)
    check_layer(layer, 3 + 2 * rng.normal(size=(3, 4, 3, 5)), rng, training=training)


def test_batchnorm_on_flat_input_gradients():
    rng = np.random.default_rng(5)
    check_layer(_built(BatchNorm(), (6,)), rng.normal(size=(8, 6)), rng)


@pytest.mark.parametrize("pool,strides", [(2, None), (3, 2), (2, 1), (3, None)])
def test_maxpool_gradients(pool, strides):
    rng = np.random.default_rng(6)
    check_layer(_built(MaxPool2D(pool, strides), (7, 8, 3)), rng.normal(size=(2, 7, 8, 3)), rng)


def test_maxpool_routes_ties_to_one_element():
    layer = _built(MaxPool2D(2), (2, 2, 1))
    layer.forward(np.ones((1, 2, 2, 1)))
    dx = layer.backward(np.ones((1, 1, 1, 1)))
    assert dx.sum() == 1.0 and dx[0, 0, 0, 0] == 1.0


@pytest.mark.parametrize(
    "layer",
    [ReLU(), LeakyReLU(0.2), GlobalAveragePooling2D(), Flatten(), Softmax()],
    ids=lambda layer: type(layer).__name__,
)
def test_parameter_free_layer_gradients(layer):
    rng = np.random.default_rng(7)
    shape = (3, 4, 5) if not isinstance(layer, Softmax) else (5,)
    check_layer(_built(layer, shape), rng.normal(size=(2, *shape)), rng)


def test_dense_gradients():
    rng = np.random.default_rng(8)
    layer = _built(Dense(4), (7,))
    layer.params["b"] = rng.normal(size=4).astype(np.float32)
    check_layer(layer, rng.normal(size=(5, 7)), rng)


def test_dropout_gradients_with_fixed_mask_and_scaling():
    rng = np.random.default_rng(9)
    layer = _built(Dropout(0.5), (20,))

    def fix():
        layer.rng = np.random.default_rng(123)

    x = rng.normal(size=(4, 20))
    check_layer(layer, x, rng, fix=fix)
    fix()
    out = layer.forward(x, training=True)
    kept = out != 0
    np.testing.assert_allclose(out[kept], 2 * x[kept])
    assert 0.2 < kept.mean() < 0.8
    np.testing.assert_array_equal(layer.forward(x, training=False), x)


def test_weighted_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(6, 3))
    y = np.array([0, 1, 2, 2, 1, 0])
    w = np.array([0.5, 2.0, 1.5])
    loss_fn = WeightedSoftmaxCrossEntropy(class_weights=w)
    loss, grad = loss_fn(logits, y)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.mean(w[y] * -np.log(p[np.arange(6), y]))
    assert loss == pytest.approx(expected, rel=1e-12)
    idx = sample_indices(logits.shape, rng, 18)
    assert_close_grads([grad[i] for i in idx], numeric_grad(lambda: loss_fn(logits, y)[0], logits, idx))
    # a {class: weight} dict and a per-call override give the same thing
    loss2, grad2 = WeightedSoftmaxCrossEntropy()(logits, y, class_weights={0: 0.5, 1: 2.0, 2: 1.5})
    assert loss2 == pytest.approx(loss) and np.allclose(grad2, grad)
    # the weights reach the gradient (report defect 3)
    _, unweighted = WeightedSoftmaxCrossEntropy()(logits, y)
    assert not np.allclose(unweighted, grad)


def test_cross_entropy_is_stable_for_huge_logits():
    loss, grad = WeightedSoftmaxCrossEntropy()(np.array([[1e4, -1e4]], np.float32), np.array([1]))
    assert loss == pytest.approx(2e4) and np.all(np.isfinite(grad))


def test_whole_custom_model_gradients_with_l2_and_class_weights():
    rng = np.random.default_rng(11)
    model = create_model("custom", input_shape=(51, 53, 3), seed=3).astype(np.float64)
    model.compile(l2=0.01)
    x = rng.normal(size=(3, 51, 53, 3)) * 20
    y = np.array([0, 1, 1])
    cw = {0: 1.7, 1: 0.6}
    model.compute_gradients(x, y, class_weights=cw)
    grads = {k: v.copy() for k, v in model.gradients().items()}
    params = model.parameters()
    assert set(grads) == set(params)

    def loss():
        return model.loss(model.logits(x, training=True), y, cw)[0] + model.l2_penalty()

    for key, p in params.items():
        idx = sample_indices(p.shape, rng, 6)
        assert_close_grads([grads[key][i] for i in idx], numeric_grad(loss, p, idx), rtol=1e-4, atol=1e-7, what=key)


def test_l2_penalty_value_and_gradient():
    model = create_model("custom", input_shape=(51, 51, 3), seed=0)
    model.compile(l2=0.1)
    kernels = [layer.params["W"] for layer in model.layers if "W" in layer.params]
    assert len(kernels) == 5
    expected = 0.1 * sum(float(np.sum(w.astype(np.float64) ** 2)) for w in kernels)
    assert model.l2_penalty() == pytest.approx(expected, rel=1e-5)
    x = np.zeros((2, 51, 51, 3), np.float32)
    y = np.array([0, 1])
    with_l2 = model.compute_gradients(x, y)
    g_l2 = model.gradients()["layers.13.W"].copy()
    model.l2 = 0.0
    without = model.compute_gradients(x, y)
    assert with_l2 == pytest.approx(without + expected, rel=1e-5)
    np.testing.assert_allclose(
        g_l2 - model.gradients()["layers.13.W"], 0.2 * model.layers[13].params["W"], rtol=1e-4, atol=1e-6
    )

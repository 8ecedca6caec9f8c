import numpy as np
import pytest

from breastcnn.errors import UserInputError
from breastcnn.models import create_model
from breastcnn.nn import BatchNorm, Conv2D, Dense, Flatten, ReLU, Sequential, Softmax, StepResult
from breastcnn.nn.losses import WeightedSoftmaxCrossEntropy
from tests.nn.gradcheck import assert_close_grads, numeric_grad, sample_indices


@pytest.fixture(scope="module")
def small():
    return create_model("custom", input_shape=(64, 64, 3), seed=0)


def test_forward_probabilities_and_predict_agree(small):
    x = np.random.default_rng(0).normal(size=(5, 64, 64, 3)).astype(np.float32)
    p = small.predict(x, batch_size=2)
    assert p.dtype == np.float32 and p.shape == (5, 2)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    # predict folds each BatchNorm into the conv before it: equal up to float32 rounding
    np.testing.assert_allclose(small.forward(x), p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(small.predict(x, batch_size=1, jobs=2), p, rtol=1e-5, atol=1e-6)
    logits = small.logits(x)
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), p, rtol=1e-5)


def test_predict_rejects_wrong_shape(small):
    with pytest.raises(UserInputError, match=r"input batch must have shape \(N, 64, 64, 3\), got \(2, 32, 32, 3\)"):
        small.predict(np.zeros((2, 32, 32, 3), np.float32))


def test_activations_and_backward_to_an_intermediate_layer(small):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 64, 64, 3)) * 10
    model = create_model("custom", input_shape=(64, 64, 3), seed=2).astype(np.float64)
    out, acts = model.forward(x, return_activations=True)
    assert len(acts) == len(model.layers) and acts[-1] is out
    assert [a.shape[1:] for a in acts] == [layer.output_shape for layer in model.layers]
    k = 7  # conv2d_3: Grad-CAM style d(logit 1)/d(acts[k])
    seed = np.zeros((2, 2))
    seed[:, 1] = 1.0
    g = model.backward(seed, stop=k + 1)
    assert g.shape == acts[k].shape
    target = acts[k].copy()

    def score():
        return float(_tail(model, target, k + 1)[:, 1].sum())

    idx = sample_indices(target.shape, rng, 10)
    assert_close_grads([g[i] for i in idx], numeric_grad(score, target, idx))
    # full input gradient on request, none by default in training
    gx = model.backward(seed, need_input_grad=True)
    assert gx.shape == x.shape
    assert model.backward(seed, need_input_grad=False) is None


def _tail(model, h, start):
    for layer in model.layers[start : model.logits_index + 1]:
        h = layer.forward(h, training=False, cache=False)
    return h


def test_frozen_layers_are_not_updated_and_count_as_non_trainable():
    model = create_model("custom", input_shape=(51, 51, 3), seed=0)
    model.freeze(upto=3)  # conv2d_1, batch_norm_1, relu_1
    before = model.get_weights()
    model.compile()
    x = np.random.default_rng(0).normal(size=(4, 51, 51, 3)).astype(np.float32)
    model.train_on_batch(x, np.array([0, 1, 0, 1]))
    after = model.get_weights()
    for key in ("layers.0.W", "layers.0.b", "layers.1.gamma", "layers.1.moving_mean"):
        np.testing.assert_array_equal(before[key], after[key])
    assert not np.array_equal(before["layers.3.W"], after["layers.3.W"])
    assert not any(k.startswith(("layers.0.", "layers.1.")) for k in model.parameters())
    counts = model.count_params()
    assert counts["non_trainable"] == 224 + 448 + 32
    assert counts["trainable"] + counts["non_trainable"] == sum(v.size for v in after.values())


def test_train_on_batch_reduces_loss_and_is_deterministic():
    def run():
        model = create_model("custom", input_shape=(51, 51, 3), seed=5)
        model.compile()
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 51, 51, 3)).astype(np.float32) * 30
        y = rng.integers(0, 2, 8)
        return [model.train_on_batch(x, y) for _ in range(15)], model.get_weights()

    losses, w1 = run()
    assert isinstance(losses[0], float) and losses[-1] < 0.5 * losses[0]
    losses2, w2 = run()
    assert losses == losses2
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k])


def test_train_step_reports_its_loss_parts_and_logits_and_steps_like_train_on_batch():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 51, 51, 3)).astype(np.float32) * 30
    y = np.array([0, 1, 1, 0, 1, 1])
    weights = np.array([1.5, 0.75])

    def fresh():
        model = create_model("custom", input_shape=(51, 51, 3), seed=2)
        model.compile(l2=0.01)
        return model

    reference = fresh()
    logits = reference.logits(x, training=True)  # what the step's forward pass computes
    data_loss, _ = WeightedSoftmaxCrossEntropy()(logits, y, weights)
    penalty = reference.l2_penalty()

    model = fresh()
    step = model.train_step(x, y, class_weights=weights)
    assert isinstance(step, StepResult) and step.l2_penalty > 0
    np.testing.assert_array_equal(step.logits, logits)
    assert step.l2_penalty == penalty and step.loss == float(data_loss) + penalty

    other = fresh()
    assert other.train_on_batch(x, y, class_weights=weights) == step.loss
    for key, value in model.get_weights().items():
        np.testing.assert_array_equal(value, other.get_weights()[key])


def test_batchnorm_moving_statistics_follow_keras_rule():
    bn = BatchNorm(momentum=0.9)
    bn.build((3,), np.random.default_rng(0))
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(50, 3)).astype(np.float32)
    bn.forward(x, training=True)
    np.testing.assert_allclose(bn.state["moving_mean"], 0.1 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.state["moving_variance"], 0.9 + 0.1 * x.var(0), rtol=1e-5)
    out = bn.forward(x, training=True, cache=False)
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(out.var(0), x.var(0) / (x.var(0) + 1e-3), rtol=1e-4)


def test_summary_lists_layers_shapes_and_counts():
    text = create_model("custom", seed=0).summary()
    for needle in (
        "conv2d_1 (Conv2D)",
        "(None, 56, 56, 16)",
        "(None, 6, 6, 64)",
        "(None, 2304)",
        "295,040",
        "Trainable params: 319,106",
        "Non-trainable params: 224",
        "softmax_1 (Softmax)",
    ):
        assert needle in text, needle


def test_layer_names_unique_and_get_set_weights_round_trip():
    layers = [Flatten(), Dense(4, name="d"), ReLU(), Dense(2), Softmax()]
    model = Sequential(layers, input_shape=(3, 2), seed=1)
    assert [layer.name for layer in model.layers] == ["flatten_1", "d", "relu_1", "dense_1", "softmax_1"]
    other = Sequential([Flatten(), Dense(4), ReLU(), Dense(2), Softmax()], input_shape=(3, 2), seed=2)
    other.set_weights(model.get_weights())
    x = np.random.default_rng(0).normal(size=(3, 3, 2))
    np.testing.assert_array_equal(other.predict(x), model.predict(x))
    with pytest.raises(UserInputError, match="missing keys"):
        other.set_weights({})
    with pytest.raises(UserInputError, match="unique"):
        Sequential([Dense(2, name="a"), Dense(2, name="a")])


def test_float32_throughout():
    model = create_model("custom", input_shape=(51, 51, 3), seed=0)
    x = np.zeros((2, 51, 51, 3), np.float64)  # converted to the model dtype
    _, acts = model.forward(x, return_activations=True)
    assert all(a.dtype == np.float32 for a in acts)
    model.compile()
    model.compute_gradients(x, np.array([0, 1]))
    assert all(g.dtype == np.float32 for g in model.gradients().values())
    assert isinstance(Conv2D(2).get_config()["filters"], int)

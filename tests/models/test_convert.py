"""The NumPy model against the same model in Keras (needs TensorFlow: the ``keras`` fixture)."""

import numpy as np
import pytest

from breastcnn.errors import UserInputError
from breastcnn.models import create_model
from breastcnn.models.convert import from_keras, to_keras

SHAPE = (64, 64, 3)


def _model_and_data(seed=0, activation="relu"):
    model = create_model("custom", input_shape=SHAPE, seed=seed, activation=activation)
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # non-trivial BN parameters and statistics
        if "gamma" in layer.params:
            c = layer.params["gamma"].shape[0]
            layer.params["gamma"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            layer.params["beta"] = rng.normal(0, 0.2, c).astype(np.float32)
            layer.state["moving_mean"] = rng.normal(0, 5, c).astype(np.float32)
            layer.state["moving_variance"] = rng.uniform(20, 200, c).astype(np.float32)
    x = rng.normal(0, 30, size=(6, *SHAPE)).astype(np.float32)  # roughly caffe-preprocessed scale
    return model, x


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_same_inference_outputs(keras, activation):
    model, x = _model_and_data(1, activation)
    kmodel = to_keras(model)
    assert kmodel.count_params() == sum(model.count_params().values())
    np.testing.assert_allclose(kmodel(x, training=False).numpy(), model.predict(x), atol=1e-4)
    # intermediate activations agree too (less saturated than probabilities)
    _, acts = model.forward(x, return_activations=True)
    probe = keras.Model(kmodel.input, kmodel.get_layer(model.layers[12].name).output)
    np.testing.assert_allclose(probe(x, training=False).numpy(), acts[12], rtol=1e-4, atol=1e-3)


def test_same_gradients_in_training_mode(keras):
    import tensorflow as tf

    model, x = _model_and_data(2)
    y = np.array([0, 1, 1, 0, 1, 1])
    class_weights = np.array([1.6, 0.7])
    l2 = 1e-3
    kmodel = to_keras(model, l2=l2)
    model.compile(l2=l2)
    loss = model.compute_gradients(x, y, class_weights=class_weights)
    ours = model.gradients()

    with tf.GradientTape() as tape:
        logits = kmodel.get_layer(model.layers[model.logits_index].name)
        probe = keras.Model(kmodel.input, [logits.output, kmodel.output])
        z, _ = probe(x, training=True)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z)
        k_loss = tf.reduce_sum(tf.gather(class_weights.astype(np.float32), y) * ce) / len(y)
        k_loss += tf.add_n(kmodel.losses)
    variables, keys = [], []
    for i, layer in enumerate(model.layers):
        kl = kmodel.get_layer(layer.name)
        for key, var in zip(
            [k for k in ("W", "b", "gamma", "beta") if k in layer.params], kl.trainable_weights, strict=True
        ):
            variables.append(var)
            keys.append(f"layers.{i}.{key}")
    k_grads = tape.gradient(k_loss, variables)
    assert loss == pytest.approx(float(k_loss), rel=1e-4)
    assert set(keys) == set(ours)
    k_grads = {key: g.numpy() for key, g in zip(keys, k_grads, strict=True)}
    # conv biases before a training-mode BN have a true gradient of 0 (BN removes the mean): compare them
    # on the scale of their layer's kernel gradient, everything else on its own scale
    for key, g in k_grads.items():
        scale = np.abs(k_grads[key[:-1] + "W"] if key.endswith(".b") else g).max()
        np.testing.assert_allclose(ours[key] / scale, g / scale, atol=2e-4, err_msg=key)
    # the batch statistics updated the moving averages the same way
    for layer in model.layers:
        if "moving_mean" in layer.state:
            kl = kmodel.get_layer(layer.name)
            np.testing.assert_allclose(layer.state["moving_mean"], kl.moving_mean.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(layer.state["moving_variance"], kl.moving_variance.numpy(), rtol=1e-4)


def test_from_keras_round_trip(keras):
    model, x = _model_and_data(3)
    model.layers[0].trainable = False
    kmodel = to_keras(model)
    assert kmodel.get_layer(model.layers[0].name).trainable is False
    assert kmodel.get_layer(model.layers[1].name).epsilon == pytest.approx(1e-3)
    assert kmodel.get_layer(model.layers[1].name).momentum == pytest.approx(0.9)
    back = from_keras(kmodel, meta=model.meta)
    assert [type(layer) for layer in back.layers] == [type(layer) for layer in model.layers]
    assert back.count_params() == model.count_params() and back.meta == model.meta
    np.testing.assert_allclose(back.predict(x), model.predict(x), atol=1e-6)
    for key, value in model.get_weights().items():
        np.testing.assert_array_equal(back.get_weights()[key], value)


def test_from_keras_expands_fused_activations(keras):
    inputs = keras.Input((10, 10, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(3, activation="softmax")(h)
    kmodel = keras.Model(inputs, out)
    model = from_keras(kmodel)
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D",
        "ReLU",
        "GlobalAveragePooling2D",
        "Dense",
        "Softmax",
    ]
    x = np.random.default_rng(0).normal(size=(4, 10, 10, 2)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), kmodel(x).numpy(), atol=1e-5)


def test_from_keras_names_the_unsupported_layer(keras):
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3)(inputs)
    h = keras.layers.AveragePooling2D(2, name="avg_pool_here")(h)
    kmodel = keras.Model(inputs, keras.layers.Flatten()(h))
    with pytest.raises(UserInputError, match="'avg_pool_here' \\(AveragePooling2D\\)"):
        from_keras(kmodel)
    tanh = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="tanh", name="dense_tanh")])
    with pytest.raises(UserInputError, match="dense_tanh.*'tanh'"):
        from_keras(tanh)

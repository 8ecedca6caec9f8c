import numpy as np
import pytest

import breastcnn
from breastcnn.errors import UserInputError
from breastcnn.models import create_model
from breastcnn.nn import BatchNorm, Conv2D, Dense, Flatten, LeakyReLU, MaxPool2D, ReLU, Softmax


def test_report_parameter_counts_at_224():
    model = create_model("custom", input_shape=(224, 224, 3), num_classes=2, seed=0)
    assert model.count_params() == {"trainable": 319_106, "non_trainable": 224}
    assert model.output_shape == (2,)
    assert model.layers[9].output_shape == (6, 6, 64) and model.layers[10].output_shape == (2304,)


def test_architecture_matches_the_report():
    model = create_model("custom", seed=0)
    kinds = [type(layer) for layer in model.layers]
    assert kinds == [
        Conv2D,
        BatchNorm,
        ReLU,
        Conv2D,
        BatchNorm,
        ReLU,
        MaxPool2D,
        Conv2D,
        BatchNorm,
        ReLU,
        Flatten,
        Dense,
        ReLU,
        Dense,
        Softmax,
    ]
    convs = [layer for layer in model.layers if isinstance(layer, Conv2D)]
    assert [(c.filters, c.kernel_size, c.strides, c.padding, c.use_bias) for c in convs] == [
        (16, 3, 4, "valid", True),
        (32, 3, 2, "valid", True),
        (64, 3, 2, "valid", True),
    ]
    assert model.layers[11].units == 128 and model.layers[13].units == 2


def test_meta():
    model = create_model("custom", input_shape=(96, 96, 3), seed=0, activation="leaky_relu")
    assert model.meta == {
        "arch": "custom",
        "classes": list(breastcnn.CLASSES),
        "preprocess": "caffe",
        "image_size": 96,
        "activation": "leaky_relu",
    }
    assert model.framework == "numpy"
    assert sum(isinstance(layer, LeakyReLU) for layer in model.layers) == 4


def test_deterministic_for_a_seed():
    a, b, c = (create_model("custom", input_shape=(64, 64, 3), seed=s) for s in (7, 7, 8))
    for key, value in a.get_weights().items():
        np.testing.assert_array_equal(value, b.get_weights()[key])
    assert not np.array_equal(a.get_weights()["layers.0.W"], c.get_weights()["layers.0.W"])


def test_too_small_input_is_refused_clearly():
    with pytest.raises(UserInputError, match=r"input size 50x50 is too small .* at least 51x51"):
        create_model("custom", input_shape=(50, 50, 3))
    with pytest.raises(UserInputError, match=r"64x40 .* at least 51x51"):
        create_model("custom", input_shape=(64, 40, 3))
    assert create_model("custom", input_shape=(51, 51, 3)).layers[9].output_shape == (1, 1, 64)


def test_bad_options():
    with pytest.raises(UserInputError, match="activation"):
        create_model("custom", activation="tanh")
    with pytest.raises(UserInputError, match="unexpected options"):
        create_model("custom", weights="imagenet")


# -- "custom-k4": 4x4/s4 first convolution (report defect 7: 3x3/s4 skips 7 of every 16 pixels) ---------------


def _k4(**kwargs):
    from breastcnn.models.custom import create_custom_k4

    return create_custom_k4(**kwargs)


def test_k4_parameter_counts_and_shapes_at_224():
    model = _k4(input_shape=(224, 224, 3), seed=0)
    # the first kernel grows from 3*3*3*16 to 4*4*3*16 weights: 319,106 + 336
    assert model.count_params() == {"trainable": 319_442, "non_trainable": 224}
    report = create_model("custom", seed=0)
    assert [layer.output_shape for layer in model.layers] == [layer.output_shape for layer in report.layers]
    convs = [(c.filters, c.kernel_size, c.strides) for c in model.layers if isinstance(c, Conv2D)]
    assert convs == [(16, 4, 4), (32, 3, 2), (64, 3, 2)]
    assert model.meta == {
        "arch": "custom-k4",
        "classes": list(breastcnn.CLASSES),
        "preprocess": "caffe",
        "image_size": 224,
        "activation": "relu",
    }


def test_k4_sees_every_pixel_once_and_custom_does_not():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 64, 64, 3)).astype(np.float32)
    seen = {}
    for name, model in (
        ("custom", create_model("custom", input_shape=(64, 64, 3))),
        ("custom-k4", _k4(input_shape=(64, 64, 3))),
    ):
        conv = model.layers[0]
        conv.params["W"][...] = 1.0
        out = conv.forward(x)
        # d(sum of all outputs)/dx counts, per pixel, how many windows (x 16 filters) read it
        seen[name] = conv.backward(np.ones_like(out))[0, :, :, 0] / 16
    np.testing.assert_array_equal(seen["custom-k4"], 1.0)
    assert np.mean(seen["custom"][:60, :60] == 0) == pytest.approx(7 / 16)


def test_k4_options_minimum_size_and_determinism():
    model = _k4(input_shape=(96, 96, 3), seed=3, activation="leaky_relu")
    assert sum(isinstance(layer, LeakyReLU) for layer in model.layers) == 4
    assert model.meta["activation"] == "leaky_relu" and model.meta["arch"] == "custom-k4"
    again = _k4(input_shape=(96, 96, 3), seed=3, activation="leaky_relu")
    for key, value in model.get_weights().items():
        np.testing.assert_array_equal(value, again.get_weights()[key])
    with pytest.raises(UserInputError, match=r"input size 51x51 is too small for the custom-k4 model.* 52x52"):
        _k4(input_shape=(51, 51, 3))
    assert _k4(input_shape=(52, 52, 3)).layers[9].output_shape == (1, 1, 64)
    with pytest.raises(UserInputError, match="unexpected options for the custom-k4 model"):
        _k4(weights="imagenet")
    with pytest.raises(UserInputError, match="activation"):
        _k4(activation="tanh")


def test_k4_is_registered():
    # needs register_model("custom-k4", "breastcnn.models.custom:create_custom_k4") in registry.py
    from breastcnn.models import list_models

    assert "custom-k4" in list_models()
    assert create_model("custom-k4", input_shape=(64, 64, 3)).meta["arch"] == "custom-k4"

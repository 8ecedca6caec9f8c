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
    assert kinds == [Conv2D, BatchNorm, ReLU, Conv2D, BatchNorm, ReLU, MaxPool2D, Conv2D, BatchNorm, ReLU,
                     Flatten, Dense, ReLU, Dense, Softmax]
    convs = [layer for layer in model.layers if isinstance(layer, Conv2D)]
    assert [(c.filters, c.kernel_size, c.strides, c.padding, c.use_bias) for c in convs] == [
        (16, 3, 4, "valid", True), (32, 3, 2, "valid", True), (64, 3, 2, "valid", True)]
    assert model.layers[11].units == 128 and model.layers[13].units == 2


def test_meta():
    model = create_model("custom", input_shape=(96, 96, 3), seed=0, activation="leaky_relu")
    assert model.meta == {"arch": "custom", "classes": list(breastcnn.CLASSES), "preprocess": "caffe",
                          "image_size": 96, "activation": "leaky_relu"}
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

"""Grad-CAM and feature maps: gradients by finite differences, CAM equivalence, NumPy == Keras."""

from __future__ import annotations

import numpy as np
import pytest

from breastcnn import explain
from breastcnn.errors import UserInputError
from breastcnn.models import create_model
from breastcnn.nn import BatchNorm, Conv2D, Dense, Flatten, GlobalAveragePooling2D, ReLU, Sequential, Softmax


def _randomise_bn(model, rng) -> None:
    """Non-trivial moving statistics and affine parameters, so inference-mode BN matters."""
    for layer in model.layers:
        if isinstance(layer, BatchNorm):
            c = layer.params["gamma"].shape[0]
            layer.params["gamma"][...] = rng.uniform(0.5, 1.5, c)
            layer.params["beta"][...] = rng.normal(0, 0.2, c)
            layer.state["moving_mean"][...] = rng.normal(0, 0.3, c)
            layer.state["moving_variance"][...] = rng.uniform(0.5, 2.0, c)


def _small_model(dtype=np.float64) -> Sequential:
    layers = [
        Conv2D(4, 3),
        BatchNorm(),
        ReLU(),
        Conv2D(5, 3, padding="same"),
        BatchNorm(),
        ReLU(),
        Flatten(),
        Dense(6),
        ReLU(),
        Dense(2),
        Softmax(),
    ]
    model = Sequential(layers, input_shape=(8, 8, 3), seed=3)
    _randomise_bn(model, np.random.default_rng(1))
    return model.astype(dtype)


def _logits_from(model, index: int, activations: np.ndarray) -> np.ndarray:
    """Inference-mode forward from the output of layer ``index`` to the logits, without caches."""
    out = activations
    for layer in model.layers[index + 1 : model.logits_index + 1]:
        out = layer.forward(out, training=False, cache=False)
    return out


@pytest.mark.parametrize("class_index", [0, 1])
def test_gradcam_gradient_matches_finite_differences(class_index):
    model = _small_model()
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 3))
    before = {k: v.copy() for k, v in model.get_weights().items()}
    parts = explain.gradcam_parts(model, x, class_index=class_index)
    assert parts["layer"] == "relu_2"  # default: the last block's output (every map is under 8x8)
    index = [layer.name for layer in model.layers].index("relu_2")
    acts, grads = parts["activations"][None], parts["gradients"]
    numeric = np.zeros_like(acts)
    eps = 1e-6
    for idx in np.ndindex(acts.shape):
        plus, minus = acts.copy(), acts.copy()
        plus[idx] += eps
        minus[idx] -= eps
        diff = _logits_from(model, index, plus)[0, class_index] - _logits_from(model, index, minus)[0, class_index]
        numeric[idx] = diff / (2 * eps)
    np.testing.assert_allclose(grads, numeric[0], rtol=1e-5, atol=1e-7)
    assert np.abs(grads).max() > 0
    # no weight update, moving statistics untouched
    after = model.get_weights()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)
    heatmap = explain.cam_from_parts(parts["activations"], parts["gradients"])
    assert heatmap.shape == (6, 6) and heatmap.min() >= 0 and np.isclose(heatmap.max(), 1.0)


def test_gradcam_equals_cam_for_global_average_pooling_head():
    rng = np.random.default_rng(5)
    model = Sequential(
        [Conv2D(6, 3, padding="same"), ReLU(), GlobalAveragePooling2D(), Dense(2), Softmax()],
        input_shape=(10, 10, 3),
        seed=2,
    )
    x = rng.normal(size=(10, 10, 3)).astype(np.float32)
    maps = model.activations(x[None])[1][0]  # (10, 10, 6): ReLU output
    w = model.layers[3].params["W"]  # (6, 2)
    for c in (0, 1):
        cam = np.maximum(maps @ w[:, c], 0)  # CAM (Zhou et al. 2016): class weights x maps
        assert cam.max() > 0
        heatmap = explain.gradcam(model, x, class_index=c, layer=model.layers[1].name)
        np.testing.assert_allclose(heatmap, cam / cam.max(), atol=1e-5)


def test_gradcam_defaults_and_errors():
    model = create_model("custom", input_shape=(96, 96, 3))
    x = np.random.default_rng(0).normal(0, 40, (96, 96, 3)).astype(np.float32)
    probs = model.predict(x[None])[0]
    parts = explain.gradcam_parts(model, x)
    assert parts["class_index"] == int(np.argmax(probs))
    np.testing.assert_allclose(parts["logits"], model.logits(x[None])[0], rtol=1e-5)
    with pytest.raises(UserInputError, match="no layer named 'nope'"):
        explain.gradcam(model, x, layer="nope")
    with pytest.raises(UserInputError, match=r"\(H, W, C\)"):
        explain.gradcam(model, x, layer="dense_1")
    with pytest.raises(UserInputError, match="--class index"):
        explain.gradcam(model, x, class_index=2)
    with pytest.raises(UserInputError, match="one preprocessed image"):
        explain.gradcam(model, np.zeros((2, 96, 96, 3), np.float32))
    big = explain.upsample_heatmap(explain.gradcam(model, x), 96)
    assert big.shape == (96, 96) and 0.0 <= big.min() and big.max() <= 1.0


def test_feature_maps_every_conv_block_in_inference_mode():
    model = create_model("custom", input_shape=(96, 96, 3))
    _randomise_bn(model, np.random.default_rng(2))
    x = np.random.default_rng(1).normal(0, 40, (96, 96, 3)).astype(np.float32)
    maps = explain.feature_maps(model, x)
    assert list(maps) == ["conv2d_1", "conv2d_2", "conv2d_3"]
    assert [m.shape[-1] for m in maps.values()] == [16, 32, 64]
    expected = model.activations(x[None])[2][0]  # conv -> BN (moving stats) -> ReLU
    np.testing.assert_allclose(maps["conv2d_1"], expected, rtol=1e-6)
    only = explain.feature_maps(model, x, layers=["conv2d_2"])
    assert list(only) == ["conv2d_2"]
    normalised = explain.normalise_maps(maps["conv2d_2"])
    assert normalised.min() >= 0 and normalised.max() <= 1


def test_overlay_and_tiles():
    image = np.full((20, 30, 3), 100, np.uint8)
    heat = np.zeros((2, 3), np.float32)
    assert explain.overlay(image, heat).shape == (20, 30, 3)
    mosaic = explain.tile_maps(np.random.default_rng(0).random((4, 4, 5)), pad=1)
    assert mosaic.shape == (2 * 5 - 1, 3 * 5 - 1)  # 5 maps -> 2 rows x 3 columns
    assert np.isnan(mosaic).sum() == mosaic.size - 5 * 16  # padding and the empty cells


def test_numpy_model_and_keras_export_give_the_same_heatmap(keras):
    from breastcnn.models.convert import to_keras

    model = create_model("custom", input_shape=(160, 160, 3), seed=1)
    _randomise_bn(model, np.random.default_rng(3))
    kmodel = to_keras(model)
    rng = np.random.default_rng(4)
    for _ in range(2):
        x = rng.normal(0, 60, (160, 160, 3)).astype(np.float32)
        for c in (0, 1):
            ours = explain.gradcam_parts(model, x, class_index=c)
            theirs = explain.gradcam_parts(kmodel, x, class_index=c)
            assert ours["layer"] == theirs["layer"] == "relu_2"  # the second block: 19x19
            np.testing.assert_allclose(theirs["logits"], ours["logits"], rtol=1e-4, atol=1e-3)
            h_ours = explain.cam_from_parts(ours["activations"], ours["gradients"])
            h_theirs = explain.cam_from_parts(theirs["activations"], theirs["gradients"])
            assert h_ours.shape == (19, 19)
            np.testing.assert_allclose(h_theirs, h_ours, atol=1e-3)
    maps = explain.feature_maps(kmodel, x)
    np.testing.assert_allclose(maps["conv2d_3"], explain.feature_maps(model, x)["conv2d_3"], atol=1e-3)


def test_keras_dense_softmax_head_uses_pre_softmax_logits(keras):
    """A final Dense(softmax) (VGG16/ResNet50 heads) and Dense + Softmax layer explain alike."""
    inputs = keras.Input((12, 12, 3))
    maps = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(maps)
    fused = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="head")(pooled))
    split_head = keras.Model(inputs, keras.layers.Softmax()(fused.get_layer("head").output))
    # same weights: split_head reuses fused's layers, but its head must be linear
    linear = keras.layers.Dense(2, name="linear_head")
    linear.build((None, 4))
    linear.set_weights(fused.get_layer("head").get_weights())
    split_head = keras.Model(inputs, keras.layers.Softmax()(linear(pooled)))
    x = np.random.default_rng(0).normal(size=(12, 12, 3)).astype(np.float32)
    a = explain.gradcam_parts(fused, x, class_index=1, layer="conv")
    b = explain.gradcam_parts(split_head, x, class_index=1, layer="conv")
    np.testing.assert_allclose(a["gradients"], b["gradients"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-5)


# ------------------------------------------------------- issue 16 item 12: a Grad-CAM layer that localises
@pytest.mark.parametrize(
    "size, layer, grid", [(64, "relu_1", 16), (96, "relu_2", 11), (160, "relu_2", 19), (224, "relu_2", 27)]
)
def test_default_gradcam_layer_is_the_last_block_with_a_map_of_at_least_8_cells(size, layer, grid):
    """The custom model ends on a 4x4 map at 160 px (6x6 at 224): too coarse; its second block is used."""
    model = create_model("custom", input_shape=(size, size, 3), seed=0)
    assert explain.default_gradcam_layer(model) == layer
    x = np.random.default_rng(0).normal(0, 40, (size, size, 3)).astype(np.float32)
    heatmap = explain.gradcam(model, x, class_index=1)
    assert heatmap.shape == (grid, grid) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0.0 and heatmap.max() == pytest.approx(1.0)
    assert explain.MIN_GRADCAM_GRID == 8


def _patch_detector() -> Sequential:
    """64 px -> conv 4x4/s4 "red detector" (16x16) -> conv 4x4/s4 (4x4) -> GAP -> Dense(2).

    The first conv outputs ``sum(red) - threshold`` per 4x4 cell, so after its ReLU only cells over a
    bright red patch are non-zero; the second conv averages them; the malignant logit is their mean.
    """
    model = Sequential(
        [
            Conv2D(1, 4, strides=4),
            ReLU(),
            Conv2D(1, 4, strides=4),
            ReLU(),
            GlobalAveragePooling2D(),
            Dense(2),
            Softmax(),
        ],
        input_shape=(64, 64, 3),
        seed=0,
    )
    first, second, dense = model.layers[0], model.layers[2], model.layers[5]
    first.params["W"][...] = 0.0
    first.params["W"][:, :, 0, 0] = 1.0 / 16.0  # mean red of the 4x4 cell
    first.params["b"][...] = -0.5  # cells redder than 0.5 only
    second.params["W"][...] = 1.0 / 16.0
    second.params["b"][...] = 0.0
    dense.params["W"][...] = [[-1.0, 1.0]]
    dense.params["b"][...] = 0.0
    return model


def test_gradcam_highlights_the_region_a_known_pattern_puts_there():
    model = _patch_detector()
    image = np.zeros((64, 64, 3), np.float32)
    image[8:16, 40:48, 0] = 1.0  # a red patch: 16x16 cells rows 2-3, cols 10-11
    assert explain.default_gradcam_layer(model) == "relu_1"  # 16x16, not the last block's 4x4
    heatmap = explain.gradcam(model, image, class_index=1)
    assert heatmap.shape == (16, 16)
    hot = np.argwhere(heatmap > 0.5)
    assert {tuple(p) for p in hot} == {(2, 10), (2, 11), (3, 10), (3, 11)}
    big = explain.upsample_heatmap(heatmap, 64)
    assert big[8:16, 40:48].mean() > 0.5 and big[:, :32].max() == 0.0 and big[32:].max() == 0.0
    coarse = explain.gradcam(model, image, class_index=1, layer="relu_2")  # the last block: one cell of 4x4
    assert coarse.shape == (4, 4) and np.count_nonzero(coarse) == 1 and coarse[0, 2] == 1.0
    blended = explain.overlay((image * 255).astype(np.uint8), heatmap)
    np.testing.assert_array_equal(blended[40:, :20], 0)  # no heat: the image as it is (black)
    assert blended[10:14, 42:46].std(axis=-1).mean() > 0  # hot: coloured

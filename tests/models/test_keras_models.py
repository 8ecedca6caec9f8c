"""VGG16 / ResNet50 / custom-keras builders, the classifier interface, saving and weights resolution."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from breastcnn.errors import UserInputError

SMALL = (32, 32, 3)


@pytest.fixture(scope="module")
def km(keras):
    from breastcnn.models import keras_models

    return keras_models


@pytest.fixture(scope="module")
def vgg(km):
    return km.create_vgg16(SMALL, 2, seed=0, weights="none")


@pytest.fixture(scope="module")
def resnet(km):
    return km.create_resnet50(SMALL, 2, seed=0, weights="none")


@pytest.fixture(scope="module")
def custom_keras(km):
    return km.create_custom_keras((64, 64, 3), 2, seed=0)


def _images(n, size, seed=0):
    return np.random.default_rng(seed).normal(0, 60, size=(n, size, size, 3)).astype(np.float32)


def test_importing_the_module_does_not_import_tensorflow():
    code = "import sys, breastcnn.models.keras_models; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_predict_is_float32_probabilities_independent_of_batch_size(vgg, resnet):
    x = _images(5, 32)
    for clf in (vgg, resnet):
        p = clf.predict(x, batch_size=2)
        assert p.dtype == np.float32 and p.shape == (5, 2)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(clf.predict(x, batch_size=64), p, atol=1e-6)
        # tf.function path equals Keras' own inference
        np.testing.assert_allclose(clf.model(x, training=False).numpy(), p, atol=1e-6)
        assert clf.framework == "keras"
        assert clf.predict(x[:0]).shape == (0, 2)


def test_predict_rejects_a_wrong_image_shape(vgg):
    with pytest.raises(UserInputError, match=r"expects images of shape \(N, 32, 32, 3\), received \(2, 40, 40, 3\)"):
        vgg.predict(_images(2, 40))


def test_parameter_counts_match_the_report(km, vgg, resnet):
    # VGG16's base has 19 layers: 20 trainable layers = the whole network (14.7 M).
    assert vgg.count_params() == {"trainable": 14_715_714, "non_trainable": 0}
    # ResNet50 with its last 20 layers trainable: the report's 8.94 M of 23.6 M.
    p = resnet.count_params()
    assert p["trainable"] == 8_935_426 and p["trainable"] + p["non_trainable"] == 23_591_810
    # The report's 7.08 M trainable VGG16 parameters are block5 only (trainable_layers=4) + the head.
    block5 = km.create_vgg16(SMALL, 2, seed=0, weights="none", trainable_layers=4)
    assert block5.count_params()["trainable"] == 3 * (3 * 3 * 512 * 512 + 512) + (512 * 2 + 2)
    assert [layer.name for layer in block5.model.layers if layer.trainable and layer.weights][:1] == ["block5_conv1"]


def test_custom_keras_is_the_report_architecture_with_numpy_weights(km, custom_keras):
    from breastcnn.models import create_model

    at_224 = km.create_custom_keras((224, 224, 3), 2, seed=0)
    assert at_224.count_params() == {"trainable": 319_106, "non_trainable": 224}
    numpy_model = create_model("custom", (64, 64, 3), 2, seed=0)
    x = _images(4, 64, seed=1)
    np.testing.assert_allclose(custom_keras.predict(x), numpy_model.predict(x), atol=1e-5)
    assert custom_keras.meta["arch"] == "custom-keras" and custom_keras.meta["preprocess"] == "caffe"


def test_gradcam_layers(vgg, resnet, custom_keras):
    assert vgg.gradcam_layer == "block5_conv3"
    assert resnet.gradcam_layer == "conv5_block3_out"
    # custom-keras: the NumPy model's rule (last block with a map >= 8x8): at 64 px the first block (16x16)
    from breastcnn import explain
    from breastcnn.models import create_model

    assert custom_keras.gradcam_layer == "relu_1" == explain.default_gradcam_layer(create_model("custom", (64, 64, 3)))
    assert custom_keras.model.get_layer("relu_1").output.shape[1:3] == (16, 16)
    for clf in (vgg, resnet):
        clf.model.get_layer(clf.gradcam_layer)  # reachable directly: the base is not nested


def test_registry_creates_keras_models(keras):
    from breastcnn.models import create_model

    clf = create_model("custom-keras", (64, 64, 3), 2, seed=3)
    assert clf.framework == "keras" and clf.meta["seed"] == 3


def test_caffe_preprocessing_matches_keras_preprocess_input(keras):
    from breastcnn.data.images import preprocess

    x = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    ours = preprocess(x, "caffe")
    for fn in (keras.applications.vgg16.preprocess_input, keras.applications.resnet50.preprocess_input):
        np.testing.assert_allclose(ours, fn(x.astype(np.float32)), atol=1e-4)


def test_save_and_load_round_trip(km, tmp_path):
    from breastcnn.models import load_model

    clf = km.create_custom_keras((64, 64, 3), 2, seed=1)
    clf.meta["split_hash"] = "abc123"
    path = tmp_path / "run" / "model.keras"
    clf.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.keras", "model.keras.json"]  # no temp files left
    side = json.loads((path.parent / "model.keras.json").read_text())
    assert side["classes"] == ["benign", "malignant"] and side["preprocess"] == "caffe"
    assert side["image_size"] == 64 and side["arch"] == "custom-keras" and side["split_hash"] == "abc123"
    assert {"tensorflow", "keras", "numpy", "breastcnn"} <= set(side["versions"])
    loaded = load_model(path)  # dispatch by file type
    assert isinstance(loaded, km.KerasClassifier) and loaded.gradcam_layer == clf.gradcam_layer
    x = _images(3, 64, seed=2)
    np.testing.assert_allclose(loaded.predict(x), clf.predict(x), atol=1e-6)
    assert loaded.count_params() == clf.count_params()


def test_saving_a_compiled_model_leaves_out_the_optimizer(km, keras, tmp_path):
    clf = km.create_custom_keras((64, 64, 3), 2, seed=0)
    plain = tmp_path / "a" / "model.keras"
    clf.save(plain)
    clf.model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    clf.model.train_on_batch(_images(2, 64), np.array([0, 1]))
    compiled = tmp_path / "b" / "model.keras"
    clf.save(compiled)
    assert abs(compiled.stat().st_size - plain.stat().st_size) < 20_000  # no Adam moments (2 x 1.3 MB)
    np.testing.assert_allclose(
        km.load_keras_model(compiled).predict(_images(2, 64)), clf.predict(_images(2, 64)), atol=1e-6
    )


def test_legacy_breastcnn_json_sidecars_still_load(km, custom_keras, tmp_path):
    """Models saved before the sidecar was named after the model (``breastcnn.json``, one per folder)."""
    from breastcnn.models import load_model

    path = tmp_path / "model.keras"
    custom_keras.save(path)
    (tmp_path / "model.keras.json").rename(tmp_path / "breastcnn.json")
    assert km.find_sidecar(path) == tmp_path / "breastcnn.json"
    x = _images(2, 64)
    np.testing.assert_allclose(load_model(path).predict(x), custom_keras.predict(x), atol=1e-6)
    renamed = tmp_path / "best.keras"  # a legacy model renamed by hand: its old sidecar names a missing file
    path.rename(renamed)
    assert km.load_keras_model(renamed).meta["arch"] == "custom-keras"
    # a second model saved into that folder gets its own sidecar; the legacy one stays with its model
    other = tmp_path / "other.keras"
    custom_keras.save(other)
    renamed.rename(path)
    assert km.find_sidecar(other) == tmp_path / "other.keras.json"
    assert km.find_sidecar(path) == tmp_path / "breastcnn.json"
    (tmp_path / "other.keras.json").unlink()
    assert km.find_sidecar(other) is None  # breastcnn.json names model.keras, which is present
    with pytest.raises(UserInputError, match=r"other\.keras\.json is missing"):
        km.load_keras_model(other)


def test_load_refuses_unsafe_lambda_layers(km, keras, tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0)(inputs))
    path = tmp_path / "model.keras"
    model.save(path)
    (tmp_path / "model.keras.json").write_text(json.dumps({"classes": ["benign", "malignant"], "preprocess": "caffe"}))
    with pytest.raises(UserInputError, match="cannot load this Keras model.*(unsafe|safe_mode|lambda)"):
        km.load_keras_model(path)


def test_load_errors_name_the_missing_file(km, custom_keras, tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        km.load_keras_model(tmp_path / "nope.keras")
    path = tmp_path / "model.keras"
    custom_keras.save(path)
    (tmp_path / "model.keras.json").unlink()
    with pytest.raises(UserInputError, match=r"metadata file .*model\.keras\.json is missing"):
        km.load_keras_model(path)
    (tmp_path / "model.keras.json").write_text(json.dumps({"classes": ["benign", "malignant"], "preprocess": "zscore"}))
    with pytest.raises(UserInputError, match="'preprocess' must be caffe or minmax, received 'zscore'"):
        km.load_keras_model(path)


# --------------------------------------------------------------------------- ImageNet weights


def test_missing_imagenet_weights_offline_is_one_clear_error(km, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    monkeypatch.setenv("BREASTCNN_OFFLINE", "1")
    for arch, build in (("vgg16", km.create_vgg16), ("resnet50", km.create_resnet50)):
        with pytest.raises(UserInputError) as info:
            build(SMALL, 2, seed=0, weights="imagenet")
        message = str(info.value)
        assert f"{arch}_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
        assert str(tmp_path / "kh" / "models") in message
        assert "--weights PATH" in message and "--weights none" in message
        assert "\n" not in message


def test_failed_download_is_reported_with_the_same_advice(km, keras, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    monkeypatch.delenv("BREASTCNN_OFFLINE", raising=False)
    calls = []

    def no_network(fname, origin, **kwargs):
        calls.append((fname, kwargs.get("cache_dir")))
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    with pytest.raises(UserInputError, match=r"download failed .*Name or service not known.*--weights none"):
        km.create_vgg16(SMALL, 2, seed=0, weights="imagenet")
    assert calls == [("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", str(tmp_path / "kh"))]


def test_cached_imagenet_file_is_used_without_download(km, keras, tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    from keras.src.legacy.saving import legacy_h5_format

    # A stand-in "ImageNet" file in the legacy h5 layout keras.applications ships.
    donor = keras.applications.VGG16(include_top=False, weights=None, input_shape=SMALL)
    cache = tmp_path / "kh" / "models"
    cache.mkdir(parents=True)
    with h5py.File(cache / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, donor)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: pytest.fail("tried to download"))
    clf = km.create_vgg16(SMALL, 2, seed=5, weights="imagenet")
    np.testing.assert_array_equal(
        clf.model.get_layer("block5_conv3").get_weights()[0], donor.get_layer("block5_conv3").get_weights()[0]
    )
    assert clf.meta["weights"] == "imagenet"


def test_weights_path(km, custom_keras, tmp_path):
    path = tmp_path / "w.weights.h5"
    custom_keras.model.save_weights(path)
    other = km.create_custom_keras((64, 64, 3), 2, seed=9, weights=str(path))
    x = _images(2, 64)
    np.testing.assert_allclose(other.predict(x), custom_keras.predict(x), atol=1e-6)
    with pytest.raises(UserInputError, match="--weights .*missing.h5: no such file"):
        km.create_custom_keras((64, 64, 3), 2, weights=str(tmp_path / "missing.h5"))
    with pytest.raises(UserInputError, match="custom-keras has no ImageNet weights"):
        km.create_custom_keras((64, 64, 3), 2, weights="imagenet")
    with pytest.raises(UserInputError, match="cannot load"):
        km.create_vgg16(SMALL, 2, weights=str(path))  # weights of another architecture


def test_require_keras_without_tensorflow_says_how_to_install():
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
        "from breastcnn.models.keras_models import require_keras\n"
        "from breastcnn.errors import MissingDependencyError\n"
        "try:\n    require_keras()\nexcept MissingDependencyError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert out.stdout.startswith("TensorFlow is not installed: pip install 'breastcnn[keras]'")

"""ModelSpec (models/spec.py) and the Classifier protocol (models/classifier.py).

The spec is read from a model's metadata once, where the model is loaded or
built, and a bad value is an error that names the file it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import breastcnn
from breastcnn.data.images import preprocess
from breastcnn.errors import UserInputError
from breastcnn.models import Classifier, ModelSpec, create_model, list_models, load_model, model_spec, save_model
from breastcnn.models.classifier import capabilities, predict_in_batches
from breastcnn.models.io import NumpyClassifier
from breastcnn.models.registry import model_framework, register_model
from breastcnn.models.spec import CAPABILITIES, DEFAULT_IMAGE_SIZE, default_classes
from breastcnn.nn import Dense, Flatten, Sequential, Softmax

# --------------------------------------------------------------------------- ModelSpec.from_meta


def test_from_meta_reads_every_field_and_round_trips():
    meta = {
        "arch": "custom-k4",
        "classes": ["benign", "malignant"],
        "image_size": 96,
        "preprocess": "minmax",
        "split_hash": "abc",
        "seed": 3,
    }
    spec = ModelSpec.from_meta(meta, framework="numpy", source="m.npz", input_shape=(96, 96, 3), num_classes=2)
    assert spec == ModelSpec("custom-k4", "numpy", ("benign", "malignant"), 96, "minmax", "binary", None)
    assert spec.num_classes == 2 and spec.capabilities is CAPABILITIES["numpy"]
    assert spec.to_meta() == {
        "arch": "custom-k4",
        "classes": ["benign", "malignant"],
        "image_size": 96,
        "preprocess": "minmax",
    }  # task/stain only when set: files stay as they were
    with_options = ModelSpec("custom", "numpy", ("a", "b"), 64, "caffe", task="binary", stain={"method": "macenko"})
    assert with_options.to_meta()["stain"] == {"method": "macenko"} and "task" not in with_options.to_meta()


def test_a_numpy_model_s_missing_fields_come_from_the_model():
    """Older files and hand-built models: the input side, the output width and the builders' defaults."""
    spec = ModelSpec.from_meta({}, framework="numpy", input_shape=(40, 40, 3), num_classes=3)
    assert (spec.arch, spec.classes, spec.image_size, spec.preprocess) == ("custom", ("0", "1", "2"), 40, "caffe")
    assert default_classes(2) == breastcnn.CLASSES


@pytest.mark.parametrize(
    "meta, framework, message",
    [
        ({"classes": ["benign"], "preprocess": "caffe"}, "keras", "'classes' must be a list of at least two distinct"),
        ({"classes": ["a", "a"], "preprocess": "caffe"}, "keras", "'classes' must be a list of at least two distinct"),
        ({"classes": ["a", "b", "c"], "preprocess": "caffe"}, "keras", "names 3 classes but the model has 2 outputs"),
        (
            {"classes": ["a", "b"], "preprocess": "zscore"},
            "keras",
            "'preprocess' must be caffe or minmax, received 'zscore'",
        ),
        (
            {"classes": ["a", "b"], "preprocess": "caffe", "image_size": 32},
            "keras",
            r"image_size 32 does not match the model's input shape \[64, 64, 3\]",
        ),
        (
            {"classes": ["a", "b"], "preprocess": "caffe", "image_size": "64"},
            "keras",
            "'image_size' must be a positive",
        ),
        (
            {"classes": ["a", "b"], "preprocess": "caffe", "task": "tumour"},
            "keras",
            "'task' must be one of binary, subtype, received 'tumour'",
        ),
        (
            {"classes": ["a", "b"], "preprocess": "caffe", "task": "subtype"},
            "keras",
            r"a subtype model's 'classes' must be \['adenosis'",
        ),
        (
            {"classes": ["a", "b"], "preprocess": "caffe", "stain": {"method": "macenko"}},
            "keras",
            "stain method 'macenko' has no fitted 'normaliser'",
        ),
        (
            {"classes": ["a", "b"], "preprocess": "caffe", "stain": {"method": "none", "colour": 1}},
            "keras",
            r"'stain' has unknown keys \['colour'\]",
        ),
        ({"classes": ["a", "b"], "preprocess": "caffe", "stain": "macenko"}, "keras", "'stain' must be a JSON object"),
        ({"classes": ["a", "b"], "preprocess": "caffe", "arch": ""}, "keras", "'arch' must be a non-empty string"),
        ({"preprocess": "caffe"}, "keras", "lacks classes"),
        ({"classes": ["a", "b"]}, "onnx", "lacks image_size, preprocess"),
    ],
)
def test_bad_metadata_is_one_error_naming_the_file(meta, framework, message):
    with pytest.raises(UserInputError, match=r"^runs/x/model\.keras\.json: .*" + message):
        ModelSpec.from_meta(
            meta, framework=framework, source="runs/x/model.keras.json", input_shape=(64, 64, 3), num_classes=2
        )


def test_without_an_input_shape_the_image_size_is_required():
    with pytest.raises(UserInputError, match="lacks classes, image_size, preprocess"):
        ModelSpec.from_meta({}, framework="keras")
    with pytest.raises(UserInputError, match="metadata must be a JSON object"):
        ModelSpec.from_meta(["not", "a", "dict"], framework="numpy")
    with pytest.raises(ValueError, match="framework must be one of"):
        ModelSpec.from_meta({}, framework="torch")


# --------------------------------------------------------------------------- checked where a model is loaded


def _rewrite_npz_meta(path: Path, change) -> None:
    """Edit the meta inside an .npz's __config__ (the arrays are kept as they are)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    config = json.loads(str(arrays["__config__"][()]))
    change(config["meta"])
    arrays["__config__"] = np.array(json.dumps(config))
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(preprocess="zscore"), "'preprocess' must be caffe or minmax"),
        (lambda m: m.update(classes=["benign"]), "'classes' must be a list of at least two"),
        (lambda m: m.update(classes=["a", "b", "c"]), "names 3 classes but the model has 2 outputs"),
        (lambda m: m.update(task="subtype"), "a subtype model's 'classes' must be"),
        (lambda m: m.update(task="grade"), "'task' must be one of"),
        (
            lambda m: m.update(stain={"method": "reinhard", "normaliser": {"method": "reinhard", "version": 1}}),
            r"stain normaliser \(reinhard\): missing keys",
        ),
        (lambda m: m.update(image_size=128), "image_size 128 does not match"),
    ],
)
def test_a_npz_with_bad_metadata_is_refused_naming_it(tmp_path, change, message):
    path = tmp_path / "bad.npz"
    save_model(create_model("custom", input_shape=(64, 64, 3)), path)
    _rewrite_npz_meta(path, change)
    with pytest.raises(UserInputError, match=rf"^{path}: .*{message}"):
        load_model(path)


def test_an_npz_without_spec_keys_loads_with_the_model_s_own_values(tmp_path):
    """A file whose meta predates the spec (or a hand-built Sequential's empty meta) still loads."""
    path = tmp_path / "old.npz"
    save_model(Sequential([Flatten(), Dense(3), Softmax()], input_shape=(8, 8, 3), seed=0), path)
    model = load_model(path)
    assert isinstance(model, NumpyClassifier) and model.meta == {}
    assert model.spec == ModelSpec("custom", "numpy", ("0", "1", "2"), 8, "caffe")


@pytest.mark.onnx
def test_an_onnx_file_with_bad_metadata_is_refused_naming_it(onnxruntime, tmp_path):
    import onnx

    from breastcnn.models.onnx_export import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(create_model("custom", input_shape=(64, 64, 3)), path)
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "classes":
            prop.value = json.dumps(["benign"])
    onnx.save(proto, str(path))
    with pytest.raises(UserInputError, match=rf"^{path}: 'classes' must be a list of at least two distinct"):
        load_model(path)


@pytest.mark.keras
def test_a_keras_sidecar_with_bad_metadata_is_refused_naming_it(keras, tmp_path):
    from breastcnn.models.keras_models import sidecar_path

    path = tmp_path / "m.keras"
    save_model(create_model("custom-keras", input_shape=(64, 64, 3)), path)
    side = sidecar_path(path)
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "stain": "macenko"}))
    with pytest.raises(UserInputError, match=rf"^{side}: 'stain' must be a JSON object"):
        load_model(path)


def test_create_model_checks_the_spec_and_the_registered_framework(monkeypatch):
    from breastcnn.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registrations end with the test
    monkeypatch.setattr(registry, "_FRAMEWORKS", dict(registry._FRAMEWORKS))
    layers = lambda: [Flatten(), Dense(2), Softmax()]  # noqa: E731
    register_model(
        "spec-test-bad",
        lambda input_shape, num_classes, seed: NumpyClassifier(
            layers(), input_shape=input_shape, meta={"preprocess": "zscore"}
        ),
        overwrite=True,
        framework="numpy",
    )
    with pytest.raises(UserInputError, match="model 'spec-test-bad' was built with bad metadata: .*'zscore'"):
        create_model("spec-test-bad", input_shape=(8, 8, 3))
    register_model(
        "spec-test-liar",
        lambda input_shape, num_classes, seed: NumpyClassifier(layers(), input_shape=input_shape),
        overwrite=True,
        framework="keras",
    )
    with pytest.raises(ValueError, match="registered as a keras model but built a numpy one"):
        create_model("spec-test-liar", input_shape=(8, 8, 3))


def test_the_registry_knows_each_architecture_s_framework():
    assert list_models(framework="numpy")[:2] == ["custom", "custom-k4"]
    assert set(list_models(framework="keras")) == {"vgg16", "resnet50", "custom-keras"}
    assert list_models(framework="onnx") == []
    assert model_framework("resnet50") == "keras" and model_framework("custom-k4") == "numpy"
    with pytest.raises(UserInputError, match="unknown model 'alexnet'"):
        model_framework("alexnet")
    with pytest.raises(ValueError, match="framework must be one of"):
        list_models(framework="torch")


# --------------------------------------------------------------------------- the Classifier protocol


def _check_classifier(model, framework: str, size: int) -> None:
    assert isinstance(model, Classifier)
    spec = model.spec
    assert spec == model_spec(model) and spec.framework == model.framework == framework
    assert spec.image_size == size and spec.classes == breastcnn.CLASSES and tuple(model.input_shape) == (size, size, 3)
    x = preprocess(np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8), spec.preprocess)
    probs = model.predict(x, batch_size=2)
    assert probs.shape == (3, 2) and probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    counts = model.count_params()
    assert set(counts) == {"trainable", "non_trainable"} and counts["trainable"] > 0
    assert isinstance(model.summary(), str) and isinstance(model.meta, dict)


@pytest.mark.onnx
def test_numpy_and_onnx_classifiers_satisfy_the_protocol(onnxruntime, tmp_path):
    from breastcnn.models.onnx_export import export_onnx

    built = create_model("custom", input_shape=(64, 64, 3))
    npz = save_model(built, tmp_path / "m.npz")
    export_onnx(built, tmp_path / "m.onnx")
    for model, framework in ((built, "numpy"), (load_model(npz), "numpy"), (load_model(tmp_path / "m.onnx"), "onnx")):
        _check_classifier(model, framework, 64)
    assert capabilities(built).engine_threads and not capabilities(load_model(tmp_path / "m.onnx")).layer_outputs


@pytest.mark.keras
def test_keras_classifiers_satisfy_the_protocol(keras, tmp_path):
    built = create_model("custom-keras", input_shape=(64, 64, 3))
    path = save_model(built, tmp_path / "m.keras")
    for model in (built, load_model(path)):
        _check_classifier(model, "keras", 64)


def test_what_is_not_a_classifier_and_the_stand_ins_that_are_read_alike():
    class Predicts:
        framework, meta = "keras", {"classes": ["benign", "malignant"], "preprocess": "minmax", "image_size": 16}

        def predict(self, x, batch_size=64):
            return np.zeros((len(x), 2), np.float32)

    assert not isinstance(Predicts(), Classifier) and not isinstance(object(), Classifier)
    # a stand-in with only the classifier's meta (as the inference tests use) has the same spec
    assert model_spec(Predicts()) == ModelSpec("unknown", "keras", breastcnn.CLASSES, 16, "minmax")
    plain = Sequential([Flatten(), Dense(2), Softmax()], input_shape=(8, 8, 3))  # built by hand: no spec
    assert model_spec(plain).image_size == 8 and not hasattr(plain, "spec")


def test_save_model_is_the_only_save_path_of_a_numpy_model(tmp_path):
    model = create_model("custom", input_shape=(64, 64, 3), seed=2)
    assert save_model(model, tmp_path / "a.npz") == tmp_path / "a.npz"
    assert load_model(tmp_path / "a.npz").get_weights().keys() == model.get_weights().keys()
    # the engine does no I/O, and the NumPy classifier has no save method of its own
    assert not hasattr(Sequential, "save") and not hasattr(model, "save")
    with pytest.raises(TypeError, match="save_model expects a breastcnn model"):
        save_model(object(), tmp_path / "c.npz")


def test_the_default_image_size_is_the_registry_default():
    assert create_model("custom").spec.image_size == DEFAULT_IMAGE_SIZE == 224


def test_predict_in_batches_checks_the_input_and_reports_progress():
    seen = []

    def run(batch):
        assert batch.dtype == np.float32 and batch.flags.c_contiguous
        seen.append(len(batch))
        return np.stack([batch.mean(axis=(1, 2, 3)), -batch.mean(axis=(1, 2, 3))], axis=1)

    x = np.arange(5 * 2 * 2 * 3, dtype=np.float64).reshape(5, 2, 2, 3)
    advanced = []
    out = predict_in_batches(x, input_shape=(2, 2, 3), num_classes=2, batch_size=2, run=run, progress=advanced.append)
    assert out.dtype == np.float32 and out.shape == (5, 2)
    np.testing.assert_allclose(out[:, 0], x.mean(axis=(1, 2, 3)))
    assert seen == advanced == [2, 2, 1]
    with pytest.raises(
        UserInputError, match=r"^vgg16 model expects images of shape \(N, 2, 2, 3\), received \(5, 2, 3\)"
    ):
        predict_in_batches(x[:, 0], input_shape=(2, 2, 3), num_classes=2, batch_size=2, run=run, what="vgg16 model")
    with pytest.raises(UserInputError, match="batch_size must be >= 1, received 0"):
        predict_in_batches(x, input_shape=(2, 2, 3), num_classes=2, batch_size=0, run=run)

"""ONNX export (``models.onnx_export``) and ONNX Runtime as a classifier (``models.onnx_runtime``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from breastcnn.errors import UserInputError
from breastcnn.models import create_model, load_model, save_model
from breastcnn.nn import layers as L
from breastcnn.nn.model import Sequential

pytestmark = pytest.mark.onnx


def ort_outputs(proto, x: np.ndarray) -> np.ndarray:
    """Run an exported graph directly (no breastcnn loader checks): for models the loader refuses by design."""
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": x})[0]


def export_and_load(model, path, **kwargs):
    from breastcnn.models.onnx_export import export_onnx
    from breastcnn.models.onnx_runtime import load_onnx_model

    export_onnx(model, path)
    return load_onnx_model(path, **kwargs)


# ------------------------------------------------------------------- same probabilities as predict


@pytest.mark.parametrize(
    "arch,size,activation",
    [
        ("custom", 64, "relu"),
        ("custom-k4", 64, "relu"),
        ("custom", 80, "leaky_relu"),
        ("custom-k4", 72, "leaky_relu"),
        ("custom", 224, "relu"),
        ("custom-k4", 224, "relu"),
    ],
)
def test_onnx_runtime_gives_the_numpy_probabilities(
    onnxruntime, tmp_path, arch, size, activation, randomize_batchnorm, unsaturate
):
    model = randomize_batchnorm(create_model(arch, (size, size, 3), 2, seed=3, activation=activation), seed=size)
    model.meta["preprocess"] = "minmax"
    rng = np.random.default_rng(7)  # a colour cast per image + noise: images that differ, so do the outputs
    x = (rng.uniform(0.0, 0.7, (5, 1, 1, 3)) + rng.uniform(0.0, 0.3, (5, size, size, 3))).astype(np.float32)
    unsaturate(model, x)
    classifier = export_and_load(model, tmp_path / "m.onnx", threads=1)
    expected = model.predict(x)
    assert np.ptp(expected[:, 1]) > 0.2  # informative: not a constant (saturated) output
    for batch in (1, 5):
        got = classifier.predict(x[:batch], batch_size=batch)
        assert got.dtype == np.float32 and got.shape == (batch, 2)
        np.testing.assert_allclose(got, expected[:batch], atol=1e-4)
    np.testing.assert_allclose(classifier.predict(x, batch_size=2), expected, atol=1e-4)  # uneven last batch


def _general_model(randomize_batchnorm, input_shape=(30, 23, 3)) -> Sequential:
    """Every exportable layer: same padding (odd sizes, strides 1-3, even kernel), BN with and without a conv
    before it and with and without a ReLU after, LeakyReLU, overlapping pooling, Flatten of a non-square map,
    Dropout, GAP-free dense head; a non-square input so that any NHWC/NCHW mix-up shows."""
    layers = [
        L.Conv2D(6, 4, strides=3, padding="same", use_bias=False),
        L.BatchNorm(),
        L.LeakyReLU(0.2),
        L.Conv2D(5, 3, strides=1, padding="same"),
        L.BatchNorm(),  # no ReLU after this BN
        L.MaxPool2D(3, strides=2),
        L.BatchNorm(),
        L.ReLU(),  # BN without a conv
        L.Conv2D(7, 2, strides=1, padding="same"),
        L.ReLU(),  # 4x3x7 map
        L.Flatten(),
        L.Dropout(0.5),
        L.BatchNorm(),  # BN on flat features
        L.Dense(9),
        L.ReLU(),
        L.Dense(3),
        L.Softmax(),
    ]
    model = Sequential(
        layers, input_shape=input_shape, seed=2, meta={"preprocess": "minmax", "classes": ["a", "b", "c"]}
    )
    return randomize_batchnorm(model, seed=5)


def test_every_layer_kind_and_same_padding_match(onnxruntime, randomize_batchnorm):
    from breastcnn.models.onnx_export import to_onnx

    model = _general_model(randomize_batchnorm)
    x = np.random.default_rng(0).normal(0.0, 1.0, (5, 30, 23, 3)).astype(np.float32)
    expected = model.predict(x)
    assert np.ptp(expected) > 0.05
    proto = to_onnx(model)
    for batch in (1, 5):
        np.testing.assert_allclose(ort_outputs(proto, x[:batch]), expected[:batch], atol=1e-5)
    ops = [n.op_type for n in proto.graph.node]
    assert "Dropout" not in ops and "BatchNormalization" not in ops
    assert ops.count("Conv") == 3 and ops.count("Mul") == 2  # two convs folded their BN; two BNs stand alone
    pads = [list(a.ints) for n in proto.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]
    # TF "same" [top, left, bottom, right]: 30 rows / 3 -> 10 need 1 more (after), 23 cols -> 8 need 2 (1 + 1)
    assert pads[0] == [0, 1, 1, 1] and pads[2] == [0, 0, 1, 1]


def test_gap_head_and_feature_map_output(onnxruntime, randomize_batchnorm):
    from breastcnn.models.onnx_export import to_onnx

    rng = np.random.default_rng(1)
    gap = randomize_batchnorm(
        Sequential(
            [
                L.Conv2D(8, 3, strides=2),
                L.BatchNorm(),
                L.ReLU(),
                L.GlobalAveragePooling2D(),
                L.BatchNorm(),
                L.Dense(2),
                L.Softmax(),
            ],
            input_shape=(20, 20, 3),
            seed=1,
        ),
        seed=1,
    )
    # a model ending on feature maps (softmax over channels): handed back NHWC like the engine
    maps = randomize_batchnorm(
        Sequential(
            [L.Conv2D(4, 3, strides=2, padding="same"), L.BatchNorm(), L.Softmax()], input_shape=(9, 11, 3), seed=1
        )
    )
    for model, shape in ((gap, (5, 20, 20, 3)), (maps, (5, 9, 11, 3))):
        x = rng.normal(0.0, 1.0, shape).astype(np.float32)
        expected = model.predict(x)
        got = ort_outputs(to_onnx(model), x)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_folding_uses_the_moving_statistics(onnxruntime, randomize_batchnorm):
    """The folded conv equals conv -> BN(moving stats): changing the statistics changes the export."""
    from breastcnn.models.onnx_export import to_onnx

    model = randomize_batchnorm(create_model("custom", (64, 64, 3), 2, seed=0), seed=1)
    x = np.random.default_rng(2).normal(0.0, 30.0, (2, 64, 64, 3)).astype(np.float32)
    before = to_onnx(model)
    bn = model.layers[1]
    bn.state["moving_mean"] = bn.state["moving_mean"] + 3.0
    after = to_onnx(model)
    w_before = {t.name: t for t in before.graph.initializer}["conv2d_1+batch_norm_1.b"]
    w_after = {t.name: t for t in after.graph.initializer}["conv2d_1+batch_norm_1.b"]
    from onnx import numpy_helper

    scale, _ = bn.inference_affine()
    np.testing.assert_allclose(
        numpy_helper.to_array(w_before) - numpy_helper.to_array(w_after), 3.0 * scale, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(ort_outputs(after, x), model.predict(x), atol=1e-4)


# ------------------------------------------------------------------- the file: checker, opset, metadata


def test_checker_opset_and_metadata_round_trip(onnxruntime, tmp_path):
    import onnx

    from breastcnn import __version__
    from breastcnn.models.onnx_export import OPSET, export_onnx

    model = create_model("custom-k4", (64, 64, 3), 2, seed=0, activation="leaky_relu")
    model.meta.update({"split_hash": "abc123", "seed": 7})
    path = tmp_path / "k4.onnx"
    written = export_onnx(model, path, source="runs/x/model.npz")
    assert written["opset"] == OPSET == 17 and written["size_bytes"] == path.stat().st_size
    assert written["max_abs_diff"] is not None and written["max_abs_diff"] <= 1e-4
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    assert proto.ir_version == onnx.helper.find_min_ir_version_for(proto.opset_import)
    assert proto.producer_name == "breastcnn" and proto.producer_version == __version__
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [64, 64, 3]  # dynamic batch, NHWC
    assert "NHWC" in proto.doc_string and "divided by 255" not in proto.doc_string
    assert "ImageNet mean [103.939, 116.779, 123.68]" in proto.doc_string  # caffe, spelled out
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["input_layout"] == "NHWC" and props["preprocess"] == "caffe" and props["image_size"] == "64"
    assert json.loads(props["classes"]) == ["benign", "malignant"] and props["arch"] == "custom-k4"

    classifier = load_model(path)  # models.load_model dispatches .onnx
    assert classifier.framework == "onnx"
    meta = classifier.meta
    assert meta["classes"] == ["benign", "malignant"] and meta["image_size"] == 64 and meta["preprocess"] == "caffe"
    assert meta["arch"] == "custom-k4" and meta["activation"] == "leaky_relu" and meta["opset"] == 17
    assert meta["split_hash"] == "abc123" and meta["seed"] == 7 and meta["exported_from"] == "runs/x/model.npz"
    assert meta["breastcnn_version"] == __version__ and meta["input_layout"] == "NHWC"
    assert classifier.count_params() == model.count_params()
    assert classifier.input_shape == (64, 64, 3) and classifier.output_shape == (2,)
    assert "Conv" in classifier.summary() and "BatchNormalization" not in classifier.summary()
    assert classifier.save(tmp_path / "copy.onnx").read_bytes() == path.read_bytes()
    with pytest.raises(UserInputError, match="saved as .onnx"):
        classifier.save(tmp_path / "copy.npz")


def test_minmax_description_and_unknown_mode():
    from breastcnn.models.onnx_export import preprocess_description

    assert "divided by 255" in preprocess_description("minmax", 96) and "96x96" in preprocess_description("minmax", 96)
    with pytest.raises(UserInputError, match="'zscore' is unknown"):
        preprocess_description("zscore", 96)


def test_unknown_layers_are_refused_by_name(onnxruntime, tmp_path):
    from breastcnn.models.onnx_export import export_onnx, to_onnx

    class Swish(L.Layer):
        def forward(self, x, training=False, cache=True):
            return x / (1.0 + np.exp(-x))

    class MyReLU(L.ReLU):  # a subclass could compute anything: exact classes only
        pass

    for odd, cls in ((Swish(name="swish_1"), "Swish"), (MyReLU(name="my_relu"), "MyReLU")):
        model = Sequential([L.Conv2D(4, 3), odd, L.Flatten(), L.Dense(2), L.Softmax()], input_shape=(8, 8, 3))
        with pytest.raises(
            UserInputError,
            match=rf"cannot export layer 1 '{odd.name}' \({cls}\) to ONNX; "
            r"supported layers: BatchNorm, Conv2D",
        ):
            export_onnx(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(UserInputError, match="takes a NumPy breastcnn model"):
        to_onnx(object())


def test_export_refuses_a_graph_that_disagrees(onnxruntime, tmp_path, monkeypatch):
    """The export's own check against predict can fail: a broken fold is caught and nothing is written."""
    from breastcnn.models import onnx_export

    real = onnx_export._bn_affine64
    monkeypatch.setattr(onnx_export, "_bn_affine64", lambda bn: (real(bn)[0], real(bn)[1] + 1.0))
    model = create_model("custom", (64, 64, 3), 2, seed=0)
    model.meta["preprocess"] = "minmax"
    with pytest.raises(UserInputError, match=r"differ from the NumPy model's by .* not written"):
        onnx_export.export_onnx(model, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


# ------------------------------------------------------------------- the loader refuses what it should


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from breastcnn.models.onnx_export import to_onnx

    model = create_model("custom", (64, 64, 3), 2, seed=1)
    return model, to_onnx(model)


def _save(proto, path):
    path.write_bytes(proto.SerializeToString())
    return path


def test_loader_refuses_foreign_or_unsafe_files(onnxruntime, exported, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from breastcnn.models.onnx_runtime import load_onnx_model

    _, proto = exported
    with pytest.raises(UserInputError, match="no such file"):
        load_onnx_model(tmp_path / "missing.onnx")
    (tmp_path / "m.bin").write_bytes(proto.SerializeToString())
    with pytest.raises(UserInputError, match="ends in .onnx"):
        load_onnx_model(tmp_path / "m.bin")
    (tmp_path / "junk.onnx").write_bytes(b"\xff\x00 not a protobuf at all" * 10)
    with pytest.raises(UserInputError, match="junk.onnx: not a readable ONNX model|junk.onnx: not a breastcnn"):
        load_onnx_model(tmp_path / "junk.onnx")

    plain = onnx.ModelProto()
    plain.CopyFrom(proto)
    del plain.metadata_props[:]
    with pytest.raises(UserInputError, match="not a breastcnn ONNX model .*breastcnn export --to onnx"):
        load_onnx_model(_save(plain, tmp_path / "plain.onnx"))

    custom = onnx.ModelProto()
    custom.CopyFrom(proto)
    custom.graph.node[1].domain = "com.evil"
    custom.opset_import.append(helper.make_opsetid("com.evil", 1))
    with pytest.raises(UserInputError, match="custom operator domain 'com.evil'"):
        load_onnx_model(_save(custom, tmp_path / "custom.onnx"))
    del custom.opset_import[1:]
    with pytest.raises(UserInputError, match=r"node 'conv2d_1\+batch_norm_1' is the custom operator com.evil.Conv"):
        load_onnx_model(_save(custom, tmp_path / "custom2.onnx"))

    outside = tmp_path / "secret.bin"
    outside.write_bytes(np.zeros(4096, np.float32).tobytes())
    (tmp_path / "sub").mkdir()
    for location in ("../secret.bin", str(outside), "nothing-here.bin"):
        external = onnx.ModelProto()
        external.CopyFrom(proto)
        tensor = external.graph.initializer[0]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", location
        with pytest.raises(UserInputError, match=f"reads external data from {location!r}.*refusing"):
            load_onnx_model(_save(external, tmp_path / "sub" / "ext.onnx"))

    wrong = onnx.ModelProto()
    wrong.CopyFrom(proto)
    for prop in wrong.metadata_props:
        if prop.key == "image_size":
            prop.value = "96"
    with pytest.raises(UserInputError, match=r"takes \['N', 64, 64, 3\].*metadata says float32 \(N, 96, 96, C\)"):
        load_onnx_model(_save(wrong, tmp_path / "wrong.onnx"))
    for prop in wrong.metadata_props:
        if prop.key == "preprocess":
            prop.value = "zscore"
    with pytest.raises(UserInputError, match="wrong2.onnx: 'preprocess' must be caffe or minmax, received 'zscore'"):
        load_onnx_model(_save(wrong, tmp_path / "wrong2.onnx"))


def test_loader_accepts_external_data_inside_its_folder(onnxruntime, exported, tmp_path):
    import onnx

    from breastcnn.models.onnx_runtime import load_onnx_model

    model, proto = exported
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    onnx.save_model(
        copy, str(tmp_path / "big.onnx"), save_as_external_data=True, location="big.weights", size_threshold=0
    )
    classifier = load_onnx_model(tmp_path / "big.onnx", threads=1)
    x = np.random.default_rng(0).normal(0.0, 20.0, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(classifier.predict(x), model.predict(x), atol=1e-4)


def test_predict_contract_and_threads(onnxruntime, exported, tmp_path):
    from breastcnn.models.onnx_runtime import load_onnx_model

    model, proto = exported
    classifier = load_onnx_model(_save(proto, tmp_path / "m.onnx"), threads=1)
    assert classifier.session.get_session_options().intra_op_num_threads == 1
    x = np.random.default_rng(0).normal(0.0, 20.0, (3, 64, 64, 3)).astype(np.float32)
    one = classifier.predict(x)
    classifier.set_threads(2, inter_op_threads=1)
    assert classifier.threads == 2 and classifier.session.get_session_options().intra_op_num_threads == 2
    np.testing.assert_allclose(classifier.predict(x.astype(np.float64)), one, atol=1e-6)  # dtype cast like numpy
    seen = []
    classifier.predict(x, batch_size=2, progress=seen.append)
    assert seen == [2, 1]
    assert classifier.predict(x[:0]).shape == (0, 2)
    with pytest.raises(UserInputError, match=r"expects images of shape \(N, 64, 64, 3\), received \(3, 32, 32, 3\)"):
        classifier.predict(np.zeros((3, 32, 32, 3), np.float32))
    with pytest.raises(UserInputError, match="batch_size must be >= 1"):
        classifier.predict(x, batch_size=0)
    with pytest.raises(UserInputError, match="threads must be >= 1"):
        classifier.set_threads(0)


# ------------------------------------------------------------------- optional dependency


@pytest.mark.slow  # Python subprocesses (1 s)
def test_onnx_is_imported_lazily_and_its_absence_is_explained(tmp_path):
    path = tmp_path / "m.npz"
    save_model(create_model("custom", (64, 64, 3), 2, seed=0), path)
    code = (
        "import sys\n"
        "import breastcnn.models, breastcnn.models.onnx_export, breastcnn.models.onnx_runtime\n"
        "from breastcnn.cli.app import app\n"
        "assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules\n"
        "sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None\n"
        "from breastcnn.errors import MissingDependencyError\n"
        "from breastcnn.models.onnx_export import to_onnx\n"
        "from breastcnn.models import load_model\n"
        f"m = load_model({str(path)!r})\n"
        "for call in (lambda: to_onnx(m), lambda: load_model('x.onnx')):\n"
        "    try:\n"
        "        call()\n"
        "    except MissingDependencyError as exc:\n"
        "        print(exc)\n"
    )
    (tmp_path / "x.onnx").write_bytes(b"")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all("pip install 'breastcnn[onnx]'" in line for line in lines)
    assert lines[0].startswith("ONNX export needs the onnx package") and lines[1].startswith("running ONNX models")

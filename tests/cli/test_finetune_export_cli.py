"""`breastcnn finetune` (Keras and NumPy paths) and `breastcnn export`, end to end through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from breastcnn.cli.app import app

SIZES = {"vgg16": 32, "resnet50": 32, "custom-keras": 64}


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny synthetic 200X tree + split (82 images: 64 train / 9 val / 9 test), made once per module."""
    root = tmp_path_factory.mktemp("finetune_cli")
    result = invoke("synth", "--out", root, "--scale", "0.02", "--mags", "200X", "--jobs", "1")
    assert result.exit_code == 0, result.output
    split = root / "split"
    result = invoke(
        "split", "--mag", "200X", "--data", root, "--out", split, "--jobs", "1", "--stratify", "class"
    )  # the 64/9/9 counts asserted below
    assert result.exit_code == 0, result.output
    images = sorted((root / "BreaKHis_v1").rglob("*.png"))[:6]
    return {"root": root, "split": split, "images": images}


@pytest.fixture(scope="module")
def runs(keras, data):
    """One short epoch of each Keras model, --weights none (module-scoped: TF work is slow)."""
    out = {}
    for model, size in SIZES.items():
        run = data["root"] / "runs" / model
        result = invoke(
            "finetune",
            "--model",
            model,
            "--split",
            data["split"],
            "--weights",
            "none",
            "--epochs",
            1,
            "--batch-size",
            32,
            "--image-size",
            size,
            "--out",
            run,
            "--json",
        )
        assert result.exit_code == 0, result.output
        out[model] = (run, json.loads(result.stdout))
    return out


def _predict(model_path, images):
    result = invoke("predict", "--model", model_path, *images, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == [str(p) for p in images]
    return np.array([r["probability"] for r in rows])


@pytest.mark.slow  # fine-tunes VGG16 and ResNet50 for an epoch (13-55 s)
@pytest.mark.parametrize("model", list(SIZES))
def test_finetune_then_evaluate_and_predict(runs, data, model):
    run, summary = runs[model]
    assert summary["arch"] == model and summary["epochs_run"] == 1 and summary["stopped"] == "completed"
    assert summary["model_path"] == str(run / "model.keras")
    side = json.loads((run / "model.keras.json").read_text())
    assert side["image_size"] == SIZES[model] and side["preprocess"] == "caffe"
    header = (run / "history.csv").read_text().splitlines()[0]
    assert header == (
        "step,epoch,loss,accuracy,val_loss,val_accuracy,val_f1,val_recall,lr,elapsed_s,"
        "data_loss,l2_penalty,val_balanced_accuracy,val_auc"
    )
    config = json.loads((run / "config.json").read_text())["options"]
    assert config["weights"] == "none" and config["epochs"] == 1
    if model == "custom-keras":  # trained like `breastcnn train`: the default recipe
        from breastcnn.training.recipes import RECIPES

        assert config["recipe"] == "default" and summary["recipe"] == "default"
        assert config["lr"] == RECIPES["default"].lr and config["l2"] == RECIPES["default"].l2
        assert config["batch_size"] == 32 and config["monitor"] == RECIPES["default"].monitor
    else:  # transfer learning, no recipe
        assert config["lr"] == 1e-4 and "recipe" not in config and summary["recipe"] is None

    result = invoke("evaluate", "--model", run, "--split", data["split"], "--json", "--out", run / "eval")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["n"] == 9 and 0.0 <= scores["accuracy"] <= 1.0 and len(scores["confusion_matrix"]) == 2
    probs = _predict(run / "model.keras", data["images"])
    assert np.all((probs >= 0) & (probs <= 1))


@pytest.mark.slow  # Keras round trip (5 s)
def test_export_numpy_to_keras_and_back_gives_the_same_probabilities(keras, data, tmp_path):
    from breastcnn.models import create_model, save_model

    npz = tmp_path / "custom" / "model.npz"
    numpy_model = create_model("custom", (64, 64, 3), 2, seed=4)
    # minmax inputs keep an untrained model's softmax away from saturation, so the match is informative
    numpy_model.meta["preprocess"] = "minmax"
    save_model(numpy_model, npz)
    kpath = tmp_path / "exported" / "model.keras"
    result = invoke("export", "--model", npz, "--to", "keras", "--out", kpath)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in kpath.parent.iterdir()) == ["model.keras", "model.keras.json"]
    p_numpy = _predict(npz, data["images"])
    p_keras = _predict(kpath, data["images"])
    np.testing.assert_allclose(p_keras, p_numpy, atol=1e-4)
    assert np.ptp(p_numpy) > 0.01  # not a constant output that would match trivially

    back = tmp_path / "back.npz"
    result = invoke("export", "--model", kpath, "--to", "numpy", "--out", back, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["params"]["trainable"] == 32386
    assert json.loads(kpath.with_name("model.keras.json").read_text())["preprocess"] == "minmax"
    np.testing.assert_allclose(_predict(back, data["images"]), p_numpy, atol=1e-4)

    # no overwrite without --force
    result = invoke("export", "--model", npz, "--to", "keras", "--out", kpath)
    assert result.exit_code == 2 and "already exists; pass --force" in result.output
    assert invoke("export", "--model", npz, "--to", "keras", "--out", kpath, "--force").exit_code == 0


@pytest.mark.slow  # two Keras exports (7 s)
def test_two_exports_into_one_folder_each_keep_their_metadata(keras, data, tmp_path):
    """Issue 16 item 5: a.keras and b.keras in one folder (the second refused before: breastcnn.json existed)."""
    from breastcnn.models import create_model, save_model

    sources = {}
    for name, (seed, mode) in {"a": (1, "minmax"), "b": (2, "caffe")}.items():
        model = create_model("custom", (64, 64, 3), 2, seed=seed)
        model.meta["preprocess"] = mode
        sources[name] = tmp_path / name / "model.npz"
        save_model(model, sources[name])
    out = tmp_path / "exported"
    for name, source in sources.items():
        result = invoke("export", "--model", source, "--to", "keras", "--out", out / f"{name}.keras", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["sidecar"] == str(out / f"{name}.keras.json")
    assert sorted(p.name for p in out.iterdir()) == ["a.keras", "a.keras.json", "b.keras", "b.keras.json"]
    for name, mode in (("a", "minmax"), ("b", "caffe")):
        assert json.loads((out / f"{name}.keras.json").read_text())["preprocess"] == mode
        np.testing.assert_allclose(
            _predict(out / f"{name}.keras", data["images"]), _predict(sources[name], data["images"]), atol=1e-4
        )
    result = invoke("export", "--model", sources["a"], "--to", "keras", "--out", out / "b.keras")
    assert result.exit_code == 2 and "b.keras already exists; pass --force" in result.output


@pytest.mark.slow  # uses the three Keras fine-tunings of `runs` (50 s)
def test_export_trained_custom_keras_to_numpy(runs, data, tmp_path):
    run, _ = runs["custom-keras"]
    out = tmp_path / "model.npz"
    result = invoke("export", "--model", run / "model.keras", "--to", "numpy", "--out", out)
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(_predict(out, data["images"]), _predict(run / "model.keras", data["images"]), atol=1e-4)
    result = invoke("finetune", "--model", out, "--split", data["split"], "--weights", "none")
    assert result.exit_code == 2 and "--weights applies to Keras models" in result.output


@pytest.mark.slow  # uses the three Keras fine-tunings of `runs` (50 s)
def test_export_errors(runs, tmp_path):
    vgg_run, _ = runs["vgg16"]
    result = invoke("export", "--model", vgg_run / "model.keras", "--to", "numpy", "--out", tmp_path / "v.npz")
    assert result.exit_code == 2 and "custom-keras models only" in result.output and "'vgg16'" in result.output
    result = invoke("export", "--model", vgg_run / "model.keras", "--to", "tflite", "--out", tmp_path / "v.tfl")
    assert result.exit_code == 2 and "--to must be one of keras, numpy, onnx, received 'tflite'" in result.output
    result = invoke("export", "--model", vgg_run / "model.keras", "--to", "onnx", "--out", tmp_path / "v.onnx")
    assert result.exit_code == 2 and "--to onnx converts a NumPy .npz model" in result.output
    assert not list(tmp_path.iterdir())


def test_missing_imagenet_weights_is_one_line_exit_2(keras, data, tmp_path):
    env = {"KERAS_HOME": str(tmp_path / "empty"), "BREASTCNN_OFFLINE": "1"}
    for model in ("vgg16", "resnet50"):
        result = invoke(
            "finetune",
            "--model",
            model,
            "--split",
            data["split"],
            "--image-size",
            32,
            "--out",
            tmp_path / model,
            env=env,
        )
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line and f"{model}_weights_tf_dim_ordering_tf_kernels_notop.h5" in line
        assert "--weights none" in line and "--weights PATH" in line
        assert not (tmp_path / model).exists()  # nothing written before the error


@pytest.mark.slow  # trains a model from a new tree (5 s)
def test_finetune_numpy_model_uses_the_numpy_defaults(data, tmp_path):
    from breastcnn.models import create_model, save_model

    npz = tmp_path / "start.npz"
    save_model(create_model("custom", (64, 64, 3), 2, seed=0), npz)
    run = tmp_path / "run"
    result = invoke(
        "finetune",
        "--model",
        npz,
        "--split",
        data["split"],
        "--epochs",
        1,
        "--freeze",
        3,
        "--out",
        run,
        "--json",
        "--threads",
        1,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model_path"] == str(run / "model.npz") and summary["stopped"] == "completed"
    options = json.loads((run / "config.json").read_text())["options"]
    assert options["lr"] == 1e-3 and options["batch_size"] == 32 and options["freeze"] == 3
    assert options["threads"] == 1
    result = invoke("finetune", "--model", npz, "--split", data["split"], "--image-size", 32, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "takes 64x64 images" in result.output
    result = invoke("finetune", "--model", npz, "--split", data["split"], "--strategy", "mirrored")
    assert result.exit_code == 2 and "--strategy applies to Keras models" in result.output


def test_finetune_option_errors(synth_split, tmp_path):
    result = invoke("finetune", "--model", "alexnet", "--split", synth_split)
    assert result.exit_code == 2 and "expected vgg16, resnet50, custom-keras or a NumPy model .npz" in result.output
    result = invoke("finetune", "--model", "vgg16", "--freeze", 3, "--split", synth_split)
    assert result.exit_code == 2 and "--freeze applies to NumPy .npz models" in result.output
    result = invoke("finetune", "--model", "vgg16", "--threads", 1, "--split", synth_split)
    assert result.exit_code == 2 and "--threads applies to NumPy .npz models" in result.output


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "BREASTCNN_NO_PROGRESS": "1"}
    )


@pytest.mark.slow  # fresh interpreters (11 s)
def test_cli_and_numpy_commands_never_import_tensorflow(data, tmp_path):
    from breastcnn.models import create_model, save_model

    npz = tmp_path / "start.npz"
    save_model(create_model("custom", (64, 64, 3), 2, seed=0), npz)
    finetune = [
        "finetune",
        "--model",
        str(npz),
        "--split",
        str(data["split"]),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from breastcnn.cli.app import app\n"
        "assert 'tensorflow' not in sys.modules\n"
        f"for args in (['--help'], ['finetune', '--help'], ['export', '--help'], {finetune!r}):\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    assert r.exit_code == 0, r.output\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    out = _run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.slow  # a Python subprocess (1 s)
def test_keras_model_without_tensorflow_says_how_to_install(data):
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
        "from breastcnn.cli.app import main\n"
        f"sys.argv = ['breastcnn', 'finetune', '--model', 'vgg16', '--split', {str(data['split'])!r}]\n"
        "main()\n"
    )
    out = _run_python(code)
    assert out.returncode == 2
    assert "TensorFlow is not installed: pip install 'breastcnn[keras]'" in out.stderr

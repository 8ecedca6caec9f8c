"""``--task`` and ``--stain-norm/--stain-target/--stain-augment`` of train/finetune through the CLI, and the
commands that read them back from the model file (evaluate, predict, featuremaps) on synthetic and real tissue."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from breastcnn.cli.app import app
from breastcnn.data.images import cache_paths, decode_image, load_subset, preprocess
from breastcnn.data.split import load_split
from breastcnn.data.stain import HEDJitter, MacenkoNormaliser, normalise_batch, stain_meta
from breastcnn.data.tasks import SUBTYPE_CLASSES
from breastcnn.models import create_model, load_model, save_model
from tests.he_tissue import he_tiles


def _run(args):
    return CliRunner().invoke(app, args, env={"BREASTCNN_NO_PROGRESS": "1"})


@pytest.fixture(scope="module")
def subtype_run(synth_split, synth_image_size, tmp_path_factory):
    """A seconds-long subtype model trained with Macenko normalisation and HED jitter."""
    out = tmp_path_factory.mktemp("subtype") / "run"
    result = _run(
        [
            "train",
            "--split",
            str(synth_split),
            "--out",
            str(out),
            "--image-size",
            str(synth_image_size),
            "--epochs",
            "1",
            "--evals-per-epoch",
            "2",
            "--task",
            "subtype",
            "--stain-norm",
            "macenko",
            "--stain-augment",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    return out


def test_train_records_the_task_and_the_fitted_stain_target(subtype_run, synth_split, synth_image_size):
    model = load_model(subtype_run / "model.npz")
    spec = model.spec
    assert spec.task == "subtype" and spec.classes == SUBTYPE_CLASSES and model.output_shape[-1] == 8
    stain = model.meta["stain"]
    assert stain["method"] == "macenko" and stain["target"] == "training subset"
    assert stain["augment"] == HEDJitter().to_dict()
    split = load_split(synth_split)
    expected = MacenkoNormaliser().fit(load_subset(split, "train", synth_image_size)[0])
    np.testing.assert_allclose(stain["normaliser"]["stain_matrix"], expected.stain_matrix.tolist())
    # the training images went through the normalised cache, keyed by this target
    assert cache_paths(split, "train", synth_image_size, spec.normaliser)[0].is_file()
    options = json.loads((subtype_run / "config.json").read_text())["options"]
    assert options["task"] == "subtype" and options["stain_norm"] == "macenko" and options["stain_augment"] is True
    assert options["stain_target"] is None
    history = (subtype_run / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "nan" not in history[-1].lower()


def test_evaluate_json_of_a_subtype_model(subtype_run, synth_split, tmp_path):
    result = _run(
        [
            "evaluate",
            "--model",
            str(subtype_run / "model.npz"),
            "--split",
            str(synth_split),
            "--out",
            str(tmp_path / "e"),
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert {
        "task",
        "classes",
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "per_class",
        "confusion_matrix",
        "patient_accuracy",
        "binary",
    } <= set(metrics)
    assert metrics["task"] == "subtype" and metrics["classes"] == list(SUBTYPE_CLASSES)
    assert np.asarray(metrics["confusion_matrix"]).shape == (8, 8)
    assert set(metrics["per_class"]) == set(SUBTYPE_CLASSES)
    assert set(metrics["per_class"]["adenosis"]) == {"precision", "recall", "f1", "support"}
    assert sum(c["support"] for c in metrics["per_class"].values()) == metrics["n"]
    assert {"accuracy", "recall", "benign_recall", "roc_auc"} <= set(metrics["binary"])
    table = _run(
        [
            "evaluate",
            "--model",
            str(subtype_run / "model.npz"),
            "--split",
            str(synth_split),
            "--out",
            str(tmp_path / "e"),
            "--force",
        ]
    )
    assert table.exit_code == 0 and "macro F1" in table.stdout and "benign/malignant accuracy" in table.stdout


def test_predict_json_of_a_subtype_model(subtype_run, synth_split):
    split = load_split(synth_split)
    image = split.root / split.subset("test")[0].path
    result = _run(["predict", "--model", str(subtype_run / "model.npz"), str(image), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert list(row["probabilities"]) == list(SUBTYPE_CLASSES)
    assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    assert row["probability"] == pytest.approx(sum(list(row["probabilities"].values())[4:]), rel=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "grade"], "--task must be one of binary, subtype, got 'grade'"),
        (["--stain-norm", "vahadane"], "--stain-norm must be one of none, macenko, reinhard, got 'vahadane'"),
        (["--stain-target", "nowhere.png"], "--stain-target nowhere.png: needs --stain-norm macenko or reinhard"),
        (
            ["--stain-norm", "reinhard", "--stain-target", "nowhere.png"],
            "--stain-target nowhere.png: no such image file",
        ),
    ],
)
def test_bad_task_and_stain_options_are_one_line_and_exit_2(args, message, synth_split, tmp_path, monkeypatch):
    def no_tensorflow_yet():
        raise AssertionError("TensorFlow was reached before the options were checked")

    # a bad option is named before finetune imports TensorFlow (seconds), with or without TensorFlow installed
    monkeypatch.setattr("breastcnn.training.keras_loop.require_keras", no_tensorflow_yet)
    for command in (["train"], ["finetune", "--model", "custom-keras"]):
        result = _run([*command, "--split", str(synth_split), "--out", str(tmp_path / "r"), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "r").exists()


@pytest.mark.slow  # two trainings (1 s)
def test_stain_target_image_and_finetune_of_a_numpy_model(synth_split, synth_image_size, tmp_path):
    split = load_split(synth_split)
    target = tmp_path / "target.png"
    Image.fromarray(load_subset(split, "val", synth_image_size)[0][0]).save(target)
    first = _run(
        [
            "train",
            "--split",
            str(synth_split),
            "--out",
            str(tmp_path / "a"),
            "--image-size",
            str(synth_image_size),
            "--epochs",
            "1",
            "--evals-per-epoch",
            "1",
            "--stain-norm",
            "reinhard",
            "--stain-target",
            str(target),
            "--json",
        ]
    )
    assert first.exit_code == 0, first.output
    stain = load_model(tmp_path / "a" / "model.npz").meta["stain"]
    assert stain["method"] == "reinhard" and stain["target"] == str(target.resolve())
    assert json.loads((tmp_path / "a" / "config.json").read_text())["options"]["stain_target"] == str(target.resolve())
    assert stain["augment"] == HEDJitter().to_dict()  # the default recipe's
    # finetune a binary model for the subtype task: refused (its outputs are the binary ones)
    wrong = _run(
        [
            "finetune",
            "--model",
            str(tmp_path / "a" / "model.npz"),
            "--split",
            str(synth_split),
            "--out",
            str(tmp_path / "b"),
            "--task",
            "subtype",
            "--epochs",
            "1",
        ]
    )
    assert wrong.exit_code == 2 and "was trained for the binary task; pass --task binary" in wrong.output
    tuned = _run(
        [
            "finetune",
            "--model",
            str(tmp_path / "a" / "model.npz"),
            "--split",
            str(synth_split),
            "--out",
            str(tmp_path / "c"),
            "--epochs",
            "1",
            "--stain-norm",
            "macenko",
            "--no-stain-augment",
            "--json",
        ]
    )
    assert tuned.exit_code == 0, tuned.output
    stain = load_model(tmp_path / "c" / "model.npz").meta["stain"]
    assert stain["method"] == "macenko" and stain["augment"] is None  # the command's, not the source model's
    assert "stain_augment" in json.loads((tmp_path / "c" / "config.json").read_text())["options"]["recipe_overrides"]
    plain = _run(
        [
            "train",
            "--split",
            str(synth_split),
            "--out",
            str(tmp_path / "d"),
            "--image-size",
            str(synth_image_size),
            "--epochs",
            "1",
            "--evals-per-epoch",
            "1",
            "--recipe",
            "report",
            "--json",
        ]
    )
    assert plain.exit_code == 0, plain.output
    assert "stain" not in load_model(tmp_path / "d" / "model.npz").meta  # files stay as they were


def test_finetune_custom_keras_subtype_with_stain(keras, synth_split, synth_image_size, tmp_path):
    result = _run(
        [
            "finetune",
            "--model",
            "custom-keras",
            "--split",
            str(synth_split),
            "--out",
            str(tmp_path / "k"),
            "--image-size",
            str(synth_image_size),
            "--epochs",
            "1",
            "--task",
            "subtype",
            "--stain-norm",
            "macenko",
            "--stain-augment",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    model = load_model(tmp_path / "k" / "model.keras")
    assert model.spec.task == "subtype" and model.spec.classes == SUBTYPE_CLASSES
    assert model.meta["stain"]["method"] == "macenko" and model.spec.normaliser is not None
    evaluated = _run(
        [
            "evaluate",
            "--model",
            str(tmp_path / "k" / "model.keras"),
            "--split",
            str(synth_split),
            "--out",
            str(tmp_path / "ke"),
            "--json",
        ]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["task"] == "subtype"


# --------------------------------------------------------------------------- real H&E tissue


@pytest.fixture(scope="module")
def real_tissue(tmp_path_factory):
    """Four real H&E tiles (and a bare-glass tile) as PNGs, and a subtype model normalised to the slide's stain."""
    tiles, glass = he_tiles()
    folder = tmp_path_factory.mktemp("he")
    paths = []
    for i, tile in enumerate([*tiles[:4], glass]):
        paths.append(folder / f"tile{i}.png")
        Image.fromarray(tile).save(paths[-1])
    model = create_model("custom", input_shape=(64, 64, 3), num_classes=8, seed=5)
    model.meta.update(
        classes=list(SUBTYPE_CLASSES),
        task="subtype",
        stain=stain_meta(MacenkoNormaliser().fit(tiles[4:12]), "training subset"),
    )
    return paths, save_model(model, folder / "model.npz")


def test_predict_on_real_tissue_normalises_and_counts_the_glass_tile(real_tissue):
    paths, model_path = real_tissue
    result = _run(["predict", "--model", str(model_path), *map(str, paths), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == list(map(str, paths))
    assert "left 1 of 5 images unchanged" in result.stderr  # the bare-glass tile
    model = load_model(model_path)
    raw = np.stack([decode_image(p, 64) for p in paths])
    normalised, unchanged = normalise_batch(model.spec.normaliser, raw)
    assert unchanged == 1 and np.array_equal(normalised[-1], raw[-1]) and not np.array_equal(normalised[0], raw[0])
    expected = model.predict(preprocess(normalised, "caffe"))
    for row, p in zip(rows, expected, strict=True):
        np.testing.assert_allclose(list(row["probabilities"].values()), p, rtol=1e-5)
        assert row["label"] == SUBTYPE_CLASSES[int(np.argmax(p))]


def test_featuremaps_on_real_tissue_shows_the_normalised_image(real_tissue, tmp_path):
    paths, model_path = real_tissue
    result = _run(
        [
            "featuremaps",
            "--model",
            str(model_path),
            str(paths[0]),
            "--out",
            str(tmp_path / "f"),
            "--gradcam",
            "--class",
            "ductal_carcinoma",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["stain"] == {"method": "macenko", "unchanged": False}
    assert set(summary["probabilities"]) == set(SUBTYPE_CLASSES) and summary["gradcam"]["class"] == "ductal_carcinoma"
    model = load_model(model_path)
    normalised, _ = normalise_batch(model.spec.normaliser, decode_image(paths[0], 64)[None])
    expected = model.predict(preprocess(normalised, "caffe"))[0]
    np.testing.assert_allclose(list(summary["probabilities"].values()), expected, rtol=1e-5)
    assert all((tmp_path / "f" / name).is_file() for name in ("input.png", "gradcam.png"))


@pytest.mark.slow
@pytest.mark.parametrize("trainable, extra", [("0", []), ("2", ["--no-augment"])])
def test_linear_probe_and_cached_prefix_do_not_ignore_the_task_and_stain(
    keras, synth_split, synth_image_size, tmp_path, trainable, extra
):
    """The feature/activation caches train a binary head on unnormalised images: with --task subtype and
    --stain-norm, finetune must take the regular loop (the model says subtype and macenko), not ignore them."""
    out = tmp_path / f"probe{trainable}"
    result = _run(
        [
            "finetune",
            "--model",
            "resnet50",
            "--weights",
            "none",
            "--trainable-layers",
            trainable,
            *extra,
            "--split",
            str(synth_split),
            "--out",
            str(out),
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--task",
            "subtype",
            "--stain-norm",
            "macenko",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    model = load_model(out / "model.keras")
    assert model.spec.task == "subtype" and model.spec.classes == SUBTYPE_CLASSES
    assert model.meta["stain"]["method"] == "macenko"

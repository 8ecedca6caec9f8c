"""Keras fine-tuning: the shared data stream, history/outputs, early stopping, reproducibility."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from breastcnn.errors import UserInputError


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    """A tiny synthetic 200X split (82 images: 64 train / 9 val / 9 test), made once per module."""
    from breastcnn.cli.app import app

    root = tmp_path_factory.mktemp("keras_train")
    runner = CliRunner()
    result = runner.invoke(app, ["synth", "--out", str(root), "--scale", "0.02", "--mags", "200X", "--jobs", "1"])
    assert result.exit_code == 0, result.output
    out = root / "split"
    result = runner.invoke(
        app, ["split", "--mag", "200X", "--data", str(root), "--out", str(out), "--jobs", "1", "--stratify", "class"]
    )  # the 64/9/9 counts asserted below
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def kt(keras):
    from breastcnn.training import keras_loop as keras_train

    return keras_train


class Recorder:
    """A TrainingCallback that records every hook call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_batches_are_our_augmented_preprocessed_stream(kt, keras):
    from breastcnn.data.augment import Augmenter
    from breastcnn.data.images import preprocess

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10, 16, 16, 3), dtype=np.uint8)
    y = np.arange(10) % 2
    aug = Augmenter()
    make = kt._batches(keras)
    a, b = make(x, y, 4, "caffe", aug, seed=7), make(x, y, 4, "caffe", aug, seed=7)
    assert a.num_batches == 3 and a.batch_sizes() == [4, 4, 2]
    xb, yb = a[1]
    # batch 1 of epoch 0 = our Augmenter with rng [seed, epoch, index] on the epoch-0 permutation, then caffe
    order = np.random.default_rng([7, 0]).permutation(10)
    expected = preprocess(aug(x[order[4:8]], np.random.default_rng([7, 0, 1])), "caffe")
    np.testing.assert_array_equal(xb, expected)
    np.testing.assert_array_equal(yb, y[order[4:8]])
    assert xb.dtype == np.float32
    # same seed -> same stream, in any call order; a new epoch -> new order and new draws
    np.testing.assert_array_equal(b[2][0], a[2][0])
    np.testing.assert_array_equal(b[1][0], xb)
    a.on_epoch_end()
    assert not np.array_equal(a[1][0], xb)
    # every image exactly once per epoch
    seen = np.concatenate([a[i][1] for i in range(a.num_batches)])
    assert sorted(seen.tolist()) == sorted(y.tolist())
    plain = make(x, y, 4, "minmax", None, seed=7)
    np.testing.assert_allclose(plain[0][0], x[order[:4]] / 255.0, atol=1e-6)


@pytest.mark.slow  # a Keras fine-tuning run (8 s)
def test_finetune_custom_keras_writes_the_run(kt, split_dir, tmp_path):
    from breastcnn.data.split import load_split
    from breastcnn.models import load_model
    from breastcnn.runs import HISTORY_COLUMNS, read_history

    rec = Recorder()
    out = tmp_path / "run"
    summary = kt.finetune_keras(
        "custom-keras", split_dir, out, epochs=2, batch_size=32, image_size=64, seed=1, callback=rec
    )
    assert summary["stopped"] == "completed" and summary["epochs_run"] == 2 and summary["steps"] == 4
    assert summary["params"] == {"trainable": 32386, "non_trainable": 224}
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "history.csv",
        "model.keras",
        "model.keras.json",
        "training.png",
        "summary.json",
    }
    rows = read_history(out / "history.csv")
    assert list(rows[0]) == list(HISTORY_COLUMNS)
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == ["2", "4"]
    assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 and float(r["lr"]) == pytest.approx(1e-4) for r in rows)
    side = json.loads((out / "model.keras.json").read_text())
    split = load_split(split_dir)
    assert side["split_hash"] == split.hash and side["seed"] == 1 and side["arch"] == "custom-keras"
    assert side["best_epoch"] == summary["best_epoch"]
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["model"] == "custom-keras" and config["split"]["hash"] == split.hash
    # hooks in the TrainingCallback order
    names = [c[0] for c in rec.calls]
    assert names[0] == "on_message" and names[-1] == "on_train_end"
    assert names.count("on_batch_end") == 4 and names.count("on_evaluation") == 2
    begin = next(c for c in rec.calls if c[0] == "on_train_begin")[2]
    assert begin["total_epochs"] == 2 and begin["steps_per_epoch"] == 2 and begin["n_train"] == 64
    evaluation = [c[1][0] for c in rec.calls if c[0] == "on_evaluation"]
    assert evaluation[0]["improved"] is True and evaluation[0]["monitor"] == "val_accuracy"
    # the saved model is the best one: its validation accuracy is the best in the history
    model = load_model(out / "model.keras")
    from breastcnn.data.images import load_subset, preprocess

    x_val, y_val = load_subset(split, "val", 64)
    acc = float(np.mean(model.predict(preprocess(x_val, "caffe")).argmax(1) == y_val))
    assert acc == pytest.approx(max(float(r["val_accuracy"]) for r in rows), abs=1e-5)
    # an existing run directory is not overwritten
    with pytest.raises(UserInputError, match="already exists; pass --force"):
        kt.finetune_keras("custom-keras", split_dir, out, epochs=1, image_size=64)


@pytest.mark.slow  # a Keras training (7 s)
def test_early_stopping_really_stops(kt, split_dir, tmp_path):
    # lr so small that validation scores cannot change: no improvement after epoch 1, patience 1.
    summary = kt.finetune_keras(
        "vgg16",
        split_dir,
        tmp_path / "es",
        weights="none",
        epochs=5,
        batch_size=64,
        lr=1e-12,
        patience=1,
        image_size=32,
        augment=False,
        trainable_layers=0,
    )
    assert summary["stopped"] == "early_stopping" and summary["epochs_run"] == 2
    assert summary["best_epoch"] == 2  # the same score: the tie goes to the later epoch


def test_custom_keras_with_a_recipe_follows_the_numpy_schedule(kt, split_dir, tmp_path):
    """Evaluations inside epochs, LR decay in epochs, L2 on the kernels, the recipe recorded, early stop in epochs."""
    from breastcnn.runs import read_history

    rec = Recorder()
    summary = kt.finetune_keras(
        "custom-keras",
        split_dir,
        tmp_path / "run",
        epochs=2,
        batch_size=16,
        image_size=64,
        seed=1,
        callback=rec,
        recipe="report",
        recipe_options={"evals_per_epoch": 2, "lr_decay_epochs": 0.5, "patience_epochs": 5.0},
    )
    rows = read_history(tmp_path / "run" / "history.csv")
    # 64 training images at batch 16: 4 steps per epoch, evaluated after steps 2 and 4
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8] and [int(r["epoch"]) for r in rows] == [1, 1, 2, 2]
    assert summary["steps"] == 8 and summary["recipe"] == "report" and summary["monitor"] == "val_accuracy"
    # report lr 0.01, x0.8 every 0.5 epoch: the LR used before evaluation k is 0.01 * 0.8**k
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.01 * 0.8**k for k in range(4)], rel=1e-5)
    assert all(float(r["l2_penalty"]) > 0 and 0 < float(r["data_loss"]) < 5 for r in rows)
    assert all(0 <= float(r["val_balanced_accuracy"]) <= 1 for r in rows)
    options = json.loads((tmp_path / "run" / "config.json").read_text())["options"]
    assert options["recipe"] == "report" and options["l2"] == 0.1 and options["lr_decay_epochs"] == 0.5
    assert sorted(options["recipe_overrides"]) == [
        "batch_size",
        "evals_per_epoch",
        "lr_decay_epochs",
        "lr_decay_every",
        "patience",
        "patience_epochs",
    ]
    assert isinstance(summary["warnings"], list)
    assert [c[0] for c in rec.calls].count("on_evaluation") == 4

    # early stopping in epochs: an LR too small to change anything, patience 0.5 epoch, no minimum
    stopped = kt.finetune_keras(
        "custom-keras",
        split_dir,
        tmp_path / "es",
        epochs=6,
        batch_size=16,
        image_size=64,
        lr=1e-12,
        augment=False,
        recipe="default",
        recipe_options={"evals_per_epoch": 2, "patience_epochs": 0.5, "min_epochs": 0.0},
    )
    assert stopped["stopped"] == "early_stopping" and stopped["epochs_run"] < 6
    # a recipe is for custom-keras (and NumPy models) only
    with pytest.raises(UserInputError, match="--recipe applies to custom-keras"):
        kt.finetune_keras("vgg16", split_dir, tmp_path / "x", weights="none", recipe="default", image_size=32)


def test_interruption_keeps_the_best_model(kt, split_dir, tmp_path):
    class StopAfterFirstEvaluation(Recorder):
        def on_evaluation(self, row):
            raise KeyboardInterrupt  # what Ctrl-C does, at a known point

    out = tmp_path / "int"
    summary = kt.finetune_keras(
        "custom-keras", split_dir, out, epochs=3, batch_size=32, image_size=64, callback=StopAfterFirstEvaluation()
    )
    assert summary["stopped"] == "interrupted" and summary["epochs_run"] == 1
    assert summary["model_path"] == str(out / "model.keras") and (out / "model.keras").is_file()
    assert len((out / "history.csv").read_text().splitlines()) == 2
    assert not (out / "summary.json").exists()


def test_bad_options_are_user_errors(kt, split_dir, tmp_path):
    with pytest.raises(UserInputError, match="--image-size must be at least 51 for custom-keras, received 32"):
        kt.finetune_keras("custom-keras", split_dir, tmp_path / "a", image_size=32)
    with pytest.raises(UserInputError, match="--strategy must be one of default, mirrored"):
        kt.finetune_keras("vgg16", split_dir, tmp_path / "a", strategy="tpu")
    with pytest.raises(UserInputError, match="no split found"):
        kt.finetune_keras("vgg16", tmp_path / "nosplit", tmp_path / "a", weights="none", image_size=32)
    assert not (tmp_path / "a").exists()


@pytest.mark.slow  # two Keras trainings (14 s)
def test_same_seed_same_weights_with_op_determinism(keras, split_dir, tmp_path):
    """In a subprocess: op determinism is process-wide and cannot be switched off again."""
    code = f"""
import json, sys
import numpy as np
from breastcnn.models import load_model
from breastcnn.training.keras_loop import finetune_keras
weights = []
for name in ("a", "b"):
    out = {str(tmp_path)!r} + "/" + name
    finetune_keras("custom-keras", {str(split_dir)!r}, out, epochs=1, batch_size=32, image_size=64,
                   seed=3, deterministic=True)
    weights.append(load_model(out + "/model.keras").model.get_weights())
    assert json.load(open(out + "/model.keras.json"))["deterministic"] is True
same = all(np.array_equal(wa, wb) for wa, wb in zip(*weights))
from breastcnn.models import create_model
initial = create_model("custom-keras", (64, 64, 3), 2, seed=3).model.get_weights()
trained = any(not np.array_equal(w, w0) for w, w0 in zip(weights[0], initial))
print("same" if same else "different", "trained" if trained else "untouched")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["same", "trained"]
    rows = [(tmp_path / name / "history.csv").read_text().splitlines()[1].split(",")[:8] for name in ("a", "b")]
    assert rows[0] == rows[1]

"""Recipes and the training schedule: units (epochs vs evaluations), minimum epochs, best-model ties,
the report recipe's LR column, config.json, history columns, the one-class warning.

Runs use the session's small synthetic split (``tests/conftest.py``) at 64x64 pixels.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from breastcnn.errors import UserInputError
from breastcnn.training.recipes import MONITORS, RECIPES, TrainingSchedule, resolve
from tests.conftest import SYNTH_IMAGE_SIZE as IMAGE_SIZE


@pytest.fixture(scope="module")
def split_dir(synth_split):
    return synth_split


def _schedule(**overrides) -> TrainingSchedule:
    options = dict(lr=0.01, lr_decay=0.8, monitor="val_accuracy", evals_per_epoch=20, steps_per_epoch=51)
    options.update(overrides)
    if "patience" not in options and "patience_epochs" not in options:
        options["patience"] = 10
    if "lr_decay_every" not in options and "lr_decay_epochs" not in options:
        options["lr_decay_every"] = 5
    return TrainingSchedule(**options)


def _stop_at(schedule: TrainingSchedule, scores) -> int | None:
    """1-based evaluation at which ``schedule`` stops for the score sequence ``scores`` (None: never)."""
    for k, score in enumerate(scores, start=1):
        schedule.update(score)
        if schedule.should_stop:
            return k
    return None


# --------------------------------------------------------------------------- the schedule (pure)


def test_lr_decay_in_epochs_equals_the_old_decay_in_evaluations():
    """x0.8 every 5 evaluations at 20 per epoch is x0.8 every 0.25 epochs, value for value."""
    in_evals, in_epochs = _schedule(lr_decay_every=5), _schedule(lr_decay_epochs=0.25)
    for k in range(1, 201):
        in_evals.update(0.5)
        in_epochs.update(0.5)
        assert in_epochs.lr == in_evals.lr == pytest.approx(0.01 * 0.8 ** (k // 5), rel=1e-12)


def test_patience_in_epochs_does_not_depend_on_the_data_set_size():
    # 20 evaluations per epoch asked; a small data set has only 6 batches, so 6 evaluations per epoch
    flat = [0.9] + [0.5] * 200
    for steps in (6, 51, 500):
        in_epochs = _schedule(steps_per_epoch=steps, patience_epochs=1.5, min_epochs=0)
        evals_per_epoch = in_epochs.evals_in_epoch
        # best at evaluation 1 (epoch 1/E); the stop comes 1.5 epochs later, whatever E is
        assert _stop_at(in_epochs, flat) == 1 + math.ceil(1.5 * evals_per_epoch)
    # the old unit: 10 evaluations = 1.67 epochs on the small set, 0.5 epoch on the large one
    assert _stop_at(_schedule(steps_per_epoch=6, patience=10, min_epochs=0), flat) == 11
    assert _stop_at(_schedule(steps_per_epoch=51, patience=10, min_epochs=0), flat) == 11


def test_no_stop_within_min_epochs_and_an_improvement_restarts_the_wait():
    schedule = _schedule(evals_per_epoch=4, steps_per_epoch=40, patience_epochs=0.5, min_epochs=3.0)
    # never improves after the first pass: patience is spent at 0.75 epochs, the minimum holds until 3.0
    assert _stop_at(schedule, [0.9] + [0.1] * 40) == 13  # first pass after 3 epochs (13 / 4 = 3.25)
    # spent patience during the minimum does not stop a run that improved since (no "latched" stop)
    schedule = _schedule(evals_per_epoch=4, steps_per_epoch=40, patience_epochs=0.5, min_epochs=3.0)
    scores = [0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.6, 0.6, 0.6, 0.6]
    assert _stop_at(schedule, scores) == 14  # best at 12 (3.0 epochs), 0.5 epoch later = 14


def test_best_model_ties_go_to_the_later_pass_and_val_loss_is_minimised():
    schedule = _schedule(monitor="val_balanced_accuracy")
    assert [schedule.update(v) for v in (0.5, 0.5, 0.8, 0.7, 0.8, float("nan"))] == [
        True,
        True,
        True,
        False,
        True,
        False,
    ]
    loss = _schedule(monitor="val_loss")
    assert [loss.update(v) for v in (0.7, 0.6, 0.65, 0.6, 0.5)] == [True, True, False, True, True]
    # early stopping needs a strict improvement: equal scores do not reset the wait
    flat = _schedule(monitor="val_balanced_accuracy", patience=3, min_epochs=0)
    assert _stop_at(flat, [0.5] * 10) == 4


def test_resolve_fills_from_the_recipe_and_overrides_single_values():
    values, overridden = resolve("report", {"lr": 0.02}, epochs=10)
    assert values["lr"] == 0.02 and overridden == ["lr"]
    assert (values["patience"], values["lr_decay_every"], values["evals_per_epoch"]) == (10, 5, 20)
    assert values["patience_epochs"] is None and values["min_epochs"] == 1.0 and values["l2"] == 0.1
    # a unit given on the command line replaces the recipe's unit
    values, _ = resolve("report", {"patience_epochs": 2.0}, epochs=10)
    assert values["patience"] is None and values["patience_epochs"] == 2.0
    values, _ = resolve("default", {"patience": 7}, epochs=10)
    assert values["patience"] == 7 and values["patience_epochs"] is None
    # the default recipe never stops in the first 30% of the epochs
    default = RECIPES["default"]
    assert default.min_epochs_fraction >= 0.3
    minimum = max(default.min_epochs, 10 * default.min_epochs_fraction)
    assert resolve("default", {}, epochs=10)[0]["min_epochs"] == minimum
    with pytest.raises(ValueError, match="--patience .* --patience-epochs"):
        resolve("default", {"patience": 3, "patience_epochs": 1.0}, epochs=5)
    with pytest.raises(ValueError, match="--recipe"):
        resolve("fast", {}, epochs=5)


# --------------------------------------------------------------------------- training runs


@pytest.mark.slow  # (0.55 s)
def test_report_recipe_reproduces_the_old_lr_column_and_records_the_recipe(split_dir, tmp_path):
    """The report's schedule: 20 evaluations per epoch, x0.8 every 5 evaluations from 0.01, patience 10 evaluations."""
    from breastcnn.runs import read_history
    from breastcnn.training.config import TrainConfig
    from breastcnn.training.numpy_run import run_training

    # 162 training images at batch 8: 21 batches, so all 20 evaluations per epoch happen
    config = TrainConfig(
        split=str(split_dir),
        out=str(tmp_path / "run"),
        image_size=IMAGE_SIZE,
        epochs=2,
        recipe="report",
        batch_size=8,
        seed=0,
    )
    summary = run_training(config)
    rows = read_history(tmp_path / "run" / "history.csv")
    assert len(rows) == summary["evaluations"] >= 20
    # the LR logged is the one used since the previous evaluation: evaluation k (0-based) ran at 0.01 * 0.8**(k//5)
    expected = [0.01 * 0.8 ** (k // 5) for k in range(len(rows))]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5)
    assert [int(r["epoch"]) for r in rows[:20]] == [1] * 20
    if summary["stopped"] == "early_stopping":  # never in epoch 1 (min_epochs 1), after 10 without improvement
        best = max(range(len(rows)), key=lambda k: (float(rows[k]["val_accuracy"]), -k))  # first best
        assert len(rows) > 20 and len(rows) - 1 - best >= 10

    options = json.loads((tmp_path / "run" / "config.json").read_text())["options"]
    assert options["recipe"] == "report" and options["recipe_overrides"] == ["batch_size"]
    assert (
        options["lr"],
        options["l2"],
        options["evals_per_epoch"],
        options["patience"],
        options["lr_decay"],
        options["lr_decay_every"],
        options["monitor"],
        options["min_epochs"],
    ) == (0.01, 0.1, 20, 10, 0.8, 5, "val_accuracy", 1.0)
    assert options["patience_epochs"] is None and options["lr_decay_epochs"] is None
    assert summary["recipe"] == "report" and summary["monitor"] == "val_accuracy"


def test_default_recipe_never_stops_within_30_percent_and_stops_by_epochs(split_dir, tmp_path, small_config):
    """A patience of 0.25 epoch is spent at once, yet the run goes on for 30% of --epochs; the stop obeys the rule."""
    from breastcnn.runs import read_history
    from breastcnn.training.numpy_run import run_training

    summary = run_training(
        small_config(
            split_dir, tmp_path / "run", epochs=10, evals_per_epoch=4, patience=None, patience_epochs=0.25, lr=1e-6
        )
    )
    assert summary["recipe"] == "default"
    options = json.loads((tmp_path / "run" / "config.json").read_text())["options"]
    minimum = options["min_epochs"]
    assert minimum == max(RECIPES["default"].min_epochs, 0.3 * 10)
    rows = read_history(tmp_path / "run" / "history.csv")
    evals_per_epoch = 4
    positions = [(k + 1) / evals_per_epoch for k in range(len(rows))]
    assert summary["stopped"] == "early_stopping", summary
    assert positions[-1] > minimum and summary["epochs_run"] >= math.ceil(minimum)
    # recompute the rule from the logged monitor: stop at the first pass after the minimum that is
    # >= 0.25 epoch past the last strict improvement
    sign = 1.0 if MONITORS[summary["monitor"]] == "max" else -1.0
    scores = [sign * float(r[summary["monitor"]]) for r in rows]
    best, best_at, stop = -math.inf, None, None
    for score, at in zip(scores, positions, strict=True):
        if score > best:
            best, best_at = score, at
        if at - best_at >= 0.25 - 1e-9 and at > minimum + 1e-9:
            stop = at
            break
    assert stop == positions[-1]


@pytest.mark.slow  # (0.55 s)
def test_new_monitors_select_the_best_model_and_history_separates_l2(split_dir, tmp_path, small_config):
    from breastcnn.runs import HISTORY_COLUMNS, read_history
    from breastcnn.training.numpy_run import run_training

    summary = run_training(
        small_config(split_dir, tmp_path / "run", epochs=2, monitor="val_loss", class_weights="none")
    )
    rows = read_history(tmp_path / "run" / "history.csv")
    assert list(rows[0]) == HISTORY_COLUMNS
    losses = [float(r["val_loss"]) for r in rows]
    assert summary["monitor"] == "val_loss" and summary["best_score"] == pytest.approx(min(losses), rel=1e-5)
    last_best = max(k for k, v in enumerate(losses) if v == min(losses))
    assert summary["best_step"] == int(rows[last_best]["step"])
    for r in rows:
        # without class weights the objective is the data loss plus the L2 penalty
        assert float(r["loss"]) == pytest.approx(float(r["data_loss"]) + float(r["l2_penalty"]), rel=1e-4)
        assert float(r["l2_penalty"]) > 0 and 0 <= float(r["val_balanced_accuracy"]) <= 1
        assert 0 <= float(r["val_auc"]) <= 1
    # the data loss is on the scale of the validation loss; the L2 penalty is not
    assert float(rows[-1]["data_loss"]) < 3 < float(rows[-1]["l2_penalty"])

    run_training(small_config(split_dir, tmp_path / "no-l2", epochs=1, l2=0.0))
    assert all(float(r["l2_penalty"]) == 0.0 for r in read_history(tmp_path / "no-l2" / "history.csv"))


def _one_class_model(path, image_size=IMAGE_SIZE):
    """A NumPy model whose output layer always says malignant (kernel 0, bias favouring class 1)."""
    from breastcnn.models import create_model, save_model

    model = create_model("custom", (image_size, image_size, 3), 2, seed=0)
    dense = [layer for layer in model.layers if "W" in layer.params][-1]
    dense.params["W"][...] = 0.0
    dense.params["b"][...] = np.array([0.0, 5.0], dtype=np.float32)
    model.meta.update({"image_size": image_size, "preprocess": "caffe", "arch": "custom"})
    save_model(model, path)
    return len(model.layers)


@pytest.mark.slow  # trains until the model collapses (3 s)
def test_a_model_that_cannot_learn_ends_with_a_one_class_warning(split_dir, synth_kfold_split, tmp_path, small_config):
    """Every layer frozen on a model that answers malignant: the summary, stderr and k-fold runs say so."""
    from typer.testing import CliRunner

    from breastcnn.cli.app import app
    from breastcnn.training.numpy_run import finetune_numpy

    start = tmp_path / "one-class.npz"
    n_layers = _one_class_model(start)
    summary = finetune_numpy(start, small_config(split_dir, tmp_path / "run", epochs=1), freeze=n_layers)
    assert len(summary["warnings"]) == 2
    assert "malignant for 100% of the 20 validation images" in summary["warnings"][0]
    assert "collapsed to one class" in summary["warnings"][0]
    assert "no better than always answering the majority class (malignant" in summary["warnings"][1]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"] == summary["warnings"]

    result = CliRunner().invoke(
        app,
        [
            "finetune",
            "--model",
            str(start),
            "--split",
            str(split_dir),
            "--epochs",
            "1",
            "--freeze",
            str(n_layers),
            "--out",
            str(tmp_path / "cli"),
            "--json",
        ],
        env={"BREASTCNN_NO_PROGRESS": "1"},
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["warnings"] == summary["warnings"]
    assert result.stderr.count("warning:") == 2 and "collapsed to one class" in result.stderr

    kfold = synth_kfold_split
    folds = finetune_numpy(start, small_config(kfold, tmp_path / "kfold", epochs=1), freeze=n_layers)
    assert all(len(fold["warnings"]) == 2 for fold in folds["folds"])
    assert [w[:7] for w in folds["warnings"]] == ["fold 1:", "fold 1:", "fold 2:", "fold 2:"]


@pytest.mark.slow  # (0.6 s)
def test_a_model_that_learns_has_no_warning(split_dir, tmp_path, small_config):
    from breastcnn.training.numpy_run import run_training

    summary = run_training(small_config(split_dir, tmp_path / "run", epochs=6))
    assert summary["monitor"] == RECIPES["default"].monitor == "val_loss"
    assert summary["warnings"] == [] and summary["best_score"] < 0.3


def test_recipe_option_errors(split_dir, tmp_path):
    from breastcnn.training.config import TrainConfig

    with pytest.raises(UserInputError, match="--recipe must be one of default, report"):
        TrainConfig(recipe="fast").validate()
    with pytest.raises(UserInputError, match="--patience-epochs"):
        TrainConfig(patience_epochs=-1.0).validate()
    with pytest.raises(UserInputError, match="--lr-decay-epochs"):
        TrainConfig(lr_decay_epochs=0.0).validate()
    with pytest.raises(UserInputError, match="--lr-decay-every .* --lr-decay-epochs"):
        TrainConfig(lr_decay_every=3, lr_decay_epochs=1.0).validate()


def test_stain_augment_is_a_recipe_value_on_in_default_off_in_report():
    from breastcnn.training.config import TrainConfig

    assert RECIPES["default"].stain_augment is True and RECIPES["report"].stain_augment is False
    assert TrainConfig().resolved().stain_augment is True
    assert TrainConfig(recipe="report").resolved().stain_augment is False
    off = TrainConfig(stain_augment=False).resolved()
    assert off.stain_augment is False and off.recipe_overrides() == ["stain_augment"]
    assert TrainConfig(recipe="report", stain_augment=True).resolved().recipe_overrides() == ["stain_augment"]
    with pytest.raises(UserInputError, match="option 'stain_augment' must be bool or null, got 'yes'"):
        TrainConfig.from_dict({"stain_augment": "yes"})


def test_keras_stain_augment_follows_the_recipe_or_is_off_for_transfer_learning():
    from breastcnn.training.keras_loop import _schedule_options

    given = {"lr": None, "batch_size": None, "patience": None, "monitor": None, "stain_augment": None}
    assert _schedule_options("custom-keras", "default", None, 5, 224, given)[1]["stain_augment"] is True
    assert _schedule_options("custom-keras", "report", None, 5, 224, given)[1]["stain_augment"] is False
    assert _schedule_options("vgg16", None, None, 5, 224, given)[1]["stain_augment"] is False
    assert _schedule_options("vgg16", None, None, 5, 224, {**given, "stain_augment": True})[1]["stain_augment"]

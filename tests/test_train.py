"""The NumPy training loop (breastcnn.training): learning, exact resume, reproducibility, stopping rules.

All runs use one small synthetic BreakHis split (built once per session: the
``synth_split`` fixture of ``tests/conftest.py``) at 64x64 pixels, so each
training takes about a second.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from breastcnn.errors import UserInputError
from breastcnn.training.callbacks import TrainingCallback
from breastcnn.training.recipes import RECIPES


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class InterruptAt(TrainingCallback):
    """Raise KeyboardInterrupt (as Ctrl-C would) after optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_batch_end(self, step, loss, accuracy):
        if step == self.step:
            raise KeyboardInterrupt


class Recorder(TrainingCallback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, total_epochs, steps_per_epoch, **info):
        self.calls.append(("begin", total_epochs, steps_per_epoch))

    def on_evaluation(self, row):
        self.calls.append(("eval", row["step"]))

    def on_train_end(self, summary):
        self.calls.append(("end", summary["stopped"]))


@pytest.fixture(scope="module")
def split_dir(synth_split):
    return synth_split


# --------------------------------------------------------------------------- pure helpers


def test_evaluation_points_spread_and_end_on_last_batch():
    from breastcnn.training.recipes import evaluation_points

    assert evaluation_points(51, 20)[-1] == 51
    assert len(evaluation_points(51, 20)) == 20
    assert evaluation_points(10, 2) == [5, 10]
    assert evaluation_points(3, 20) == [1, 2, 3]  # never more than one per batch


@pytest.mark.parametrize(
    "field, value, option",
    [
        ("epochs", 0, "--epochs"),
        ("lr", -1.0, "--lr"),
        ("monitor", "loss", "--monitor"),
        ("class_weights", "auto", "--class-weights"),
        ("lr_decay", 1.5, "--lr-decay"),
        ("arch", "vgg16", "--arch"),
        ("preprocess", "zscore", "--preprocess"),
        ("activation", "tanh", "--activation"),
        ("threads", 0, "--threads"),
    ],
)
def test_config_validation_names_the_option(field, value, option):
    from breastcnn.training.config import TrainConfig

    with pytest.raises(UserInputError, match=option):
        TrainConfig(**{field: value}).validate()


# --------------------------------------------------------------------------- training runs


def test_training_learns_and_writes_run_outputs(split_dir, tmp_path, small_config, synth_image_size):
    from breastcnn.data.split import load_split
    from breastcnn.evaluation import evaluate_model
    from breastcnn.models import load_model
    from breastcnn.runs import HISTORY_COLUMNS
    from breastcnn.training.numpy_run import run_training

    recorder = Recorder()
    out = tmp_path / "run"
    summary = run_training(small_config(split_dir, out, epochs=15, patience=20), [recorder])
    for name in ("model.npz", "last.npz", "history.csv", "training.png", "config.json", "summary.json"):
        assert (out / name).is_file(), name
    with open(out / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == HISTORY_COLUMNS
    assert len(rows) == summary["evaluations"] == len([c for c in recorder.calls if c[0] == "eval"])
    assert recorder.calls[0][0] == "begin" and recorder.calls[-1] == ("end", summary["stopped"])
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["lr"] == RECIPES["default"].lr and config["options"]["recipe"] == "default"
    assert config["seed"] == 0 and config["split"]["hash"]
    assert config["environment"]["numpy"] == np.__version__

    model = load_model(out / "model.npz")
    assert model.meta["image_size"] == synth_image_size and model.meta["preprocess"] == "caffe"
    metrics, _ = evaluate_model(model, load_split(split_dir), "test")
    assert metrics["accuracy"] >= 0.90, metrics  # the end-to-end bar
    # the kept model is the best by the monitor (the default recipe's val_loss): its row holds the min
    assert summary["monitor"] == "val_loss"
    best = min(float(r["val_loss"]) for r in rows)
    assert summary["best_score"] == pytest.approx(best, rel=1e-5)
    assert summary["warnings"] == []


@pytest.mark.slow  # three trainings (2 s)
def test_same_seed_gives_identical_weights_and_resume_ends_the_same(split_dir, tmp_path, final_weights, small_config):
    from breastcnn.training.numpy_run import run_training

    run_a = run_training(small_config(split_dir, tmp_path / "a"))
    run_training(small_config(split_dir, tmp_path / "b"))
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))

    # interrupt mid-epoch, between two evaluations (step 4 of 6), then resume
    interrupted = run_training(small_config(split_dir, tmp_path / "c"), [InterruptAt(4)])
    assert interrupted["stopped"] == "interrupted" and interrupted["steps"] == 4
    resumed = run_training(small_config(split_dir, tmp_path / "ignored"), resume=tmp_path / "c")
    assert resumed["stopped"] == "completed" and resumed["steps"] == run_a["steps"]
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "c"))
    from breastcnn.models import load_model

    assert_same_weights(
        load_model(tmp_path / "a" / "model.npz").get_weights(), load_model(tmp_path / "c" / "model.npz").get_weights()
    )
    from breastcnn.runs import read_history

    history_a, history_c = (read_history(tmp_path / name / "history.csv") for name in ("a", "c"))
    for row in history_a + history_c:
        row.pop("elapsed_s")
    assert history_a == history_c  # same rows except elapsed_s

    other_seed = run_training(small_config(split_dir, tmp_path / "d", seed=1))
    assert other_seed["steps"] == run_a["steps"]
    assert not np.array_equal(final_weights(tmp_path / "a")["layers.0.W"], final_weights(tmp_path / "d")["layers.0.W"])


@pytest.mark.slow  # (0.75 s)
def test_early_stopping_really_stops_and_lr_decay_spans_epochs(split_dir, tmp_path, small_config):
    from breastcnn.runs import read_history
    from breastcnn.training.numpy_run import run_training

    # The old units (evaluations) still work: lr decays every 2 evaluations by 0.5; 3 evaluations per
    # epoch -> a decay falls mid-epoch 1
    summary = run_training(
        small_config(
            split_dir,
            tmp_path / "run",
            epochs=6,
            evals_per_epoch=3,
            patience=4,
            lr_decay=0.5,
            lr_decay_every=2,
            lr=1e-6,
            recipe="report",
        )
    )
    assert summary["stopped"] == "early_stopping"
    rows = read_history(tmp_path / "run" / "history.csv")
    assert len(rows) == 5  # best at the first evaluation (lr 1e-6 barely moves), then 4 without improvement
    assert summary["steps"] < 6 * 6
    lrs = [float(r["lr"]) for r in rows]
    # the lr logged is the one used since the previous evaluation; epoch 2 (evaluations 4-5) does not reset it
    assert lrs == pytest.approx([1e-6, 1e-6, 0.5e-6, 0.5e-6, 0.25e-6])

    # patience 1 would stop at evaluation 2, but never within the first --min-epochs (1) epoch
    summary = run_training(
        small_config(split_dir, tmp_path / "run1", epochs=6, evals_per_epoch=3, patience=1, lr=1e-6, recipe="report")
    )
    assert summary["stopped"] == "early_stopping" and summary["evaluations"] == 4 and summary["steps"] == 6 + 2


def test_nan_loss_stops_with_message_and_keeps_best_model(
    split_dir, tmp_path, monkeypatch, small_config, synth_image_size
):
    from breastcnn.training import loop
    from breastcnn.training.common import TrainingDiverged
    from breastcnn.training.numpy_run import run_training

    real_step = loop.train_step
    calls = {"n": 0}

    def exploding_step(model, xb, yb, class_weights):
        calls["n"] += 1
        scores = real_step(model, xb, yb, class_weights)
        return scores._replace(loss=float("nan")) if calls["n"] == 5 else scores

    monkeypatch.setattr(loop, "train_step", exploding_step)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="loss is nan at step 5") as info:
        run_training(small_config(split_dir, out, evals_per_epoch=6))
    assert info.value.summary["stopped"] == "nan"
    assert "best model so far is kept" in str(info.value)
    from breastcnn.models import load_model

    model = load_model(out / "model.npz")  # loads: every array finite (load_model checks)
    assert model.meta["image_size"] == synth_image_size


@pytest.mark.slow  # three trainings (0.8 s)
def test_class_weights_and_l2_change_training(split_dir, tmp_path, final_weights, small_config):
    from breastcnn.training.numpy_run import run_training

    common = dict(epochs=1, evals_per_epoch=1)
    run_training(small_config(split_dir, tmp_path / "balanced", **common))
    run_training(small_config(split_dir, tmp_path / "none", class_weights="none", **common))
    run_training(small_config(split_dir, tmp_path / "no-l2", l2=0.0, **common))
    balanced = final_weights(tmp_path / "balanced")["layers.13.W"]
    assert not np.allclose(balanced, final_weights(tmp_path / "none")["layers.13.W"])
    # the default L2 (0.1) reaches the gradient: the dense kernel ends smaller than without it
    assert np.sum(final_weights(tmp_path / "balanced")["layers.11.W"] ** 2) < np.sum(
        final_weights(tmp_path / "no-l2")["layers.11.W"] ** 2
    )


@pytest.mark.slow  # two trainings on the k-fold split (2.6 s)
def test_kfold_split_trains_one_model_per_fold(tmp_path, small_config, synth_kfold_split):
    from breastcnn.training.numpy_run import run_training

    kfold = synth_kfold_split
    messages = []

    class Messages(TrainingCallback):
        def on_message(self, text):
            messages.append(text)

    result = run_training(small_config(kfold, tmp_path / "run", epochs=1), [Messages()])
    assert [s["fold"] for s in result["folds"]] == [1, 2]
    for k in (1, 2):
        assert (tmp_path / "run" / f"fold{k}" / "model.npz").is_file()
    # 70/30 folds have no val subset: validation is carved from training patients, never test
    assert any("no validation subset" in m for m in messages)


@pytest.mark.slow  # (0.9 s)
def test_threads_reach_the_engine_and_resume_takes_them_from_the_command(
    split_dir, tmp_path, final_weights, small_config
):
    """TrainConfig.threads is what the engine's chunk maps run on (train steps and validation); a resumed
    run uses the threads of the resuming command (a machine setting), and the weights never depend on it."""
    from breastcnn.nn.parallel import observe_chunks
    from breastcnn.runs import read_run_config
    from breastcnn.training.config import TrainConfig
    from breastcnn.training.numpy_run import run_training

    with observe_chunks() as log:
        run_training(small_config(split_dir, tmp_path / "one", threads=1, epochs=1))
    assert log.calls > 0 and log.max_threads == 1  # the batch-32 convs are cut in chunks at 64 px too
    with observe_chunks() as log:
        interrupted = run_training(small_config(split_dir, tmp_path / "two", threads=2, epochs=1), [InterruptAt(2)])
    assert interrupted["stopped"] == "interrupted" and log.max_threads == 2
    assert read_run_config(tmp_path / "two")["options"]["threads"] == 2
    with observe_chunks() as log:
        run_training(TrainConfig(threads=1), resume=tmp_path / "two")
    assert log.calls > 0 and log.max_threads == 1
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))


@pytest.mark.slow  # (0.55 s)
def test_finetune_numpy_freezes_layers(split_dir, tmp_path, small_config):
    from breastcnn.models import load_model
    from breastcnn.training.numpy_run import finetune_numpy, run_training

    run_training(small_config(split_dir, tmp_path / "base", epochs=1, evals_per_epoch=1))
    base = load_model(tmp_path / "base" / "model.npz").get_weights()
    summary = finetune_numpy(
        tmp_path / "base" / "model.npz", small_config(split_dir, tmp_path / "ft", epochs=1, lr=1e-3), freeze=3
    )
    tuned = load_model(Path(summary["run_dir"]) / "model.npz")
    weights = tuned.get_weights()
    np.testing.assert_array_equal(weights["layers.0.W"], base["layers.0.W"])  # frozen conv
    np.testing.assert_array_equal(weights["layers.1.moving_mean"], base["layers.1.moving_mean"])  # frozen BN
    assert not np.array_equal(weights["layers.3.W"], base["layers.3.W"])  # trained
    assert tuned.meta["frozen_layers"] == 3
    with pytest.raises(UserInputError, match="--freeze"):
        finetune_numpy(tmp_path / "base" / "model.npz", small_config(split_dir, tmp_path / "x"), freeze=99)


def test_missing_split_and_existing_out_are_user_errors(split_dir, tmp_path):
    from breastcnn.training.config import TrainConfig
    from breastcnn.training.numpy_run import run_training

    with pytest.raises(UserInputError, match="--split"):
        run_training(TrainConfig(split=str(tmp_path / "nope"), out=str(tmp_path / "run")))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UserInputError, match="--force"):
        run_training(TrainConfig(split=str(split_dir), out=str(tmp_path / "full")))
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]
    with pytest.raises(UserInputError, match="--resume"):
        run_training(TrainConfig(), resume=tmp_path / "nope")


def test_ctrl_c_is_deferred_to_the_end_of_the_step(split_dir, tmp_path, small_config):
    import os
    import signal

    from breastcnn.training.numpy_run import run_training

    class SendSigint(TrainingCallback):
        def on_batch_end(self, step, loss, accuracy):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C in the terminal

    # the handler in force before (Python's default, or SIG_IGN when started under e.g. `time` in a background
    # job) comes back afterwards; the deferred handler catches the signal either way
    before = signal.getsignal(signal.SIGINT)
    summary = run_training(small_config(split_dir, tmp_path / "run"), [SendSigint()])
    assert summary["stopped"] == "interrupted" and summary["steps"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    resumed = run_training(small_config(split_dir, tmp_path / "x"), resume=tmp_path / "run")
    assert resumed["stopped"] == "completed" and resumed["steps"] == 12


@pytest.mark.slow  # (0.75 s)
def test_resume_of_a_finetune_that_crashed_before_its_first_checkpoint(split_dir, tmp_path, small_config):
    """A fine-tuning run killed before any checkpoint restarts from its source model, frozen layers and all."""
    from breastcnn.models import load_model
    from breastcnn.training.config import TrainConfig
    from breastcnn.training.numpy_run import finetune_numpy, run_training

    run_training(small_config(split_dir, tmp_path / "base", epochs=1, evals_per_epoch=1))
    base = load_model(tmp_path / "base" / "model.npz").get_weights()

    class PowerCut(TrainingCallback):
        def on_batch_end(self, step, loss, accuracy):
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        finetune_numpy(
            tmp_path / "base" / "model.npz",
            small_config(split_dir, tmp_path / "ft", epochs=1, lr=1e-3),
            freeze=3,
            progress_callbacks=[PowerCut()],
        )
    assert (tmp_path / "ft" / "config.json").is_file() and not (tmp_path / "ft" / "last.npz").exists()
    resumed = run_training(TrainConfig(), resume=tmp_path / "ft")
    assert resumed["stopped"] == "completed"
    tuned = load_model(tmp_path / "ft" / "model.npz")
    assert tuned.meta["frozen_layers"] == 3 and tuned.meta["finetuned_from"] == str(tmp_path / "base" / "model.npz")
    np.testing.assert_array_equal(tuned.get_weights()["layers.0.W"], base["layers.0.W"])  # still frozen
    assert not np.array_equal(tuned.get_weights()["layers.3.W"], base["layers.3.W"])  # trained

    (tmp_path / "base" / "model.npz").unlink()  # the source is gone: a clear error, not a fresh model
    (tmp_path / "ft" / "summary.json").unlink()
    (tmp_path / "ft" / "last.npz").unlink()
    with pytest.raises(UserInputError, match="no longer exists"):
        run_training(TrainConfig(), resume=tmp_path / "ft")

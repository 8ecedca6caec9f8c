"""`breastcnn train` through the CLI: the end-to-end path, JSON output, replay, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from breastcnn.cli.app import app


def _run(args):
    return CliRunner().invoke(app, args, env={"BREASTCNN_NO_PROGRESS": "1"})


@pytest.fixture(scope="session")
def small(synth_image_size):
    """Options of a seconds-long training on the session split."""
    return ["--image-size", str(synth_image_size), "--epochs", "1", "--evals-per-epoch", "2"]


@pytest.mark.slow  # 15 epochs (20 s)
def test_end_to_end_split_train_evaluate_reaches_90_percent(synth_data, synth_image_size, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    split = _run(["split", "--data", str(synth_data), "--mag", "200X", "-j", "1", "--json"])
    assert split.exit_code == 0, split.output
    train = _run(
        [
            "train",
            "--image-size",
            str(synth_image_size),
            "--epochs",
            "15",
            "--evals-per-epoch",
            "2",
            "--patience",
            "20",
            "--json",
        ]
    )
    assert train.exit_code == 0, train.output
    summary = json.loads(train.stdout)  # stdout holds only the JSON summary
    assert summary["stopped"] in ("completed", "early_stopping")
    assert (tmp_path / "runs" / "latest" / "model.npz").is_file()
    assert "step" in train.stderr  # one plain line per evaluation on a non-terminal stderr
    evaluate = _run(["evaluate", "--json"])  # finds runs/latest and the split it was trained on
    assert evaluate.exit_code == 0, evaluate.output
    metrics = json.loads(evaluate.stdout)
    assert metrics["accuracy"] >= 0.90, metrics
    assert {
        "n",
        "precision",
        "recall",
        "f1",
        "benign_recall",
        "roc_auc",
        "confusion_matrix",
        "patient_accuracy",
        "threshold",
    } <= set(metrics)


@pytest.mark.slow  # two trainings (1 s)
def test_config_replays_a_run_with_identical_weights(tmp_path, final_weights, small, synth_split):
    split = synth_split
    first = _run(
        [
            "train",
            "--split",
            str(split),
            "--out",
            str(tmp_path / "a"),
            *small,
            "--seed",
            "3",
            "--lr",
            "0.005",
            "--no-augment",
            "--json",
        ]
    )
    assert first.exit_code == 0, first.output
    replay = _run(["train", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b"), "--json"])
    assert replay.exit_code == 0, replay.output
    options = json.loads((tmp_path / "b" / "config.json").read_text())["options"]
    assert options["seed"] == 3 and options["lr"] == 0.005 and options["augment"] is False
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # an option given on the command line overrides the replayed one
    changed = _run(["train", "--config", str(tmp_path / "a"), "--out", str(tmp_path / "c"), "--seed", "4", "--json"])
    assert changed.exit_code == 0, changed.output
    assert json.loads((tmp_path / "c" / "config.json").read_text())["options"]["seed"] == 4


def test_resume_of_a_finished_run_has_nothing_to_do(tmp_path, small, synth_split):
    split = synth_split
    done = _run(["train", "--split", str(split), "--out", str(tmp_path / "run"), *small, "--json"])
    assert done.exit_code == 0, done.output
    again = _run(["train", "--resume", str(tmp_path / "run"), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["steps"] == json.loads(done.stdout)["steps"]
    assert "nothing to resume" in again.stderr


def test_nan_loss_exits_1_with_a_clear_message(tmp_path, monkeypatch, small, synth_split):
    from breastcnn.training import loop

    monkeypatch.setattr(loop, "train_step", lambda *args: loop.BatchScores(float("inf"), 0.5, float("inf"), 0.0))
    split = synth_split
    result = _run(["train", "--split", str(split), "--out", str(tmp_path / "run"), *small])
    assert result.exit_code == 1
    assert "training diverged" in result.stderr and "--lr" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--split", "{tmp}/missing"], "--split"),
        (["--monitor", "loss"], "--monitor"),
        (["--patience", "3", "--patience-epochs", "1.5"], "--patience-epochs"),
        (["--recipe", "fast"], "--recipe"),
        (["--class-weights", "auto"], "--class-weights"),
        (["--threads", "0"], "--threads"),
        (["--resume", "{tmp}/nothing"], "--resume"),
        (["--config", "{tmp}/nothing/config.json"], "config"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _run(["train", *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and needle in result.stderr
    assert result.stdout == "" and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_help_documents_defaults_and_exit_codes():
    result = _run(["train", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for option in ("--evals-per-epoch", "--patience", "--lr-decay", "--monitor", "--resume", "--config", "--l2"):
        assert option in text
    assert "NaN" in text and "130" in text

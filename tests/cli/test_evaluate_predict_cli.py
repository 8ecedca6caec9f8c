"""`breastcnn evaluate` and `breastcnn predict` through the CLI."""

from __future__ import annotations

import csv
import io
import json
import shutil

import pytest
from typer.testing import CliRunner

from breastcnn.cli.app import app


def _run(args):
    return CliRunner().invoke(app, args, env={"BREASTCNN_NO_PROGRESS": "1"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_split, small_config):
    """A small model trained on the session split: (split dir, run dir)."""
    from breastcnn.training.numpy_run import run_training

    split = synth_split
    run_dir = tmp_path_factory.mktemp("evalrun") / "run"
    run_training(small_config(split, run_dir, epochs=3))
    return split, run_dir


def test_evaluate_json_and_outputs_next_to_model(trained, tmp_path):
    split, run_dir = trained
    run = shutil.copytree(run_dir, tmp_path / "run")
    result = _run(["evaluate", "--model", str(run / "model.npz"), "--split", str(split), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    for key in (
        "n",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "benign_recall",
        "roc_auc",
        "confusion_matrix",
        "patient_accuracy",
        "threshold",
    ):
        assert key in metrics
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    assert tn + fp + fn + tp == metrics["n"]
    for name in ("roc.png", "confusion.png", "predictions.csv", "metrics.json"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(io.StringIO((run / "predictions.csv").read_text())))
    assert list(rows[0]) == ["path", "true_label", "probability", "predicted_label", "patient"]
    assert len(rows) == metrics["n"]
    assert sum(r["true_label"] == r["predicted_label"] for r in rows) / len(rows) == pytest.approx(metrics["accuracy"])
    # re-evaluating in the default location replaces the outputs (atomically), with another threshold
    again = _run(["evaluate", "--model", str(run), "--split", str(split), "--threshold", "0.9", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads((run / "metrics.json").read_text())["threshold"] == 0.9
    # an explicit --out is protected unless --force
    out = tmp_path / "report"
    assert _run(["evaluate", "--model", str(run), "--split", str(split), "--out", str(out), "--json"]).exit_code == 0
    refused = _run(["evaluate", "--model", str(run), "--split", str(split), "--out", str(out)])
    assert refused.exit_code == 2 and "--force" in refused.stderr
    table = _run(["evaluate", "--model", str(run), "--split", str(split), "--out", str(out), "--force"])
    assert table.exit_code == 0 and "patient-level accuracy" in table.stdout


@pytest.mark.slow  # two fold trainings (13 s)
def test_evaluate_kfold_reports_each_fold_and_mean_std(synth_kfold_split, small_config, tmp_path):
    from breastcnn.training.numpy_run import run_training

    kfold = synth_kfold_split
    run_training(small_config(kfold, tmp_path / "run", epochs=1, evals_per_epoch=1))
    result = _run(["evaluate", "--model", str(tmp_path / "run"), "--json"])  # split taken from config.json
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [f["fold"] for f in doc["folds"]] == [1, 2]
    accs = [f["accuracy"] for f in doc["folds"]]
    assert doc["mean_std"]["accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert (tmp_path / "run" / "fold2" / "predictions.csv").is_file()
    table = _run(["evaluate", "--model", str(tmp_path / "run")])
    assert table.exit_code == 0 and "mean ± std" in table.stdout


def test_predict_folder_with_unreadable_file(trained, tmp_path):
    split, run_dir = trained
    from breastcnn.data.split import load_split

    s = load_split(split)
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    for i, row in enumerate(s.subset("test")[:3]):
        shutil.copy(s.root / row.path, images / "nested" / f"img{i}.png")
    (images / "corrupt.png").write_bytes(b"not a png at all")
    model = str(run_dir / "model.npz")

    as_json = _run(["predict", "--model", model, str(images), "--json"])
    assert as_json.exit_code == 1
    results = json.loads(as_json.stdout)  # stdout is exactly one JSON array
    assert len(results) == 3 and all(set(r) == {"path", "label", "probability"} for r in results)
    assert all(r["label"] in ("benign", "malignant") and 0 <= r["probability"] <= 1 for r in results)
    assert "corrupt.png" in as_json.stderr and "error" in as_json.stderr

    as_csv = _run(["predict", "--model", model, str(images / "nested" / "*.png"), "--csv"])
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["path"].split("/")[-1] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    assert [float(r["probability"]) for r in rows] == pytest.approx([r["probability"] for r in results], abs=1e-6)

    table = _run(["predict", "--model", str(run_dir), str(images / "nested"), "--jobs", "2"])
    assert table.exit_code == 0 and "img1.png" in table.stdout

    missing = _run(["predict", "--model", model, str(tmp_path / "nope.png"), "--json"])
    assert missing.exit_code == 1 and json.loads(missing.stdout) == [] and "nope.png" in missing.stderr


@pytest.mark.parametrize("command", [["evaluate"], ["predict", "x.png"]])
def test_missing_model_exits_2_with_one_line(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _run([*command, "--json"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "breastcnn train" in result.stderr
    assert result.stdout == ""


def test_missing_split_and_bad_options_exit_2(trained, tmp_path):
    _, run_dir = trained
    result = _run(["evaluate", "--model", str(run_dir), "--split", str(tmp_path / "nosplit"), "--json"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "nosplit" in result.stderr
    result = _run(["evaluate", "--model", str(run_dir), "--threshold", "2"])
    assert result.exit_code == 2 and "--threshold" in result.stderr
    result = _run(["predict", "--model", str(run_dir), "x.png", "--json", "--csv"])
    assert result.exit_code == 2 and "--csv" in result.stderr


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_reach_the_engine_in_evaluate_and_predict(trained, tmp_path, monkeypatch, threads):
    """--threads N: the NumPy engine's own chunk bookkeeping shows N threads (chunks forced small)."""
    from breastcnn.nn import inference, layers
    from breastcnn.nn.parallel import observe_chunks

    for module in (layers, inference):  # training layers and the predict plan
        monkeypatch.setattr(module, "chunk_size", lambda bytes_per_sample, budget=0: 1)
    split, run_dir = trained
    run = shutil.copytree(run_dir, tmp_path / "run")
    with observe_chunks() as log:
        result = _run(["evaluate", "--model", str(run), "--split", str(split), "--json", "--threads", str(threads)])
    assert result.exit_code == 0, result.output
    assert log.calls > 0 and log.max_threads == threads
    from breastcnn.data.split import load_split

    s = load_split(split)
    images = tmp_path / "images"
    images.mkdir()
    for i, row in enumerate(s.subset("test")[:6]):
        shutil.copy(s.root / row.path, images / f"img{i}.png")
    with observe_chunks() as log:
        result = _run(["predict", "--model", str(run), str(images), "--json", "--threads", str(threads)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 6
    assert log.calls > 0 and log.max_threads == threads


@pytest.mark.parametrize("command", [["evaluate"], ["predict", "x.png"]])
def test_bad_threads_exit_2_naming_the_option(trained, command):
    _, run_dir = trained
    result = _run([*command, "--model", str(run_dir), "--threads", "0"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "--threads must be >= 1" in result.stderr and "got 0" in result.stderr

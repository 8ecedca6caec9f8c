"""CLI: `breastcnn bench`, `featuremaps` and `demo` (in-process, CliRunner)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from breastcnn.cli.app import app
from breastcnn.models import create_model, save_model

TINY_BENCH = [
    "--models",
    "custom",
    "--image-size",
    "64",
    "--batch-sizes",
    "1,2",
    "--repeats",
    "2",
    "--train-steps",
    "1",
    "--max-seconds",
    "0.5",
    "--threads",
    "1",
    "--fresh",
]


@pytest.fixture()
def runner():
    return CliRunner()


def _one_error_line(result) -> str:
    """The single red error line (progress/info lines may precede it; never a traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_bench_json_and_out(runner, tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", *TINY_BENCH, "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert set(doc) >= {"machine", "models"}
    (entry,) = doc["models"]
    assert entry["model"] == "custom" and entry["skipped"] is None
    assert set(entry["throughput_ips"]) == {"1", "2"} and entry["latency_ms_p50"] > 0
    assert json.loads((out / "bench.json").read_text())["models"][0]["model"] == "custom"
    assert (out / "bench.md").read_text().startswith("| model | params |")
    assert "threads:" in result.stderr
    assert entry["threads"] == {"engine": 1, "blas": 1}  # --threads 1 reaches the NumPy engine
    again = runner.invoke(app, ["bench", *TINY_BENCH, "--json", "--out", str(out)])
    assert again.exit_code == 2
    assert "bench.json already exists; pass --force" in _one_error_line(again)


def test_bench_markdown_and_table(runner):
    result = runner.invoke(app, ["bench", *TINY_BENCH, "--train-steps", "0", "--markdown"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| model |") and lines[2].startswith("| custom (64px) |")
    assert "Machine:" in result.stdout
    table = runner.invoke(app, ["bench", *TINY_BENCH, "--train-steps", "0"])
    assert table.exit_code == 0 and "custom" in table.stdout and "breastcnn bench" in table.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "custom,alexnet"], "unknown model 'alexnet'"),
        (["--models", "custom", "--batch-sizes", "1,a"], "--batch-sizes must be comma-separated integers, got '1,a'"),
        (["--models", "custom", "--model-file", "custom=/nonexistent/model.npz"], "/nonexistent/model.npz"),
        (["--models", "custom", "--json", "--markdown"], "--json and --markdown are exclusive"),
        (["--models", "custom", "--image-size", "8"], "--image-size must be an integer >= 32, got 8"),
    ],
)
def test_bench_bad_input_is_one_line_exit_2(runner, args, message):
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2
    assert message in _one_error_line(result)


@pytest.mark.slow  # a bench run (6 s)
def test_bench_missing_dependency_skips_the_model(runner, monkeypatch):
    from breastcnn.errors import MissingDependencyError
    from breastcnn.models import keras_models

    def missing(*args, **kwargs):
        raise MissingDependencyError("TensorFlow is not installed: pip install 'breastcnn[keras]'")

    monkeypatch.setattr(keras_models, "create_resnet50", missing)
    args = [a if a != "custom" else "custom,resnet50" for a in TINY_BENCH]
    result = runner.invoke(app, ["bench", *args, "--train-steps", "0", "--json"])
    assert result.exit_code == 0, result.output
    entries = {e["model"]: e for e in json.loads(result.stdout)["models"]}
    assert entries["resnet50"]["skipped"].startswith("TensorFlow is not installed")
    assert entries["custom"]["skipped"] is None
    assert "resnet50 skipped" in result.stderr


def _trained_run(tmp_path, monkeypatch):
    """cwd = tmp_path with a split and runs/latest -> a saved custom model (64 px) whose config.json names it."""
    from breastcnn.data.split import load_split
    from breastcnn.runs import run_directory, write_run_config

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["synth", "--out", ".", "--scale", "0.02", "--mags", "200", "-j", "1"]).exit_code == 0
    assert runner.invoke(app, ["split", "--mag", "200X", "--data", ".", "--out", "split", "-j", "1"]).exit_code == 0
    with run_directory("custom") as run_dir:
        run = run_dir.path
        save_model(create_model("custom", input_shape=(64, 64, 3), seed=1), run / "model.npz")
        write_run_config(run, {"arch": "custom", "split": "split", "image_size": 64}, load_split("split"))
        run_dir.model_written()
    return run


QUICK = ["--batch-sizes", "1", "--repeats", "2", "--train-steps", "0", "--max-seconds", "0.2", "--threads", "1"]


@pytest.mark.slow  # a bench run with test metrics (10 s)
def test_bench_uses_the_trained_model_of_runs_latest_and_its_split(runner, tmp_path, monkeypatch):
    """Issue 16 item 2: after `train`, the README's bench command measures the trained model, with metrics."""
    run = _trained_run(tmp_path, monkeypatch)
    result = runner.invoke(app, ["bench", "--models", "custom", *QUICK, "--json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)["models"]
    assert entry["source"] == "runs/latest" and entry["file"] == str((run / "model.npz").resolve())
    assert entry["image_size"] == 64 and 0.0 <= entry["accuracy"] <= 1.0
    assert entry["metrics_images"] == entry["test_images"] > 0
    assert "custom: measuring the trained model of runs/latest" in result.stderr
    assert "with the test subset of its split split" in result.stderr and "--fresh" in result.stderr

    fresh = runner.invoke(app, ["bench", "--models", "custom", *QUICK, "--json", "--fresh", "--image-size", "64"])
    assert fresh.exit_code == 0, fresh.output
    (entry,) = json.loads(fresh.stdout)["models"]
    assert entry["source"] == "fresh" and entry["file"] is None and "accuracy" not in entry
    assert "runs/latest" not in fresh.stderr

    markdown = runner.invoke(app, ["bench", "--models", "custom", *QUICK, "--markdown"])
    assert "| custom (64px, runs/latest) |" in markdown.stdout and "test accuracy" in markdown.stdout


def test_bench_full_takes_the_reports_settings_and_explicit_options_win(runner):
    result = runner.invoke(
        app,
        [
            "bench",
            "--models",
            "custom",
            "--full",
            "--fresh",
            "--image-size",
            "64",
            "--repeats",
            "2",
            "--train-steps",
            "0",
            "--max-seconds",
            "0.2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    options = json.loads(result.stdout)["options"]
    assert options["batch_sizes"] == [1, 32] and options["keras_train_batch_size"] == 64
    assert options["min_calls"] == 3 and options["max_seconds"] == 0.2 and options["repeats"] == 2
    default = runner.invoke(
        app,
        [
            "bench",
            "--models",
            "custom",
            "--fresh",
            "--image-size",
            "64",
            "--repeats",
            "2",
            "--train-steps",
            "0",
            "--json",
        ],
    )
    options = json.loads(default.stdout)["options"]
    assert options["batch_sizes"] == [1, 8] and options["keras_train_batch_size"] == 4
    assert options["max_seconds"] == 2.0


def test_bench_draws_a_bar_per_model_on_a_terminal(runner, monkeypatch):
    from breastcnn.cli import bench as bench_cli
    from breastcnn.cli import common

    monkeypatch.setattr(common, "progress_enabled", lambda quiet=False: not quiet)
    monkeypatch.setattr(bench_cli, "progress_enabled", lambda quiet=False: not quiet)
    result = runner.invoke(app, ["bench", *TINY_BENCH, "--markdown"])
    assert result.exit_code == 0, result.output
    assert "custom: done" in result.stderr and "4/4" in result.stderr  # 2 forward + end-to-end + train step
    assert "custom: forward pass, batch 1\n" not in result.stderr  # no plain lines when bars are drawn
    monkeypatch.undo()
    plain = runner.invoke(app, ["bench", *TINY_BENCH, "--markdown"])
    assert "custom: forward pass, batch 1\n" in plain.stderr and "━" not in plain.stderr


@pytest.fixture()
def model_and_image(tmp_path):
    model_file = tmp_path / "model.npz"
    save_model(create_model("custom", input_shape=(96, 96, 3), seed=0), model_file)
    rng = np.random.default_rng(0)
    image = tmp_path / "SOB_M_DC-14-0000-200-001.png"
    Image.fromarray(rng.integers(0, 256, (46, 70, 3), dtype=np.uint8)).resize((140, 92)).save(image)
    return model_file, image


@pytest.mark.slow  # (0.9 s)
def test_featuremaps_one_png_per_conv_layer_and_gradcam(runner, tmp_path, model_and_image):
    model_file, image = model_and_image
    out = tmp_path / "maps"
    result = runner.invoke(
        app,
        [
            "featuremaps",
            "--model",
            str(model_file),
            str(image),
            "--gradcam",
            "--class",
            "malignant",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    expected = ["input.png", "01_conv2d_1.png", "02_conv2d_2.png", "03_conv2d_3.png", "gradcam.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name in expected:
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.width > 100
    assert summary["gradcam"]["class"] == "malignant" and summary["gradcam"]["layer"] == "relu_2"
    assert summary["gradcam"]["shape"] == [11, 11]  # the second block at 96 px, not 1x1
    assert summary["predicted"] in ("benign", "malignant")
    assert abs(sum(summary["probabilities"].values()) - 1) < 1e-5

    again = runner.invoke(app, ["featuremaps", "--model", str(model_file), str(image), "--out", str(out)])
    assert again.exit_code == 2 and "already exists; pass --force" in _one_error_line(again)
    only = runner.invoke(
        app,
        ["featuremaps", "--model", str(model_file), str(image), "--layers", "conv2d_2", "--out", str(tmp_path / "one")],
    )
    assert only.exit_code == 0, only.output
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["01_conv2d_2.png", "input.png"]
    assert "conv2d_2" in only.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--class", "cancer"], "--class must be one of predicted, benign, malignant, adenosis, fibroadenoma"),
        (["--class", "ductal_carcinoma"], "--class ductal_carcinoma: "),
        (["--layers", "conv9"], "no layer named 'conv9'"),
    ],
)
def test_featuremaps_bad_input(runner, tmp_path, model_and_image, extra, message):
    model_file, image = model_and_image
    result = runner.invoke(
        app, ["featuremaps", "--model", str(model_file), str(image), "--out", str(tmp_path / "x"), *extra]
    )
    assert result.exit_code == 2
    assert message in _one_error_line(result)
    missing = runner.invoke(app, ["featuremaps", "--model", str(model_file), str(tmp_path / "none.png")])
    assert missing.exit_code == 2 and "none.png: no such file" in _one_error_line(missing)


def test_demo_refuses_a_non_empty_out(runner, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "already exists; pass --force" in _one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_demo_quick_end_to_end(runner, tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for path in (
        "BreaKHis_v1/README.txt",
        "splits/200X/manifest.csv",
        "runs/custom/model.npz",
        "runs/custom/metrics.json",
        "bench/bench.json",
        "bench/bench.md",
        "featuremaps/gradcam.png",
        "featuremaps/01_conv2d_1.png",
    ):
        assert (out / path).is_file(), path
    bench = json.loads((out / "bench" / "bench.json").read_text())
    custom = bench["models"][0]
    assert custom["model"] == "custom" and custom["accuracy"] is not None  # metrics of the trained model
    # not a one-class model (issue #10: the quick demo used to save one that called everything malignant)
    metrics = json.loads((out / "runs" / "custom" / "metrics.json").read_text())
    assert metrics["benign_recall"] > 0.5 and metrics["roc_auc"] > 0.9, metrics
    assert json.loads((out / "runs" / "custom" / "summary.json").read_text())["warnings"] == []
    assert "NOT medical data" in result.stdout
    assert not (tmp_path / "runs").exists()  # nothing written outside --out

"""CLI: `breastcnn bench`, `featuremaps` and `demo` (in-process, CliRunner)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from breastcnn.cli.app import app
from breastcnn.models import create_model

TINY_BENCH = ["--models", "custom", "--image-size", "64", "--batch-sizes", "1,2", "--repeats", "2",
              "--train-steps", "1", "--max-seconds", "0.5", "--threads", "1"]


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
    doc = json.loads(result.stdout)                                  # exactly one JSON document on stdout
    assert set(doc) >= {"machine", "models"}
    (entry,) = doc["models"]
    assert entry["model"] == "custom" and entry["skipped"] is None
    assert set(entry["throughput_ips"]) == {"1", "2"} and entry["latency_ms_p50"] > 0
    assert json.loads((out / "bench.json").read_text())["models"][0]["model"] == "custom"
    assert (out / "bench.md").read_text().startswith("| model | params |")
    assert "threads:" in result.stderr
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


@pytest.fixture()
def model_and_image(tmp_path):
    model_file = tmp_path / "model.npz"
    create_model("custom", input_shape=(96, 96, 3), seed=0).save(model_file)
    rng = np.random.default_rng(0)
    image = tmp_path / "SOB_M_DC-14-0000-200-001.png"
    Image.fromarray(rng.integers(0, 256, (46, 70, 3), dtype=np.uint8)).resize((140, 92)).save(image)
    return model_file, image


def test_featuremaps_one_png_per_conv_layer_and_gradcam(runner, tmp_path, model_and_image):
    model_file, image = model_and_image
    out = tmp_path / "maps"
    result = runner.invoke(app, ["featuremaps", "--model", str(model_file), str(image), "--gradcam",
                                 "--class", "malignant", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    expected = ["input.png", "01_conv2d_1.png", "02_conv2d_2.png", "03_conv2d_3.png", "gradcam.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name in expected:
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.width > 100
    assert summary["gradcam"]["class"] == "malignant" and summary["gradcam"]["layer"] == "conv2d_3"
    assert summary["predicted"] in ("benign", "malignant")
    assert abs(sum(summary["probabilities"].values()) - 1) < 1e-5

    again = runner.invoke(app, ["featuremaps", "--model", str(model_file), str(image), "--out", str(out)])
    assert again.exit_code == 2 and "already exists; pass --force" in _one_error_line(again)
    only = runner.invoke(app, ["featuremaps", "--model", str(model_file), str(image), "--layers", "conv2d_2",
                               "--out", str(tmp_path / "one")])
    assert only.exit_code == 0, only.output
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["01_conv2d_2.png", "input.png"]
    assert "conv2d_2" in only.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--class", "cancer"], "--class must be one of predicted, benign, malignant, got 'cancer'"),
        (["--layers", "conv9"], "no layer named 'conv9'"),
    ],
)
def test_featuremaps_bad_input(runner, tmp_path, model_and_image, extra, message):
    model_file, image = model_and_image
    result = runner.invoke(app, ["featuremaps", "--model", str(model_file), str(image), "--out",
                                 str(tmp_path / "x"), *extra])
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
    for path in ("BreaKHis_v1/README.txt", "splits/200X/manifest.csv", "runs/custom/model.npz",
                 "runs/custom/metrics.json", "bench/bench.json", "bench/bench.md", "featuremaps/gradcam.png",
                 "featuremaps/01_conv2d_1.png"):
        assert (out / path).is_file(), path
    bench = json.loads((out / "bench" / "bench.json").read_text())
    custom = bench["models"][0]
    assert custom["model"] == "custom" and custom["accuracy"] is not None   # metrics of the trained model
    # not a one-class model (issue #10: the quick demo used to save one that called everything malignant)
    metrics = json.loads((out / "runs" / "custom" / "metrics.json").read_text())
    assert metrics["benign_recall"] > 0.5 and metrics["roc_auc"] > 0.9, metrics
    assert json.loads((out / "runs" / "custom" / "summary.json").read_text())["warnings"] == []
    assert "NOT medical data" in result.stdout
    assert not (tmp_path / "runs").exists()                                  # nothing written outside --out

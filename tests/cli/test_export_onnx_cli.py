"""`breastcnn export --to onnx`, then `breastcnn predict` with the .onnx beside the .npz."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from breastcnn.cli.app import app
from breastcnn.models import create_model, save_model

pytestmark = pytest.mark.onnx


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture()
def source(tmp_path, randomize_batchnorm, unsaturate):
    """A run directory with a custom model (non-trivial BN statistics) and five PNGs of different sizes."""
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(46, 70), (64, 64), (90, 60), (33, 101), (128, 128)]):
        tint = rng.integers(40, 220, size=3)
        pixels = np.clip(tint + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
        path = tmp_path / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path)
        images.append(path)
    from breastcnn.data.images import decode_image, preprocess

    model = randomize_batchnorm(create_model("custom", (64, 64, 3), 2, seed=4), seed=1)
    model.meta["preprocess"] = "minmax"
    unsaturate(model, preprocess(np.stack([decode_image(str(p), 64) for p in images]), "minmax"))
    run = tmp_path / "run"
    save_model(model, run / "model.npz")
    return run, images


def _predict(model_path, images):
    result = invoke("predict", "--model", model_path, *images, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == [str(p) for p in images]
    return np.array([r["probability"] for r in rows])


def test_export_to_onnx_predicts_like_the_numpy_model(onnxruntime, source, tmp_path):
    run, images = source
    out = tmp_path / "deploy" / "model.onnx"
    result = invoke("export", "--model", run, "--to", "onnx", "--out", out, "--json")  # a run directory works
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["from"] == str(run / "model.npz") and summary["out"] == str(out) and summary["to"] == "onnx"
    assert summary["source_framework"] == "numpy" and summary["arch"] == "custom" and summary["opset"] == 17
    assert summary["params"] == {"trainable": 32386, "non_trainable": 224}
    assert summary["size_bytes"] == out.stat().st_size and summary["max_abs_diff"] <= 1e-4

    p_numpy = _predict(run / "model.npz", images)
    p_onnx = _predict(out, images)
    np.testing.assert_allclose(p_onnx, p_numpy, atol=1e-4)
    assert np.ptp(p_numpy) > 0.05  # not a constant output that would match trivially

    # no overwrite without --force; the file is left as it was
    before = out.read_bytes()
    result = invoke("export", "--model", run / "model.npz", "--to", "onnx", "--out", out)
    assert result.exit_code == 2 and "already exists; pass --force" in result.output
    assert out.read_bytes() == before
    result = invoke("export", "--model", run / "model.npz", "--to", "onnx", "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)  # the path on stdout, the message on stderr
    assert "exported" in result.stderr and "(onnx)" in result.stderr
    assert out.read_bytes() == before  # deterministic export


def test_export_to_onnx_errors(onnxruntime, source, tmp_path):
    run, _ = source
    result = invoke("export", "--model", run / "model.npz", "--to", "onnx", "--out", tmp_path / "m.keras")
    assert result.exit_code == 2 and "--out" in result.output and "must end in .onnx" in result.output
    fake = tmp_path / "m.keras"
    fake.write_bytes(b"")
    result = invoke("export", "--model", fake, "--to", "onnx", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "--to onnx converts a NumPy .npz model" in result.output
    assert not (tmp_path / "m.onnx").exists()
    result = invoke("predict", "--model", fake.with_suffix(".onnx"), "x.png")
    assert result.exit_code == 2 and "no such file" in result.output


def test_featuremaps_refuses_an_onnx_model_before_writing(onnxruntime, source, tmp_path):
    run, images = source
    out = tmp_path / "m.onnx"
    assert invoke("export", "--model", run, "--to", "onnx", "--out", out).exit_code == 0
    result = invoke("featuremaps", "--model", out, images[0], "--out", tmp_path / "maps")
    assert result.exit_code == 2 and "an ONNX export holds only the inference graph" in result.output
    assert not (tmp_path / "maps").exists()

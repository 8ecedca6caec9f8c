"""Issue 11 through the CLI: outputs stay out of the data tree, CSV cells cannot run formulas, TF is quiet.

Item 7: ``evaluate --out`` and ``train --out`` inside the data root are refused, as ``split`` does.
Item 11: a Keras command's error is one line on stderr (no TensorFlow C++ logging).
Item 14: text cells starting with ``=``, ``+``, ``-``, ``@`` are neutralised in every CSV we write
from user-controlled strings (``predictions.csv``, ``predict --csv``); numbers stay numbers.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from breastcnn.cli.app import app
from breastcnn.data.split import create_split
from breastcnn.models import create_model, save_model

REPO = Path(__file__).resolve().parents[2]
FORMULA_STARTS = ("=", "+", "-", "@")


def _run(args):
    return CliRunner().invoke(app, args, env={"BREASTCNN_NO_PROGRESS": "1"})


@pytest.fixture(scope="module")
def data(tmp_path_factory, make_breakhis_tree):
    """(data root, split dir, model file): a small tree, its split and an untrained 64 px model."""
    base = tmp_path_factory.mktemp("hostile")
    root = make_breakhis_tree(base / "src", traps=False)
    create_split(root, "200X", out=base / "s")
    model = base / "m.npz"
    save_model(create_model("custom", input_shape=(64, 64, 3), seed=0), model)
    return root, base / "s", model


# --------------------------------------------------------------------------- item 7


def test_evaluate_out_inside_the_data_root_is_refused(data, tree_digest):
    root, split, model = data
    before = tree_digest(root)
    for out in (root / "histology_slides" / "reports", root / "histology_slides" / "breast" / "benign" / "r"):
        result = _run(["evaluate", "--model", str(model), "--split", str(split), "--out", str(out)])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert "--out" in result.stderr and "data" in result.stderr
    assert tree_digest(root) == before


def test_train_out_inside_the_data_root_is_refused(data, tree_digest):
    root, split, _ = data
    before = tree_digest(root)
    out = root / "histology_slides" / "breast" / "malignant" / "run"
    result = _run(["train", "--split", str(split), "--out", str(out), "--image-size", "64", "--epochs", "1"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "--out" in result.stderr and "data" in result.stderr
    assert tree_digest(root) == before


# --------------------------------------------------------------------------- item 14: CSV


def test_predict_csv_neutralises_formula_cells(data, tmp_path, monkeypatch):
    _, _, model = data
    monkeypatch.chdir(tmp_path)
    names = ["=SUM(A1).png", "+1.png", "@cmd.png", "plain.png"]
    for name in names:
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / name, format="PNG")
    result = _run(["predict", "--model", str(model), *names, "--csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["path"] for r in rows] == ["'=SUM(A1).png", "'+1.png", "'@cmd.png", "plain.png"]
    for r in rows:
        assert 0.0 <= float(r["probability"]) <= 1.0  # numbers stay numbers


def test_evaluate_predictions_csv_neutralises_text_cells(data, tmp_path):
    _, split, model = data
    edited = tmp_path / "s"
    edited.mkdir()
    (edited / "split.json").write_bytes((split / "split.json").read_bytes())
    lines = (split / "manifest.csv").read_text().splitlines()
    out_lines = [lines[0]]
    for i, line in enumerate(lines[1:]):
        fields = line.split(",")
        fields[3] = ['=HYPERLINK("http://x")', "-2+3", "@SUM(1)", "+7"][i % 4]  # patient column
        out_lines.append(",".join(fields))
    (edited / "manifest.csv").write_text("\n".join(out_lines) + "\n")
    report = tmp_path / "report"
    result = _run(["evaluate", "--model", str(model), "--split", str(edited), "--out", str(report)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO((report / "predictions.csv").read_text())))
    assert rows
    for r in rows:
        assert r["patient"].startswith("'") and r["patient"][1] in FORMULA_STARTS, r
        assert not any(str(v).startswith(FORMULA_STARTS) for v in r.values()), r
        float(r["probability"])


def test_csv_cell_keeps_numbers_and_neutralises_text():
    from breastcnn.inference import csv_cell

    assert csv_cell(-0.5) == -0.5 and csv_cell(3) == 3
    assert csv_cell("-0.5") == "'-0.5"  # a text cell that looks like a formula or a number is text
    assert csv_cell("=1+1") == "'=1+1" and csv_cell("@x") == "'@x" and csv_cell("+x") == "'+x"
    assert csv_cell("\t=x") == "'\t=x"
    assert csv_cell("benign") == "benign" and csv_cell("") == ""


# --------------------------------------------------------------------------- item 11


@pytest.mark.keras
@pytest.mark.slow  # a fresh interpreter imports TensorFlow (about 10 s)
def test_keras_command_error_is_one_line_without_tensorflow_logging(tmp_path, keras):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    env.update(PYTHONPATH=str(REPO), BREASTCNN_NO_PROGRESS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "breastcnn",
            "finetune",
            "--model",
            "custom-keras",
            "--split",
            str(tmp_path / "none"),
            "--image-size",
            "64",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error:") and "none" in proc.stderr


# --------------------------------------------------------------------------- item 9: run files of evaluate


@pytest.mark.parametrize("text", ["[]", '{"options": {"split": 7}}', '{"options": []}'])
def test_evaluate_with_a_malformed_config_json_names_it(data, tmp_path, text):
    _, _, model = data
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.npz").write_bytes(model.read_bytes())
    (run / "config.json").write_text(text)
    result = _run(["evaluate", "--model", str(run)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "config.json" in result.stderr

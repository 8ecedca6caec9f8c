"""Tables on a non-terminal stdout (a pipe, a file) are not cut at 80 columns (issue 16 item 8)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from rich.table import Table
from typer.testing import CliRunner

from breastcnn.cli.app import app

LONG = "a_directory_name_long_enough_that_two_of_them_overflow_eighty_columns"


def test_print_table_keeps_every_character_when_not_a_terminal(capsys, monkeypatch):
    from breastcnn.cli.common import print_table

    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table(title="t")
    table.add_column("name")
    table.add_column("path")
    path = "/".join([LONG] * 3) + "/file.png"
    table.add_row("x", path)
    print_table(table)
    out = capsys.readouterr().out
    assert "…" not in out and path in out  # one line, whole


def test_featuremaps_and_predict_tables_through_a_non_terminal_stdout(tmp_path, monkeypatch):
    from breastcnn.models import create_model, save_model

    monkeypatch.delenv("COLUMNS", raising=False)
    model = tmp_path / "model.npz"
    save_model(create_model("custom", input_shape=(64, 64, 3), seed=0), model)
    folder = tmp_path / LONG / LONG
    folder.mkdir(parents=True)
    image = folder / "image_with_a_long_name.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image)
    out = tmp_path / LONG / "maps"
    runner = CliRunner()
    result = runner.invoke(app, ["featuremaps", "--model", str(model), str(image), "--gradcam", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    assert str(out / "gradcam.png") in result.stdout and str(out / "01_conv2d_1.png") in result.stdout
    result = runner.invoke(app, ["predict", "--model", str(model), str(folder)])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and str(image) in result.stdout

"""`breastcnn synth` through the CLI (a handful of images: the full plan is patched down)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from breastcnn.cli.app import app
from breastcnn.data import synth


@pytest.fixture
def tiny_plan(monkeypatch):
    full = synth.plan
    monkeypatch.setattr(
        synth, "plan", lambda scale=synth.DEFAULT_SCALE, mags=synth.DEFAULT_MAGS: full(scale, mags)[::40]
    )


def test_synth_then_split_in_same_folder(tmp_path, monkeypatch, tiny_plan):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BREAKHIS_DIR", raising=False)
    runner = CliRunner()
    env = {"BREASTCNN_NO_PROGRESS": "1"}
    result = runner.invoke(app, ["synth", "--json", "-j", "1"], env=env)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["synthetic"] is True and doc["mags"] == ["200X"] and doc["n_images"] == len(synth.plan())
    assert (tmp_path / "BreaKHis_v1" / "README.txt").is_file()
    again = runner.invoke(app, ["synth"], env=env)
    assert again.exit_code == 2 and "--force" in again.stderr
    split = runner.invoke(app, ["split", "--mag", "200X", "--by", "image", "-j", "1"], env=env)
    assert split.exit_code == 0, split.output


def test_help_says_synthetic_and_defaults():
    result = CliRunner().invoke(app, ["synth", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "NOT medical data" in text and "0.1" in text and "200" in text


def test_bad_mags(tmp_path):
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), "--mags", "200,500"])
    assert result.exit_code == 2 and "--mags" in result.stderr and "40, 100, 200, 400" in result.stderr


def test_synth_hard_shifted_json_and_readme(tmp_path, tiny_plan):
    result = CliRunner().invoke(
        app,
        ["synth", "--out", str(tmp_path), "--difficulty", "hard", "--stain-profile", "shifted", "--json", "-j", "1"],
        env={"BREASTCNN_NO_PROGRESS": "1"},
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["difficulty"] == "hard" and doc["stain_profile"] == "shifted" and doc["n_images"] == len(synth.plan())
    readme = (tmp_path / "BreaKHis_v1" / "README.txt").read_text()
    assert "--difficulty hard --stain-profile shifted" in readme
    assert "Difficulty: hard (same stain" in readme and "Stain profile: shifted (another lab" in readme


def test_synth_default_is_easy(tmp_path, tiny_plan):
    result = CliRunner().invoke(
        app, ["synth", "--out", str(tmp_path), "--json", "-j", "1"], env={"BREASTCNN_NO_PROGRESS": "1"}
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["difficulty"] == "easy" and doc["stain_profile"] == "default"
    assert "Difficulty: easy" in (tmp_path / "BreaKHis_v1" / "README.txt").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--difficulty", "medium"], "--difficulty must be one of easy, hard, got 'medium'"),
        (["--stain-profile", "lab3"], "--stain-profile: unknown profile 'lab3'; choose one of default, shifted"),
    ],
)
def test_bad_difficulty_or_stain_profile(tmp_path, args, message):
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output and not (tmp_path / "BreaKHis_v1").exists()

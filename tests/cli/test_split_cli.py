"""`breastcnn split` through the CLI: defaults, JSON, errors, overwrite, folds, image split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from breastcnn.cli.app import app


@pytest.fixture
def runner():
    return CliRunner()


def _run(runner, args, env=None):
    return runner.invoke(app, args, env={"BREASTCNN_NO_PROGRESS": "1", **(env or {})})


def test_default_data_and_out_in_cwd(runner, tmp_path, monkeypatch, make_breakhis_tree, tree_digest):
    data = make_breakhis_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BREAKHIS_DIR", raising=False)
    before = tree_digest(data)
    result = _run(runner, ["split", "--mag", "200X", "-j", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "splits" / "200X" / "manifest.csv").is_file()
    assert "train" in result.stdout and "unreadable" in result.stderr
    assert tree_digest(data) == before
    again = _run(runner, ["split", "--mag", "200X", "-j", "1"])
    assert again.exit_code == 2 and "--force" in again.stderr and again.stderr.count("\n") == 1
    forced = _run(runner, ["split", "--mag", "200X", "--force", "--seed", "1", "-j", "1"])
    assert forced.exit_code == 0


def test_second_split_refuses_before_decoding_anything(runner, tmp_path, monkeypatch, make_breakhis_tree):
    """Issue 16 item 6: an existing output is refused before the (expensive) decode check of every image."""
    from breastcnn.data import breakhis

    data = make_breakhis_tree(tmp_path)
    out = tmp_path / "split"
    args = ["split", "--mag", "200X", "--data", str(data), "--out", str(out), "-j", "1"]
    assert _run(runner, args).exit_code == 0
    before = (out / "manifest.csv").read_bytes()

    def no_decoding(*args, **kwargs):
        raise AssertionError("images were decoded before the existing output was refused")

    monkeypatch.setattr(breakhis, "_map_chunks", no_decoding)
    again = _run(runner, args)
    assert again.exit_code == 2, again.output
    assert f"{out} already exists; pass --force" in again.stderr and again.stderr.count("\n") == 1
    inside = _run(
        runner,
        ["split", "--mag", "200X", "--data", str(data), "--out", str(data / "histology_slides" / "s"), "-j", "1"],
    )
    assert inside.exit_code == 2 and "inside the data tree" in inside.stderr
    assert (out / "manifest.csv").read_bytes() == before
    monkeypatch.undo()
    assert _run(runner, [*args, "--force"]).exit_code == 0  # --force still decodes and rewrites


def test_json_only_on_stdout(runner, tmp_path, make_breakhis_tree):
    data = make_breakhis_tree(tmp_path)
    out = tmp_path / "s"
    result = _run(runner, ["split", "--data", str(data), "--mag", "200", "--out", str(out), "--json", "-j", "2"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # nothing but one JSON document
    assert doc["manifest_hash"] and doc["by"] == "patient" and doc["kind"] == "split"
    assert (
        doc["images"]["train"]["total"] + doc["images"]["val"]["total"] + doc["images"]["test"]["total"]
        == doc["n_images"]
    )
    assert len(doc["unreadable"]) == 1
    saved = json.loads((out / "split.json").read_text())
    assert saved["manifest_hash"] == doc["manifest_hash"]


def test_missing_data_error(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _run(runner, ["split", "--mag", "200X"], env={"BREAKHIS_DIR": str(tmp_path / "nope")})
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert str(tmp_path / "nope") in result.stderr and "breastcnn synth" in result.stderr
    result = _run(runner, ["split", "--mag", "200X"], env={"BREAKHIS_DIR": ""})
    assert result.exit_code == 2 and "BreaKHis_v1" in result.stderr


def test_bad_mag_lists_valid_values(runner, tmp_path):
    result = _run(runner, ["split", "--data", str(tmp_path), "--mag", "250X"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "40X, 100X, 200X, 400X" in result.stderr


def test_folds_and_image_split(runner, tmp_path, make_breakhis_tree):
    data = make_breakhis_tree(tmp_path, traps=False)
    result = _run(
        runner,
        [
            "split",
            "--data",
            str(data),
            "--mag",
            "200X",
            "--out",
            str(tmp_path / "k"),
            "--folds",
            "2",
            "--json",
            "-j",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kind"] == "kfold" and doc["fold_dirs"] == ["fold1", "fold2"]
    assert (tmp_path / "k" / "fold2" / "manifest.csv").is_file()
    assert json.loads((tmp_path / "k" / "split.json").read_text())["kind"] == "kfold"
    result = _run(
        runner,
        ["split", "--data", str(data), "--mag", "200X", "--out", str(tmp_path / "i"), "--by", "image", "-j", "1"],
    )
    assert result.exit_code == 0 and "leak" in result.stderr


def test_folder_per_class_tree_with_links(runner, tmp_path):
    rng = np.random.default_rng(0)
    for label, n in (("benign", 10), ("malignant", 20)):
        (tmp_path / "d" / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "d" / label / f"{i}.png")
    result = _run(
        runner,
        [
            "split",
            "--data",
            str(tmp_path / "d"),
            "--mag",
            "200X",
            "--out",
            str(tmp_path / "s"),
            "--materialize",
            "link",
            "-j",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "split by image" in result.stderr
    linked = list((tmp_path / "s" / "train" / "malignant").iterdir())
    assert len(linked) == 16 and all(p.is_symlink() for p in linked)


def test_mag_all_json(runner, tmp_path, monkeypatch):
    """Issue 13: `split --mag all --json` over every magnification, patient-disjoint, stratified by subtype."""
    from tests.data.plans import make_plan_tree

    data = make_plan_tree(tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    result = _run(runner, ["split", "--data", str(data), "--mag", "all", "--json", "-j", "1"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["out"] == "splits/all" and doc["magnification"] == "all"
    assert doc["magnifications"] == ["40X", "100X", "200X", "400X"] and doc["stratify"] == "subtype"
    assert doc["n_images"] == 4 * 82 and doc["n_patients"] == 82
    for subset in ("train", "val", "test"):
        assert sorted(doc["images_by_magnification"][subset]) == sorted(doc["magnifications"])
        assert sum(doc["images_by_magnification"][subset].values()) == doc["images"][subset]["total"]
        assert len(doc["patients_by_subtype"][subset]) == 8 and min(doc["patients_by_subtype"][subset].values()) >= 1
    rows = (tmp_path / "splits" / "all" / "manifest.csv").read_text().splitlines()[1:]
    subsets_of = {}
    for line in rows:
        _, _, _, patient, _, subset = line.split(",")
        subsets_of.setdefault(patient, set()).add(subset)
    assert len(subsets_of) == 82 and all(len(s) == 1 for s in subsets_of.values())


def test_mag_list_tables_and_class_stratification(runner, tmp_path):
    from tests.data.plans import make_plan_tree

    data = make_plan_tree(tmp_path / "src", mags=("40X", "200X", "400X"))
    result = _run(runner, ["split", "--data", str(data), "--mag", "40X,200X", "--out", str(tmp_path / "s"), "-j", "1"])
    assert result.exit_code == 0, result.output
    assert "by subtype" in result.stdout and "phyllodes_tumor" in result.stdout and "by magnification" in result.stdout
    assert "split 40X+200X by patient" in result.stderr
    saved = json.loads((tmp_path / "s" / "split.json").read_text())
    assert saved["magnifications"] == ["40X", "200X"] and saved["magnification"] == "40X+200X"
    result = _run(
        runner,
        [
            "split",
            "--data",
            str(data),
            "--mag",
            "200X",
            "--out",
            str(tmp_path / "c"),
            "--stratify",
            "class",
            "--json",
            "-j",
            "1",
        ],
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["stratify"] == "class"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--mag", "40X,250X"], "--mag: unknown magnification '250X'"),
        (["--mag", "all,40X"], "--mag: unknown magnification 'all'"),
        (["--mag", "200X", "--stratify", "tissue"], "--stratify must be one of subtype, class"),
    ],
)
def test_bad_mag_list_or_stratify_exit_2(runner, tmp_path, args, needle, make_breakhis_tree):
    data = make_breakhis_tree(tmp_path, traps=False)
    result = _run(runner, ["split", "--data", str(data), "--out", str(tmp_path / "s"), *args, "-j", "1"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert needle in result.stderr and not (tmp_path / "s").exists()

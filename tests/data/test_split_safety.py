"""Issue 11: `split` never loses data, never reads outside the data root, and says so in one line.

Item 1: ``--force`` removes only files a previous split recorded as its own (or cache files that
carry our metadata); never anything in the data tree; an ``--out`` that contains or is inside the
data is refused. Item 4: one writer per split directory. Item 6: manifest paths stay inside the data
root. Items 9/10: malformed split.json and manifest name the file. Item 13: one-class data warns.
Item 14: ``--seed -1`` names ``--seed``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from breastcnn.cli.app import app
from breastcnn.data.images import load_subset
from breastcnn.data.split import create_split, load_split
from breastcnn.errors import UserInputError


def _run(args):
    return CliRunner().invoke(app, args, env={"BREASTCNN_NO_PROGRESS": "1"})


def _folder_tree(root: Path, n: int = 6, classes=("benign", "malignant")) -> Path:
    """A folder-per-class tree ``root/<class>/img<i>.png`` of small random images."""
    rng = np.random.default_rng(0)
    for label in ("benign", "malignant"):
        (root / label).mkdir(parents=True, exist_ok=True)
        if label not in classes:
            continue
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / label / f"img{i}.png")
    return root


@pytest.fixture
def clean_tree(tmp_path, make_breakhis_tree) -> Path:
    """A BreakHis tree without trap files (no warnings: stderr holds only the error line)."""
    return make_breakhis_tree(tmp_path / "src", traps=False)


def _user_files(out: Path) -> dict[Path, str]:
    """User files placed exactly where a split would write its own (item 1 of issue 11)."""
    files = {
        out / "test" / "mine.txt": "test notes",
        out / "cache" / "mine.txt": "cache notes",
        out / "fold1" / "mine.txt": "fold notes",
        out / "train" / "benign" / "mine.png": "not ours",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


# --------------------------------------------------------------------------- item 1: --force scope


def test_force_keeps_user_files_where_split_would_write(breakhis_tree, tmp_path):
    out = tmp_path / "P"
    out.mkdir()
    files = _user_files(out)
    result = _run(["split", "--data", str(breakhis_tree), "--mag", "200X", "--out", str(out), "--force", "-j", "1"])
    assert result.exit_code == 0, result.output
    for path, text in files.items():
        assert path.read_text() == text, path
    assert (out / "manifest.csv").is_file()


def test_force_removes_our_previous_files_but_not_the_users(breakhis_tree, tmp_path):
    """A previous split (materialised, k-fold, with caches that train wrote) is replaced; user files stay."""
    out = tmp_path / "P"
    create_split(breakhis_tree, "200X", out=out, folds=2, materialize="copy")
    load_subset(load_split(out / "fold1"), "train", 16)  # cache files written later, as `train` does
    assert list((out / "fold1" / "cache").iterdir())
    files = _user_files(out)
    (out / "fold1" / "cache" / "notes.txt").write_text("mine")
    (out / "fold2" / "train" / "benign" / "keep.png").write_text("mine")
    files.update(
        {out / "fold1" / "cache" / "notes.txt": "mine", out / "fold2" / "train" / "benign" / "keep.png": "mine"}
    )

    create_split(breakhis_tree, "200X", out=out, seed=3, force=True)
    for path, text in files.items():
        assert path.read_text() == text, path
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    ours = {"manifest.csv", "split.json"}
    assert set(left) == ours | {p.relative_to(out).as_posix() for p in files}, left
    # the new split records what it wrote, so the next --force knows
    assert {"manifest.csv", "split.json"} <= set(json.loads((out / "split.json").read_text())["files"])


def test_force_recognises_splits_written_before_the_file_list(breakhis_tree, tmp_path):
    """A split.json without ``files`` (written by an earlier version): its files are reconstructed."""
    out = tmp_path / "P"
    create_split(breakhis_tree, "200X", out=out, materialize="copy")
    info = json.loads((out / "split.json").read_text())
    del info["files"]
    (out / "split.json").write_text(json.dumps(info))
    load_subset(load_split(out), "val", 16)
    files = _user_files(out)
    create_split(breakhis_tree, "200X", out=out, seed=4, force=True)
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert set(left) == {"manifest.csv", "split.json"} | {p.relative_to(out).as_posix() for p in files}, left


def test_force_refuses_to_overwrite_a_file_it_did_not_write(clean_tree, tmp_path):
    out = tmp_path / "P"
    out.mkdir()
    (out / "manifest.csv").write_text("my own table\n")
    result = _run(["split", "--data", str(clean_tree), "--mag", "200X", "--out", str(out), "--force", "-j", "1"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "manifest.csv" in result.stderr
    assert (out / "manifest.csv").read_text() == "my own table\n"


def test_doctored_split_json_cannot_make_force_delete_outside(breakhis_tree, tmp_path):
    out = tmp_path / "P"
    create_split(breakhis_tree, "200X", out=out)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    info = json.loads((out / "split.json").read_text())
    info["files"] = ["manifest.csv", "../victim.txt", str(victim)]
    (out / "split.json").write_text(json.dumps(info))
    create_split(breakhis_tree, "200X", out=out, force=True)
    assert victim.read_text() == "precious"


def test_out_containing_the_data_is_refused_and_source_images_survive(tmp_path, tree_digest):
    x = tmp_path / "X"
    data = _folder_tree(x / "test")
    before = tree_digest(x)
    result = _run(
        ["split", "--data", str(data), "--mag", "200X", "--by", "image", "--out", str(x), "--force", "-j", "1"]
    )
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "--out" in result.stderr and str(data) in result.stderr
    assert tree_digest(x) == before


def test_out_inside_the_data_is_refused(tmp_path, tree_digest):
    data = _folder_tree(tmp_path / "D")
    before = tree_digest(data)
    for out in (data, data / "splits", data / "benign" / "s"):
        with pytest.raises(UserInputError, match="--out"):
            create_split(data, "all", out=out, force=True)
    assert tree_digest(data) == before


# --------------------------------------------------------------------------- item 4: one writer at a time


def test_second_split_into_the_same_directory_names_the_holder(breakhis_tree, tmp_path):
    out = tmp_path / "P"
    started, release = threading.Event(), threading.Event()
    errors = []

    def slow_progress(n):
        started.set()
        release.wait(30)

    def first():
        try:
            create_split(breakhis_tree, "200X", out=out, progress=slow_progress)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(30)
        with pytest.raises(UserInputError, match=f"pid {os.getpid()}"):
            create_split(breakhis_tree, "200X", out=out, force=True)
    finally:
        release.set()
        thread.join(60)
    assert not errors, errors
    assert load_split(out).rows  # the first writer finished undisturbed


# --------------------------------------------------------------------------- item 6: manifest paths


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.png", "histology_slides/../../outside.png"])
def test_manifest_path_outside_the_data_root_is_refused(breakhis_tree, tmp_path, bad):
    out = tmp_path / "s"
    create_split(breakhis_tree, "200X", out=out)
    lines = (out / "manifest.csv").read_text().splitlines()
    fields = lines[3].split(",")
    fields[0] = bad
    lines[3] = ",".join(fields)
    (out / "manifest.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserInputError, match=r"manifest.csv:4: .*outside the data root") as info:
        load_split(out)
    assert bad in str(info.value)


# --------------------------------------------------------------------------- items 9, 10: malformed files


def test_split_json_that_is_not_an_object(breakhis_tree, tmp_path):
    out = tmp_path / "s"
    create_split(breakhis_tree, "200X", out=out)
    (out / "split.json").write_text("[1, 2]")
    result = _run(["train", "--split", str(out), "--out", str(tmp_path / "run"), "--image-size", "64"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "split.json" in result.stderr


def test_binary_manifest_names_the_file(breakhis_tree, tmp_path):
    out = tmp_path / "s"
    create_split(breakhis_tree, "200X", out=out)
    for junk in (b"\xff\xfe\x00\x01binary\x00\x00", b"path,label,subtype,patient,magnification,split\nab\x00c\n"):
        (out / "manifest.csv").write_bytes(junk)
        result = _run(["train", "--split", str(out), "--out", str(tmp_path / "run"), "--image-size", "64"])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert "manifest.csv" in result.stderr


# --------------------------------------------------------------------------- item 13: one class


def test_one_class_data_warns_at_split(tmp_path):
    data = _folder_tree(tmp_path / "D", classes=("benign",))
    info = create_split(data, "all", out=tmp_path / "s")
    assert any("only benign" in w for w in info["warnings"]), info["warnings"]


# --------------------------------------------------------------------------- item 14: --seed


def test_negative_seed_names_the_option(clean_tree, tmp_path):
    result = _run(
        ["split", "--data", str(clean_tree), "--mag", "200X", "--out", str(tmp_path / "s"), "--seed", "-1", "-j", "1"]
    )
    assert result.exit_code == 2 and "--seed" in result.stderr and result.stderr.count("\n") == 1, result.output
    assert not (tmp_path / "s").exists()


def test_synth_negative_seed_names_the_option(tmp_path):
    result = _run(["synth", "--out", str(tmp_path / "d"), "--seed", "-1", "--scale", "0.01"])
    assert result.exit_code == 2 and "--seed" in result.stderr and result.stderr.count("\n") == 1, result.output
    assert not (tmp_path / "d").exists()

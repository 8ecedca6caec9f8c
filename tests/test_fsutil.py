"""Atomic writes: nothing half-written, and the file mode a plain open() would give (issue 16 item 4)."""

from __future__ import annotations

import contextlib
import os
import stat

import pytest

from breastcnn import fsutil


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(
    "mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]
)
def test_default_mode_follows_the_umask(mask, file_mode, dir_mode, tmp_path):
    with umask(mask):
        assert fsutil.default_mode() == file_mode
        assert fsutil.default_mode(directory=True) == dir_mode
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what the OS gives a normal file
        assert mode(plain) == file_mode
        assert os.umask(mask) == mask  # reading it left the umask as it was


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_get_the_umask_mode_not_0600(mask, expected, tmp_path):
    with umask(mask):
        fsutil.atomic_write_text(tmp_path / "a.csv", "x\n")
        fsutil.atomic_write_json(tmp_path / "a.json", {"a": 1})
        with fsutil.atomic_write(tmp_path / "a.bin", "wb") as handle:
            handle.write(b"\x00")
    for name in ("a.csv", "a.json", "a.bin"):
        assert mode(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.csv", "a.json"]  # no temp files left


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_model_npz_and_plots_get_the_umask_mode(mask, expected, tmp_path):
    from breastcnn.models import create_model, save_model
    from breastcnn.plots import plot_confusion

    model = create_model("custom", input_shape=(64, 64, 3), seed=0)
    with umask(mask):
        save_model(model, tmp_path / "model.npz")
        plot_confusion([[3, 1], [0, 4]], tmp_path / "confusion.png")
    assert mode(tmp_path / "model.npz") == expected
    assert mode(tmp_path / "confusion.png") == expected


def test_keras_model_and_sidecar_get_the_umask_mode(keras, tmp_path):
    from breastcnn.models import create_model, save_model

    model = create_model("custom-keras", input_shape=(64, 64, 3), seed=0)
    with umask(0o022):
        path = save_model(model, tmp_path / "m.keras")
    assert mode(path) == 0o644
    assert all(mode(p) == 0o644 for p in tmp_path.iterdir()), {p.name: oct(mode(p)) for p in tmp_path.iterdir()}


def test_synthetic_tree_and_split_outputs_are_readable_by_others(tmp_path, monkeypatch, make_breakhis_tree):
    """mkdtemp gives 0700: the synthetic tree renamed from it must get the umask's 0755."""
    from breastcnn.data import synth
    from breastcnn.data.split import create_split

    full_plan = synth.plan
    monkeypatch.setattr(synth, "plan", lambda scale, mags: full_plan(scale, mags)[:3])  # 3 images suffice
    data = make_breakhis_tree(tmp_path / "real", traps=False)
    with umask(0o022):
        synth.generate(tmp_path, scale=0.01, mags="200", seed=0, jobs=1)
        create_split(data, mag="200X", out=tmp_path / "split", jobs=1)
    tree = tmp_path / "BreaKHis_v1"
    assert mode(tree) == 0o755
    assert mode(tree / "README.txt") == 0o644
    assert mode(next(tree.rglob("*.png"))) == 0o644
    assert mode(tmp_path / "split" / "manifest.csv") == 0o644
    assert mode(tmp_path / "split" / "split.json") == 0o644


def test_atomic_write_failure_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with fsutil.atomic_write(target) as handle:
            handle.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_remove_recorded_deletes_only_what_is_recorded_and_empty_folders(tmp_path):
    from breastcnn.fsutil import remove_recorded

    root = tmp_path / "out"
    for rel in ("a/ours.txt", "a/b/ours.txt", "c/ours.txt", "c/theirs.txt", "c/cache/ours.npy", "top.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    data = tmp_path / "data"
    data.mkdir()
    (data / "image.png").write_text("source")
    (root / "linked").symlink_to(data, target_is_directory=True)  # a folder that resolves outside root
    owned = ["a/ours.txt", "a/b/ours.txt", "c/ours.txt", "c/cache/ours.npy", "top.txt", "linked/image.png", "no.txt"]
    kept = remove_recorded(root, owned)
    assert kept == [root / "c"] and (root / "c" / "theirs.txt").read_text() == "c/theirs.txt"  # named once
    assert sorted(p.name for p in (root / "c").iterdir()) == ["theirs.txt"]
    assert not (root / "a").exists() and not (root / "top.txt").exists() and not (root / "c" / "ours.txt").exists()
    assert (data / "image.png").read_text() == "source" and root.is_dir()  # root itself stays
    protected = tmp_path / "protected"
    (protected / "x").mkdir(parents=True)
    (protected / "x" / "f.txt").write_text("keep")
    assert remove_recorded(tmp_path, ["protected/x/f.txt"], protected=[protected.resolve()]) == []
    assert (protected / "x" / "f.txt").read_text() == "keep"
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "ours.txt").write_text("x")
    remove_recorded(tmp_path, ["lone/ours.txt"])
    assert not lone.exists()
    (tmp_path / "made" / "empty").mkdir(parents=True)  # a folder of ours with nothing written in it yet
    assert remove_recorded(tmp_path, [], folders=["made/empty"]) == [] and not (tmp_path / "made").exists()

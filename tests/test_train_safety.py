"""Issue 11 for `train`: resume checks its split, one run per directory, nothing half-made left behind.

Item 3: the split path in config.json is absolute and its manifest hash is checked on resume.
Item 4: an exclusive lock per run directory (NumPy and Keras runs). Item 9: hand-edited run files
are user errors naming the file. Item 12: ``runs/latest`` moves only once a model exists; a run
directory that a failed start left empty is removed. Item 13: one-class training data is refused.
Item 14: ``--image-size`` and ``--seed`` are checked before any cache is written; our stale ``.tmp``
files are removed on resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from breastcnn.cli.app import app
from breastcnn.data.split import create_split, load_split
from breastcnn.errors import UserInputError
from breastcnn.training.callbacks import TrainingCallback
from breastcnn.training.config import TrainConfig
from breastcnn.training.numpy_run import run_training

SIZE = 64


def _run(args):
    return CliRunner().invoke(app, args, env={"BREASTCNN_NO_PROGRESS": "1"})


@pytest.fixture(scope="module")
def tree(tmp_path_factory, make_breakhis_tree):
    """A small BreakHis tree (16 patients, about 90 images of 40x30 px) without trap files."""
    return make_breakhis_tree(tmp_path_factory.mktemp("train_safety"), traps=False)


@pytest.fixture(scope="module")
def split_dir(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_safety_split") / "s"
    create_split(tree, "200X", out=out, seed=0)
    return out


def _config(split, out=None, **overrides) -> TrainConfig:
    options = dict(
        split=str(split),
        out=None if out is None else str(out),
        image_size=SIZE,
        epochs=2,
        evals_per_epoch=2,
        batch_size=16,
        patience=50,
        seed=0,
        jobs=1,
    )
    options.update(overrides)
    return TrainConfig(**options)


class InterruptAt(TrainingCallback):
    """Raise KeyboardInterrupt (a deferred Ctrl-C) after optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_batch_end(self, step, loss, accuracy):
        if step == self.step:
            raise KeyboardInterrupt


class Hold(TrainingCallback):
    """Block in on_train_begin until released (a run in progress)."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def on_train_begin(self, total_epochs, steps_per_epoch, **info):
        self.started.set()
        self.release.wait(60)


def _interrupted_run(split, run_dir, **overrides) -> dict:
    summary = run_training(_config(split, run_dir, **overrides), [InterruptAt(3)])
    assert summary["stopped"] == "interrupted"
    return summary


# --------------------------------------------------------------------------- item 3


@pytest.mark.slow  # (0.65 s)
def test_resume_from_another_directory_uses_the_recorded_split(tree, tmp_path, monkeypatch):
    a, b = tmp_path / "A", tmp_path / "B"
    create_split(tree, "200X", out=a / "s", seed=0)
    create_split(tree, "200X", out=b / "s", seed=1)  # same relative path, other manifest
    monkeypatch.chdir(a)
    _interrupted_run("s", tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["split"]["dir"] == str((a / "s").resolve())
    assert recorded["options"]["split"] == str((a / "s").resolve())
    monkeypatch.chdir(b)
    resumed = run_training(TrainConfig(), resume=tmp_path / "run")
    assert resumed["stopped"] == "completed"
    assert not (b / "s" / "cache").exists()  # B's split was never read


def test_resume_refuses_a_split_whose_manifest_changed(tree, tmp_path):
    split = tmp_path / "s"
    create_split(tree, "200X", out=split, seed=0)
    _interrupted_run(split, tmp_path / "run")
    old_hash = json.loads((split / "split.json").read_text())["manifest_hash"]
    create_split(tree, "200X", out=split, seed=7, force=True)
    new_hash = json.loads((split / "split.json").read_text())["manifest_hash"]
    with pytest.raises(UserInputError) as info:
        run_training(TrainConfig(), resume=tmp_path / "run")
    message = str(info.value)
    assert old_hash[:12] in message and new_hash[:12] in message and str(split.resolve()) in message


@pytest.mark.slow  # (0.6 s)
def test_old_relative_config_resumes_only_where_unambiguous(tree, tmp_path, monkeypatch):
    a, b = tmp_path / "A", tmp_path / "B"
    create_split(tree, "200X", out=a / "s", seed=0)
    create_split(tree, "200X", out=b / "s", seed=1)
    monkeypatch.chdir(a)
    _interrupted_run("s", tmp_path / "run")
    config_path = tmp_path / "run" / "config.json"
    config = json.loads(config_path.read_text())
    config["options"]["split"] = config["split"]["dir"] = "s"  # as written before issue 11
    config_path.write_text(json.dumps(config))
    monkeypatch.chdir(b)
    with pytest.raises(UserInputError, match="manifest hash"):
        run_training(TrainConfig(), resume=tmp_path / "run")
    monkeypatch.chdir(a)
    assert run_training(TrainConfig(), resume=tmp_path / "run")["stopped"] == "completed"


# --------------------------------------------------------------------------- item 4


def test_second_run_into_a_busy_run_dir_names_the_holder(split_dir, tmp_path):
    run_dir = tmp_path / "run"
    hold = Hold()
    results = []
    thread = threading.Thread(target=lambda: results.append(run_training(_config(split_dir, run_dir), [hold])))
    thread.start()
    try:
        assert hold.started.wait(60)
        with pytest.raises(UserInputError, match=f"pid {os.getpid()}"):
            run_training(_config(split_dir, run_dir, force=True, seed=1))
        with pytest.raises(UserInputError, match=f"pid {os.getpid()}"):
            run_training(TrainConfig(), resume=run_dir)
        result = _run(["train", "--split", str(split_dir), "--out", str(run_dir), "--force", "--image-size", str(SIZE)])
        assert result.exit_code == 2 and f"pid {os.getpid()}" in result.stderr, result.output
        assert result.stderr.count("\n") == 1
    finally:
        hold.release.set()
        thread.join(120)
    assert results and results[0]["stopped"] == "completed"
    rows = (run_dir / "history.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # header + the first run's evaluations only
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 0


@pytest.mark.slow  # a child process (0.5 s)
def test_lock_of_a_killed_process_does_not_block(split_dir, tmp_path):
    """flock is released by the kernel when its holder dies: a SIGKILLed run never blocks the next."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, str(os.getpid()).encode()); print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir / ".breastcnn.lock")], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"locked"
    with pytest.raises(UserInputError, match=f"pid {holder.pid}"):
        run_training(_config(split_dir, run_dir, force=True))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert run_training(_config(split_dir, run_dir, force=True, epochs=1))["stopped"] == "completed"


@pytest.mark.keras
def test_keras_finetune_into_a_busy_run_dir_is_refused(split_dir, tmp_path, keras):
    from breastcnn.training.keras_loop import finetune_keras

    run_dir = tmp_path / "run"
    hold = Hold()
    thread = threading.Thread(target=lambda: run_training(_config(split_dir, run_dir, epochs=1), [hold]))
    thread.start()
    try:
        assert hold.started.wait(60)
        with pytest.raises(UserInputError, match=f"pid {os.getpid()}"):
            finetune_keras("custom-keras", split_dir, run_dir, force=True, epochs=1, image_size=SIZE, batch_size=16)
    finally:
        hold.release.set()
        thread.join(120)
    assert not (run_dir / "model.keras").exists()


# --------------------------------------------------------------------------- item 9


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda c: {**c, "options": {**c["options"], "epochs": "12"}}, "epochs"),
        (lambda c: {**c, "options": {**c["options"], "split": None}}, "split"),
        (lambda c: {**c, "options": {**c["options"], "lr": [1]}}, "lr"),
    ],
)
def test_hand_edited_config_json_is_a_user_error(split_dir, tmp_path, change, needle):
    run_dir = tmp_path / "run"
    _interrupted_run(split_dir, run_dir)
    _edit_json(run_dir / "config.json", change)
    for args in (
        ["train", "--resume", str(run_dir)],
        ["train", "--config", str(run_dir / "config.json"), "--out", str(tmp_path / "replay")],
    ):
        result = _run(args)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and "config.json" in result.stderr and needle in result.stderr


def test_checkpoint_without_rng_state_is_a_user_error(split_dir, tmp_path):
    from breastcnn.models import load_checkpoint, save_model

    run_dir = tmp_path / "run"
    _interrupted_run(split_dir, run_dir)
    model, optimizer_state, extra = load_checkpoint(run_dir / "last.npz")
    state = json.loads(str(extra["train_state"]))
    del state["rngs"]
    extra["train_state"] = np.array(json.dumps(state))
    save_model(model, run_dir / "last.npz", optimizer=optimizer_state, extra=extra)
    result = _run(["train", "--resume", str(run_dir)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "last.npz" in result.stderr


def test_summary_json_that_is_not_an_object(split_dir, tmp_path):
    run_dir = tmp_path / "run"
    _interrupted_run(split_dir, run_dir)
    (run_dir / "summary.json").write_text("[]")
    result = _run(["train", "--resume", str(run_dir)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "summary.json" in result.stderr


# --------------------------------------------------------------------------- item 12


@pytest.mark.slow  # (0.8 s)
def test_failed_starts_leave_no_run_dir_and_latest_keeps_the_last_model(
    tree, split_dir, tmp_path, monkeypatch, make_breakhis_tree
):
    monkeypatch.chdir(tmp_path)
    first = run_training(_config(split_dir, epochs=1, evals_per_epoch=1))
    good = Path(first["run_dir"]).resolve()
    assert (tmp_path / "runs" / "latest").resolve() == good

    # bad input met after the run directory exists: an image of the split has disappeared
    broken_tree = make_breakhis_tree(tmp_path / "broken", traps=False)
    create_split(broken_tree, "200X", out=tmp_path / "broken_split")
    (broken_tree / load_split(tmp_path / "broken_split").subset("train")[0].path).unlink()
    with pytest.raises(UserInputError, match="missing"):
        run_training(_config(tmp_path / "broken_split"))

    # Ctrl-C while the image cache is being built
    class CtrlCDuringCache(TrainingCallback):
        def on_message(self, text):
            if "cache" in text:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(_config(split_dir, image_size=SIZE + 8), [CtrlCDuringCache()])

    # interrupted before its first evaluation: resumable (kept) but no model yet, so latest stays
    kept = run_training(_config(split_dir, epochs=1, evals_per_epoch=1), [InterruptAt(1)])
    assert kept["stopped"] == "interrupted" and not (Path(kept["run_dir"]) / "model.npz").exists()
    assert (tmp_path / "runs" / "latest").resolve() == good
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == sorted(["latest", good.name, Path(kept["run_dir"]).name]), names
    # once the resumed run writes its model, latest points at it
    run_training(TrainConfig(), resume=kept["run_dir"])
    assert (tmp_path / "runs" / "latest").resolve() == Path(kept["run_dir"]).resolve()


# --------------------------------------------------------------------------- item 13


def test_one_class_training_data_is_refused(tmp_path, make_breakhis_tree):
    data = make_breakhis_tree(tmp_path / "src", patients=(8, 0), traps=False)
    info = create_split(data, "200X", out=tmp_path / "s")
    assert any("only benign" in w for w in info["warnings"])
    result = _run(
        [
            "train",
            "--split",
            str(tmp_path / "s"),
            "--out",
            str(tmp_path / "run"),
            "--image-size",
            str(SIZE),
            "--epochs",
            "1",
        ]
    )
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "benign" in result.stderr and "malignant" in result.stderr


# --------------------------------------------------------------------------- item 14


def test_image_size_too_small_is_refused_before_any_cache_is_written(split_dir, tmp_path):
    result = _run(["train", "--split", str(split_dir), "--out", str(tmp_path / "run"), "--image-size", "10"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "--image-size" in result.stderr
    assert (
        not any("-10-" in p.name for p in (split_dir / "cache").glob("*")) if (split_dir / "cache").exists() else True
    )
    assert not (tmp_path / "run").exists()


def test_negative_seed_names_the_option(split_dir, tmp_path):
    result = _run(
        ["train", "--split", str(split_dir), "--out", str(tmp_path / "run"), "--seed", "-1", "--image-size", str(SIZE)]
    )
    assert result.exit_code == 2 and "--seed" in result.stderr and result.stderr.count("\n") == 1, result.output
    with pytest.raises(UserInputError, match="--seed"):
        TrainConfig(seed=-1).validate()


@pytest.mark.slow  # (0.5 s)
def test_resume_removes_our_stale_temporary_files(split_dir, tmp_path):
    run_dir = tmp_path / "run"
    _interrupted_run(split_dir, run_dir)
    ours = [run_dir / ".last.npz.k1l2m3.tmp", run_dir / ".model.npz.abc.tmp", run_dir / ".history.csv.x1.tmp"]
    for path in ours:
        path.write_bytes(b"half a checkpoint")
    foreign = run_dir / "notes.tmp"
    foreign.write_text("mine")
    assert run_training(TrainConfig(), resume=run_dir)["stopped"] == "completed"
    assert not any(p.exists() for p in ours)
    assert foreign.read_text() == "mine"


# --------------------------------------------------------------------------- item 10


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_history_row_on_a_full_disk_names_the_file(tmp_path):
    from breastcnn.runs import HistoryLogger

    logger = HistoryLogger(tmp_path / "history.csv")
    logger.path = Path("/dev/full")  # every write fails with ENOSPC, as on a full disk
    with pytest.raises(OSError) as info:
        logger.log({"step": 1})
    assert info.value.filename == "/dev/full"

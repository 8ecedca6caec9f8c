"""A closed stdout ends quietly (issue 16 item 3); ``--debug`` keeps the exit codes (item 7).

The pipe tests run the real CLI in a subprocess with a real pipe: either one
whose reader is gone before the command starts (every write fails), or one
read by ``head -1``-like code that closes it after the first line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

import breastcnn
from breastcnn.cli.app import EXIT_BROKEN_PIPE, app

REPO = Path(breastcnn.__file__).resolve().parent.parent
NOISE = ("Broken pipe", "Errno 32", "Traceback", "Exception ignored", "error")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A model (64 px), 300 small PNGs with long names, and a tiny split for evaluate."""
    from breastcnn.models import create_model, save_model

    root = tmp_path_factory.mktemp("pipes")
    save_model(create_model("custom", input_shape=(64, 64, 3), seed=0), root / "model.npz")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            images / f"a_rather_long_image_file_name_to_fill_the_pipe_{i:04d}.png"
        )
    runner = CliRunner()
    synth = ["synth", "--out", str(root), "--scale", "0.02", "--mags", "200", "--jobs", "1"]
    assert runner.invoke(app, synth).exit_code == 0
    assert (
        runner.invoke(
            app, ["split", "--mag", "200X", "--data", str(root), "--out", str(root / "split"), "--jobs", "1"]
        ).exit_code
        == 0
    )
    return root


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("BREASTCNN_DEBUG", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def _command(work: Path, name: str) -> list[str]:
    model = str(work / "model.npz")
    return {
        "predict --csv": ["predict", "--model", model, str(work / "images"), "--csv"],
        "predict --json": ["predict", "--model", model, str(work / "images"), "--json"],
        "predict table": ["predict", "--model", model, str(work / "images")],
        "evaluate --json": [
            "evaluate",
            "--model",
            model,
            "--split",
            str(work / "split"),
            "--json",
            "--out",
            str(work / f"eval-{os.getpid()}-{np.random.default_rng().integers(1e9)}"),
        ],
        "bench --markdown": [
            "bench",
            "--models",
            "custom",
            "--fresh",
            "--image-size",
            "64",
            "--batch-sizes",
            "1",
            "--repeats",
            "2",
            "--train-steps",
            "0",
            "--max-seconds",
            "0.2",
            "--markdown",
        ],
    }[name]


@pytest.mark.parametrize(
    "name", ["predict --csv", "predict --json", "predict table", "evaluate --json", "bench --markdown"]
)
@pytest.mark.slow  # a fresh interpreter per command (6-18 s each)
def test_stdout_closed_before_any_output_ends_quietly(work, name):
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the command's first write to stdout fails
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "breastcnn", *_command(work, name)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=work,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == EXIT_BROKEN_PIPE, proc.stderr
    assert not [word for word in NOISE if word in proc.stderr], proc.stderr


@pytest.mark.slow  # a fresh interpreter (10 s)
def test_predict_csv_into_head_1(work):
    """``breastcnn predict ... --csv | head -1``: head gets the header, the rest ends quietly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "breastcnn", *_command(work, "predict --csv")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        cwd=work,
    )
    first = proc.stdout.readline()
    proc.stdout.close()  # what head does after its first line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) in (0, EXIT_BROKEN_PIPE)
    assert first == b"path,label,probability\n"
    assert not [word for word in NOISE if word in stderr], stderr


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(monkeypatch, capsys):
    """Only a closed stdout is quiet: any other EPIPE (e.g. a dead worker's socket) is one error line."""
    from breastcnn.cli import app as app_module

    def broken():
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(app_module, "stdout_is_closed", lambda: False)
    with pytest.raises(typer.Exit) as exit_info:
        app_module.handle_errors(broken)()
    assert exit_info.value.exit_code == 2
    assert "error: [Errno 32] Broken pipe" in capsys.readouterr().err


@pytest.fixture
def no_debug_env(monkeypatch):
    """``--debug`` sets BREASTCNN_DEBUG in this process: undo it after the test."""
    monkeypatch.setenv("BREASTCNN_DEBUG", "0")


def test_debug_keeps_exit_code_2_for_bad_input_and_adds_the_traceback(no_debug_env, tmp_path):
    args = ["predict", "--model", str(tmp_path / "missing.npz"), str(tmp_path)]
    plain = CliRunner().invoke(app, args)
    debug = CliRunner().invoke(app, ["--debug", *args])
    assert plain.exit_code == 2 and debug.exit_code == 2, debug.output
    assert "Traceback" not in plain.output and "Traceback" in debug.output
    line = "error: --model " + str(tmp_path / "missing.npz") + ": no such file or directory"
    assert line in plain.output and line in debug.output


def test_debug_keeps_exit_code_1_for_a_bug(no_debug_env, monkeypatch, capsys):
    from breastcnn.cli import app as app_module

    def bug():
        raise ZeroDivisionError("a bug")

    for debug, traceback_shown in (("0", False), ("1", True)):
        monkeypatch.setenv("BREASTCNN_DEBUG", debug)
        with pytest.raises(typer.Exit) as exit_info:
            app_module.handle_errors(bug)()
        assert exit_info.value.exit_code == 1
        err = capsys.readouterr().err
        assert "internal error: ZeroDivisionError: a bug" in err
        assert ("Traceback" in err) is traceback_shown


@pytest.mark.slow  # a fresh interpreter (7 s)
def test_debug_exit_code_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "breastcnn", "--debug", "evaluate", "--model", str(tmp_path / "nope.npz")],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "nope.npz" in proc.stderr.strip().splitlines()[-1]

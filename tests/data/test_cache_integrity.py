"""Issue 11 for the image cache: a changed cache is rebuilt, never used; decode and write errors name the file.

Item 5: each cache array's checksum is in its metadata; a mismatch rebuilds with a warning.
Item 9: cache metadata that is JSON but not an object is rebuilt too; an image that trips Pillow's
decompression-bomb guard is a user error. Item 10: a truncated image met while building the cache,
and a write that runs out of space, name the file.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from breastcnn.cli.app import app
from breastcnn.data.images import cache_paths, load_subset
from breastcnn.data.split import create_split, load_split
from breastcnn.errors import UserInputError

REPO = Path(__file__).resolve().parents[2]


def _run(args):
    return CliRunner().invoke(app, args, env={"BREASTCNN_NO_PROGRESS": "1"})


@pytest.fixture
def split(tmp_path, make_breakhis_tree):
    data = make_breakhis_tree(tmp_path / "src", traps=False)
    create_split(data, "200X", out=tmp_path / "s")
    return load_split(tmp_path / "s")


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A 60-byte PNG whose header claims side x side pixels (Pillow refuses it at open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


# --------------------------------------------------------------------------- item 5


def test_cache_changed_in_place_is_rebuilt_with_a_warning(split):
    x, y = load_subset(split, "train", 16)
    assert x.any()
    x_path, _, meta_path = cache_paths(split, "train", 16)
    assert "checksums" in json.loads(meta_path.read_text())
    size = x_path.stat().st_size
    with open(x_path, "r+b") as handle:  # zero the image bytes, keep the .npy header and the size
        handle.seek(size - x.nbytes)
        handle.write(bytes(x.nbytes))
    assert x_path.stat().st_size == size
    with pytest.warns(UserWarning, match=f"{x_path.name}.*checksum.*rebuil"):
        x2, y2 = load_subset(split, "train", 16)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    x3, _ = load_subset(split, "train", 16)  # the rebuilt cache is consistent again
    np.testing.assert_array_equal(x3, x)


@pytest.mark.parametrize("meta", ["[]", '"text"', "17", "{not json"])
def test_cache_metadata_that_is_not_an_object_is_rebuilt(split, meta):
    x, _ = load_subset(split, "val", 16)
    meta_path = cache_paths(split, "val", 16)[2]
    meta_path.write_text(meta)
    with pytest.warns(UserWarning, match=meta_path.name):
        x2, _ = load_subset(split, "val", 16)
    np.testing.assert_array_equal(x2, x)
    assert isinstance(json.loads(meta_path.read_text()), dict)


# --------------------------------------------------------------------------- items 9, 10: decoding


def test_truncated_image_in_the_cache_build_names_the_file(split):
    victim = Path(split.root) / split.subset("train")[2].path
    victim.write_bytes(victim.read_bytes()[:80])
    for jobs in (1, 2):
        with pytest.raises(UserInputError, match=str(victim)):
            load_subset(split, "train", 16, jobs=jobs)


def test_decompression_bomb_in_the_cache_build_is_a_user_error(split, tmp_path):
    victim = bomb_png(Path(split.root) / split.subset("train")[1].path)
    result = _run(
        ["train", "--split", str(split.dir), "--out", str(tmp_path / "run"), "--image-size", "64", "--jobs", "1"]
    )
    assert result.exit_code == 2, result.output
    assert str(victim) in result.stderr and "internal error" not in result.stderr


def test_decompression_bomb_as_featuremaps_image(tmp_path):
    from breastcnn.models import create_model, save_model

    model = tmp_path / "m.npz"
    save_model(create_model("custom", input_shape=(64, 64, 3)), model)
    image = bomb_png(tmp_path / "bomb.png")
    result = _run(["featuremaps", "--model", str(model), str(image), "--out", str(tmp_path / "maps")])
    assert result.exit_code == 2 and result.stderr.count("\n") <= 2, result.output
    assert "bomb.png" in result.stderr and "internal error" not in result.stderr


# --------------------------------------------------------------------------- item 10: full disk


@pytest.mark.slow  # (1.2 s)
def test_write_that_runs_out_of_space_names_the_file(split, tmp_path):
    """A real short write (RLIMIT_FSIZE, as a full disk gives): the message names the file being written."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from breastcnn.cli.app import main\n"
        "sys.argv = ['breastcnn'] + sys.argv[1:]\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "BREASTCNN_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "train",
            "--split",
            str(split.dir),
            "--out",
            str(tmp_path / "run"),
            "--image-size",
            "96",
            "--jobs",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(error) == 1, proc.stderr
    x_path = cache_paths(split, "train", 96)[0]
    assert str(x_path) in error[0], error[0]
    assert not list(x_path.parent.glob(".*.tmp"))  # the partial file was removed

"""The code base passes ``ruff check`` and ``ruff format --check`` (pyproject's [tool.ruff]: pycodestyle, pyflakes, isort, bugbear,
pyupgrade and mccabe complexity <= 12).

Skipped only where ruff is not installed and the environment variable ``CI``
is unset: in CI (``CI=true``) a missing ruff fails like a finding.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("breastcnn", "tests", "benchmarks")


def ruff_command() -> list[str] | None:
    """How to run ruff: the binary next to this Python (a virtualenv's), one on PATH, or ``python -m ruff``."""
    beside = Path(sys.executable).with_name("ruff")
    if beside.is_file():
        return [str(beside)]
    on_path = shutil.which("ruff")
    if on_path:
        return [on_path]
    probe = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True, text=True)
    return [sys.executable, "-m", "ruff"] if probe.returncode == 0 else None


def test_ruff_check_is_clean():
    command = ruff_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("ruff is not installed but CI is set: pip install -e '.[test]'")
        pytest.skip("ruff is not installed (pip install -e '.[test]'); CI runs this check")
    result = subprocess.run(
        [*command, "check", "--no-cache", "--output-format", "concise", *TARGETS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"ruff check found problems:\n{result.stdout}{result.stderr}"


def test_ruff_format_leaves_the_code_as_it_is():
    command = ruff_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("ruff is not installed but CI is set: pip install -e '.[test]'")
        pytest.skip("ruff is not installed (pip install -e '.[test]'); CI runs this check")
    result = subprocess.run(
        [*command, "format", "--check", "--no-cache", *TARGETS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"run `ruff format .`:\n{result.stdout}{result.stderr}"

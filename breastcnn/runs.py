"""Run directories: where a training run writes, and how later commands find it.

A run directory (default ``./runs/<arch>-<YYYYmmdd-HHMMSS>/``) holds
``config.json``, ``history.csv``, the best model (``model.npz`` or
``model.keras``), the resumable checkpoint ``last.npz`` and ``training.png``.
``./runs/latest`` is a relative symlink to the newest default run that has
written a model (a text file ``runs/LATEST`` holding the directory name where
symlinks are impossible), so ``evaluate`` and ``predict`` find the latest model
without ``--model``. A run holds its directory's lock (:func:`run_directory`)
while it writes there.

Shared by the NumPy training loop (:mod:`breastcnn.training.loop`) and the Keras
fine-tuning; both write the same :data:`HISTORY_COLUMNS`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from breastcnn import __version__
from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write_json, atomic_write_text, check_overwrite, locked_directory

HISTORY_COLUMNS = [
    "step",
    "epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "val_f1",
    "val_recall",
    "lr",
    "elapsed_s",
    "data_loss",
    "l2_penalty",
    "val_balanced_accuracy",
    "val_auc",
]
"""Columns of ``history.csv``: one row per validation evaluation.

Training columns are running means over the training batches since the
previous evaluation (training mode, augmented images):

- ``loss``: what the optimizer minimises: the class-weighted cross-entropy
  **plus** ``l2_penalty`` (Keras reports its ``loss`` the same way);
- ``data_loss``: the unweighted mean cross-entropy, no L2: the same
  definition as ``val_loss``, so the two compare like with like
  (``loss = data_loss + l2_penalty`` when ``--class-weights none``);
- ``l2_penalty``: ``l2 * sum(W**2)`` over the regularised kernels;
- ``accuracy``.

``val_*`` are scored on the validation subset (never test), in inference mode:
``val_loss`` (unweighted mean cross-entropy), ``val_accuracy``, malignant
``val_f1`` and ``val_recall``, ``val_balanced_accuracy`` (mean of the two class
recalls) and ``val_auc`` (ROC AUC). ``lr`` is the learning rate used since the
previous evaluation; ``elapsed_s`` is wall-clock seconds of training since the
run started (a resumed run continues from the checkpointed value; the pause
is not counted). The last four columns were added after the first ten; a
history written before keeps its ten columns when its run is resumed."""

RUNS_ROOT = Path("runs")
LATEST_LINK = "latest"
LATEST_FILE = "LATEST"
MODEL_FILES = ("model.npz", "model.keras")
"""Model file names looked up in a run directory, in this order."""


# --------------------------------------------------------------------------- run dirs


RUN_FILES = (
    "config.json",
    "history.csv",
    "model.npz",
    "model.keras",
    "model.keras.json",
    "breastcnn.json",
    "last.npz",
    "training.png",
    "summary.json",
    "metrics.json",
    "predictions.csv",
    "roc.png",
    "confusion.png",
)
"""Files the tool writes into a run directory (their stale ``.tmp`` files are removed on resume)."""

START_FILES = ("config.json",)
"""What a run writes before its data are loaded: a run that fails holding only these is removed."""


class RunDir:
    """A run directory held by this process (see :func:`run_directory`).

    ``path``: the directory; ``created``: made by this call; ``latest_root``: the
    runs root whose ``latest`` link should point here once a model exists (None for
    an explicit ``--out``).
    """

    def __init__(self, path: Path, created: bool, latest_root: Path | None):
        self.path = path
        self.created = created
        self.latest_root = latest_root
        self._pointed = False

    def model_written(self) -> None:
        """Call after a model file was written here: moves ``latest`` (once) for default runs."""
        if self.latest_root is not None and not self._pointed:
            point_latest(self.path, self.latest_root)
            self._pointed = True


@contextlib.contextmanager
def run_directory(
    arch: str,
    out: str | os.PathLike | None = None,
    force: bool = False,
    runs_root: str | os.PathLike = RUNS_ROOT,
    resume: str | os.PathLike | None = None,
    latest_root: str | os.PathLike | None = None,
) -> Iterator[RunDir]:
    """Create (or, with ``resume``, reopen) a run directory and hold its lock while the block runs.

    ``out=None``: a fresh ``<runs_root>/<arch>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``...
    when two runs start in the same second), whose ``<runs_root>/latest`` moves
    there when :meth:`RunDir.model_written` is called, not before. An explicit
    ``out`` that exists and is not empty is refused unless ``force`` (``latest``
    is then left alone). A directory in use by another process is refused naming
    its pid. If the block fails and this call created the directory, it is removed
    again when it holds nothing but :data:`START_FILES`.
    """
    if resume is not None:
        path = Path(resume)
        if not path.is_dir():
            raise UserInputError(f"--resume {path}: no such run directory")
        latest = Path(latest_root) if latest_root is not None else None
    elif out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise UserInputError(f"--out {path} exists and is not a directory")
        latest = None
    else:
        root = Path(runs_root)
        root.mkdir(parents=True, exist_ok=True)
        base = f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, counter = root / base, 2
        while True:
            try:
                path.mkdir()
                break
            except FileExistsError:
                path, counter = root / f"{base}-{counter}", counter + 1
        latest = root
    made = True if out is None and resume is None else None
    with locked_directory(path, "run directory", removable=START_FILES, created=made) as created:
        if out is not None and resume is None and not created:
            check_overwrite(path, force, option="--force")
        yield RunDir(path, created, latest)


def point_latest(run_dir: str | os.PathLike, runs_root: str | os.PathLike = RUNS_ROOT) -> None:
    """Point ``<runs_root>/latest`` (relative symlink) at ``run_dir``, replacing it atomically.

    Falls back to writing the directory name into ``<runs_root>/LATEST`` where
    the filesystem refuses symlinks.
    """
    root = Path(runs_root)
    target = os.path.relpath(Path(run_dir).resolve(), root.resolve())
    link = root / LATEST_LINK
    tmp = root / f".{LATEST_LINK}.{os.getpid()}.tmp"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp, target_is_directory=True)
        os.replace(tmp, link)
        # A stale LATEST file from a symlink-less past would shadow nothing, but remove it.
        stale = root / LATEST_FILE
        if stale.is_file():
            stale.unlink()
    except (OSError, NotImplementedError):
        if tmp.is_symlink():
            tmp.unlink()
        atomic_write_text(root / LATEST_FILE, target + "\n")


def latest_run_dir(runs_root: str | os.PathLike = RUNS_ROOT) -> Path | None:
    """The run ``latest`` points to, or ``None`` when there is none."""
    root = Path(runs_root)
    link = root / LATEST_LINK
    if link.is_dir():
        return link
    marker = root / LATEST_FILE
    if marker.is_file():
        candidate = root / marker.read_text(encoding="utf-8").strip()
        if candidate.is_dir():
            return candidate
    return None


def model_in_dir(run_dir: Path) -> Path | None:
    """The model file of a run directory (``model.npz`` before ``model.keras``), if any."""
    for name in MODEL_FILES:
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def fold_run_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """``fold1``, ``fold2``, ... sub-directories of a k-fold run, in fold order (empty otherwise)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    folds = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("fold") and p.name[4:].isdigit()]
    return sorted(folds, key=lambda p: int(p.name[4:]))


def resolve_model_path(model: str | os.PathLike | None, runs_root: str | os.PathLike = RUNS_ROOT) -> Path:
    """Turn ``--model`` into a model file.

    ``None`` -> the model of ``runs/latest``; a run directory -> its
    ``model.npz``/``model.keras``; a file -> itself. Raises
    :class:`UserInputError` naming what was looked for when nothing is found.
    """
    if model is None:
        run_dir = latest_run_dir(runs_root)
        if run_dir is None:
            raise UserInputError(
                f"no trained model found: {Path(runs_root) / LATEST_LINK} does not exist; "
                "run `breastcnn train` first or pass --model PATH"
            )
        found = model_in_dir(run_dir)
        if found is None:
            raise UserInputError(
                f"no model file ({' or '.join(MODEL_FILES)}) in the latest run {run_dir}; "
                "run `breastcnn train` first or pass --model PATH"
            )
        return found
    path = Path(model)
    if path.is_dir():
        found = model_in_dir(path)
        if found is None:
            hint = " (a k-fold run: use its fold directories)" if fold_run_dirs(path) else ""
            raise UserInputError(
                f"--model {path}: no {' or '.join(MODEL_FILES)} in this directory{hint}; run `breastcnn train` first"
            )
        return found
    if not path.is_file():
        if path.exists():
            raise UserInputError(
                f"--model {path}: not a regular file (a device, pipe or socket); "
                "pass a model file (.npz/.keras) or a run directory"
            )
        raise UserInputError(f"--model {path}: no such file or directory; run `breastcnn train` first")
    return path


# --------------------------------------------------------------------------- history.csv


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if value != value or value in (float("inf"), float("-inf")) else f"{value:.6g}"
    if hasattr(value, "item"):  # NumPy scalar
        return _format_cell(value.item())
    return str(value)


class HistoryLogger:
    """Append one CSV row per evaluation to ``history.csv``.

    The header is written once (when the file is new or empty); each row is
    flushed and fsynced as it is written, so an interrupted run keeps every
    evaluation logged so far. ``truncate(n)`` rewrites the file with its first
    ``n`` rows, which a resume uses to drop rows logged after the checkpoint.
    """

    def __init__(self, path: str | os.PathLike, columns: Iterable[str] = HISTORY_COLUMNS):
        self.path = Path(path)
        self.columns = list(columns)
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, newline="", encoding="utf-8") as handle:
                header = next(csv.reader(handle), [])
            if header != self.columns and header == self.columns[: len(header)]:
                self.columns = header  # an older run's history (fewer columns) goes on with its own header
            elif header != self.columns:
                raise UserInputError(f"{self.path}: unexpected history columns {header}, expected {self.columns}")
        else:
            atomic_write_text(self.path, ",".join(self.columns) + "\n")

    def log(self, row: dict) -> None:
        """Append ``row`` (missing columns empty, unknown keys ignored)."""
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([_format_cell(row.get(c)) for c in self.columns])
        try:
            with open(self.path, "a", encoding="utf-8", newline="") as handle:
                handle.write(buffer.getvalue())
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # a full disk: name the file
            exc.filename = exc.filename or str(self.path)
            raise

    def rows(self) -> list[dict]:
        """The rows logged so far, as dicts of strings."""
        return read_history(self.path)

    def truncate(self, n_rows: int) -> None:
        """Keep only the first ``n_rows`` rows (atomically)."""
        rows = self.rows()[:n_rows]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())


def read_history(path: str | os.PathLike) -> list[dict]:
    """Read ``history.csv`` into a list of dicts (string values)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- environment / config


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info() -> dict:
    """Versions, platform, CPU and thread pools (for ``config.json`` and benchmarks)."""
    import numpy as np

    info: dict[str, Any] = {
        "breastcnn": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["cpu_affinity"] = None
    if "tensorflow" in sys.modules:  # report TF only when this process uses it
        info["tensorflow"] = getattr(sys.modules["tensorflow"], "__version__", None)
    if "keras" in sys.modules:
        info["keras"] = getattr(sys.modules["keras"], "__version__", None)
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [
            {k: pool.get(k) for k in ("user_api", "internal_api", "num_threads", "version")}
            for pool in threadpool_info()
        ]
    except Exception:  # threadpoolctl is best-effort diagnostics
        info["threadpools"] = []
    return info


def write_run_config(run_dir: str | os.PathLike, options: dict, split=None) -> Path:
    """Write ``run_dir/config.json``: every option, seed, versions, split hash, CPU/threads.

    ``options`` must be JSON-serialisable (paths as strings); ``split`` is a
    ``breastcnn.data`` ``Split`` (its ``hash`` and absolute ``dir`` are recorded;
    ``--resume`` checks them), or any object with ``dir`` and ``hash`` (a k-fold
    split's identity), or ``None``.
    """
    payload = {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": list(sys.argv),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "seed": options.get("seed"),
        "split": None,
        "environment": environment_info(),
    }
    if split is not None:
        payload["split"] = {
            "dir": str(Path(getattr(split, "dir", "")).resolve()),
            "hash": getattr(split, "hash", None),
        }
    path = Path(run_dir) / "config.json"
    atomic_write_json(path, payload)
    return path


def read_run_config(path: str | os.PathLike) -> dict:
    """Read a ``config.json`` (a run directory or the file itself); clear error when missing."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserInputError(f"{path}: no such config file (expected RUN_DIR/config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path}: not a valid config.json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("options"), dict):
        raise UserInputError(f"{path}: not a breastcnn config.json (no 'options' object)")
    return data

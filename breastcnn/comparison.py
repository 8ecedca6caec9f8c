"""``breastcnn compare`` as a library: every model on every patient-wise fold, with statistics and cost.

Layout of ``--out`` (every path below is recorded in ``compare-files.json``
before it is written; ``--force`` removes only recorded paths, and a path of
this layout that exists without being recorded is refused, ``--force`` or not)::

    kfold/                  the k-fold split, when made from --data (``split --folds`` protocol)
    splits/foldK/           fold K with validation carved from its training patients (same for all models)
    features/               frozen-backbone feature caches (linear probe, --trainable-layers 0)
    cells/foldK/MODEL/      one cell: run/ (the training run directory) and cell.json
    cost/MODEL.json         parameters, file size, batch-1 latency (the bench harness, on fold 1's model)
    compare.json compare.md pareto.png folds.png

The same validation subset for every model: a 70/30 fold has no validation
subset, so ``splits/foldK`` gives 12.5% of the training patients (per class) to
validation (:func:`breastcnn.training.data.carve_validation`, the rule ``train`` applies
to such a split); test is untouched. Every model then trains with its default
schedule (NumPy ``custom``/``custom-k4``: ``train``'s default recipe;
``vgg16``/``resnet50``: ``finetune``'s transfer-learning schedule;
``custom-keras``: ``finetune``'s default recipe), on the same image cache and
augmentation, and is scored on the fold's test subset by the same code.

Cells: ``cell.json`` is written atomically when the cell has finished,
holding the test predictions and the options it was made with (``key``). A
rerun skips a cell whose ``key`` matches (its numbers are read back, so they
are identical); a cell with another ``key`` is refused unless ``--force``. An
interrupted NumPy cell continues from its ``last.npz`` (exact resume); other
interrupted cells start again. Ctrl-C: the cell in progress stops at its next
step, nothing half-written is left as finished, and the command ends with 130.

Statistics are :func:`breastcnn.stats.comparison_statistics` (see there: the
patient bootstrap, and why ``p_value`` is the paired patient bootstrap, not
McNemar).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from breastcnn import __version__, runs
from breastcnn.bench import BenchOptions, bench_model
from breastcnn.cluster import LocalExecutor, connect, scheduler_address
from breastcnn.data.breakhis import check_outside_data, locate_data
from breastcnn.data.images import DEFAULT_JOBS
from breastcnn.data.split import create_split, fold_dirs, load_split, manifest_text, recorded_split_files
from breastcnn.data.stain_options import DEFAULT_STAIN_NORM, check_stain_options
from breastcnn.data.tasks import DEFAULT_TASK, SUBTYPE_CLASSES, check_task
from breastcnn.errors import UserInputError
from breastcnn.evaluation import evaluate_model
from breastcnn.fsutil import (
    LOCK_NAME,
    atomic_write_json,
    atomic_write_text,
    is_our_file,
    locked_directory,
    remove_recorded,
)
from breastcnn.metrics import degenerate_model_warnings
from breastcnn.models import load_model
from breastcnn.plots import plot_folds, plot_pareto
from breastcnn.stats import FoldPredictions, StatsOptions, comparison_statistics, markdown_report, mcnemar_exact
from breastcnn.training.common import CHECKPOINT_NAME
from breastcnn.training.config import TrainConfig
from breastcnn.training.data import carve_validation
from breastcnn.training.feature_cache import PROBE_ARCHS, ProbeSettings, head_probabilities, run_linear_probe
from breastcnn.training.keras_loop import finetune_keras
from breastcnn.training.numpy_run import run_training

NUMPY_MODELS = ("custom", "custom-k4")
KERAS_MODELS = ("vgg16", "resnet50", "custom-keras")
COMPARE_MODELS = NUMPY_MODELS + KERAS_MODELS
DEFAULT_MODELS = ("custom", "vgg16", "resnet50")
OWNED_FILE = "compare-files.json"
CELL_FILE = "cell.json"
OUTPUTS = ("compare.json", "compare.md", "pareto.png", "folds.png")
CELL_FORMAT = 1
THRESHOLD = 0.5
SUBTYPE_METRICS = ("subtype_accuracy", "balanced_accuracy", "macro_f1")
"""Per-fold extras of a ``--task subtype`` comparison (scikit-learn, on the 8-class prediction)."""
LEGACY_KEY = {"task": DEFAULT_TASK, "stain_norm": DEFAULT_STAIN_NORM, "stain_target": None, "stain_augment": None}
"""Key entries of cells written before compare had task/stain options: those cells ran with these values."""


@dataclass
class CompareOptions:
    """Every option of ``breastcnn compare`` (same names, underscores for dashes).

    ``epochs``/``weights`` ``None``: each model's default (NumPy 5 epochs, vgg16/resnet50 200 epochs with
    early stopping and ImageNet weights, custom-keras 5 epochs and no weights). ``trainable_layers`` applies
    to vgg16/resnet50; 0 is the linear probe on cached features.

    ``task``/``stain_norm``/``stain_target``/``stain_augment``: as ``breastcnn train``
    (:mod:`breastcnn.data.tasks`, :mod:`breastcnn.data.stain_options`), for every cell; ``stain_augment``
    None: each model's default (NumPy models and custom-keras: the default recipe's, on; vgg16/resnet50: off).
    The linear probe (``trainable_layers`` 0) supports neither stain normalisation nor the subtype task.
    """

    data: str | None = None
    split: str | None = None
    mag: str = "200X"
    models: tuple[str, ...] = DEFAULT_MODELS
    folds: int | None = None
    epochs: int | None = None
    image_size: int = 224
    trainable_layers: int = 20
    weights: str | None = None
    seed: int = 0
    out: str = "compare"
    force: bool = False
    n_resamples: int = 10_000
    jobs: int = DEFAULT_JOBS
    scheduler: str | None = None
    task: str = DEFAULT_TASK
    stain_norm: str = DEFAULT_STAIN_NORM
    stain_target: str | None = None
    stain_augment: bool | None = None

    DEFAULT_FOLDS = 5

    def validate(self) -> CompareOptions:
        """Raise :class:`UserInputError` naming the option for a bad value; returns self."""
        if (self.data is None) == (self.split is None):
            raise UserInputError("pass exactly one of --data DIR (make a k-fold split) or --split KFOLD_SPLIT_DIR")
        models = tuple(self.models)
        unknown = [m for m in models if m not in COMPARE_MODELS]
        if unknown or not models:
            raise UserInputError(
                f"--models: unknown model {unknown[0] if unknown else '(none)'!r}; "
                f"expected a comma-separated list of {', '.join(COMPARE_MODELS)}"
            )
        if len(set(models)) != len(models):
            raise UserInputError(f"--models lists a model twice: {','.join(models)}")
        if len(models) < 2:
            raise UserInputError(f"--models needs at least two models to compare, got {','.join(models)}")
        checks = [
            (self.folds is None or 2 <= self.folds <= 100, "--folds", self.folds, "must be between 2 and 100"),
            (self.epochs is None or self.epochs >= 1, "--epochs", self.epochs, "must be >= 1"),
            (32 <= self.image_size <= 2048, "--image-size", self.image_size, "must be between 32 and 2048"),
            (self.trainable_layers >= 0, "--trainable-layers", self.trainable_layers, "must be >= 0"),
            (self.seed >= 0, "--seed", self.seed, "must be >= 0"),
            (self.n_resamples >= 100, "--resamples", self.n_resamples, "must be >= 100"),
            (self.jobs >= 1 or self.jobs == -1, "--jobs", self.jobs, "must be >= 1 (or -1 for all cores)"),
        ]
        for ok, option, value, why in checks:
            if not ok:
                raise UserInputError(f"{option} {why}, got {value!r}")
        if "custom-keras" in models and self.image_size < 51:
            raise UserInputError(f"--image-size must be at least 51 for custom-keras, got {self.image_size}")
        if (
            self.weights is not None
            and self.weights.lower() not in ("imagenet", "none")
            and not Path(self.weights).is_file()
        ):
            raise UserInputError(f"--weights {self.weights}: no such file (expected imagenet, none or a weights file)")
        check_task(self.task)
        check_stain_options(self.stain_norm, self.stain_target, bool(self.stain_augment))
        probes = [m for m in models if m in PROBE_ARCHS] if self.trainable_layers == 0 else []
        if probes and (self.stain_norm != DEFAULT_STAIN_NORM or self.task != DEFAULT_TASK):
            given = f"--stain-norm {self.stain_norm}" if self.stain_norm != DEFAULT_STAIN_NORM else "--task subtype"
            raise UserInputError(
                f"{given}: not supported by the linear probe of {', '.join(probes)} (--trainable-layers 0, cached "
                "features of the raw binary task); use --trainable-layers 1 or more, or leave those models out"
            )
        if self.stain_target is not None:
            self.stain_target = str(Path(self.stain_target).resolve())
        self.models = models
        return self

    def weights_for(self, model: str) -> str | None:
        """``--weights`` as the model takes it (custom-keras has no ImageNet weights: ``none`` there)."""
        if model in NUMPY_MODELS:
            return None
        if model == "custom-keras":
            return "none" if self.weights in (None, "imagenet") else self.weights
        return self.weights or "imagenet"


# --------------------------------------------------------------------------- what compare owns in --out


class Ownership:
    """The paths (relative to ``out``) this command created, recorded in ``compare-files.json``."""

    def __init__(self, out: Path):
        self.out = out
        self.file = out / OWNED_FILE
        self.paths: set[str] = set()
        if self.file.is_file():
            try:
                recorded = json.loads(self.file.read_text(encoding="utf-8"))
                self.paths = set(recorded["paths"])
            except (ValueError, KeyError, TypeError):
                raise UserInputError(
                    f"{self.file}: not a compare-files.json written by breastcnn compare; "
                    "move it away or choose another --out"
                ) from None

    def claim(self, relative: str) -> Path:
        """Record ``relative`` as ours before creating it (its folder is made); refuse when something we did
        not write is there."""
        path = self.out / relative
        if relative not in self.paths:
            if path.exists() or path.is_symlink():
                raise UserInputError(
                    f"{path} exists and was not written by 'breastcnn compare' (not recorded in "
                    f"{self.file}); move it away or choose another --out"
                )
            self.paths.add(relative)
            self._save()
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def remove(self, keep: Sequence[str] = ()) -> list[Path]:
        """``--force``: delete what compare recorded except ``keep`` (caches); return the folders kept.

        A recorded file goes; in a recorded folder only the files breastcnn wrote there go
        (:func:`_written_in`), then the folders left empty. A folder that still holds someone
        else's files stays (and stays recorded).
        """
        owned: set[str] = set()
        folders: list[str] = []
        for relative in self.paths - set(keep):
            path = self.out / relative
            if path.is_dir() and not path.is_symlink():
                owned.update(f"{relative}/{name}" for name in _written_in(path))
                folders.append(relative)
            else:
                owned.add(relative)
                folders.append(Path(relative).parent.as_posix())  # made by claim() even if never written
        kept = remove_recorded(self.out, owned, folders=[f for f in folders if f != "."])
        self.paths = {r for r in self.paths if r in keep or (self.out / r).exists() or (self.out / r).is_symlink()}
        self._save()
        return kept

    def _save(self) -> None:
        atomic_write_json(self.file, {"created_by": f"breastcnn {__version__}", "paths": sorted(self.paths)})


def _written_in(folder: Path) -> set[str]:
    """The files (POSIX paths relative to ``folder``) that breastcnn wrote in a folder compare created:
    a split's, as its ``split.json`` records them (with its image caches), or a cell's ``cell.json`` and
    run files (and their temporary files); nothing else is ours."""
    if (folder / "split.json").is_file():
        return recorded_split_files(folder)[0]
    names = (CELL_FILE, LOCK_NAME, *runs.RUN_FILES)
    return {
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if (path.is_file() or path.is_symlink()) and is_our_file(path.name, names)
    }


# --------------------------------------------------------------------------- the split


def _kfold_dir(options: CompareOptions, owned: Ownership, message: Callable[[str], None]) -> Path:
    """The k-fold split: ``--split`` as given, or ``out/kfold`` made (or reused) from ``--data``."""
    if options.split is not None:
        split_dir = Path(options.split)
        folds = fold_dirs(split_dir)
        if not folds:
            raise UserInputError(
                f"--split {split_dir}: not a k-fold split (no fold1/manifest.csv); make one with "
                "'breastcnn split --folds 5' or pass --data"
            )
        if options.folds is not None and options.folds != len(folds):
            raise UserInputError(f"--folds {options.folds}: --split {split_dir} has {len(folds)} folds")
        return split_dir.resolve()
    folds = options.folds or CompareOptions.DEFAULT_FOLDS
    split_dir = Path(options.out) / "kfold"
    info_path = split_dir / "split.json"
    if "kfold" in owned.paths and info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("folds") == folds and info.get("seed") == options.seed and info.get("magnification") == options.mag:
            return split_dir.resolve()
        raise UserInputError(
            f"{split_dir} holds a {info.get('folds')}-fold split of {info.get('magnification')} "
            f"(seed {info.get('seed')}); pass --force to replace it, or another --out"
        )
    owned.claim("kfold")
    message(f"making a {folds}-fold patient-wise split of {options.data} ({options.mag}) -> {split_dir}")
    create_split(
        options.data, mag=options.mag, out=split_dir, folds=folds, seed=options.seed, force=True, jobs=options.jobs
    )
    return split_dir.resolve()


def _carved_folds(kfold: Path, owned: Ownership, seed: int) -> list[Path]:
    """``out/splits/foldK``: each fold with validation carved from its training patients (written when changed)."""
    carved_dirs = []
    for k, fold_dir in enumerate(fold_dirs(kfold), start=1):
        fold = load_split(fold_dir)
        carved = carve_validation(fold, seed=seed) if not fold.subset("val") else fold
        text = manifest_text(carved.rows)
        target = owned.claim(f"splits/fold{k}")
        manifest = target / "manifest.csv"
        if not manifest.is_file() or manifest.read_text(encoding="utf-8") != text:
            target.mkdir(parents=True, exist_ok=True)
            atomic_write_text(manifest, text)
            info = {
                **fold.info,
                "data_root": str(fold.root),
                "kind": "fold",
                "fold": k,
                "source": str(fold_dir),
                "validation": carved.info.get("validation", "from the split"),
            }
            info.pop("files", None)
            atomic_write_json(target / "split.json", info)
        carved_dirs.append(target.resolve())
    return carved_dirs


# --------------------------------------------------------------------------- one cell


@dataclass(frozen=True)
class CellSpec:
    """Everything one fold x model cell needs (picklable: it travels to a Dask worker)."""

    model: str
    fold: int
    split_dir: str
    cell_dir: str
    epochs: int | None
    image_size: int
    trainable_layers: int
    weights: str | None
    seed: int
    jobs: int
    feature_dir: str
    feature_images: tuple[str, ...] = ()
    split_hash: str = ""
    task: str = DEFAULT_TASK
    stain_norm: str = DEFAULT_STAIN_NORM
    stain_target: str | None = None
    stain_target_sha256: str | None = None
    stain_augment: bool | None = None

    @property
    def mode(self) -> str:
        """``numpy``, ``probe`` (frozen backbone, cached features) or ``keras`` (fine-tuning)."""
        if self.model in NUMPY_MODELS:
            return "numpy"
        return "probe" if self.trainable_layers == 0 and self.model in PROBE_ARCHS else "keras"

    def key(self) -> dict:
        """What the cell's numbers depend on; a finished cell is reused only when this matches."""
        return {
            "format": CELL_FORMAT,
            "model": self.model,
            "fold": self.fold,
            "split_hash": self.split_hash,
            "epochs": self.epochs,
            "image_size": self.image_size,
            "mode": self.mode,
            "trainable_layers": self.trainable_layers if self.mode != "numpy" else None,
            "weights": self.weights,
            "seed": self.seed,
            "task": self.task,
            "stain_norm": self.stain_norm,
            "stain_target": self.stain_target_sha256,
            "stain_augment": self.stain_augment,
        }

    def stain_and_task(self) -> dict:
        """``task``, ``stain_norm``, ``stain_target``, ``stain_augment`` as ``TrainConfig``/``finetune_keras`` take them."""
        return {
            "task": self.task,
            "stain_norm": self.stain_norm,
            "stain_target": self.stain_target,
            "stain_augment": self.stain_augment,
        }


def read_cell(cell_dir: Path) -> dict | None:
    """A finished cell's ``cell.json`` (None when the cell has not finished)."""
    path = Path(cell_dir) / CELL_FILE
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc}); pass --force to recompute the comparison") from None
    if not isinstance(cell, dict) or "key" not in cell or "predictions" not in cell:
        raise UserInputError(f"{path}: not a compare cell; pass --force to recompute the comparison")
    return cell


def run_cell(spec: CellSpec) -> dict:
    """Train and test one cell (runs here or on a Dask worker); writes ``cell.json`` atomically and returns it."""
    start = time.perf_counter()
    cell_dir = Path(spec.cell_dir)
    run_dir = cell_dir / "run"
    cell_dir.mkdir(parents=True, exist_ok=True)
    runner = {"numpy": _numpy_cell, "probe": _probe_cell, "keras": _keras_cell}[spec.mode]
    result = runner(spec, run_dir)
    cell = {
        "key": spec.key(),
        "model": spec.model,
        "fold": spec.fold,
        "mode": spec.mode,
        "model_path": str(Path(result.pop("model_path")).relative_to(cell_dir)),
        "cell_seconds": round(time.perf_counter() - start, 3),
        **result,
    }
    atomic_write_json(cell_dir / CELL_FILE, cell)
    return cell


def _test_predictions(model, split_dir: str, jobs: int) -> dict:
    """The cell's test predictions: binary truth and P(malignant) (a subtype model's: the sum over the malignant
    subtypes), and for a subtype model ``subtype_true``/``subtype_pred`` (class indices of ``SUBTYPE_CLASSES``)."""
    split = load_split(split_dir)
    _, rows = evaluate_model(model, split, "test", threshold=THRESHOLD, jobs=jobs)
    predictions = {
        "paths": [r["path"] for r in rows],
        "y_true": split.labels("test").tolist(),
        "p_malignant": [r["probability"] for r in rows],
        "patients": [r["patient"] for r in rows],
    }
    if rows and "true_class" in rows[0]:  # a subtype model: labels are subtype names
        predictions["subtype_true"] = [SUBTYPE_CLASSES.index(r["true_label"]) for r in rows]
        predictions["subtype_pred"] = [SUBTYPE_CLASSES.index(r["predicted_label"]) for r in rows]
    return predictions


def _fresh(run_dir: Path) -> None:
    """An unfinished run of this cell (ours: the cell directory is recorded) starts again: its files go
    (only those a run writes)."""
    if run_dir.is_dir() and not run_dir.is_symlink():
        names = {f"{run_dir.name}/{name}" for name in _written_in(run_dir)}
        remove_recorded(run_dir.parent, names, folders=[run_dir.name])


def _numpy_cell(spec: CellSpec, run_dir: Path) -> dict:
    resume = run_dir if (run_dir / CHECKPOINT_NAME).is_file() and (run_dir / "config.json").is_file() else None
    if resume is None:
        _fresh(run_dir)
    config = TrainConfig(
        split=spec.split_dir,
        out=str(run_dir),
        force=True,  # the cell's folder: _fresh removed our files, a file of the user's may stay beside the run
        arch=spec.model,
        image_size=spec.image_size,
        seed=spec.seed,
        jobs=spec.jobs,
        **spec.stain_and_task(),
        **({"epochs": spec.epochs} if spec.epochs else {}),
    )
    start = time.perf_counter()
    summary = run_training(config, resume=resume)
    if summary["stopped"] == "interrupted":
        raise KeyboardInterrupt
    train_seconds = time.perf_counter() - start
    model_path = run_dir / "model.npz"
    return {
        "model_path": str(model_path),
        "train_seconds": round(train_seconds, 3),
        "predictions": _test_predictions(load_model(model_path), spec.split_dir, spec.jobs),
        "resumed": resume is not None,
    }


def _keras_cell(spec: CellSpec, run_dir: Path) -> dict:
    _fresh(run_dir)
    kwargs = {"recipe": "default"} if spec.model == "custom-keras" else {}
    epochs = spec.epochs or (5 if spec.model == "custom-keras" else 200)
    start = time.perf_counter()
    summary = finetune_keras(
        spec.model,
        spec.split_dir,
        out=run_dir,
        weights=spec.weights,
        trainable_layers=spec.trainable_layers,
        epochs=epochs,
        image_size=spec.image_size,
        seed=spec.seed,
        jobs=spec.jobs,
        force=True,  # as in _numpy_cell
        **spec.stain_and_task(),
        **kwargs,
    )
    if summary["stopped"] == "interrupted":
        raise KeyboardInterrupt
    train_seconds = time.perf_counter() - start
    model_path = run_dir / "model.keras"
    return {
        "model_path": str(model_path),
        "train_seconds": round(train_seconds, 3),
        "predictions": _test_predictions(load_model(model_path), spec.split_dir, spec.jobs),
    }


def _probe_cell(spec: CellSpec, run_dir: Path) -> dict:
    """Linear probe: features from the shared cache, only the head trains (:mod:`breastcnn.training.feature_cache`);
    the test predictions come from the cached test features (equal to the saved model's: tested)."""
    split = load_split(spec.split_dir)
    _fresh(run_dir)
    settings = ProbeSettings(**({"epochs": spec.epochs} if spec.epochs else {}))
    with runs.run_directory(spec.model, run_dir, force=True) as run:  # as in _numpy_cell
        summary = run_linear_probe(
            spec.model,
            split,
            run.path,
            weights=spec.weights,
            seed=spec.seed,
            image_size=spec.image_size,
            settings=settings,
            cache_dir=spec.feature_dir,
            images=spec.feature_images,
        )
    head, _, features = summary.pop("_probe")
    rows = split.subset("test")
    predictions = {
        "paths": [r.path for r in rows],
        "y_true": split.labels("test").tolist(),
        "p_malignant": head_probabilities(head, features["test"]).tolist(),
        "patients": split.patients("test"),
    }
    return {
        "model_path": summary["model_path"],
        "train_seconds": summary["train_seconds"],
        "predictions": predictions,
        "feature_cache": summary["feature_cache"],
    }


# --------------------------------------------------------------------------- cost


def model_cost(model: str, model_path: Path, image_size: int, cache: Path, key: dict) -> dict:
    """Parameters, file size (KB) and batch-1 latency p50 (ms) of a trained model file, by the bench harness.

    Stored in ``cache`` with ``key``; a rerun with the same key reads it back (latency is a measurement:
    rereading keeps a resumed comparison's numbers identical).
    """
    if cache.is_file():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return stored["cost"]
    options = BenchOptions(image_size=image_size, batch_sizes=(1,), repeats=20, train_steps=0, max_seconds=2.0)
    with tempfile.TemporaryDirectory(prefix="breastcnn-compare-") as work:
        entry = bench_model(model, model_path, options, Path(work))
    if entry.get("skipped"):
        raise UserInputError(f"{model}: cannot measure its cost ({entry['skipped']})")
    cost = {
        "params_total": entry["params_total"],
        "size_kb": entry["size_kb"],
        "latency_ms_p50": entry["latency_ms_p50"],
    }
    atomic_write_json(cache, {"key": key, "cost": cost})
    return cost


# --------------------------------------------------------------------------- the run


@dataclass
class _Progress:
    """Cells done/total, elapsed time and an estimate, as message lines."""

    total: int
    message: Callable[[str], None]
    start: float = field(default_factory=time.perf_counter)
    done: int = 0
    computed: list[float] = field(default_factory=list)

    def cell(self, cell: dict, skipped: bool) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        if not skipped:
            self.computed.append(cell["cell_seconds"])
        remaining = self.total - self.done
        eta = f", about {np.mean(self.computed) * remaining:.0f} s left" if self.computed and remaining else ""
        how = "already done" if skipped else f"{cell['cell_seconds']:.1f} s"
        self.message(
            f"[{self.done}/{self.total}] {cell['model']} fold {cell['fold']}: {how} (elapsed {elapsed:.0f} s{eta})"
        )


def _cell_specs(options: CompareOptions, carved: list[Path], kfold: Path, owned: Ownership) -> list[CellSpec]:
    images = tuple(sorted({r.path for f in fold_dirs(kfold) for r in load_split(f).rows}))
    feature_dir = owned.claim("features")
    target_sha = None
    if options.stain_target is not None:
        target_sha = hashlib.sha256(Path(options.stain_target).read_bytes()).hexdigest()
    specs = []
    for k, split_dir in enumerate(carved, start=1):
        split_hash = load_split(split_dir).hash
        for model in options.models:
            cell_dir = owned.claim(f"cells/fold{k}/{model}")
            specs.append(
                CellSpec(
                    model=model,
                    fold=k,
                    split_dir=str(split_dir),
                    cell_dir=str(cell_dir.resolve()),
                    epochs=options.epochs,
                    image_size=options.image_size,
                    trainable_layers=options.trainable_layers,
                    weights=options.weights_for(model),
                    seed=options.seed,
                    jobs=options.jobs,
                    feature_dir=str(feature_dir.resolve()),
                    feature_images=images,
                    split_hash=split_hash,
                    task=options.task,
                    stain_norm=options.stain_norm,
                    stain_target=options.stain_target,
                    stain_target_sha256=target_sha,
                    stain_augment=options.stain_augment,
                )
            )
    return specs


def _finished(spec: CellSpec) -> dict | None:
    cell = read_cell(Path(spec.cell_dir))
    if cell is None:
        return None
    stored = {**LEGACY_KEY, **cell["key"]}
    if stored != spec.key():
        changed = sorted(k for k in spec.key() if stored.get(k) != spec.key()[k])
        raise UserInputError(
            f"{spec.cell_dir} was computed with other options ({', '.join(changed)} differ); "
            "pass --force to recompute the comparison, or choose another --out"
        )
    return cell


def _run_cells(specs: list[CellSpec], scheduler: str | None, message: Callable[[str], None]) -> list[dict]:
    """Every cell's result, in ``specs`` order: finished ones read back, the others computed (here or on Dask)."""
    progress = _Progress(len(specs), message)
    results: dict[int, dict] = {}
    todo = []
    for i, spec in enumerate(specs):
        cell = _finished(spec)
        if cell is not None:
            results[i] = cell
            progress.cell(cell, skipped=True)
        else:
            todo.append(i)
    if todo:
        with connect(scheduler) if scheduler else contextlib.nullcontext(LocalExecutor()) as executor:
            for i, cell in zip(todo, executor.map(run_cell, [(specs[i],) for i in todo]), strict=True):
                results[i] = cell
                progress.cell(cell, skipped=False)
    return [results[i] for i in range(len(specs))]


def _statistics(options: CompareOptions, cells: list[dict]) -> dict:
    predictions = {m: [] for m in options.models}
    for cell in cells:
        p = cell["predictions"]
        predictions[cell["model"]].append(
            FoldPredictions(
                fold=cell["fold"],
                y_true=p["y_true"],
                p_malignant=p["p_malignant"],
                patients=p["patients"],
                threshold=THRESHOLD,
                image_ids=p["paths"],
            )
        )
    stats = comparison_statistics(predictions, StatsOptions(n_resamples=options.n_resamples, seed=options.seed))
    if options.task == "subtype":
        _subtype_statistics(stats, cells)
    return stats


def _subtype_scores(predictions: dict) -> dict:
    """``subtype_accuracy``, ``balanced_accuracy``, ``macro_f1`` (scikit-learn) of one cell's subtype predictions."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    y, pred = predictions["subtype_true"], predictions["subtype_pred"]
    # the definitions of evaluate's subtype metrics (breastcnn.metrics.subtype_metrics)
    with warnings.catch_warnings():  # balanced accuracy warns when pred has subtypes y lacks
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y, pred))
    labels = list(range(len(SUBTYPE_CLASSES)))
    return {
        "subtype_accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": balanced,
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
    }


def _subtype_statistics(stats: dict, cells: list[dict]) -> None:
    """Add the subtype metrics to ``stats`` in place: per fold (:data:`SUBTYPE_METRICS`), their mean/std over folds
    (``subtype_mean``/``subtype_std``), and per pair ``subtype_mcnemar`` (exact McNemar on subtype correctness,
    discordant images pooled over folds, as the binary ``mcnemar``)."""
    by_cell = {(c["model"], c["fold"]): c["predictions"] for c in cells}
    for entry in stats["models"]:
        for fold in entry["folds"]:
            fold.update(_subtype_scores(by_cell[entry["model"], fold["fold"]]))
        values = {m: [f[m] for f in entry["folds"]] for m in SUBTYPE_METRICS}
        entry["subtype_mean"] = {m: float(np.mean(v)) for m, v in values.items()}
        entry["subtype_std"] = {m: float(np.std(v, ddof=1)) if len(v) > 1 else None for m, v in values.items()}
    folds = sorted({c["fold"] for c in cells})
    for pair in stats["pairwise"]:
        a_only = b_only = 0
        for k in folds:
            # same images in the same order for every model (checked by comparison_statistics)
            a, b = by_cell[pair["a"], k], by_cell[pair["b"], k]
            right_a = np.equal(a["subtype_true"], a["subtype_pred"])
            right_b = np.equal(b["subtype_true"], b["subtype_pred"])
            a_only += int(np.sum(right_a & ~right_b))
            b_only += int(np.sum(~right_a & right_b))
        pair["subtype_mcnemar"] = {
            "a_right_b_wrong": a_only,
            "a_wrong_b_right": b_only,
            "p_value": mcnemar_exact(a_only, b_only),
        }


def _model_entries(
    options: CompareOptions, stats: dict, cells: list[dict], owned: Ownership, message: Callable[[str], None]
) -> list[dict]:
    entries = []
    for entry in stats["models"]:
        model = entry["model"]
        mine = sorted((c for c in cells if c["model"] == model), key=lambda c: c["fold"])
        first = mine[0]
        cost_path = owned.claim(f"cost/{model}.json")
        message(f"{model}: measuring parameters, size and batch-1 latency (bench harness)")
        cost = model_cost(
            model,
            Path(options.out) / "cells" / "fold1" / model / first["model_path"],
            options.image_size,
            cost_path,
            first["key"],
        )
        train = [c["train_seconds"] for c in mine]
        extra = {"train_seconds_folds": train, "mode": first["mode"]}
        caches = [c["feature_cache"] for c in mine if c.get("feature_cache")]
        if caches:
            extra["feature_cache"] = {
                "built_seconds": sum(c["seconds"] for c in caches if c["status"] == "built"),
                "statuses": [c["status"] for c in caches],
                "file": caches[0]["file"],
            }
        entries.append({"model": model, **cost, "train_seconds": float(np.mean(train)), **entry, **extra})
    return entries


def one_class_warnings(cells: list[dict]) -> list[str]:
    """``metrics.degenerate_model_warnings`` of every cell on its test subset: a model that answers (almost) one
    class, or no better than the majority class, must not sit silently in the table."""
    lines = []
    for c in sorted(cells, key=lambda c: (c["model"], c["fold"])):
        p = c["predictions"]
        for line in degenerate_model_warnings(p["y_true"], p["p_malignant"], "test", threshold=THRESHOLD):
            lines.append(f"{c['model']} fold {c['fold']}: {line}")
    return lines


def _document(options: CompareOptions, kfold: Path, stats: dict, models: list[dict], cells: list[dict]) -> dict:
    info = json.loads((kfold / "split.json").read_text(encoding="utf-8"))
    protocol = {
        "folds": len({c["fold"] for c in cells}),
        "by": info.get("by"),
        "mag": info.get("magnification", options.mag),
        "seed": options.seed,
        "split": str(kfold),
        "ratios": info.get("ratios"),
        "validation": "carved from each fold's training patients "
        "(12.5% per class), the same for every model; test untouched",
        "image_size": options.image_size,
        "trainable_layers": options.trainable_layers,
        "epochs": options.epochs,
        "weights": options.weights,
        "threshold": THRESHOLD,
        "task": options.task,
        "stain_norm": options.stain_norm,
        "stain_target": options.stain_target,
        "stain_augment": options.stain_augment,
    }
    if options.task == "subtype":
        protocol["binary_outcome"] = (
            "benign/malignant derived from the subtype prediction (P(malignant) = sum of the malignant subtypes)"
        )
    # the folds are independent 70/30 draws (Spanhol et al.): a patient can be in several folds' test sets
    by_fold = {}
    for c in cells:
        by_fold.setdefault(c["fold"], set(c["predictions"]["patients"]))
    protocol["test_patients_per_fold"] = [len(by_fold[k]) for k in sorted(by_fold)]
    protocol["distinct_test_patients"] = len(set().union(*by_fold.values()))
    timing = [
        {
            "model": c["model"],
            "fold": c["fold"],
            "cell_seconds": c["cell_seconds"],
            "train_seconds": c["train_seconds"],
            **({"feature_cache": c["feature_cache"]} if c.get("feature_cache") else {}),
        }
        for c in cells
    ]
    return {
        "protocol": protocol,
        "models": models,
        "pairwise": stats["pairwise"],
        "statistics": stats["statistics"],
        "cells": timing,
        "warnings": one_class_warnings(cells),
        "created_by": f"breastcnn {__version__}",
    }


def markdown(document: dict) -> str:
    """``compare.md``: the protocol line and :func:`breastcnn.stats.markdown_report`'s tables."""
    p = document["protocol"]
    head = (
        f"# Model comparison\n\n{p['folds']} patient-wise folds ({p['by']}, {p['mag']}, seed {p['seed']}), "
        f"{p['image_size']} px, trainable layers {p['trainable_layers']}; split {p['split']}.\n\n"
    )
    if p.get("task", DEFAULT_TASK) != DEFAULT_TASK or p.get("stain_norm", DEFAULT_STAIN_NORM) != DEFAULT_STAIN_NORM:
        head += f"Task {p.get('task')}, stain normalisation {p.get('stain_norm')}.\n\n"
    if p.get("task") == "subtype":
        head += _subtype_table(document["models"])
    warned = "".join(f"- warning: {line}\n" for line in document.get("warnings", []))
    return head + (warned + "\n" if warned else "") + markdown_report(document)


def _subtype_table(models: list[dict]) -> str:
    """The subtype metrics (mean ± std over folds) as a markdown table; the tables below are benign/malignant."""
    lines = [
        "| Model | Subtype accuracy | Balanced accuracy | Macro F1 |",
        "|---|---|---|---|",
    ]
    for m in models:
        cells = []
        for metric in SUBTYPE_METRICS:
            std = m["subtype_std"][metric]
            cells.append(f"{m['subtype_mean'][metric]:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
        lines.append(f"| {m['model']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n\nBelow: the benign/malignant outcome derived from the subtype prediction.\n\n"


def run_compare(options: CompareOptions, message: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) a comparison into ``options.out``; returns the ``compare.json`` document."""
    message = message or (lambda text: None)
    options = options.validate()
    out = Path(options.out)
    if options.data is not None:
        check_outside_data(out, locate_data(options.data)[0], "--out")
    scheduler = scheduler_address(options.scheduler)
    with locked_directory(out, "compare directory", removable=(OWNED_FILE,)):
        owned = Ownership(out)
        if options.force:
            for folder in owned.remove(keep=("features",)):
                message(f"--force kept {folder}: it holds files that breastcnn did not write")
        kfold = _kfold_dir(options, owned, message)
        carved = _carved_folds(kfold, owned, options.seed)
        specs = _cell_specs(options, carved, kfold, owned)
        cells = _run_cells(specs, scheduler, message)
        message(f"statistics: patient bootstrap with {options.n_resamples} resamples")
        stats = _statistics(options, cells)
        models = _model_entries(options, stats, cells, owned, message)
        document = _document(options, kfold, stats, models, cells)
        for line in document["warnings"]:
            message(f"warning: {line}")
        paths = {name: owned.claim(name) for name in OUTPUTS}
        atomic_write_json(paths["compare.json"], document)
        atomic_write_text(paths["compare.md"], markdown(document))
        plot_pareto(models, paths["pareto.png"])
        plot_folds(models, paths["folds.png"])
    return document

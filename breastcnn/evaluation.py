"""Evaluate a model on a split: ``breastcnn evaluate`` as a library (the command only prints).

:func:`evaluate_model` scores a loaded classifier on one subset of a loaded
split (metrics and one row per image). :func:`plan_evaluation` turns the
command's arguments into targets: a model file or run directory (default
``runs/latest``), a k-fold run directory paired fold by fold with the k-fold
split, and the split the run was trained on (its ``config.json``) when none
is given. :func:`run_evaluation` scores each target and writes
``predictions.csv``, ``roc.png``, ``confusion.png`` and ``metrics.json``
(atomically; next to the model, replaced each time, or in an explicit
``out``, kept unless ``force``), calling ``progress(images)`` as it goes.
Notes for the user are returned (``EvaluationPlan.notes``); problems that do
not stop the evaluation are :class:`~breastcnn.errors.BreastCNNWarning`\\ s.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from breastcnn import CLASSES
from breastcnn.data.breakhis import MAGNIFICATIONS, check_outside_data
from breastcnn.data.images import load_subset
from breastcnn.data.split import DEFAULT_SPLIT_DIR, SUBSETS, Split, fold_dirs, load_split
from breastcnn.data.tasks import binary_probabilities
from breastcnn.errors import BreastCNNWarning, UserInputError
from breastcnn.fsutil import atomic_write_json, atomic_write_text, check_overwrite
from breastcnn.inference import check_threads, model_threads, predict_proba_uint8, predictions_csv_rows
from breastcnn.metrics import aggregate_metrics, classification_metrics, subtype_metrics
from breastcnn.models import load_model, model_spec
from breastcnn.models.classifier import capabilities, model_source
from breastcnn.plots import plot_confusion, plot_roc
from breastcnn.runs import fold_run_dirs, latest_run_dir, model_in_dir, read_run_config, resolve_model_path

PREDICTION_COLUMNS = ("path", "true_label", "probability", "predicted_label", "patient")
"""Columns of ``predictions.csv`` (probability = P(malignant)); a multi-magnification split adds
``magnification``, a subtype model ``true_class``/``predicted_class`` (benign/malignant; ``true_label`` and
``predicted_label`` are then subtypes) and one ``p_<class>`` column per subtype."""

OUTPUT_NAMES = ("predictions.csv", "roc.png", "confusion.png", "metrics.json")
"""What an evaluation writes into its output folder."""


# --------------------------------------------------------------------------- one model, one subset


def evaluate_model(
    model,
    split: Split,
    subset: str = "test",
    threshold: float = 0.5,
    jobs: int = 1,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> tuple[dict, list[dict]]:
    """Score ``model`` on ``subset`` of ``split`` (a loaded ``Split``).

    Returns ``(metrics, rows)``: metrics from :func:`breastcnn.metrics.classification_metrics`
    (a subtype model: :func:`breastcnn.metrics.subtype_metrics`), patient-level accuracy included, and
    ``per_magnification`` (``{"40X": {...the same metrics...}}``) when the subset holds several
    magnifications; and one row per image with :data:`PREDICTION_COLUMNS` (path relative to the data
    root). Images are stain-normalised as the model was trained (``spec.normaliser``), through the
    image cache. ``progress(n)`` calls add up to the subset's size: images decoded while the image
    cache is built, else images scored (a cached subset loads at once). ``threads``: engine threads of
    a NumPy model (None: the model's setting, all available cores).
    """
    spec = model_spec(model)
    check_threads(threads)
    records = split.subset(subset)
    if not records:
        raise UserInputError(f"--subset {subset}: the {subset} subset of split {split.dir} is empty")
    told = _Told(progress)
    x, y = load_subset(
        split, subset, spec.image_size, jobs=jobs, progress=told.decoded, task=spec.task, normaliser=spec.normaliser
    )
    with model_threads(model, threads):
        proba = predict_proba_uint8(model, x, batch_size=batch_size, progress=told.scored, normalise=False)
    bad = np.flatnonzero(~np.all(np.isfinite(proba), axis=1))
    if bad.size:
        raise UserInputError(
            f"{model_source(model)}: the model gives non-finite probabilities for {bad.size} of {len(proba)} "
            f"{subset} images (e.g. {records[bad[0]].path}); its weights are unusable"
        )
    patients = split.patients(subset)
    mags = split.magnifications(subset)

    def scores(index: np.ndarray) -> dict:
        chosen = [patients[i] for i in index]
        if spec.task == "subtype":
            return subtype_metrics(y[index], proba[index], spec.classes, threshold=threshold, patients=chosen)
        return classification_metrics(y[index], proba[index, 1], threshold=threshold, patients=chosen)

    metrics = scores(np.arange(len(y)))
    metrics["subset"] = subset
    found = [m for m in MAGNIFICATIONS if m in set(mags)]
    if len(set(mags)) > 1:
        metrics["per_magnification"] = {m: scores(np.flatnonzero(np.asarray(mags) == m)) for m in found}
    return metrics, _prediction_rows(spec, records, y, proba, patients, mags, threshold)


def _prediction_rows(spec, records, y: np.ndarray, proba: np.ndarray, patients, mags, threshold: float) -> list[dict]:
    """One ``predictions.csv`` row per image (:data:`PREDICTION_COLUMNS` and the task's extra columns)."""
    p_malignant = binary_probabilities(proba)[:, 1] if spec.task == "subtype" else proba[:, 1]
    several = len(set(mags)) > 1
    rows = []
    for i, record in enumerate(records):
        prob = float(p_malignant[i])
        row = {"path": record.path, "probability": prob, "patient": patients[i]}
        if spec.task == "subtype":
            row.update(
                true_label=spec.classes[int(y[i])],
                predicted_label=spec.classes[int(np.argmax(proba[i]))],
                true_class=record.label,
                predicted_class=CLASSES[int(prob >= threshold)],
                **{f"p_{c}": float(v) for c, v in zip(spec.classes, proba[i], strict=True)},
            )
        else:
            row.update(true_label=CLASSES[int(y[i])], predicted_label=CLASSES[int(prob >= threshold)])
        if several:
            row["magnification"] = mags[i]
        rows.append(row)
    return rows


def prediction_columns(spec, several_magnifications: bool = False) -> list[str]:
    """The ``predictions.csv`` columns of a model of ``spec`` (see :data:`PREDICTION_COLUMNS`)."""
    columns = list(PREDICTION_COLUMNS)
    if spec.task == "subtype":
        columns += ["true_class", "predicted_class", *(f"p_{c}" for c in spec.classes)]
    if several_magnifications:
        columns.append("magnification")
    return columns


class _Told:
    """Forwards decode progress, then scoring progress only for images not told yet: the total is N either way."""

    def __init__(self, progress: Callable[[int], None] | None):
        self.progress, self.told, self.done = progress, 0, 0

    def decoded(self, n: int) -> None:
        self.told += n
        if self.progress is not None:
            self.progress(n)

    def scored(self, n: int) -> None:
        self.done += n
        if self.done > self.told:
            if self.progress is not None:
                self.progress(self.done - self.told)
            self.told = self.done


# --------------------------------------------------------------------------- the evaluate use case


@dataclass
class EvaluationTarget:
    """One model to score on one split; ``fold`` (1-based) for a fold of a k-fold run."""

    model_path: Path
    split: Split
    out_dir: Path
    fold: int | None = None


@dataclass
class EvaluationPlan:
    """What ``evaluate`` will score: ``targets`` (one, or one per fold), the ``model`` and ``split_dir``
    given or found, whether ``out`` was explicit, and ``notes`` to tell the user (where the split came from)."""

    targets: list[EvaluationTarget]
    model: Path
    split_dir: Path
    explicit_out: bool
    kfold: bool
    notes: list[str] = field(default_factory=list)

    def images(self, subset: str) -> int:
        """How many images the plan scores (every target's ``subset``): a progress bar's total."""
        return sum(len(target.split.subset(subset)) for target in self.targets)


@dataclass
class EvaluationResult:
    """Per target: the metrics (``model``, ``split``, ``fold`` for k-fold, then the metric keys) and the
    files written; for k-fold the mean/std summary (:func:`breastcnn.metrics.aggregate_metrics`)."""

    plan: EvaluationPlan
    metrics: list[dict]
    written: list[tuple[Path, list[Path]]]
    summary: dict | None = None

    def to_json(self) -> dict:
        """What ``evaluate --json`` prints: the metrics, or ``{"folds": [...], "mean_std": {...}}`` for k-fold."""
        if self.plan.kfold:
            return {"folds": self.metrics, "mean_std": self.summary}
        return self.metrics[0]


def trained_split(run_dir: Path) -> tuple[Path, Path | None]:
    """``(split dir, config.json it came from)``: the ``--split`` a run was trained with, else
    ``(DEFAULT_SPLIT_DIR, None)``."""
    config = Path(run_dir) / "config.json"
    if config.is_file():
        split = read_run_config(config)["options"].get("split")
        if split is not None and not isinstance(split, str):
            raise UserInputError(f"{config}: option 'split' must be a path, got {split!r}")
        if split:
            return Path(split), config
    return Path(DEFAULT_SPLIT_DIR), None


def plan_evaluation(
    model: str | Path | None = None, split: str | Path | None = None, out: str | Path | None = None
) -> EvaluationPlan:
    """Resolve ``evaluate``'s ``--model``/``--split``/``--out`` into targets (see the module docstring).

    A k-fold run directory (``fold1/``, ``fold2/``... without a model of its own) is paired fold by fold
    with a k-fold split of as many folds; a single model refuses a k-fold split. Raises UserInputError
    naming the option when the model, the split or the pairing is wrong.
    """
    target = Path(model) if model is not None else latest_run_dir()
    folds = fold_run_dirs(target) if target is not None and target.is_dir() and model_in_dir(target) is None else []
    notes: list[str] = []

    def split_of(run_dir: Path) -> Path:
        if split is not None:
            return Path(split)
        found, config = trained_split(run_dir)
        if config is not None:
            notes.append(f"using the split the model was trained on: {found} (from {config})")
        return found

    if not folds:
        model_path = resolve_model_path(model)
        split_dir = split_of(model_path.parent)
        if fold_dirs(split_dir):
            raise UserInputError(
                f"--split {split_dir} is a k-fold split but --model {model_path} is one model; "
                "pass the k-fold run directory as --model, or one fold's split"
            )
        targets = [
            EvaluationTarget(model_path, load_split(split_dir), Path(out) if out is not None else model_path.parent)
        ]
        return EvaluationPlan(targets, model_path, split_dir, out is not None, kfold=False, notes=notes)

    split_dir = split_of(target)
    split_folds = fold_dirs(split_dir)
    if len(split_folds) != len(folds):
        raise UserInputError(
            f"--model {target} has {len(folds)} folds but --split {split_dir} has {len(split_folds)}; "
            "pass the k-fold split the run was trained on"
        )
    targets = [
        EvaluationTarget(
            resolve_model_path(fold_run),
            load_split(fold_split),
            (Path(out) / fold_run.name) if out is not None else fold_run,
            fold=k,
        )
        for k, (fold_run, fold_split) in enumerate(zip(folds, split_folds, strict=True), start=1)
    ]
    return EvaluationPlan(targets, target, split_dir, out is not None, kfold=True, notes=notes)


def check_evaluation_options(subset: str, threshold: float, threads: int | None) -> None:
    """Raise UserInputError naming ``--subset``, ``--threshold`` or ``--threads`` when out of range."""
    if not 0.0 <= threshold <= 1.0:
        raise UserInputError(f"--threshold must be in [0, 1], got {threshold}")
    if subset not in SUBSETS:
        raise UserInputError(f"--subset must be test, val or train, got {subset!r}")
    check_threads(threads)


def run_evaluation(
    plan: EvaluationPlan,
    subset: str = "test",
    threshold: float = 0.5,
    force: bool = False,
    jobs: int = 1,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvaluationResult:
    """Score every target of ``plan`` on ``subset`` and write its outputs; ``progress(images)`` after each
    batch of images is decoded (as many in all as ``plan.images(subset)``).

    Every output folder is checked first (outside the data tree; an explicit ``out`` is not overwritten
    without ``force``), so a refusal writes nothing.
    """
    check_evaluation_options(subset, threshold, threads)
    where = "--out" if plan.explicit_out else "the output folder (next to --model)"
    for target in plan.targets:
        check_outside_data(target.out_dir, target.split.root, where)
        if plan.explicit_out:
            for name in OUTPUT_NAMES:
                check_overwrite(target.out_dir / name, force)
    metrics, written = [], []
    for target in plan.targets:
        scores, files = _evaluate_target(target, subset, threshold, jobs, threads, progress)
        metrics.append(scores)
        written.append((target.out_dir, files))
    summary = aggregate_metrics(metrics) if plan.kfold else None
    return EvaluationResult(plan, metrics, written, summary)


def evaluate(
    model=None,
    split=None,
    subset: str = "test",
    threshold: float = 0.5,
    out=None,
    force: bool = False,
    jobs: int = 1,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvaluationResult:
    """:func:`plan_evaluation` then :func:`run_evaluation` (the options are checked before anything is read)."""
    check_evaluation_options(subset, threshold, threads)
    return run_evaluation(plan_evaluation(model, split, out), subset, threshold, force, jobs, threads, progress)


def _evaluate_target(
    target: EvaluationTarget,
    subset: str,
    threshold: float,
    jobs: int,
    threads: int | None,
    progress: Callable[[int], None] | None,
) -> tuple[dict, list[Path]]:
    classifier = load_model(target.model_path)
    if threads is not None and not capabilities(classifier).engine_threads:
        warnings.warn(
            "--threads sets the NumPy engine's threads; this Keras model uses TensorFlow's own thread pools",
            BreastCNNWarning,
            stacklevel=2,
        )
    split = target.split
    trained_on = classifier.meta.get("split_hash")
    if trained_on and trained_on != split.hash:
        warnings.warn(
            f"{target.model_path} was trained on another split (manifest hash {trained_on[:12]} != "
            f"{split.hash[:12]}); its training images may be in this test subset",
            BreastCNNWarning,
            stacklevel=2,
        )
    scores, rows = evaluate_model(classifier, split, subset, threshold, jobs=jobs, progress=progress, threads=threads)
    scores = {
        **({"fold": target.fold} if target.fold is not None else {}),
        "model": str(target.model_path),
        "split": str(split.dir),
        **scores,
    }
    outputs = [target.out_dir / name for name in OUTPUT_NAMES]
    target.out_dir.mkdir(parents=True, exist_ok=True)
    spec = model_spec(classifier)
    atomic_write_text(outputs[0], predictions_csv_rows(rows, prediction_columns(spec, "per_magnification" in scores)))
    binary = scores.get("binary", scores)  # a subtype model's ROC is of its derived P(malignant)
    plot_roc(
        [r.get("true_class", r["true_label"]) == "malignant" for r in rows],
        [r["probability"] for r in rows],
        outputs[1],
        auc=binary["roc_auc"],
    )
    plot_confusion(scores["confusion_matrix"], outputs[2], classes=spec.classes)
    atomic_write_json(outputs[3], {k: v for k, v in scores.items() if k != "fold"})
    return scores, outputs


__all__ = [
    "EvaluationPlan",
    "EvaluationResult",
    "EvaluationTarget",
    "OUTPUT_NAMES",
    "PREDICTION_COLUMNS",
    "check_evaluation_options",
    "evaluate",
    "evaluate_model",
    "plan_evaluation",
    "prediction_columns",
    "run_evaluation",
    "trained_split",
]

"""`breastcnn evaluate`: Evaluate a model on a split's test subset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from breastcnn.cli.common import info, jobs_option, make_progress, print_json, print_table, warn, warn_threads_ignored
from breastcnn.errors import UserInputError
from breastcnn.inference import check_threads

_SCORES = ("accuracy", "precision", "recall", "f1", "benign_recall", "roc_auc", "patient_accuracy")
_LABELS = {
    "accuracy": "accuracy",
    "precision": "precision (malignant)",
    "recall": "recall (malignant)",
    "f1": "F1 (malignant)",
    "benign_recall": "recall (benign)",
    "roc_auc": "ROC AUC",
    "patient_accuracy": "patient-level accuracy",
}


def evaluate(
    model: Optional[Path] = typer.Option(None, "--model", help="Model file or run directory (default: runs/latest). A k-fold run directory evaluates every fold."),
    split: Optional[Path] = typer.Option(None, "--split", help="Split directory (default: the split the run was trained on (its config.json), else splits/200X)."),
    subset: str = typer.Option("test", "--subset", help="Subset to score: test (default), val or train."),
    threshold: float = typer.Option(0.5, "--threshold", help="Call an image malignant when P(malignant) >= this."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where roc.png, confusion.png, predictions.csv and metrics.json go (default: next to the model, replaced on re-evaluation)."),
    force: bool = typer.Option(False, "--force", help="Replace existing outputs in an explicit --out directory."),
    jobs: int = jobs_option("decoding images when the image cache must be built (processes)"),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="Engine threads of a NumPy model (default: all available cores; Keras models use "
                                "TensorFlow's own thread pools)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (per fold and mean/std for k-fold) on stdout."),
) -> None:
    """Evaluate a model on a split's test subset.

    Scores with scikit-learn: accuracy, malignant precision/recall/F1, benign
    recall, ROC AUC, confusion matrix (rows true benign/malignant: tn fp / fn tp), and the
    patient-level recognition rate. Writes roc.png, confusion.png,
    predictions.csv and metrics.json atomically; in the default location
    (next to the model) they are replaced on every evaluation, in an explicit
    --out they are kept unless --force.
    """
    from breastcnn.data.split import fold_dirs, load_split
    from breastcnn.metrics import aggregate_metrics
    from breastcnn.runs import fold_run_dirs, latest_run_dir, model_in_dir, resolve_model_path

    if not 0.0 <= threshold <= 1.0:
        raise UserInputError(f"--threshold must be in [0, 1], got {threshold}")
    if subset not in ("train", "val", "test"):
        raise UserInputError(f"--subset must be test, val or train, got {subset!r}")
    check_threads(threads)

    target = Path(model) if model is not None else latest_run_dir()
    folds = fold_run_dirs(target) if target is not None and target.is_dir() and model_in_dir(target) is None else []
    if not folds:
        model_path = resolve_model_path(model)
        split_dir = split if split is not None else _trained_split(model_path.parent)
        if fold_dirs(split_dir):
            raise UserInputError(
                f"--split {split_dir} is a k-fold split but --model {model_path} is one model; "
                "pass the k-fold run directory as --model, or one fold's split"
            )
        out_dir = out if out is not None else model_path.parent
        metrics = _evaluate_one(model_path, load_split(split_dir), subset, threshold, out_dir,
                                explicit_out=out is not None, force=force, jobs=jobs, quiet=json_output,
                                threads=threads)
        if json_output:
            print_json(metrics)
        else:
            _print_table([metrics], None, title=f"{model_path} on {split_dir} ({subset})")
        return

    split_dir = split if split is not None else _trained_split(target)
    split_folds = fold_dirs(split_dir)
    if len(split_folds) != len(folds):
        raise UserInputError(
            f"--model {target} has {len(folds)} folds but --split {split_dir} has {len(split_folds)}; "
            "pass the k-fold split the run was trained on"
        )
    results = []
    for k, (fold_run, fold_split) in enumerate(zip(folds, split_folds), start=1):
        model_path = resolve_model_path(fold_run)
        out_dir = (out / fold_run.name) if out is not None else fold_run
        metrics = _evaluate_one(model_path, load_split(fold_split), subset, threshold, out_dir,
                                explicit_out=out is not None, force=force, jobs=jobs, quiet=json_output,
                                threads=threads)
        results.append({"fold": k, **metrics})
    summary = aggregate_metrics(results)
    if json_output:
        print_json({"folds": results, "mean_std": summary})
    else:
        _print_table(results, summary, title=f"{target} on {split_dir} ({subset}, {len(results)} folds)")


def _trained_split(run_dir: Path) -> Path:
    """The --split a run was trained with (its config.json), else the default splits/200X."""
    from breastcnn.data.split import DEFAULT_SPLIT_DIR
    from breastcnn.runs import read_run_config

    config = run_dir / "config.json"
    if config.is_file():
        split = read_run_config(config)["options"].get("split")
        if split is not None and not isinstance(split, str):
            raise UserInputError(f"{config}: option 'split' must be a path, got {split!r}")
        if split:
            info(f"using the split the model was trained on: {split} (from {config})")
            return Path(split)
    return Path(DEFAULT_SPLIT_DIR)


def _evaluate_one(model_path: Path, split, subset: str, threshold: float, out_dir: Path,
                  explicit_out: bool, force: bool, jobs: int, quiet: bool, threads: int | None = None) -> dict:
    from breastcnn.fsutil import atomic_write_json, atomic_write_text, check_overwrite
    from breastcnn.inference import PREDICTION_COLUMNS, evaluate_model, predictions_csv_rows
    from breastcnn.models import load_model
    from breastcnn.plots import plot_confusion, plot_roc

    from breastcnn.data.breakhis import check_outside_data

    check_outside_data(out_dir, split.root, "--out" if explicit_out else "the output folder (next to --model)")
    outputs = [out_dir / name for name in ("predictions.csv", "roc.png", "confusion.png", "metrics.json")]
    if explicit_out:
        for path in outputs:
            check_overwrite(path, force)
    classifier = load_model(model_path)
    warn_threads_ignored(classifier, threads)
    trained_on = (classifier.meta or {}).get("split_hash")
    if trained_on and trained_on != split.hash:
        warn(f"{model_path} was trained on another split (manifest hash {trained_on[:12]} != {split.hash[:12]}); "
             "its training images may be in this test subset")
    n = len(split.subset(subset))
    with make_progress(quiet) as progress:
        task = progress.add_task(f"{subset} images", total=n)
        metrics, rows = evaluate_model(classifier, split, subset, threshold, jobs=jobs,
                                       progress=lambda k: progress.advance(task, k), threads=threads)
    metrics = {"model": str(model_path), "split": str(split.dir), **metrics}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(outputs[0], predictions_csv_rows(rows, PREDICTION_COLUMNS))
    plot_roc([r["true_label"] == "malignant" for r in rows], [r["probability"] for r in rows], outputs[1],
             auc=metrics["roc_auc"])
    plot_confusion(metrics["confusion_matrix"], outputs[2])
    atomic_write_json(outputs[3], metrics)
    info(f"wrote {', '.join(p.name for p in outputs)} to {out_dir}")
    return metrics


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _print_table(results: list[dict], summary: dict | None, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    many = len(results) > 1 or summary is not None
    for r in results:
        table.add_column(f"fold {r['fold']}" if many else "value", justify="right")
    if summary is not None:
        table.add_column("mean ± std", justify="right")
    for key in _SCORES:
        cells = [_fmt(r.get(key)) for r in results]
        if summary is not None:
            s = summary.get(key)
            cells.append("n/a" if s is None else f"{s['mean']:.4f} ± {s['std']:.4f}")
        table.add_row(_LABELS[key], *cells)
    table.add_row("images", *[str(r["n"]) for r in results], *([str(summary["n"])] if summary else []))
    cms = [r["confusion_matrix"] for r in results] + ([summary["confusion_matrix"]] if summary else [])
    table.add_row(escape("confusion [[tn, fp], [fn, tp]]"), *[str(cm) for cm in cms])
    table.add_row("threshold", *[f"{r['threshold']:g}" for r in results], *([""] if summary else []))
    print_table(table)

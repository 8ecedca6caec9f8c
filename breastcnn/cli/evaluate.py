"""`breastcnn evaluate`: Evaluate a model on a split's test subset."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from breastcnn.cli.common import info, jobs_option, make_progress, print_json, print_table
from breastcnn.data.split import DEFAULT_SPLIT_DIR
from breastcnn.evaluation import check_evaluation_options, plan_evaluation, run_evaluation

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
    model: Path | None = typer.Option(
        None,
        "--model",
        help="Model file or run directory (default: runs/latest). A k-fold run directory evaluates every fold.",
    ),
    split: Path | None = typer.Option(
        None,
        "--split",
        help="Split directory (default: the split the run was trained on (its config.json), else "
        f"{DEFAULT_SPLIT_DIR}).",
    ),
    subset: str = typer.Option("test", "--subset", help="Subset to score: test (default), val or train."),
    threshold: float = typer.Option(0.5, "--threshold", help="Call an image malignant when P(malignant) >= this."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Where roc.png, confusion.png, predictions.csv and metrics.json go (default: next to the "
        "model, replaced on re-evaluation).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace existing outputs in an explicit --out directory."),
    jobs: int = jobs_option("decoding images when the image cache must be built (processes)"),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="Engine threads of a NumPy model (default: all available cores; Keras models use "
        "TensorFlow's own thread pools).",
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON object (per fold and mean/std for k-fold) on stdout."
    ),
) -> None:
    """Evaluate a model on a split's test subset.

    Scores with scikit-learn: accuracy, malignant precision/recall/F1, benign
    recall, ROC AUC, confusion matrix (rows true benign/malignant: tn fp / fn tp), and the
    patient-level recognition rate. Writes roc.png, confusion.png,
    predictions.csv and metrics.json atomically; in the default location
    (next to the model) they are replaced on every evaluation, in an explicit
    --out they are kept unless --force.
    """
    check_evaluation_options(subset, threshold, threads)
    plan = plan_evaluation(model, split, out)
    for note in plan.notes:
        info(note)
    with make_progress(json_output) as progress:
        task = progress.add_task(f"{subset} images", total=plan.images(subset))
        result = run_evaluation(
            plan,
            subset,
            threshold,
            force=force,
            jobs=jobs,
            threads=threads,
            progress=lambda k: progress.advance(task, k),
        )
    for out_dir, files in result.written:
        info(f"wrote {', '.join(p.name for p in files)} to {out_dir}")
    if json_output:
        print_json(result.to_json())
    elif plan.kfold:
        _print_table(
            result.metrics,
            result.summary,
            title=f"{plan.model} on {plan.split_dir} ({subset}, {len(result.metrics)} folds)",
        )
    else:
        _print_table(result.metrics, None, title=f"{plan.model} on {plan.split_dir} ({subset})")


_SUBTYPE_SCORES = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "patient_accuracy",
    "binary.accuracy",
    "binary.recall",
    "binary.benign_recall",
    "binary.roc_auc",
)
"""Rows of a subtype model's table (``binary.*``: benign/malignant scores derived from the subtypes)."""
_LABELS.update(
    {
        "balanced_accuracy": "balanced accuracy (subtypes)",
        "macro_f1": "macro F1 (subtypes)",
        "binary.accuracy": "benign/malignant accuracy",
        "binary.recall": "recall (malignant)",
        "binary.benign_recall": "recall (benign)",
        "binary.roc_auc": "ROC AUC (malignant)",
    }
)


def _score(result: dict, key: str):
    """``result[key]``; ``"binary.x"`` reads ``result["binary"]["x"]``; None when absent."""
    if key.startswith("binary."):
        return (result.get("binary") or {}).get(key.split(".", 1)[1])
    return result.get(key)


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
    subtype = any(r.get("task") == "subtype" for r in results)
    for key in _SUBTYPE_SCORES if subtype else _SCORES:
        cells = [_fmt(_score(r, key)) for r in results]
        if summary is not None:
            s = summary.get(key)
            cells.append("n/a" if s is None else f"{s['mean']:.4f} ± {s['std']:.4f}")
        table.add_row(_LABELS.get(key, key), *cells)
    table.add_row("images", *[str(r["n"]) for r in results], *([str(summary["n"])] if summary else []))
    cms = [r["confusion_matrix"] for r in results] + ([summary["confusion_matrix"]] if summary else [])
    if not subtype:  # an 8x8 matrix does not fit a cell: it is in confusion.png and --json
        table.add_row(escape("confusion [[tn, fp], [fn, tp]]"), *[str(cm) for cm in cms])
    thresholds = [r["binary"]["threshold"] if subtype else r["threshold"] for r in results]
    table.add_row("threshold", *[f"{t:g}" for t in thresholds], *([""] if summary else []))
    print_table(table)

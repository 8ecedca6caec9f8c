"""PNG plots with matplotlib's Agg backend, written atomically.

``training.png`` (loss and accuracy curves from history rows), ``roc.png`` and
``confusion.png``. Figures are built with the object API (no pyplot state), so
nothing leaks between calls and no display is needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from breastcnn import CLASSES
from breastcnn.fsutil import atomic_write


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", bbox_inches="tight")
    return path


def _column(rows: Sequence[dict], key: str) -> np.ndarray:
    values = []
    for row in rows:
        value = row.get(key)
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            values.append(np.nan)
    return np.asarray(values, dtype=np.float64)


def plot_training(history: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """Loss and accuracy (train running mean and validation) against the step, like with like.

    The loss panel plots the training ``data_loss`` (unweighted cross-entropy,
    no L2) against ``val_loss`` (the same definition); the L2 penalty, when
    logged and non-zero, goes on a second axis of its own. Histories without a
    ``data_loss`` column (older runs) plot ``loss``. The accuracy panel adds
    ``val_balanced_accuracy`` when logged (a one-class model sits at 0.5 there).
    ``history`` rows have the ``HISTORY_COLUMNS`` of :mod:`breastcnn.runs`
    (values may be strings as read back from the CSV).
    """
    fig, (ax_loss, ax_acc) = _figure(11, 4, ncols=2)
    steps = _column(history, "step")
    data_loss = _column(history, "data_loss")
    if np.isfinite(data_loss).any():
        ax_loss.plot(steps, data_loss, label="train data loss (no L2)", marker=".")
    else:
        ax_loss.plot(steps, _column(history, "loss"), label="train loss", marker=".")
    ax_loss.plot(steps, _column(history, "val_loss"), label="validation loss", marker=".")
    ax_loss.set_ylabel("cross-entropy")
    l2 = _column(history, "l2_penalty")
    if np.nan_to_num(l2).any():
        ax_l2 = ax_loss.twinx()
        ax_l2.plot(steps, l2, color="grey", linestyle=":", label="L2 penalty (right axis)")
        ax_l2.set_ylabel("L2 penalty")
        ax_l2.legend(loc="upper center")
    ax_acc.plot(steps, _column(history, "accuracy"), label="train accuracy", marker=".")
    ax_acc.plot(steps, _column(history, "val_accuracy"), label="validation accuracy", marker=".")
    balanced = _column(history, "val_balanced_accuracy")
    if np.isfinite(balanced).any():
        ax_acc.plot(steps, balanced, label="validation balanced accuracy", linestyle="--")
    ax_acc.set_ylabel("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("step (batches)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right" if ax is ax_loss else "lower right")
    ax_acc.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_roc(y_true, p_malignant, path: str | os.PathLike, auc: float | None = None) -> Path:
    """ROC curve of P(malignant) (positive class malignant)."""
    from sklearn.metrics import roc_curve

    fig, ax = _figure(5, 5)
    y = np.asarray(y_true).ravel()
    if np.unique(y).size == 2:
        fpr, tpr, _ = roc_curve(y, np.asarray(p_malignant).ravel(), pos_label=1)
        label = "ROC" if auc is None else f"ROC (AUC = {auc:.3f})"
        ax.plot(fpr, tpr, label=label)
    else:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class present", ha="center", va="center")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set_xlabel("false positive rate (benign called malignant)")
    ax.set_ylabel("true positive rate (malignant recall)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], path: str | os.PathLike, classes=CLASSES) -> Path:
    """Confusion matrix (rows true, columns predicted; binary: ``[[tn, fp], [fn, tp]]``) of ``classes``."""
    many = len(classes) > 2
    fig, ax = _figure(8, 7) if many else _figure(4.5, 4)
    cm = np.asarray(matrix, dtype=np.int64)
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(
        range(len(classes)), labels=list(classes), rotation=45 if many else 0, ha="right" if many else "center"
    )
    ax.set_yticks(range(len(classes)), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > threshold else "black")
    return _save(fig, path)


def _ci_errors(entry: dict, metric: str) -> tuple[float, list[list[float]]]:
    """``(mean, [[below], [above]])`` error-bar lengths of a compare model entry's 95% CI (0 where unknown)."""
    mean = entry["mean"][metric]
    low, high = entry["ci95"][metric]
    return mean, [[mean - low if low is not None else 0.0], [high - mean if high is not None else 0.0]]


def plot_pareto(models: Sequence[dict], path: str | os.PathLike, metric: str = "accuracy") -> Path:
    """``pareto.png``: ``metric`` (mean over folds, 95% CI bars) vs batch-1 latency and vs file size, one
    point per ``compare.json`` model entry; models without a cost figure are left out of that panel."""
    fig, axes = _figure(10, 4, ncols=2)
    for ax, key, label in (
        (axes[0], "latency_ms_p50", "batch-1 latency p50 (ms, log)"),
        (axes[1], "size_kb", "model file size (KB, log)"),
    ):
        for entry in models:
            if entry.get(key) is None or entry["mean"].get(metric) is None:
                continue
            mean, err = _ci_errors(entry, metric)
            ax.errorbar([entry[key]], [mean], yerr=err, fmt="o", capsize=4, label=entry["model"])
            ax.annotate(entry["model"], (entry[key], mean), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (mean over folds, 95% CI)")
        ax.grid(True, alpha=0.3)
    axes[0].set_title(f"{metric} vs latency")
    axes[1].set_title(f"{metric} vs size")
    return _save(fig, path)


def plot_folds(
    models: Sequence[dict], path: str | os.PathLike, metrics: Sequence[str] = ("accuracy", "patient_accuracy")
) -> Path:
    """``folds.png``: per-fold values (dots) and the mean (bar) of each model, one panel per metric."""
    fig, axes = _figure(5 * len(metrics), 4, ncols=len(metrics))
    axes = np.atleast_1d(axes)
    names = [entry["model"] for entry in models]
    for ax, metric in zip(axes, metrics, strict=True):
        for i, entry in enumerate(models):
            values = [f[metric] for f in entry["folds"] if f[metric] is not None]
            ax.scatter(np.full(len(values), i, dtype=float), values, s=18, alpha=0.8)
            if entry["mean"][metric] is not None:
                ax.hlines(entry["mean"][metric], i - 0.25, i + 0.25, colors="black")
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per fold (bar: mean)")
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)

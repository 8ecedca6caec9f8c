"""The run vocabulary of both training loops (NumPy and Keras): file names, outcomes, validation scores."""

from __future__ import annotations

import numpy as np

from breastcnn import CLASSES
from breastcnn.errors import UserInputError
from breastcnn.metrics import fast_validation_scores

CHECKPOINT_NAME = "last.npz"
MODEL_NAME = "model.npz"
SUMMARY_NAME = "summary.json"

EXIT_DIVERGED = 1
"""Exit code of ``breastcnn train``/``finetune`` when the loss became NaN/inf (bad input is 2, Ctrl-C 130)."""

FINISHED = ("completed", "early_stopping", "nan")
"""``summary["stopped"]`` values of a run that has nothing left to resume."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``summary`` holds the run summary."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def validation_scores(probs: np.ndarray, y: np.ndarray) -> dict:
    """The ``val_*`` history columns from validation probabilities ``(M, 2)`` and labels ``(M,)``.

    ``val_loss``: unweighted mean cross-entropy (no class weights, no L2);
    accuracy, F1 and recall of the malignant class; balanced accuracy (mean of
    the two class recalls) and ROC AUC (scikit-learn; NaN with one class).
    """
    p_true = np.clip(probs[np.arange(y.size), y].astype(np.float64), 1e-12, 1.0)
    scores = fast_validation_scores(y, probs[:, 1])
    return {
        "val_loss": float(-np.mean(np.log(p_true))),
        "val_accuracy": scores["accuracy"],
        "val_f1": scores["f1"],
        "val_recall": scores["recall"],
        "val_balanced_accuracy": scores["balanced_accuracy"],
        "val_auc": scores["roc_auc"],
    }


def require_both_classes(split) -> None:
    """Refuse a split whose train subset lacks a class (one-class data trains to a constant, "100%" on val)."""
    labels = split.labels("train")
    if labels.size == 0:
        return  # reported as an empty train subset where the data are loaded
    counts = {c: int(np.sum(labels == i)) for i, c in enumerate(CLASSES)}
    if min(counts.values()) == 0:
        found = ", ".join(f"{n} {c}" for c, n in counts.items())
        raise UserInputError(
            f"--split {split.dir}: the train subset holds one class only ({found}); a classifier needs both "
            f"{' and '.join(CLASSES)} images"
        )

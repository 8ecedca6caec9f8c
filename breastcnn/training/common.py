"""The run vocabulary of both training loops (NumPy and Keras): file names, outcomes, validation scores."""

from __future__ import annotations

import numpy as np

from breastcnn import CLASSES
from breastcnn.data.tasks import binary_probabilities, subtype_to_binary
from breastcnn.errors import UserInputError
from breastcnn.metrics import fast_subtype_validation_scores, fast_validation_scores

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


def validation_scores(probs: np.ndarray, y: np.ndarray, task: str = "binary") -> dict:
    """The ``val_*`` history columns from validation probabilities ``(M, C)`` and labels ``(M,)``.

    ``val_loss``: unweighted mean cross-entropy (no class weights, no L2);
    accuracy, F1 and recall of the malignant class; balanced accuracy (mean of
    the two class recalls) and ROC AUC (scikit-learn; NaN with one class).
    ``task="subtype"``: accuracy, balanced accuracy and (macro) F1 of the subtypes, recall and AUC of
    the derived benign/malignant call (:func:`breastcnn.metrics.fast_subtype_validation_scores`).
    """
    p_true = np.clip(probs[np.arange(y.size), y].astype(np.float64), 1e-12, 1.0)
    if task == "subtype":
        scores = fast_subtype_validation_scores(y, probs)
    else:
        scores = fast_validation_scores(y, probs[:, 1])
    return {
        "val_loss": float(-np.mean(np.log(p_true))),
        "val_accuracy": scores["accuracy"],
        "val_f1": scores["f1"],
        "val_recall": scores["recall"],
        "val_balanced_accuracy": scores["balanced_accuracy"],
        "val_auc": scores["roc_auc"],
    }


def binary_view(y: np.ndarray, probs: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """``(benign/malignant labels, P(malignant))`` of a task's labels and probabilities (subtypes summed)."""
    if task == "subtype":
        return subtype_to_binary(y), binary_probabilities(probs)[:, 1]
    return y, probs[:, 1]


def require_both_classes(split, task: str = "binary") -> None:
    """Refuse a split whose train subset lacks a class (one-class data trains to a constant, "100%" on val),
    or, for the subtype task, an image without a BreakHis subtype."""
    if task != "binary":
        split.labels("train", task)  # a UserInputError naming the first image without a subtype
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

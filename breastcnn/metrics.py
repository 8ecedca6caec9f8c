"""Classification metrics: a thin layer over scikit-learn plus patient-level scores.

Positive class = malignant (label 1). Every function takes plain arrays and
returns JSON-serialisable Python values (floats, ints, lists, None).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from breastcnn import CLASSES
from breastcnn.errors import UserInputError

METRIC_KEYS = (
    "n",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "benign_recall",
    "roc_auc",
    "confusion_matrix",
    "patient_accuracy",
    "threshold",
)
"""Keys of :func:`classification_metrics` (the ``evaluate --json`` contract)."""

SCALAR_KEYS = ("accuracy", "precision", "recall", "f1", "benign_recall", "roc_auc", "patient_accuracy")
"""The float metrics that :func:`aggregate_metrics` summarises as mean +- std."""


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    p_malignant: Sequence[float] | np.ndarray,
    threshold: float = 0.5,
    patients: Sequence[str] | None = None,
) -> dict:
    """Scores of P(malignant) against the true labels (0 benign, 1 malignant).

    Args:
        y_true: ``(N,)`` int labels.
        p_malignant: ``(N,)`` probabilities of the malignant class.
        threshold: predict malignant when ``p >= threshold``.
        patients: optional ``(N,)`` patient ids for the patient-level recognition
            rate (mean over patients of the share of their images classified right,
            Spanhol et al. 2016). ``None`` -> ``patient_accuracy`` is ``None``.

    Returns:
        dict with :data:`METRIC_KEYS`. Precision/recall/F1 are for the malignant
        class and are 0.0 when undefined (no predicted/true positives, sklearn
        ``zero_division=0``). ``roc_auc`` is ``None`` when only one class is
        present, with the reason in ``roc_auc_note``.
    """
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(p_malignant, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise UserInputError(f"y_true has {y.size} labels but p_malignant has {p.size} probabilities")
    if y.size == 0:
        raise UserInputError("cannot compute metrics on 0 images")
    if not np.isin(y, (0, 1)).all():
        raise UserInputError(f"labels must be 0 (benign) or 1 (malignant), got {sorted(set(y.tolist()))}")
    if not np.isfinite(p).all():
        raise UserInputError("p_malignant contains NaN or infinite values")
    if not 0.0 <= threshold <= 1.0:
        raise UserInputError(f"--threshold must be in [0, 1], got {threshold}")
    y_pred = (p >= threshold).astype(np.int64)
    # scikit-learn takes ~0.5 s to import: imported here, not when a command merely starts
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

    cm = confusion_matrix(y, y_pred, labels=[0, 1])
    result: dict = {
        "n": int(y.size),
        "accuracy": float(accuracy_score(y, y_pred)),
        "precision": float(precision_score(y, y_pred, pos_label=1, labels=[0, 1], zero_division=0)),
        "recall": float(recall_score(y, y_pred, pos_label=1, labels=[0, 1], zero_division=0)),
        "f1": float(f1_score(y, y_pred, pos_label=1, labels=[0, 1], zero_division=0)),
        "benign_recall": float(recall_score(y, y_pred, pos_label=0, labels=[0, 1], zero_division=0)),
        "roc_auc": None,
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "patient_accuracy": None,
        "threshold": float(threshold),
    }
    if np.unique(y).size == 2:
        result["roc_auc"] = float(roc_auc_score(y, p))
    else:
        result["roc_auc_note"] = f"undefined: only class {int(y[0])} present in y_true"
    if patients is not None:
        result["patient_accuracy"] = patient_accuracy(y, y_pred, patients)
    return result


SUBTYPE_METRIC_KEYS = (
    "task",
    "classes",
    "n",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "per_class",
    "confusion_matrix",
    "patient_accuracy",
    "binary",
)
"""Keys of :func:`subtype_metrics` (the ``evaluate --json`` contract of a subtype model)."""


def subtype_metrics(
    y_true: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    threshold: float = 0.5,
    patients: Sequence[str] | None = None,
) -> dict:
    """Scores of a multi-class (subtype) prediction, with the benign/malignant scores derived from it.

    Args:
        y_true: ``(N,)`` int labels, ``0 .. len(classes) - 1``.
        probabilities: ``(N, len(classes))`` class probabilities; the prediction is their argmax.
        classes: class names in label order (:data:`breastcnn.data.tasks.SUBTYPE_CLASSES`).
        threshold, patients: as :func:`classification_metrics` (patients: the patient-level rate).

    Returns:
        dict with :data:`SUBTYPE_METRIC_KEYS`: ``task`` ``"subtype"``, ``classes``, ``accuracy``,
        ``balanced_accuracy`` (mean recall over the classes present in ``y_true``), ``macro_f1`` (over
        all classes, 0 for a class never predicted nor present), ``per_class``
        (``{class: {precision, recall, f1, support}}``), ``confusion_matrix`` (rows true, columns
        predicted, in class order), ``patient_accuracy`` (None without ``patients``), and ``binary``:
        :func:`classification_metrics` of P(malignant) = the summed probability of the malignant
        subtypes against the true subtype's class (:func:`breastcnn.data.tasks.binary_probabilities`).
    """
    from breastcnn.data.tasks import SUBTYPE_CLASSES, binary_probabilities, subtype_to_binary

    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64)
    k = len(classes)
    if p.ndim != 2 or p.shape != (y.size, k):
        raise UserInputError(f"probabilities must have shape ({y.size}, {k}), got {p.shape}")
    if y.size == 0:
        raise UserInputError("cannot compute metrics on 0 images")
    if y.min() < 0 or y.max() >= k:
        raise UserInputError(f"labels must be in 0..{k - 1}, got {sorted(set(y.tolist()))}")
    if not np.isfinite(p).all():
        raise UserInputError("probabilities contain NaN or infinite values")
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    y_pred = p.argmax(axis=1)
    labels = list(range(k))
    with warnings.catch_warnings():  # balanced accuracy warns when y_pred has classes y_true lacks
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y, y_pred))
    precision, recall, f1, support = precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    result: dict = {
        "task": "subtype",
        "classes": list(classes),
        "n": int(y.size),
        "accuracy": float(accuracy_score(y, y_pred)),
        "balanced_accuracy": balanced,
        "macro_f1": float(f1_score(y, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y, y_pred, labels=labels).astype(int).tolist(),
        "patient_accuracy": None if patients is None else patient_accuracy(y, y_pred, patients),
    }
    if tuple(classes) == SUBTYPE_CLASSES:  # the BreakHis subtypes: benign/malignant follow from them
        result["binary"] = classification_metrics(
            subtype_to_binary(y), binary_probabilities(p)[:, 1], threshold=threshold, patients=patients
        )
    return result


def patient_accuracy(y_true, y_pred, patients: Sequence[str]) -> float:
    """Patient-level recognition rate: mean over patients of their share of correct images."""
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    patients = np.asarray([str(p) for p in patients])
    if patients.shape != y_true.shape:
        raise UserInputError(f"patients has {patients.size} entries but y_true has {y_true.size}")
    correct = (y_true == y_pred).astype(np.float64)
    ids, inverse = np.unique(patients, return_inverse=True)
    per_patient = np.bincount(inverse, weights=correct) / np.bincount(inverse)
    return float(per_patient.mean())


def aggregate_metrics(results: Iterable[dict]) -> dict:
    """Mean and (population) std of the scalar metrics over k folds / repetitions.

    Returns ``{"folds": k, "accuracy": {"mean": .., "std": ..}, ...}``; a metric
    that is ``None`` in some folds is averaged over the others (``None`` if in all).
    The summed confusion matrix and ``n`` are included as well.
    """
    results = list(results)
    if not results:
        raise UserInputError("no results to aggregate")
    summary: dict = {"folds": len(results), "n": int(sum(r["n"] for r in results))}
    subtype_keys = ("balanced_accuracy", "macro_f1") if any(r.get("task") == "subtype" for r in results) else ()
    for key in (*SCALAR_KEYS, *subtype_keys):
        values = [r.get(key) for r in results if r.get(key) is not None]
        values = [float(v) for v in values if not (isinstance(v, float) and math.isnan(v))]
        if values:
            summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
        else:
            summary[key] = None
    summary["confusion_matrix"] = np.sum([r["confusion_matrix"] for r in results], axis=0).astype(int).tolist()
    summary["threshold"] = results[0].get("threshold")
    return summary


def fast_validation_scores(y_true: np.ndarray, p_malignant: np.ndarray, threshold: float = 0.5) -> dict:
    """The scores the training loops monitor, at every validation pass (hot path in training).

    ``accuracy``, malignant ``f1`` and ``recall``, ``benign_recall`` and
    ``balanced_accuracy`` (mean of the two recalls) in plain NumPy, without
    scikit-learn's per-call overhead (same values as scikit-learn: tested);
    ``roc_auc`` from scikit-learn's ``roc_auc_score`` (NaN when ``y_true``
    holds one class only). A constant predictor scores the majority share on
    ``accuracy`` but 0.5 on ``balanced_accuracy`` and ``roc_auc``.
    """
    from sklearn.metrics import roc_auc_score  # imported on first use, like classification_metrics

    y = np.asarray(y_true).ravel().astype(np.int64)
    p = np.asarray(p_malignant).ravel()
    pred = (p >= threshold).astype(np.int64)
    tp = int(np.sum((pred == 1) & (y == 1)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    benign_recall = tn / (tn + fp) if tn + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    present = [r for r, n in ((recall, tp + fn), (benign_recall, tn + fp)) if n]
    balanced = float(np.mean(present)) if present else 0.0
    auc = float(roc_auc_score(y, p)) if tp + fn and tn + fp else float("nan")
    return {
        "accuracy": float(np.mean(pred == y)),
        "f1": float(f1),
        "recall": float(recall),
        "benign_recall": float(benign_recall),
        "balanced_accuracy": balanced,
        "roc_auc": auc,
    }


def fast_subtype_validation_scores(y_true: np.ndarray, probabilities: np.ndarray) -> dict:
    """The validation scores of a subtype model, under the keys of :func:`fast_validation_scores`.

    ``accuracy`` and ``balanced_accuracy`` (mean recall over the subtypes present) of the subtype
    argmax, ``f1`` = macro F1 over the subtypes; ``recall``, ``benign_recall`` and ``roc_auc`` are the
    benign/malignant ones of the derived P(malignant) (summed malignant subtypes), so that every
    ``--monitor`` means the same kind of thing for both tasks.
    """
    from sklearn.metrics import f1_score

    from breastcnn.data.tasks import binary_probabilities, subtype_to_binary

    y = np.asarray(y_true).ravel().astype(np.int64)
    p = np.asarray(probabilities)
    pred = p.argmax(axis=1)
    present = np.unique(y)
    recalls = [float(np.mean(pred[y == c] == c)) for c in present]
    binary = fast_validation_scores(subtype_to_binary(y), binary_probabilities(p)[:, 1])
    return {
        "accuracy": float(np.mean(pred == y)),
        "f1": float(f1_score(y, pred, labels=list(range(p.shape[1])), average="macro", zero_division=0)),
        "recall": binary["recall"],
        "benign_recall": binary["benign_recall"],
        "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0,
        "roc_auc": binary["roc_auc"],
    }


ONE_CLASS_SHARE = 0.05
"""A model that gives one class to fewer than this share of the images is called (almost) one-class."""


def degenerate_model_warnings(y_true, p_malignant, subset: str = "validation", threshold: float = 0.5) -> list[str]:
    """Plain-language warnings when a classifier is no better than a constant guess on ``subset``.

    Two checks, each giving one sentence: the model predicts (almost) one class
    (the other class gets fewer than :data:`ONE_CLASS_SHARE` of the
    predictions), and its accuracy is no better than always answering the
    majority class. Returns ``[]`` for a model that passes both.
    """
    y = np.asarray(y_true).ravel().astype(np.int64)
    if y.size == 0:
        return []
    pred = (np.asarray(p_malignant).ravel() >= threshold).astype(np.int64)
    warnings = []
    predicted = np.bincount(pred, minlength=2) / y.size
    rare = int(np.argmin(predicted))
    if predicted[rare] < ONE_CLASS_SHARE:
        recalls = [float(np.mean(pred[y == c] == c)) if np.any(y == c) else float("nan") for c in (0, 1)]
        warnings.append(
            f"the model predicts {CLASSES[1 - rare]} for {predicted[1 - rare]:.0%} of the {y.size} {subset} images "
            f"({CLASSES[0]} recall {recalls[0]:.2f}, {CLASSES[1]} recall {recalls[1]:.2f}): it has (almost) "
            "collapsed to one class"
        )
    counts = np.bincount(y, minlength=2)
    majority = int(np.argmax(counts))
    majority_share = counts[majority] / y.size
    accuracy = float(np.mean(pred == y))
    if accuracy <= majority_share:
        warnings.append(
            f"{subset} accuracy {accuracy:.3f} is no better than always answering the majority class "
            f"({CLASSES[majority]}, {majority_share:.3f})"
        )
    return warnings

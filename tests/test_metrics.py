"""breastcnn.metrics against hand-computed values, scikit-learn, and edge cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from breastcnn.errors import UserInputError
from breastcnn.metrics import (
    METRIC_KEYS,
    aggregate_metrics,
    classification_metrics,
    fast_validation_scores,
    patient_accuracy,
)


def test_hand_computed_example():
    # 4 benign, 6 malignant; predictions at 0.5: benign -> [0, 0, 1, 0], malignant -> [1, 1, 1, 0, 1, 0]
    y = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    p = [0.1, 0.4, 0.7, 0.2, 0.9, 0.6, 0.5, 0.3, 0.8, 0.45]
    m = classification_metrics(y, p)
    assert set(METRIC_KEYS) <= set(m)
    tn, fp, fn, tp = 3, 1, 2, 4
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx((tp + tn) / 10)
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["f1"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert m["benign_recall"] == pytest.approx(tn / (tn + fp))
    # AUC by counting ordered (malignant, benign) pairs: 21 of 24 pairs ranked right
    pos = [pi for pi, yi in zip(p, y, strict=True) if yi == 1]
    neg = [pi for pi, yi in zip(p, y, strict=True) if yi == 0]
    pairs = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    assert m["roc_auc"] == pytest.approx(pairs / (len(pos) * len(neg)))
    assert m["threshold"] == 0.5
    assert m["patient_accuracy"] is None
    json.dumps(m)  # plain Python types only


def test_threshold_is_inclusive_and_changes_predictions():
    y = [0, 1, 1]
    p = [0.3, 0.5, 0.7]
    assert classification_metrics(y, p, threshold=0.5)["recall"] == 1.0
    assert classification_metrics(y, p, threshold=0.6)["recall"] == 0.5
    assert classification_metrics(y, p, threshold=0.2)["benign_recall"] == 0.0


def test_matches_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    p = np.clip(y * 0.3 + rng.random(500) * 0.7, 0, 1)
    m = classification_metrics(y, p, threshold=0.45)
    pred = (p >= 0.45).astype(int)
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["benign_recall"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    fast = fast_validation_scores(y, p, threshold=0.45)
    assert fast["accuracy"] == pytest.approx(m["accuracy"])
    assert fast["f1"] == pytest.approx(m["f1"])
    assert fast["recall"] == pytest.approx(m["recall"])


def test_patient_accuracy_is_mean_of_per_patient_rates():
    y = [1, 1, 1, 1, 0, 0]
    p = [0.9, 0.9, 0.9, 0.1, 0.1, 0.9]  # patient a: 3/4 right, b: 1/2 right
    patients = ["a", "a", "a", "a", "b", "b"]
    m = classification_metrics(y, p, patients=patients)
    assert m["patient_accuracy"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["accuracy"] == pytest.approx(4 / 6)  # differs from the patient-level rate
    assert patient_accuracy([1, 0], [1, 1], ["x", "y"]) == pytest.approx(0.5)


def test_single_class_edge_cases():
    m = classification_metrics([1, 1, 1], [0.9, 0.2, 0.8])
    assert m["roc_auc"] is None and "only class 1" in m["roc_auc_note"]
    assert m["benign_recall"] == 0.0  # zero_division: no benign images
    assert m["confusion_matrix"] == [[0, 0], [1, 2]]
    m = classification_metrics([0, 0], [0.1, 0.2])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["accuracy"] == 1.0 and m["benign_recall"] == 1.0
    assert fast_validation_scores(np.array([0, 0]), np.array([0.1, 0.2]))["f1"] == 0.0


@pytest.mark.parametrize(
    "y, p, kwargs, message",
    [
        ([0, 1], [0.5], {}, "1 probabilities"),
        ([], [], {}, "0 images"),
        ([0, 2], [0.1, 0.2], {}, "labels must be 0"),
        ([0, 1], [0.1, float("nan")], {}, "NaN"),
        ([0, 1], [0.1, 0.2], {"threshold": 1.5}, "--threshold"),
        ([0, 1], [0.1, 0.2], {"patients": ["a"]}, "patients has 1"),
    ],
)
def test_bad_input_raises_user_error(y, p, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        classification_metrics(y, p, **kwargs)


def test_aggregate_mean_std_over_folds():
    a = classification_metrics([0, 1, 1, 0], [0.2, 0.8, 0.3, 0.1], patients=["a", "b", "b", "c"])
    b = classification_metrics([0, 1, 1, 1], [0.6, 0.8, 0.7, 0.9], patients=["a", "b", "b", "c"])
    c = classification_metrics([1, 1], [0.9, 0.8])  # roc_auc None, patient_accuracy None
    s = aggregate_metrics([a, b, c])
    assert s["folds"] == 3 and s["n"] == 10
    accs = [a["accuracy"], b["accuracy"], c["accuracy"]]
    assert s["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert s["accuracy"]["std"] == pytest.approx(np.std(accs))
    assert s["roc_auc"]["mean"] == pytest.approx(np.mean([a["roc_auc"], b["roc_auc"]]))  # None skipped
    assert (
        s["confusion_matrix"]
        == (np.array(a["confusion_matrix"]) + b["confusion_matrix"] + c["confusion_matrix"]).tolist()
    )
    with pytest.raises(UserInputError):
        aggregate_metrics([])


def test_monitored_validation_scores_match_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, log_loss

    from breastcnn.training.common import validation_scores

    rng = np.random.default_rng(3)
    for n, share in ((41, 0.7), (200, 0.3), (9, 0.5)):
        y = (rng.random(n) < share).astype(np.int64)
        y[:2] = [0, 1]  # both classes present
        p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
        probs = np.stack([1 - p, p], axis=1).astype(np.float32)
        scores = validation_scores(probs, y)
        pred = (p >= 0.5).astype(int)
        assert scores["val_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert scores["val_auc"] == pytest.approx(roc_auc_score(y, p))
        assert scores["val_loss"] == pytest.approx(log_loss(y, probs, labels=[0, 1]), rel=1e-5)
        assert scores["val_accuracy"] == pytest.approx(np.mean(pred == y))
    # a constant (one-class) predictor: the majority share on accuracy, 0.5 on the two balanced scores
    y = np.array([1] * 7 + [0] * 3)
    constant = fast_validation_scores(y, np.full(10, 0.9))
    assert constant["accuracy"] == 0.7 and constant["balanced_accuracy"] == 0.5 and constant["roc_auc"] == 0.5
    # one class in y: balanced accuracy is that class's recall (as scikit-learn), AUC undefined
    single = fast_validation_scores(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.8]))
    assert single["balanced_accuracy"] == pytest.approx(2 / 3) and np.isnan(single["roc_auc"])


def test_degenerate_model_warnings():
    from breastcnn.metrics import degenerate_model_warnings

    y = np.array([1] * 28 + [0] * 13)
    # all malignant: one class, and no better than the majority answer
    warnings = degenerate_model_warnings(y, np.full(41, 0.8))
    assert len(warnings) == 2
    assert warnings[0].startswith("the model predicts malignant for 100% of the 41 validation images")
    assert "benign recall 0.00, malignant recall 1.00" in warnings[0]
    assert warnings[1] == (
        "validation accuracy 0.683 is no better than always answering the majority class (malignant, 0.683)"
    )
    # one benign answer in 41 (2.4% < 5%) is still (almost) one class
    p = np.full(41, 0.8)
    p[-1] = 0.1
    assert "collapsed to one class" in degenerate_model_warnings(y, p, "test")[0]
    # a real model: both classes predicted, better than the majority: no warning
    good = np.where(y == 1, 0.8, 0.2)
    good[0] = 0.3
    assert degenerate_model_warnings(y, good) == []
    # both classes predicted but below the majority rate
    bad = np.where(y == 1, 0.2, 0.8)
    bad[:10] = 0.9
    assert degenerate_model_warnings(y, bad) == [
        "validation accuracy 0.244 is no better than always answering the majority class (malignant, 0.683)"
    ]


def test_patient_accuracy_is_spanhols_patient_recognition_rate_by_hand():
    """Spanhol et al. (2016): patient score = N_rec / N_P; recognition rate = sum of scores / patients."""
    patients = ["p1"] * 5 + ["p2"] + ["p3"] * 2
    y_true = [1, 1, 1, 1, 1, 0, 0, 0]
    p = [0.9, 0.8, 0.7, 0.6, 0.4, 0.7, 0.2, 0.1]  # p1: 4 of 5 right, p2: 0 of 1, p3: 2 of 2
    m = classification_metrics(y_true, p, patients=patients)
    assert m["patient_accuracy"] == pytest.approx((4 / 5 + 0 / 1 + 2 / 2) / 3)  # 0.6
    assert m["accuracy"] == pytest.approx(6 / 8)  # image-level: 0.75
    shuffled = np.random.default_rng(0).permutation(8)  # order does not matter
    again = classification_metrics(
        np.array(y_true)[shuffled], np.array(p)[shuffled], patients=list(np.array(patients)[shuffled])
    )
    assert again["patient_accuracy"] == pytest.approx(0.6)


# --------------------------------------------------------------------------- the subtype task


def _subtype_example(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 8, n)
    logits = rng.normal(size=(n, 8))
    logits[np.arange(n), y] += 1.5  # better than chance, far from perfect
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    patients = [f"P{i % 9}" for i in range(n)]
    return y, p, patients


def test_subtype_metrics_match_scikit_learn():
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    from breastcnn.data.tasks import SUBTYPE_CLASSES, binary_probabilities, subtype_to_binary
    from breastcnn.metrics import SUBTYPE_METRIC_KEYS, subtype_metrics

    y, p, patients = _subtype_example()
    m = subtype_metrics(y, p, SUBTYPE_CLASSES, patients=patients)
    pred = p.argmax(axis=1)
    assert set(m) == set(SUBTYPE_METRIC_KEYS) and m["task"] == "subtype" and m["classes"] == list(SUBTYPE_CLASSES)
    assert m["n"] == 120
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=range(8), zero_division=0)
    for i, name in enumerate(SUBTYPE_CLASSES):
        assert m["per_class"][name] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]}
        )
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(8)).tolist()
    assert np.asarray(m["confusion_matrix"]).shape == (8, 8) and np.trace(m["confusion_matrix"]) == (pred == y).sum()
    assert m["patient_accuracy"] == pytest.approx(patient_accuracy(y, pred, patients))
    expected = classification_metrics(subtype_to_binary(y), binary_probabilities(p)[:, 1], patients=patients)
    assert m["binary"]["confusion_matrix"] == expected.pop("confusion_matrix")
    assert {k: v for k, v in m["binary"].items() if k != "confusion_matrix"} == pytest.approx(expected)
    assert m["binary"]["roc_auc"] == pytest.approx(roc_auc_score(subtype_to_binary(y), p[:, 4:].sum(axis=1)))
    json.dumps(m)  # plain JSON


def test_subtype_metrics_edge_cases():
    from breastcnn.data.tasks import SUBTYPE_CLASSES
    from breastcnn.metrics import subtype_metrics

    y = np.array([0, 0, 5])  # classes absent from y_true and from the predictions: 0 scores, no warning
    p = np.eye(8)[[0, 1, 5]]
    m = subtype_metrics(y, p, SUBTYPE_CLASSES)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["mucinous_carcinoma"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["lobular_carcinoma"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert m["patient_accuracy"] is None
    with pytest.raises(UserInputError, match=r"probabilities must have shape \(3, 8\), got \(3, 2\)"):
        subtype_metrics(y, p[:, :2], SUBTYPE_CLASSES)
    with pytest.raises(UserInputError, match=r"labels must be in 0..7"):
        subtype_metrics([0, 9, 1], p, SUBTYPE_CLASSES)
    with pytest.raises(UserInputError, match="NaN"):
        subtype_metrics(y, np.full((3, 8), np.nan), SUBTYPE_CLASSES)


def test_fast_subtype_validation_scores_match_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score

    from breastcnn.data.tasks import binary_probabilities, subtype_to_binary
    from breastcnn.metrics import fast_subtype_validation_scores

    y, p, _ = _subtype_example(seed=3)
    s = fast_subtype_validation_scores(y, p)
    pred = p.argmax(axis=1)
    assert s["accuracy"] == pytest.approx(np.mean(pred == y))
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert s["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    yb, pb = subtype_to_binary(y), binary_probabilities(p)[:, 1]
    assert s["recall"] == pytest.approx(recall_score(yb, pb >= 0.5))
    assert s["roc_auc"] == pytest.approx(roc_auc_score(yb, pb))


def test_aggregate_metrics_summarises_the_subtype_scores():
    from breastcnn.data.tasks import SUBTYPE_CLASSES
    from breastcnn.metrics import subtype_metrics

    folds = [subtype_metrics(*_subtype_example(seed=s)[:2], SUBTYPE_CLASSES) for s in (0, 1)]
    summary = aggregate_metrics(folds)
    assert summary["macro_f1"]["mean"] == pytest.approx(np.mean([f["macro_f1"] for f in folds]))
    assert summary["balanced_accuracy"]["std"] == pytest.approx(np.std([f["balanced_accuracy"] for f in folds]))
    assert np.asarray(summary["confusion_matrix"]).shape == (8, 8)

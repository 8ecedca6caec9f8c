"""breastcnn.stats: patient bootstrap, paired tests, pairing checks and the report tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import bootstrap as scipy_bootstrap

from breastcnn.errors import UserInputError
from breastcnn.metrics import classification_metrics
from breastcnn.stats import (
    METRICS,
    FoldPredictions,
    StatsOptions,
    _align,
    _bootstrap_distribution,
    _FoldScorer,
    bootstrap_p_value,
    comparison_statistics,
    holm,
    markdown_report,
    mcnemar_exact,
    percentile_interval,
)

FAST = StatsOptions(n_resamples=400, seed=0)


def _fold_data(rng, fold, n_patients=12, images_per_patient=(3, 9), malignant_share=0.6):
    """One fold's test set: patients with a class each, a few images per patient."""
    counts = rng.integers(images_per_patient[0], images_per_patient[1] + 1, n_patients)
    patient_label = (np.arange(n_patients) < round(malignant_share * n_patients)).astype(int)
    patient = np.repeat(np.arange(n_patients), counts)
    return {
        "y": patient_label[patient],
        "patients": np.array([f"f{fold}-p{q}" for q in patient]),
        "ids": np.array([f"f{fold}-img{i}" for i in range(patient.size)]),
        "patient_index": patient,
    }


def _model_p(rng, y, patient_index, skill, patient_sd=1.0, image_sd=1.0):
    """P(malignant) whose correctness is correlated within a patient (a patient effect)."""
    effect = rng.normal(0.0, patient_sd, patient_index.max() + 1)[patient_index]
    margin = skill + effect + rng.normal(0.0, image_sd, y.size)
    return 1.0 / (1.0 + np.exp(-np.where(y == 1, margin, -margin)))


def _predictions(skills: dict[str, float], n_folds=3, seed=0, **fold_kwargs):
    rng = np.random.default_rng(seed)
    out = {name: [] for name in skills}
    for fold in range(n_folds):
        d = _fold_data(rng, fold, **fold_kwargs)
        for name, skill in skills.items():
            p = _model_p(rng, d["y"], d["patient_index"], skill)
            out[name].append(FoldPredictions(fold, d["y"], p, d["patients"], 0.5, d["ids"]))
    return out


def _expand(fp: FoldPredictions, multiplicity: np.ndarray):
    """The resampled images of a fold: each patient's images repeated, each copy its own patient."""
    patient_ids, index = np.unique(np.asarray(fp.patients), return_inverse=True)
    rows, copies = [], []
    for q in range(patient_ids.size):
        for copy in range(int(multiplicity[q])):
            members = np.flatnonzero(index == q)
            rows.append(members)
            copies += [f"{patient_ids[q]}#{copy}"] * members.size
    rows = np.concatenate(rows)
    return np.asarray(fp.y_true)[rows], np.asarray(fp.p_malignant)[rows], np.array(copies)


# --------------------------------------------------------------------------- the vectorised metrics


def test_fold_scorer_equals_classification_metrics_on_expanded_resamples():
    rng = np.random.default_rng(3)
    d = _fold_data(rng, 0, n_patients=10)
    # rounded scores: many ties between malignant and benign images, as ROC AUC must handle
    p = np.round(_model_p(rng, d["y"], d["patient_index"], 0.8), 1)
    fp = FoldPredictions(0, d["y"], p, d["patients"], 0.45, d["ids"])
    scorer = _FoldScorer(d["y"], p, 0.45, d["patient_index"], 10)
    multiplicities = np.vstack([np.ones(10, dtype=int), rng.multinomial(10, np.full(10, 0.1), size=30)])
    multiplicities[1] = [3, 0, 0, 0, 0, 2, 0, 0, 5, 0]  # one resample with a single benign patient drawn
    scores = scorer.scores(multiplicities)
    for r, m in enumerate(multiplicities):
        y, pr, patients = _expand(fp, m)
        expected = classification_metrics(y, pr, 0.45, patients)
        for metric in METRICS:
            if expected[metric] is None:
                assert math.isnan(scores[metric][r]), metric
            else:
                assert scores[metric][r] == pytest.approx(expected[metric], abs=1e-12), (metric, r)


def test_fold_scorer_roc_auc_undefined_on_one_class_and_zero_division_rules():
    y = np.array([1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4])  # all predicted benign: no predicted positives
    scorer = _FoldScorer(y, p, 0.5, np.array([0, 0, 1, 1]), 2)
    s = scorer.scores(np.ones((1, 2)))
    expected = classification_metrics(y, p, 0.5, ["a", "a", "b", "b"])
    assert math.isnan(s["roc_auc"][0]) and expected["roc_auc"] is None
    for metric in ("accuracy", "precision", "recall", "f1", "benign_recall", "patient_accuracy"):
        assert s[metric][0] == expected[metric] == 0.0, metric


# --------------------------------------------------------------------------- exact small pieces


def test_mcnemar_hand_checked_and_against_the_binomial_sum():
    # b=1, c=9: 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(0.021484375, abs=1e-15)
    assert mcnemar_exact(9, 1) == pytest.approx(0.021484375, abs=1e-15)
    for b, c in [(0, 5), (3, 7), (12, 30), (20, 20), (0, 1)]:
        n, k = b + c, min(b, c)
        expected = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12), (b, c)
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(UserInputError, match="discordant"):
        mcnemar_exact(-1, 3)


def test_holm_hand_checked():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, max(0.06, 1*0.04) -> back in input order
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2]) == [0.2]
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([]) == []


@pytest.mark.parametrize("n_resamples", [400, 999, 2000, 10_000])
def test_interval_excludes_zero_exactly_when_p_below_alpha(n_resamples):
    # B replicates with j of them <= 0 (and the rest > 0), for every j around the boundary
    for non_positive in range(0, int(0.06 * n_resamples)):
        values = np.concatenate([-np.ones(non_positive), np.linspace(0.1, 1.0, n_resamples - non_positive)])
        for sign in (1, -1):
            low, high = percentile_interval(sign * values)
            p = bootstrap_p_value(sign * values)
            assert (low > 0 or high < 0) == (p < 0.05), (n_resamples, non_positive, sign, low, high, p)


def test_interval_and_p_value_edge_cases():
    assert bootstrap_p_value(np.zeros(500)) == 1.0
    assert percentile_interval(np.zeros(500)) == [0.0, 0.0]
    assert bootstrap_p_value(np.ones(999)) == pytest.approx(2 / 1000)
    assert percentile_interval(np.full(50, 0.3)) == [None, None]  # too few defined replicates
    assert bootstrap_p_value(np.full(50, np.nan)) is None
    values = np.arange(1000.0)
    values[:10] = np.nan  # undefined replicates are left out
    assert percentile_interval(values) == percentile_interval(np.arange(10.0, 1000.0))


# --------------------------------------------------------------------------- the patient bootstrap


def _overlapping_predictions(skills: dict[str, float], n_folds=3, seed=0, n_pool=16, n_test=8):
    """Folds as ``split --folds`` makes them: each fold's test set is drawn from one pool of
    patients on its own, so a patient is in several folds' test sets (same images, but
    predicted by each fold's own model; a patient hard for one fold's model is hard for all)."""
    rng = np.random.default_rng(seed)
    pool = _fold_data(rng, "pool", n_patients=n_pool)
    difficulty = {name: rng.normal(0.0, 1.0, n_pool) for name in skills}
    out = {name: [] for name in skills}
    for fold in range(n_folds):
        # stratified: half the test patients from each class, so every fold has both
        malignant = np.flatnonzero(np.bincount(pool["patient_index"], weights=pool["y"]) > 0)
        benign = np.setdiff1d(np.arange(n_pool), malignant)
        chosen = np.r_[
            rng.choice(malignant, n_test // 2, replace=False), rng.choice(benign, n_test // 2, replace=False)
        ]
        rows = np.flatnonzero(np.isin(pool["patient_index"], chosen))
        y, index = pool["y"][rows], pool["patient_index"][rows]
        for name, skill in skills.items():
            p = _model_p(rng, y, index, skill + difficulty[name][index], patient_sd=0.3)
            out[name].append(FoldPredictions(fold, y, p, pool["patients"][rows], 0.5, pool["ids"][rows]))
    return out


def _hand_loop_bootstrap(preds: list[FoldPredictions], n_resamples: int, seed: int) -> dict[str, np.ndarray]:
    """An independent bootstrap in plain loops: the distinct patients of all folds (by id) drawn
    per class, each fold taking the drawn patients it holds; a fold that drew no patient of
    one of its classes is left out of that resample's mean."""
    rng = np.random.default_rng(seed)
    out = {"accuracy": [], "patient_accuracy": [], "roc_auc": []}
    by_class = {}
    for fp in preds:
        for patient, label in zip(np.asarray(fp.patients), np.asarray(fp.y_true), strict=True):
            by_class.setdefault(int(label), set()).add(str(patient))
    by_class = [sorted(members) for members in by_class.values()]
    for _ in range(n_resamples):
        drawn = [group[i] for group in by_class for i in rng.integers(0, len(group), len(group))]
        acc, pacc, auc = [], [], []
        for fp in preds:
            y, p, patients = np.asarray(fp.y_true), np.asarray(fp.p_malignant), np.asarray(fp.patients)
            pred = p >= fp.threshold
            groups = [np.flatnonzero(patients == q) for q in drawn if q in set(patients.tolist())]
            if not groups or set(y[np.concatenate(groups)].tolist()) != set(y.tolist()):
                continue
            rows = np.concatenate(groups)
            acc.append(np.mean(pred[rows] == y[rows]))
            pacc.append(np.mean([np.mean(pred[r] == y[r]) for r in groups]))
            # ROC AUC by its definition: malignant-benign image pairs ranked right, ties 1/2
            pos, neg = p[rows][y[rows] == 1], p[rows][y[rows] == 0]
            auc.append(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))
        out["accuracy"].append(np.mean(acc) if acc else np.nan)
        out["patient_accuracy"].append(np.mean(pacc) if pacc else np.nan)
        out["roc_auc"].append(np.mean(auc) if auc else np.nan)
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize(
    "make, overlapping",
    [
        (lambda: _predictions({"m": 0.8}, n_folds=2, seed=5, n_patients=14), False),
        (lambda: _overlapping_predictions({"m": 0.8}, n_folds=3, seed=5, n_pool=14, n_test=10), True),
    ],
    ids=["disjoint", "overlapping"],
)
@pytest.mark.slow  # a hand loop of bootstrap replicates (1 s each)
def test_patient_bootstrap_agrees_with_an_independent_hand_loop(make, overlapping):
    preds = make()
    n = 2000
    result = comparison_statistics(preds, StatsOptions(n_resamples=n, seed=1))
    entry = result["models"][0]
    patients = {str(q) for fp in preds["m"] for q in np.asarray(fp.patients)}
    assert result["statistics"]["distinct_patients"] == len(patients)
    assert (entry["n_patients"] > len(patients)) == overlapping  # test-patient slots over folds
    hand = _hand_loop_bootstrap(preds["m"], n, seed=2)
    for metric, replicates in hand.items():
        low, high = entry["ci95"][metric]
        hand_low, hand_high = np.nanpercentile(replicates, [2.5, 97.5])
        width = hand_high - hand_low
        assert width > 0.05  # a real interval, so the comparison means something
        # different random streams: the endpoints agree up to Monte Carlo error
        assert low == pytest.approx(hand_low, abs=0.08 * width), metric
        assert high == pytest.approx(hand_high, abs=0.08 * width), metric
        # both bootstraps centre on the reported mean
        assert np.nanmean(replicates) == pytest.approx(entry["mean"][metric], abs=0.05 * width), metric


def test_a_patient_in_two_identical_folds_is_one_patient():
    # fold 1 is fold 0 again (same patients, images and predictions): nothing new is learnt
    (fp,) = _predictions({"m": 0.8}, n_folds=1, seed=6, n_patients=14)["m"]
    single = comparison_statistics({"m": [fp]}, StatsOptions(n_resamples=2000, seed=3))
    twice = comparison_statistics({"m": [fp, _replace(fp, fold=1)]}, StatsOptions(n_resamples=2000, seed=3))
    assert twice["statistics"]["distinct_patients"] == single["statistics"]["distinct_patients"] == 14
    assert twice["models"][0]["n_patients"] == 28  # test-patient slots
    for metric in METRICS:
        # the same draws give the same patients to both folds: the same replicates exactly
        assert twice["models"][0]["ci95"][metric] == pytest.approx(single["models"][0]["ci95"][metric]), metric
    # resampling each fold's patients on its own (the old scheme) narrows the interval by ~sqrt(2)
    rng = np.random.default_rng(0)
    patients, ok = np.asarray(fp.patients), (np.asarray(fp.p_malignant) >= 0.5) == (np.asarray(fp.y_true) == 1)
    classes = [[ok[patients == q] for q in np.unique(patients[np.asarray(fp.y_true) == k])] for k in (0, 1)]

    def per_fold_draw():
        return np.concatenate([grp[i] for grp in classes for i in rng.integers(0, len(grp), len(grp))]).mean()

    old = [(per_fold_draw() + per_fold_draw()) / 2 for _ in range(2000)]
    old_width = np.subtract(*np.percentile(old, [97.5, 2.5]))
    low, high = twice["models"][0]["ci95"]["accuracy"]
    assert old_width < 0.85 * (high - low)


def test_patient_ci_is_wider_than_an_image_level_ci_when_a_patients_images_agree():
    # 20 patients x 20 images per fold; each patient entirely right or entirely wrong
    rng = np.random.default_rng(0)
    preds = {"m": []}
    right_all = []
    for fold in range(2):
        patient = np.repeat(np.arange(20), 20)
        y = (patient < 10).astype(int)
        right = (rng.random(20) < 0.75)[patient]
        p = np.where(right == (y == 1), 0.9, 0.1)
        preds["m"].append(FoldPredictions(fold, y, p, [f"{fold}-{q}" for q in patient], 0.5))
        right_all.append(right.astype(float))
    low, high = comparison_statistics(preds, StatsOptions(n_resamples=2000, seed=0))["models"][0]["ci95"]["accuracy"]

    def mean_over_folds(a, b, axis=-1):
        return (np.mean(a, axis=axis) + np.mean(b, axis=axis)) / 2

    image_level = scipy_bootstrap(
        tuple(right_all), mean_over_folds, n_resamples=2000, method="percentile", rng=np.random.default_rng(0)
    ).confidence_interval
    # design effect 1 + (20 - 1) * 1 = 20: about sqrt(20) = 4.5 times wider
    assert (high - low) > 3 * (image_level.high - image_level.low)


def test_mean_std_and_folds_come_from_classification_metrics():
    preds = _predictions({"a": 1.0, "b": 0.5}, n_folds=4, seed=2)
    result = comparison_statistics(preds, FAST)
    for entry in result["models"]:
        per_fold = [
            classification_metrics(fp.y_true, fp.p_malignant, fp.threshold, fp.patients) for fp in preds[entry["model"]]
        ]
        assert [f["fold"] for f in entry["folds"]] == [0, 1, 2, 3]
        assert [f["n"] for f in entry["folds"]] == [r["n"] for r in per_fold]
        for metric in METRICS:
            values = [r[metric] for r in per_fold]
            assert [f[metric] for f in entry["folds"]] == values
            assert entry["mean"][metric] == pytest.approx(np.mean(values))
            assert entry["std"][metric] == pytest.approx(np.std(values, ddof=1))
            low, high = entry["ci95"][metric]
            assert low <= entry["mean"][metric] <= high, metric
    pair = result["pairwise"][0]
    means = [entry["mean"]["accuracy"] for entry in result["models"]]
    assert pair["accuracy_diff"] == pytest.approx(means[0] - means[1])


def test_one_class_fold_leaves_roc_auc_out_of_that_fold_only():
    preds = _predictions({"a": 1.0, "b": 0.7}, n_folds=3, seed=4)
    # fold 2 keeps only its malignant patients
    for name in preds:
        fp = preds[name][2]
        keep = np.asarray(fp.y_true) == 1
        preds[name][2] = FoldPredictions(
            2,
            np.asarray(fp.y_true)[keep],
            np.asarray(fp.p_malignant)[keep],
            np.asarray(fp.patients)[keep],
            0.5,
            np.asarray(fp.image_ids)[keep],
        )
    result = comparison_statistics(preds, FAST)
    json.dumps(result, allow_nan=False)
    entry = result["models"][0]
    aucs = [f["roc_auc"] for f in entry["folds"]]
    assert aucs[2] is None and None not in aucs[:2]
    assert entry["mean"]["roc_auc"] == pytest.approx(np.mean(aucs[:2]))
    assert entry["std"]["roc_auc"] == pytest.approx(np.std(aucs[:2], ddof=1))
    low, high = entry["ci95"]["roc_auc"]
    assert low is not None and low <= entry["mean"]["roc_auc"] <= high
    assert entry["folds"][2]["benign_recall"] == 0.0  # sklearn's zero_division=0, as evaluate reports it


def test_metric_undefined_in_every_fold_is_none_everywhere():
    preds = _predictions({"a": 1.0}, n_folds=2, seed=4, malignant_share=1.0)
    result = comparison_statistics(preds, FAST)
    json.dumps(result, allow_nan=False)
    entry = result["models"][0]
    assert entry["mean"]["roc_auc"] is None and entry["std"]["roc_auc"] is None
    assert entry["ci95"]["roc_auc"] == [None, None]
    assert entry["mean"]["accuracy"] is not None
    assert "| a | " in markdown_report(result) and "n/a" in markdown_report(result)


def test_a_fold_whose_resample_lacks_a_class_is_left_out_for_both_models():
    # fold 0: patients A, C benign and B, D malignant, both models right everywhere;
    # fold 1: only A and B, model a right and model b wrong on every image -> difference 1
    def fold(number, patients, b_right):
        y = np.array([0 if q in "AC" else 1 for q in patients])
        right = {"a": np.ones(y.size, bool), "b": np.full(y.size, b_right)}
        return {
            m: FoldPredictions(number, y, np.where(r == (y == 1), 0.9, 0.1), list(patients), 0.5)
            for m, r in right.items()
        }

    folds = [fold(0, "AABBCCDD", True), fold(1, "AABB", False)]
    preds = {m: [f[m] for f in folds] for m in ("a", "b")}
    _, per_pair, _, n_distinct = _bootstrap_distribution(_align(preds), ["a", "b"], [("a", "b")], FAST)
    replicates = per_pair["a", "b"]
    assert n_distinct == 4
    # fold 1 drew A and B: mean of 0 and 1; it missed one: fold 0 alone (never NaN, never 1)
    assert set(np.unique(replicates).tolist()) == {0.0, 0.5}
    assert np.mean(replicates == 0.0) == pytest.approx(1 - 0.75**2, abs=0.08)  # P(A or B not drawn)


def test_single_patient_class_is_kept_fixed_and_noted():
    preds = _predictions({"a": 1.0, "b": 0.5}, n_folds=2, seed=1, n_patients=6, malignant_share=5 / 6)
    for folds in preds.values():  # both folds' benign patient is the same patient
        for k, fp in enumerate(folds):
            patients = np.where(np.asarray(fp.y_true) == 0, "benign-patient", np.asarray(fp.patients))
            folds[k] = _replace(fp, patients=patients)
    result = comparison_statistics(preds, FAST)
    assert result["statistics"]["notes"] == [
        "the benign class has 1 distinct test patient; it is kept in every resample"
    ]
    assert result["statistics"]["distinct_patients"] == 11
    low, high = result["models"][0]["ci95"]["accuracy"]
    assert low < high  # the malignant patients still vary


def test_nothing_to_resample_gives_a_point_interval():
    # one patient per class, in both folds: no group can vary
    preds = _predictions({"a": 1.0, "b": 0.0}, n_folds=1, seed=1, n_patients=2, malignant_share=0.5)
    preds = {m: [fp, _replace(fp, fold=1, p_malignant=np.asarray(fp.p_malignant)[::-1])] for m, (fp,) in preds.items()}
    result = comparison_statistics(preds, FAST)
    entry = result["models"][0]
    assert entry["ci95"]["accuracy"] == [pytest.approx(entry["mean"]["accuracy"])] * 2
    assert len(result["statistics"]["notes"]) == 2 and result["statistics"]["distinct_patients"] == 2


# --------------------------------------------------------------------------- pairwise


def test_identical_models_differ_by_zero_and_are_not_significant():
    preds = _predictions({"a": 0.8}, n_folds=3, seed=0)
    preds["copy"] = list(preds["a"])
    result = comparison_statistics(preds, FAST)
    (pair,) = result["pairwise"]
    assert (pair["a"], pair["b"]) == ("a", "copy")
    assert pair["accuracy_diff"] == 0.0 and pair["ci95"] == [0.0, 0.0]
    assert pair["p_value"] == 1.0 and pair["p_value_holm"] == 1.0
    assert pair["significant"] is False and pair["significant_unadjusted"] is False
    assert pair["mcnemar"] == {"a_right_b_wrong": 0, "a_wrong_b_right": 0, "p_value": 1.0}
    assert "| a | copy | +0.000 | [+0.000, +0.000] | 1.000 | 1.000 | not significant |" in markdown_report(result)


def test_clearly_better_model_is_significant():
    preds = _predictions({"weak": -0.2, "strong": 3.0}, n_folds=3, seed=0)
    result = comparison_statistics(preds, FAST)
    (pair,) = result["pairwise"]
    assert (pair["a"], pair["b"]) == ("weak", "strong")
    assert pair["accuracy_diff"] < -0.2
    assert pair["ci95"][1] < 0
    assert pair["p_value"] == pytest.approx(2 / 401)  # no replicate on the other side of 0
    assert pair["significant"] is True
    assert pair["mcnemar"]["a_wrong_b_right"] > pair["mcnemar"]["a_right_b_wrong"]
    assert pair["mcnemar"]["p_value"] < 1e-6
    assert "significant (strong better)" in markdown_report(result)


def test_mcnemar_pools_discordant_pairs_over_folds():
    # fold 0: b=1, c=4; fold 1: b=0, c=5 -> pooled b=1, c=9 -> 0.021484375
    preds = {"a": [], "b": []}
    for fold, (b_count, c_count) in enumerate([(1, 4), (0, 5)]):
        n = 30
        y = np.tile([0, 1], n // 2)
        a_right = np.ones(n, bool)
        b_right = np.ones(n, bool)
        a_right[:c_count] = False  # a wrong, b right
        b_right[c_count : c_count + b_count] = False  # a right, b wrong
        a_right[-2:] = b_right[-2:] = False  # concordant errors do not count
        to_p = lambda right, y=y: np.where(right == (y == 1), 0.8, 0.2)  # noqa: E731 (a one-line helper per fold)
        patients = [f"{fold}-{i % 10}" for i in range(n)]
        preds["a"].append(FoldPredictions(fold, y, to_p(a_right), patients, 0.5))
        preds["b"].append(FoldPredictions(fold, y, to_p(b_right), patients, 0.5))
    (pair,) = comparison_statistics(preds, FAST)["pairwise"]
    assert pair["mcnemar"] == {"a_right_b_wrong": 1, "a_wrong_b_right": 9, "p_value": pytest.approx(0.021484375)}
    assert pair["fold_accuracy_diffs"] == pytest.approx([-3 / 30, -5 / 30])


@pytest.mark.parametrize("overlapping", [False, True], ids=["disjoint", "overlapping"])
@pytest.mark.slow  # bootstraps of random comparisons (0.5-0.65 s each)
def test_ci_and_p_value_agree_on_random_comparisons(overlapping):
    seen = set()
    for seed in range(12):
        skills = {"a": 0.6, "b": 0.6 + 0.08 * seed}
        if overlapping:
            preds = _overlapping_predictions(skills, n_folds=3, seed=seed, n_pool=12, n_test=8)
        else:
            preds = _predictions(skills, n_folds=2, seed=seed, n_patients=10)
        (pair,) = comparison_statistics(preds, StatsOptions(n_resamples=400, seed=seed))["pairwise"]
        low, high = pair["ci95"]
        excludes_zero = low > 0 or high < 0
        assert excludes_zero == (pair["p_value"] < 0.05) == pair["significant_unadjusted"]
        assert pair["significant"] == pair["significant_unadjusted"]  # one pair: Holm changes nothing
        seen.add(excludes_zero)
    assert seen == {True, False}  # both outcomes were exercised


def test_three_models_holm_adjusts_the_pairs():
    preds = _predictions({"a": 0.8, "b": 1.0, "c": 1.6}, n_folds=3, seed=7)
    result = comparison_statistics(preds, FAST)
    pairs = result["pairwise"]
    assert [(p["a"], p["b"]) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert [p["p_value_holm"] for p in pairs] == holm([p["p_value"] for p in pairs])
    for p in pairs:
        assert p["significant"] == (p["p_value_holm"] < 0.05)
        assert p["significant_unadjusted"] == (p["p_value"] < 0.05)
        assert p["p_value_holm"] >= p["p_value"]
    assert result["statistics"]["multiple_comparisons"].startswith("holm over 3 pairs")


def test_markdown_says_when_only_holm_makes_it_not_significant():
    doc = {
        "models": [],
        "pairwise": [
            {
                "a": "x",
                "b": "y",
                "accuracy_diff": 0.03,
                "ci95": [0.001, 0.06],
                "p_value": 0.04,
                "p_value_holm": 0.08,
                "significant": False,
                "significant_unadjusted": True,
            }
        ],
    }
    row = "| x | y | +0.030 | [+0.001, +0.060] | 0.040 | 0.080 | not significant after Holm correction |"
    assert row in markdown_report(doc)


# --------------------------------------------------------------------------- pairing and input checks


def _replace(fp: FoldPredictions, **changes) -> FoldPredictions:
    fields = dict(
        fold=fp.fold,
        y_true=fp.y_true,
        p_malignant=fp.p_malignant,
        patients=fp.patients,
        threshold=fp.threshold,
        image_ids=fp.image_ids,
    )
    fields.update(changes)
    return FoldPredictions(**fields)


def test_shuffled_rows_are_paired_by_image_id():
    preds = _predictions({"a": 0.8, "b": 1.2}, n_folds=2, seed=3)
    order = np.random.default_rng(0).permutation(len(preds["b"][0].y_true))
    shuffled = dict(preds)
    fp = preds["b"][0]
    shuffled["b"] = [
        _replace(
            fp,
            y_true=np.asarray(fp.y_true)[order],
            p_malignant=np.asarray(fp.p_malignant)[order],
            patients=np.asarray(fp.patients)[order],
            image_ids=np.asarray(fp.image_ids)[order],
        ),
        preds["b"][1],
    ]
    assert comparison_statistics(shuffled, FAST) == comparison_statistics(preds, FAST)


def test_rows_are_paired_by_order_without_image_ids():
    preds = _predictions({"a": 0.8, "b": 1.2}, n_folds=2, seed=3)
    without_ids = {m: [_replace(fp, image_ids=None) for fp in folds] for m, folds in preds.items()}
    assert comparison_statistics(without_ids, FAST) == comparison_statistics(preds, FAST)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            lambda fp: _replace(fp, image_ids=np.r_[np.asarray(fp.image_ids)[:-1], ["elsewhere.png"]]),
            r"fold 0: models 'a' and 'b' did not predict the same test images "
            r"\(2 image ids differ, e.g. 'elsewhere.png'\)",
        ),
        (lambda fp: _replace(fp, y_true=1 - np.asarray(fp.y_true)), "disagree on the true labels"),
        (lambda fp: _replace(fp, patients=np.roll(np.asarray(fp.patients), 3)), "disagree on the patients"),
        (lambda fp: _replace(fp, image_ids=None), "one has image_ids and the other not"),
        (
            lambda fp: _replace(fp, image_ids=np.r_[np.asarray(fp.image_ids)[:-1], np.asarray(fp.image_ids)[:1]]),
            "model 'b' fold 0: image_ids are not unique",
        ),
        (
            lambda fp: _replace(fp, p_malignant=np.asarray(fp.p_malignant) + 1.0),
            r"model 'b' fold 0: p_malignant must be",
        ),
        (lambda fp: _replace(fp, p_malignant=np.asarray(fp.p_malignant)[:-1]), "y_true has .* but p_malignant has"),
        (lambda fp: _replace(fp, threshold=1.5), "threshold must be in"),
        (lambda fp: _replace(fp, y_true=np.full(len(fp.y_true), 2)), "labels must be 0"),
    ],
)
def test_pairing_and_value_errors_name_the_problem(break_it, message):
    preds = _predictions({"a": 0.8, "b": 1.2}, n_folds=2, seed=3)
    preds["b"][0] = break_it(preds["b"][0])
    with pytest.raises(UserInputError, match=message):
        comparison_statistics(preds, FAST)


def test_fold_set_errors():
    preds = _predictions({"a": 0.8, "b": 1.2}, n_folds=2, seed=3)
    with pytest.raises(UserInputError, match=r"not paired: 'a' has folds \[0, 1\], 'b' has folds \[0\]"):
        comparison_statistics({"a": preds["a"], "b": preds["b"][:1]}, FAST)
    with pytest.raises(UserInputError, match="lists fold 0 twice"):
        comparison_statistics({"a": [preds["a"][0], preds["a"][0]]}, FAST)
    with pytest.raises(UserInputError, match="model 'a' has no folds"):
        comparison_statistics({"a": []}, FAST)
    with pytest.raises(UserInputError, match="no models"):
        comparison_statistics({}, FAST)
    without_ids = [_replace(fp, image_ids=None) for fp in preds["b"]]
    first = without_ids[0]
    short = _replace(
        first,
        y_true=np.asarray(first.y_true)[:-1],
        p_malignant=np.asarray(first.p_malignant)[:-1],
        patients=np.asarray(first.patients)[:-1],
    )
    a_without_ids = [_replace(fp, image_ids=None) for fp in preds["a"]]
    with pytest.raises(UserInputError, match="paired by row order"):
        comparison_statistics({"a": a_without_ids, "b": [short, without_ids[1]]}, FAST)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_resamples": 99}, "n_resamples must be an integer >= 100"),
        ({"n_resamples": 1000.0}, "n_resamples"),
        ({"seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_options_are_checked(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        StatsOptions(**kwargs)


# --------------------------------------------------------------------------- determinism and the contract


def test_same_seed_same_numbers_other_seed_other_intervals():
    preds = _predictions({"a": 0.8, "b": 1.2}, n_folds=2, seed=3)
    first = comparison_statistics(preds, StatsOptions(n_resamples=1500, seed=11))  # crosses a batch boundary
    assert comparison_statistics(preds, StatsOptions(n_resamples=1500, seed=11)) == first
    other = comparison_statistics(preds, StatsOptions(n_resamples=1500, seed=12))
    assert other["models"][0]["ci95"] != first["models"][0]["ci95"]
    assert other["models"][0]["mean"] == first["models"][0]["mean"]  # only the bootstrap is random


def test_output_follows_the_compare_json_contract():
    preds = _predictions({"custom": 0.8, "vgg16": 1.0, "resnet50": 1.1}, n_folds=2, seed=0)
    result = comparison_statistics(preds, FAST)
    text = json.dumps(result, allow_nan=False)  # no NaN anywhere
    assert json.loads(text) == result
    assert [m["model"] for m in result["models"]] == ["custom", "vgg16", "resnet50"]
    fold_keys = {"fold", "n", "accuracy", "patient_accuracy", "precision", "recall", "f1", "benign_recall", "roc_auc"}
    for entry in result["models"]:
        assert {"model", "folds", "mean", "std", "ci95"} <= set(entry)
        for fold in entry["folds"]:
            assert fold_keys <= set(fold)
        for key in ("mean", "std", "ci95"):
            assert set(entry[key]) == fold_keys - {"fold", "n"}
        assert all(isinstance(v, list) and len(v) == 2 for v in entry["ci95"].values())
    for pair in result["pairwise"]:
        assert {"a", "b", "accuracy_diff", "ci95", "p_value", "significant"} <= set(pair)
        assert isinstance(pair["significant"], bool) and len(pair["ci95"]) == 2
    assert result["statistics"]["n_resamples"] == 400 and result["statistics"]["seed"] == 0
    assert result["statistics"]["std_ddof"] == 1
    assert result["statistics"]["distinct_patients"] == sum(m["n_patients"] for m in result["models"][:1])


def test_markdown_report_tables():
    preds = _predictions({"custom": 0.8, "vgg16": 1.0}, n_folds=3, seed=0)
    result = comparison_statistics(preds, FAST)
    result["models"][0].update(params_total=319330, size_kb=1254.2, latency_ms_p50=0.25, train_seconds=61.0)
    text = markdown_report(result)
    entry = result["models"][0]
    mean, std, (low, high) = entry["mean"]["accuracy"], entry["std"]["accuracy"], entry["ci95"]["accuracy"]
    assert f"| custom | {mean:.3f} ± {std:.3f} [{low:.3f}, {high:.3f}] |" in text
    assert "Mean ± std over 3 patient-wise folds" in text
    assert "| Model | Parameters | Size (KB) | Latency p50 (ms) | Train time per fold (s) |" in text
    assert "| custom | 319,330 | 1,254 | 0.25 | 61 |" in text
    assert "| vgg16 | n/a | n/a | n/a | n/a |" in text
    assert "400 resamples, seed 0" in text


def test_numpy_integers_are_accepted_as_options():
    assert StatsOptions(n_resamples=np.int64(200), seed=np.int32(3)).n_resamples == 200


def test_a_patient_with_both_labels_forms_its_own_group():
    preds = _predictions({"a": 1.0}, n_folds=1, seed=2, n_patients=8)
    fp = preds["a"][0]
    patients = np.asarray(fp.patients).copy()
    y = np.asarray(fp.y_true)
    # the first benign and the first malignant image now belong to one new patient
    patients[[np.flatnonzero(y == 0)[0], np.flatnonzero(y == 1)[0]]] = "both"
    result = comparison_statistics({"a": [_replace(fp, patients=patients)]}, FAST)
    assert result["statistics"]["notes"] == [
        "the mixed-label class has 1 distinct test patient; it is kept in every resample"
    ]
    assert result["models"][0]["n_patients"] == 9

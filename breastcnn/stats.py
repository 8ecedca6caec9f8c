"""Statistics for comparing models over patient-wise folds (the core of ``breastcnn compare``).

Input: for every model and every fold, that fold's test predictions
(:class:`FoldPredictions`: labels, P(malignant), patient ids, image ids, the
threshold). Output (:func:`comparison_statistics`): the ``models`` and
``pairwise`` entries of the ``compare.json`` contract, plus a ``statistics``
block that records how they were computed. :func:`markdown_report` renders
them as paper-ready tables. No I/O, no training code.

How the numbers are made, and why
---------------------------------
Per fold, every metric comes from :func:`breastcnn.metrics.classification_metrics`
(scikit-learn), exactly as ``evaluate`` reports it. ``mean`` is the plain mean
over folds; ``std`` is the sample standard deviation over folds (``ddof=1``):
the K folds are a sample of the splits one could have drawn, and ``ddof=0``
would understate the spread by ``sqrt((K-1)/K)`` (0.89 at K=5). A metric that
is undefined in a fold (ROC AUC on a one-class test set) is left out of that
fold's mean, std and bootstrap alike; ``None`` when undefined in every fold.

``ci95`` (per model and metric) is a **stratified patient bootstrap**. Images of
one patient come from the same slides and are strongly correlated, so the
unit of resampling is the patient. The ``split --folds`` protocol (Spanhol et
al.) draws K independent 70/30 patient-wise splits, so the folds' test sets
**overlap**: one patient can be in the test set of several folds. A patient is
therefore one unit however many folds it is in: patients are identified across
folds by id, and each resample draws the *distinct* patients with replacement,
separately within each class (benign, malignant; a patient with both labels
would form a third group), keeping the number of distinct patients of each
class. Every fold the patient is in gets the patient's multiplicity: every image
of a drawn patient comes along in each of those folds, and a patient drawn twice
counts twice (also in ``patient_accuracy``). Resampling each fold's patients on
their own instead would treat a patient's repeated appearances as independent
and make the intervals too narrow (with K identical folds, by about sqrt(K)); with
disjoint folds the two schemes differ only in that a fold's class counts vary
from resample to resample here. On each resample the metric is recomputed per
fold and averaged over folds, which is the same statistic as the reported
``mean``, so the interval brackets it (pooling the resampled images of all folds
into one metric would estimate a different quantity: for ROC AUC or precision it
would mix the scores of K differently calibrated models, and weigh folds by their
size). A fold whose share of a resample lacks a class its test set has (or has
no patient at all, which happens when few of its patients are drawn) is left out
of that resample's mean, for every metric and model alike; such resamples are
rare at BreakHis sizes. The interval is the percentile interval read from order
statistics (see :func:`percentile_interval`). A class with a single distinct
patient cannot vary and is kept fixed; ``statistics.notes`` says so.
``statistics.distinct_patients`` is the number of distinct patients resampled.

``pairwise``: the models predict the same test images (checked: same image ids
per fold, same labels and patients). ``accuracy_diff`` is a minus b, mean over
folds. Its ``ci95`` comes from a **paired** patient bootstrap (the same
resampled patients for both models, from the same resamples as the per-model
intervals; a fold left out of a resample is left out for both), and ``p_value``
from inverting that interval (:func:`bootstrap_p_value`): ``ci95`` excludes 0
exactly when ``p_value < 0.05``. We do not make exact McNemar the headline test,
because it counts every image as an independent trial: with ~400 images from
~16-25 patients per fold, images of a patient tend to be right or wrong together,
so McNemar's p-values are too small. It is still reported (``mcnemar``: image-level
discordant counts pooled over folds, one exact two-sided binomial test; pooling
keeps the direction, which combining per-fold two-sided p-values would lose) for
comparison with the literature only. Because the folds' test sets overlap, an
image in the test set of several folds is counted once per fold (each time as
predicted by that fold's model), which makes McNemar more optimistic still. A
paired t-test over folds was not chosen either: K-1 = 4 degrees of freedom, and
the folds' training sets overlap so their differences are correlated (the
Nadeau-Bengio correction is a heuristic for that, needs the training-set sizes,
and leaves very little power at K=5).

Multiple comparisons: with M models there are M(M-1)/2 pairs. ``p_value`` is
per comparison; ``p_value_holm`` is Holm-adjusted over the pairs (family-wise
error 0.05) and ``significant`` is ``p_value_holm < 0.05``; ``significant_unadjusted``
is ``p_value < 0.05`` (what ``ci95`` says). With two models they agree.

Scope: every interval and p-value here is conditional on the K trained models.
It says how sure we can be about these networks on patients like these test
patients, not how a network retrained with another seed or split would do; the
fold ``std`` shows that training spread.

Speed: the bootstrap recomputes 7 metrics per fold, model and resample
(10,000 resamples x 5 folds x 3 models = 1.05 million metric evaluations), far
too many for scikit-learn's per-call overhead (~10 ms). :class:`_FoldScorer`
therefore computes them for all resamples at once from per-patient counts; it
reproduces ``classification_metrics`` on the expanded resampled images to
rounding error (tested on random resamples).
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import DegenerateDataWarning, binomtest, bootstrap

from breastcnn.errors import UserInputError
from breastcnn.metrics import classification_metrics

METRICS = ("accuracy", "patient_accuracy", "precision", "recall", "f1", "benign_recall", "roc_auc")
"""The metrics summarised per model (``mean``/``std``/``ci95`` keys; ``folds`` adds ``fold`` and ``n``)."""

ALPHA = 0.05
"""Significance level; ``ci95`` is the matching 1 - ALPHA interval."""

STD_DDOF = 1
"""Delta degrees of freedom of the ``std`` over folds (sample standard deviation)."""

MIN_RESAMPLES = 100

_BATCH = 1_000
"""Resamples per vectorised call. It bounds memory, and it is part of the random
stream (scipy draws batch by batch): changing it changes the intervals for a seed."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class StatsOptions:
    """Settings of the bootstrap. ``seed`` is the command's ``--seed``."""

    n_resamples: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.n_resamples) or self.n_resamples < MIN_RESAMPLES:
            raise UserInputError(f"n_resamples must be an integer >= {MIN_RESAMPLES}, got {self.n_resamples!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise UserInputError(f"seed must be a non-negative integer, got {self.seed!r}")


@dataclass(frozen=True)
class FoldPredictions:
    """One model's predictions on one fold's test subset.

    Args:
        fold: fold number (the same numbers for every model).
        y_true: ``(N,)`` labels, 0 benign / 1 malignant.
        p_malignant: ``(N,)`` P(malignant).
        patients: ``(N,)`` patient id of each image.
        threshold: predict malignant when ``p >= threshold`` (as ``classification_metrics``).
        image_ids: ``(N,)`` unique image ids used to pair models' predictions;
            ``None`` pairs them by row order instead.
    """

    fold: int
    y_true: Sequence[int] | np.ndarray
    p_malignant: Sequence[float] | np.ndarray
    patients: Sequence[str] | np.ndarray
    threshold: float
    image_ids: Sequence[str] | np.ndarray | None = None


# --------------------------------------------------------------------------- small exact pieces


def mcnemar_exact(a_right_b_wrong: int, a_wrong_b_right: int) -> float:
    """Exact two-sided McNemar p-value: binomial test of the discordant pairs at 1/2.

    ``b = a_right_b_wrong``, ``c = a_wrong_b_right``; p = P(|X - n/2| >= |b - n/2|),
    X ~ Bin(b + c, 1/2) (``scipy.stats.binomtest``). 1.0 when there is no discordant pair.
    """
    b, c = int(a_right_b_wrong), int(a_wrong_b_right)
    if b < 0 or c < 0:
        raise UserInputError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error), in the input order.

    Sorted ascending, the i-th (0-based) of m p-values is multiplied by m - i;
    a running maximum keeps the adjusted values monotone; capped at 1.
    """
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (p.size - np.arange(p.size)) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return [float(v) for v in adjusted]


def _tail_count(n_resamples: int) -> int:
    """Replicates trimmed from each tail of the percentile interval.

    The largest k with 2 (k + 1) / (B + 1) < ALPHA, so that the interval
    (order statistics k and B-1-k) excludes 0 exactly when
    :func:`bootstrap_p_value` < ALPHA. B = 10,000 -> k = 249 (2.49% per tail).
    """
    return math.ceil(ALPHA * (n_resamples + 1) / 2) - 2


def percentile_interval(replicates: np.ndarray) -> list[float | None]:
    """95% percentile interval ``[low, high]`` of bootstrap replicates (NaN ignored).

    ``[sorted[k], sorted[B-1-k]]`` with k from :func:`_tail_count` (about 2.5% of
    B per tail; Davison & Hinkley 1997, sec. 5.2). ``[None, None]`` when fewer than
    MIN_RESAMPLES replicates are defined.
    """
    values = np.sort(np.asarray(replicates, dtype=np.float64)[np.isfinite(replicates)])
    if values.size < MIN_RESAMPLES:
        return [None, None]
    k = _tail_count(values.size)
    return [float(values[k]), float(values[values.size - 1 - k])]


def bootstrap_p_value(replicates: np.ndarray) -> float | None:
    """Two-sided bootstrap p-value of "the statistic is 0", by inverting the percentile interval.

    p = min(1, 2 (min(#{T* <= 0}, #{T* >= 0}) + 1) / (B + 1)): the smallest level at
    which the percentile interval excludes 0, with the +1 that keeps a p-value
    from being 0 after finitely many resamples (Davison & Hinkley 1997, sec. 4.4).
    Identical models (all replicates 0) give 1.
    """
    values = np.asarray(replicates, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < MIN_RESAMPLES:
        return None
    tail = min(int(np.sum(values <= 0)), int(np.sum(values >= 0)))
    return float(min(1.0, 2.0 * (tail + 1) / (values.size + 1)))


# --------------------------------------------------------------------------- metrics for many resamples at once


class _FoldScorer:
    """The :data:`METRICS` of one model on one fold, for many patient resamples at once.

    A resample is given as patient multiplicities ``M`` ``(R, P)``: how often each
    of the fold's P patients was drawn. Every count the metrics need is a sum over
    images, hence ``M @ (per-patient counts)``; ROC AUC is the Mann-Whitney
    statistic, ``sum_pq M_p S_pq M_q / (n_pos n_neg)`` with ``S_pq`` the (malignant
    image of patient p, benign image of patient q) pairs ranked right (ties 1/2).
    Same definitions and zero-division rules as ``classification_metrics``.
    """

    def __init__(self, y: np.ndarray, p: np.ndarray, threshold: float, patient_index: np.ndarray, n_patients: int):
        pred = p >= threshold
        pos, neg = y == 1, y == 0

        def per_patient(mask: np.ndarray) -> np.ndarray:
            return np.bincount(patient_index, weights=mask, minlength=n_patients)

        # (P, 4) counts per patient: true positives, false positives, false negatives, true negatives
        self.counts = np.stack(
            [per_patient(pred & pos), per_patient(pred & neg), per_patient(~pred & pos), per_patient(~pred & neg)],
            axis=1,
        )
        images = per_patient(np.ones_like(y, dtype=bool))
        self.patient_share_right = per_patient(pred == pos) / images
        self.positives = per_patient(pos)
        self.negatives = per_patient(neg)
        # (P, P) pairs ranked right; (n_pos, n_neg) pair matrix is fine for fold-sized test sets
        ranked = (p[pos][:, None] > p[neg][None, :]) + 0.5 * (p[pos][:, None] == p[neg][None, :])
        onehot = np.eye(n_patients)[patient_index]
        self.pairs_right = onehot[pos].T @ ranked @ onehot[neg]

    def scores(self, multiplicity: np.ndarray) -> dict[str, np.ndarray]:
        """``multiplicity`` ``(R, P)`` -> {metric: ``(R,)``}; NaN where undefined (ROC AUC, one class)."""
        m = multiplicity.astype(np.float64)
        tp, fp, fn, tn = (m @ self.counts).T
        n_pos, n_neg = m @ self.positives, m @ self.negatives
        auc_pairs = np.einsum("rp,pq,rq->r", m, self.pairs_right, m)
        return {
            "accuracy": (tp + tn) / (tp + fp + fn + tn),
            "patient_accuracy": (m @ self.patient_share_right) / m.sum(axis=1),
            "precision": _ratio(tp, tp + fp, 0.0),
            "recall": _ratio(tp, tp + fn, 0.0),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn, 0.0),
            "benign_recall": _ratio(tn, tn + fp, 0.0),
            "roc_auc": _ratio(auc_pairs, n_pos * n_neg, np.nan),
        }


def _ratio(numerator: np.ndarray, denominator: np.ndarray, undefined: float) -> np.ndarray:
    out = np.full(np.shape(numerator), undefined, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _mean_over_defined(values: np.ndarray) -> np.ndarray:
    """``(K, R)`` -> ``(R,)`` mean over folds that are not NaN; NaN where none is."""
    defined = np.isfinite(values)
    count = defined.sum(axis=0)
    total = np.where(defined, values, 0.0).sum(axis=0)
    return _ratio(total, count, np.nan)


# --------------------------------------------------------------------------- input checks and pairing


@dataclass
class _Fold:
    """One fold's test set, aligned across models (row i is the same image for every model)."""

    fold: int
    y: np.ndarray  # (N,) int64
    patients: np.ndarray  # (N,) str
    patient_index: np.ndarray  # (N,) int64 in [0, P)
    patient_ids: np.ndarray  # (P,) str
    p: dict[str, np.ndarray]  # model -> (N,) P(malignant)
    threshold: dict[str, float]


def _as_arrays(model: str, fp: FoldPredictions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    where = f"model {model!r} fold {fp.fold}"
    y = np.asarray(fp.y_true).ravel()
    p = np.asarray(fp.p_malignant, dtype=np.float64).ravel()
    patients = np.asarray([str(v) for v in np.asarray(fp.patients).ravel()])
    ids = None if fp.image_ids is None else np.asarray([str(v) for v in np.asarray(fp.image_ids).ravel()])
    if y.size == 0:
        raise UserInputError(f"{where}: no test predictions")
    for name, arr in (("p_malignant", p), ("patients", patients)) + ((("image_ids", ids),) if ids is not None else ()):
        if arr.shape != y.shape:
            raise UserInputError(f"{where}: y_true has {y.size} labels but {name} has {arr.size} entries")
    if not np.isin(y, (0, 1)).all():
        raise UserInputError(f"{where}: labels must be 0 (benign) or 1 (malignant), got {sorted(set(y.tolist()))}")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise UserInputError(f"{where}: p_malignant must be probabilities in [0, 1]")
    if not 0.0 <= float(fp.threshold) <= 1.0:
        raise UserInputError(f"{where}: threshold must be in [0, 1], got {fp.threshold}")
    if ids is not None and np.unique(ids).size != ids.size:
        raise UserInputError(f"{where}: image_ids are not unique")
    return y.astype(np.int64), p, patients, ids


def _fold_numbers(predictions: Mapping[str, Sequence[FoldPredictions]]) -> dict[str, list[int]]:
    """``{model: its fold numbers}``, checked: every model has folds, none twice, all the same set."""
    fold_sets = {}
    for model, folds in predictions.items():
        numbers = [int(fp.fold) for fp in folds]
        if not numbers:
            raise UserInputError(f"model {model!r} has no folds")
        if len(set(numbers)) != len(numbers):
            twice = sorted(n for n in numbers if numbers.count(n) > 1)[0]
            raise UserInputError(f"model {model!r} lists fold {twice} twice")
        fold_sets[model] = numbers
    reference = next(iter(fold_sets))
    for model, numbers in fold_sets.items():
        if sorted(numbers) != sorted(fold_sets[reference]):
            raise UserInputError(
                f"models are not paired: {reference!r} has folds {sorted(fold_sets[reference])}, "
                f"{model!r} has folds {sorted(numbers)}"
            )
    return fold_sets


def _paired_probabilities(where: str, reference: tuple, other: tuple) -> np.ndarray:
    """``other``'s p_malignant in the reference's row order, after checking both predicted the same images.

    ``reference``: ``(y, patients, image_ids or None)``; ``other``: :func:`_as_arrays` of the other model.
    Rows pair by image id when both give ids, else by row order.
    """
    y, patients, ids = reference
    y_m, p_m, patients_m, ids_m = other
    if (ids is None) != (ids_m is None):
        raise UserInputError(f"{where}: one has image_ids and the other not; give image_ids for every model")
    if ids is not None:
        if ids_m.size != ids.size or not np.array_equal(np.sort(ids_m), np.sort(ids)):
            only = sorted(set(ids.tolist()) ^ set(ids_m.tolist()))
            raise UserInputError(
                f"{where} did not predict the same test images ({len(only)} image ids differ, e.g. {only[0]!r})"
            )
        position = {image: i for i, image in enumerate(ids_m.tolist())}
        order = np.array([position[image] for image in ids.tolist()])
        y_m, p_m, patients_m = y_m[order], p_m[order], patients_m[order]
    elif y_m.size != y.size:
        raise UserInputError(f"{where} have {y.size} and {y_m.size} test predictions (paired by row order)")
    if not np.array_equal(y_m, y):
        raise UserInputError(f"{where} disagree on the true labels of the same images")
    if not np.array_equal(patients_m, patients):
        raise UserInputError(f"{where} disagree on the patients of the same images")
    return p_m


def _align(predictions: Mapping[str, Sequence[FoldPredictions]]) -> list[_Fold]:
    """Check that every model predicted the same images in the same folds; rows aligned to the first model."""
    if not predictions:
        raise UserInputError("no models to compare")
    models = list(predictions)
    fold_sets = _fold_numbers(predictions)
    reference = models[0]

    folds = []
    for number in sorted(fold_sets[reference]):
        by_model = {m: next(fp for fp in predictions[m] if int(fp.fold) == number) for m in models}
        y, p_ref, patients, ids = _as_arrays(reference, by_model[reference])
        p = {reference: p_ref}
        for model in models[1:]:
            where = f"fold {number}: models {reference!r} and {model!r}"
            p[model] = _paired_probabilities(where, (y, patients, ids), _as_arrays(model, by_model[model]))
        patient_ids, patient_index = np.unique(patients, return_inverse=True)
        folds.append(
            _Fold(
                fold=number,
                y=y,
                patients=patients,
                patient_index=patient_index.astype(np.int64),
                patient_ids=patient_ids,
                p=p,
                threshold={m: float(by_model[m].threshold) for m in models},
            )
        )
    return folds


# --------------------------------------------------------------------------- the bootstrap


def _strata(folds: list[_Fold]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[slice], list[str]]:
    """Resampling groups: the distinct patients of each class, over all folds.

    A patient in the test set of several folds (independent 70/30 splits) is one
    patient: it is identified by its id and drawn once per resample, and every
    fold it is in gets its multiplicity. Its class is its label if all its images
    (in every fold) agree, else "mixed" (not the case in BreakHis).

    Returns (groups with >= 2 distinct patients, as distinct-patient numbers, to
    resample; a ``(D,)`` 0/1 vector of the distinct patients in single-patient
    groups, kept fixed; a ``(P_slots,)`` index from each fold's patient slot to its
    distinct patient; each fold's slice of the slots; notes on the fixed groups).
    """
    distinct = np.unique(np.concatenate([f.patient_ids for f in folds]))
    slot_to_distinct = np.concatenate([np.searchsorted(distinct, f.patient_ids) for f in folds])
    labels: list[set[int]] = [set() for _ in distinct]
    for f in folds:
        for d, label in zip(np.searchsorted(distinct, f.patients).tolist(), f.y.tolist(), strict=True):
            labels[d].add(label)
    stratum = np.array([str(next(iter(lab))) if len(lab) == 1 else "mixed" for lab in labels])
    groups, notes = [], []
    fixed = np.zeros(distinct.size)
    for name in sorted(set(stratum.tolist())):
        members = np.flatnonzero(stratum == name)
        if members.size >= 2:
            groups.append(members)
        else:
            fixed[members] = 1.0
            label = {"0": "benign", "1": "malignant"}.get(name, "mixed-label")
            notes.append(f"the {label} class has 1 distinct test patient; it is kept in every resample")
    bounds = np.cumsum([0] + [f.patient_ids.size for f in folds])
    slices = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    return groups, fixed, slot_to_distinct, slices, notes


def _covers_classes(scorer: _FoldScorer, multiplicity: np.ndarray) -> np.ndarray:
    """``(R, P)`` -> ``(R,)`` True where the resample drew an image of every class the fold's test set has.

    With patients shared across folds, a fold's share of a resample is not stratified:
    it can lack a class (or every patient). Its metrics then describe another kind of
    test set (or nothing), so that fold is left out of that resample's mean over folds.
    """
    covered = np.ones(multiplicity.shape[0], dtype=bool)
    for per_patient in (scorer.positives, scorer.negatives):
        if per_patient.sum() > 0:
            covered &= multiplicity @ per_patient > 0
    return covered


def _bootstrap_distribution(
    folds: list[_Fold], models: list[str], pairs: list[tuple[str, str]], options: StatsOptions
) -> tuple[dict[tuple[str, str], np.ndarray], dict[tuple[str, str], np.ndarray], list[str], int]:
    """Replicates of every model's fold-mean metrics and every pair's accuracy difference.

    Returns ({(model, metric): (B,)}, {(a, b): (B,)}, notes, number of distinct
    patients). All come from the same patient resamples, so the pairs are paired.
    """
    groups, fixed, slot_to_distinct, slices, notes = _strata(folds)
    n_distinct = fixed.size
    scorers = {
        (m, i): _FoldScorer(f.y, f.p[m], f.threshold[m], f.patient_index, f.patient_ids.size)
        for m in models
        for i, f in enumerate(folds)
    }

    def statistic(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        # resampled[g]: (R, n_g) drawn distinct-patient numbers of group g -> multiplicities (R, D)
        drawn = np.concatenate([np.asarray(r, dtype=np.int64) for r in resampled], axis=-1)
        n_rows = drawn.shape[0]
        flat = (drawn + n_distinct * np.arange(n_rows)[:, None]).ravel()
        multiplicity = np.bincount(flat, minlength=n_rows * n_distinct).reshape(n_rows, n_distinct) + fixed
        return _statistic_rows(multiplicity)

    def _statistic_rows(multiplicity_distinct: np.ndarray) -> np.ndarray:
        multiplicity = multiplicity_distinct[:, slot_to_distinct]  # (R, P_slots): each slot its patient's draw
        covered = [_covers_classes(scorers[models[0], i], multiplicity[:, s]) for i, s in enumerate(slices)]
        rows = []
        accuracy = {}
        for m in models:
            per_fold = [scorers[m, i].scores(multiplicity[:, s]) for i, s in enumerate(slices)]
            # {metric: (K, R)}, NaN where a fold's resample lacks a class of its test set
            by_metric = {
                metric: np.stack(
                    [np.where(c, scores[metric], np.nan) for c, scores in zip(covered, per_fold, strict=True)]
                )
                for metric in METRICS
            }
            accuracy[m] = by_metric["accuracy"]
            rows.extend(_mean_over_defined(by_metric[metric]) for metric in METRICS)
        for a, b in pairs:
            # the same folds are left out for both models (coverage depends on the resample only)
            rows.append(_mean_over_defined(accuracy[a] - accuracy[b]))
        return np.stack(rows)  # (models * metrics + pairs, R)

    if groups:
        with warnings.catch_warnings():
            # scipy computes its own interval too and warns when a replicate is NaN
            # (an undefined metric); we read intervals from the replicates ourselves.
            warnings.simplefilter("ignore", DegenerateDataWarning)
            with np.errstate(invalid="ignore", divide="ignore"):
                result = bootstrap(
                    tuple(groups),
                    statistic,
                    n_resamples=options.n_resamples,
                    batch=_BATCH,
                    vectorized=True,
                    paired=False,  # each group resampled on its own: stratified by class
                    method="percentile",
                    rng=np.random.default_rng(options.seed),
                )
        replicates = np.asarray(result.bootstrap_distribution).reshape(-1, options.n_resamples)
    else:  # every group has a single patient: nothing can vary
        replicates = np.repeat(_statistic_rows(fixed[None, :]), options.n_resamples, axis=1)

    per_metric, per_pair = {}, {}
    row = 0
    for m in models:
        for metric in METRICS:
            per_metric[m, metric] = replicates[row]
            row += 1
    for pair in pairs:
        per_pair[pair] = replicates[row]
        row += 1
    return per_metric, per_pair, notes, n_distinct


# --------------------------------------------------------------------------- the document


def _none_if_nan(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _fold_entry(fold: _Fold, model: str) -> dict:
    scores = classification_metrics(fold.y, fold.p[model], fold.threshold[model], fold.patients)
    entry = {"fold": fold.fold, "n": int(scores["n"])}
    entry.update({metric: _none_if_nan(scores[metric]) for metric in METRICS})
    entry.update(
        n_patients=int(fold.patient_ids.size),
        threshold=float(fold.threshold[model]),
        confusion_matrix=scores["confusion_matrix"],
    )
    return entry


def _summary(fold_entries: list[dict], metric: str) -> tuple[float | None, float | None]:
    values = [e[metric] for e in fold_entries if e[metric] is not None]
    mean = float(np.mean(values)) if values else None
    std = float(np.std(values, ddof=STD_DDOF)) if len(values) > STD_DDOF else None
    return mean, std


def comparison_statistics(
    predictions: Mapping[str, Sequence[FoldPredictions]], options: StatsOptions | None = None
) -> dict:
    """Per-model summaries and pairwise tests over folds (the ``compare.json`` ``models``/``pairwise``).

    Args:
        predictions: model name -> its :class:`FoldPredictions`, one per fold (same
            folds and test images for every model; the order of the mapping is the
            order of the output and of the pairs: (m0, m1), (m0, m2), (m1, m2), ...).
        options: bootstrap settings (:class:`StatsOptions`).

    Returns:
        A JSON-serialisable dict (no NaN; ``None`` where undefined)::

            {"models": [{"model", "folds": [{"fold", "n", "accuracy", "patient_accuracy",
                          "precision", "recall", "f1", "benign_recall", "roc_auc",
                          "n_patients", "threshold", "confusion_matrix"}, ...],
                         "mean": {metric: x}, "std": {metric: x}, "ci95": {metric: [low, high]},
                         "n_patients": int}, ...],
             "pairwise": [{"a", "b", "accuracy_diff", "ci95", "p_value", "significant",
                           "p_value_holm", "significant_unadjusted", "fold_accuracy_diffs",
                           "mcnemar": {"a_right_b_wrong", "a_wrong_b_right", "p_value"}}, ...],
             "statistics": {"n_resamples", "seed", "alpha", "std_ddof", "ci_method",
                            "p_value_method", "distinct_patients", "multiple_comparisons", "notes"}}

        ``n_patients`` (per model) counts test-patient slots over folds; ``distinct_patients``
        counts each patient once, however many folds' test sets it is in.

    Raises:
        UserInputError: a model misses a fold, models' test images differ, or bad values.
    """
    options = options or StatsOptions()
    folds = _align(predictions)
    models = list(predictions)
    pairs = list(itertools.combinations(models, 2))
    per_metric, per_pair, notes, n_distinct = _bootstrap_distribution(folds, models, pairs, options)

    model_entries = []
    for m in models:
        fold_entries = [_fold_entry(f, m) for f in folds]
        summaries = {metric: _summary(fold_entries, metric) for metric in METRICS}
        model_entries.append(
            {
                "model": m,
                "folds": fold_entries,
                "mean": {metric: summaries[metric][0] for metric in METRICS},
                "std": {metric: summaries[metric][1] for metric in METRICS},
                "ci95": {
                    metric: [None, None] if summaries[metric][0] is None else percentile_interval(per_metric[m, metric])
                    for metric in METRICS
                },
                "n_patients": int(sum(f.patient_ids.size for f in folds)),
            }
        )

    pair_entries = []
    for a, b in pairs:
        right = {m: [(f.p[m] >= f.threshold[m]) == (f.y == 1) for f in folds] for m in (a, b)}
        a_only = [int(np.sum(ra & ~rb)) for ra, rb in zip(right[a], right[b], strict=True)]
        b_only = [int(np.sum(~ra & rb)) for ra, rb in zip(right[a], right[b], strict=True)]
        fold_diffs = [float(ra.mean() - rb.mean()) for ra, rb in zip(right[a], right[b], strict=True)]
        replicates = per_pair[a, b]
        p_value = bootstrap_p_value(replicates)
        pair_entries.append(
            {
                "a": a,
                "b": b,
                "accuracy_diff": float(np.mean(fold_diffs)),
                "ci95": percentile_interval(replicates),
                "p_value": p_value,
                "significant": None,  # set below from the Holm-adjusted p-value
                "p_value_holm": None,
                "significant_unadjusted": bool(p_value < ALPHA),
                "fold_accuracy_diffs": fold_diffs,
                "mcnemar": {
                    "a_right_b_wrong": int(sum(a_only)),
                    "a_wrong_b_right": int(sum(b_only)),
                    "p_value": mcnemar_exact(sum(a_only), sum(b_only)),
                },
            }
        )
    for entry, adjusted in zip(pair_entries, holm([e["p_value"] for e in pair_entries]), strict=True):
        entry["p_value_holm"] = adjusted
        entry["significant"] = bool(adjusted < ALPHA)

    return {
        "models": model_entries,
        "pairwise": pair_entries,
        "statistics": {
            "n_resamples": options.n_resamples,
            "seed": options.seed,
            "alpha": ALPHA,
            "std_ddof": STD_DDOF,
            "ci_method": "percentile interval of a patient bootstrap stratified by class: distinct patients "
            "(by id, over all folds) drawn once per resample, every fold a patient is in gets its multiplicity; "
            "metric recomputed per fold and averaged over the folds whose resample has each of their classes",
            "p_value_method": "paired patient bootstrap of the accuracy difference, inverted percentile "
            "interval (p < alpha exactly when ci95 excludes 0); mcnemar: exact, image-level, discordant pairs "
            "pooled over folds (an image in several folds' test sets counts once per fold), for comparison only",
            "distinct_patients": n_distinct,
            "multiple_comparisons": f"holm over {len(pairs)} pairs: significant = p_value_holm < {ALPHA}",
            "notes": notes,
        },
    }


# --------------------------------------------------------------------------- paper-ready tables

_METRIC_TITLES = {
    "accuracy": "Accuracy",
    "patient_accuracy": "Patient accuracy",
    "precision": "Precision",
    "recall": "Recall (malignant)",
    "f1": "F1",
    "benign_recall": "Benign recall",
    "roc_auc": "ROC AUC",
}
_COST_COLUMNS = (
    ("params_total", "Parameters", "{:,.0f}"),
    ("size_kb", "Size (KB)", "{:,.0f}"),
    ("latency_ms_p50", "Latency p50 (ms)", "{:.2f}"),
    ("train_seconds", "Train time per fold (s)", "{:,.0f}"),
)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def markdown_report(comparison: Mapping) -> str:
    """Markdown tables of a :func:`comparison_statistics` result (or a whole ``compare.json``).

    One table of mean +- std [95% CI] per metric and model, a cost table when the
    model entries carry ``params_total``/``size_kb``/``latency_ms_p50``/``train_seconds``,
    and the pairwise accuracy differences, with "not significant" written out.
    """
    models = comparison["models"]
    stats = comparison.get("statistics", {})
    n_folds = len(models[0]["folds"]) if models else 0
    lines = [
        f"Mean ± std over {n_folds} patient-wise folds, with the 95% confidence interval in brackets.",
        "",
        "| Model | " + " | ".join(_METRIC_TITLES[m] for m in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for entry in models:
        cells = []
        for metric in METRICS:
            mean, std, (low, high) = entry["mean"][metric], entry["std"][metric], entry["ci95"][metric]
            if mean is None:
                cells.append("n/a")
                continue
            cell = _fmt(mean) + (f" ± {_fmt(std)}" if std is not None else "")
            if low is not None:
                cell += f" [{_fmt(low)}, {_fmt(high)}]"
            cells.append(cell)
        lines.append(f"| {entry['model']} | " + " | ".join(cells) + " |")

    cost = [c for c in _COST_COLUMNS if any(entry.get(c[0]) is not None for entry in models)]
    if cost:
        lines += ["", "| Model | " + " | ".join(title for _, title, _ in cost) + " |", "|---|" + "---|" * len(cost)]
        for entry in models:
            cells = [fmt.format(entry[key]) if entry.get(key) is not None else "n/a" for key, _, fmt in cost]
            lines.append(f"| {entry['model']} | " + " | ".join(cells) + " |")

    pairwise = comparison.get("pairwise", [])
    if pairwise:
        lines += [
            "",
            "| A | B | Accuracy A − B | 95% CI | p | p (Holm) | Verdict | McNemar p (image-level) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for pair in pairwise:
            low, high = pair["ci95"]
            ci = "n/a" if low is None else f"[{_fmt_signed(low)}, {_fmt_signed(high)}]"
            if pair["significant"]:
                verdict = f"significant ({pair['a'] if pair['accuracy_diff'] > 0 else pair['b']} better)"
            elif pair.get("significant_unadjusted"):
                verdict = "not significant after Holm correction"
            else:
                verdict = "not significant"
            mcnemar = pair.get("mcnemar", {}).get("p_value")
            lines.append(
                f"| {pair['a']} | {pair['b']} | {_fmt_signed(pair['accuracy_diff'])} | {ci} | "
                f"{_fmt_p(pair['p_value'])} | {_fmt_p(pair.get('p_value_holm'))} | {verdict} | {_fmt_p(mcnemar)} |"
            )
        lines += [
            "",
            f"CI and p: paired bootstrap over patients ({stats.get('n_resamples', '?')} resamples, "
            f"seed {stats.get('seed', '?')}); a difference is significant when its Holm-adjusted p < {ALPHA}. "
            "McNemar treats images as independent and is shown for comparison only.",
        ]
    return "\n".join(lines) + "\n"

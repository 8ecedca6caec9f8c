"""Time of the comparison statistics (patient bootstrap) at the size of a BreakHis 200X comparison.

    .venv/bin/python benchmarks/bench_stats.py [--folds 5] [--images 400] [--patients 25] [--models 3]
                                               [--resamples 2000 10000] [--repeats 5] [--threads 1]

Synthetic test predictions (``--images`` per fold from ``--patients`` patients,
two thirds malignant, correctness correlated within a patient) for ``--models``
models; times ``breastcnn.stats.comparison_statistics`` (median of ``--repeats``,
the resample counts alternated in one process) and, for scale, one call of
``classification_metrics`` on a fold, i.e. what every bootstrap replicate
would cost through scikit-learn. The machine may be shared: read the figures
as rough.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from breastcnn.metrics import classification_metrics
from breastcnn.stats import FoldPredictions, StatsOptions, comparison_statistics


def synthetic_predictions(folds: int, images: int, patients: int, models: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {f"model{k}": [] for k in range(models)}
    for fold in range(folds):
        patient = rng.integers(0, patients, images)
        y = (np.arange(patients) % 3 != 0).astype(int)[patient]
        patient_effect = rng.normal(0.0, 1.0, patients)[patient]
        ids = [f"fold{fold}/img{i}.png" for i in range(images)]
        names = [f"fold{fold}/patient{q}" for q in patient]
        for k, name in enumerate(out):
            margin = 1.5 + 0.2 * k + patient_effect + rng.normal(0.0, 1.0, images)
            p = 1.0 / (1.0 + np.exp(-np.where(y == 1, margin, -margin)))
            out[name].append(FoldPredictions(fold, y, p, names, 0.5, ids))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--patients", type=int, default=25)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--resamples", type=int, nargs="+", default=[2000, 10_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    args = parser.parse_args()

    predictions = synthetic_predictions(args.folds, args.images, args.patients, args.models)
    print(
        f"cores: {os.cpu_count()}, BLAS threads: {args.threads}; {args.folds} folds x {args.images} images "
        f"({args.patients} patients per fold) x {args.models} models"
    )
    with threadpool_limits(args.threads):
        times = {n: [] for n in args.resamples}
        for _ in range(args.repeats):
            for n in args.resamples:
                start = time.perf_counter()
                comparison_statistics(predictions, StatsOptions(n_resamples=n, seed=0))
                times[n].append(time.perf_counter() - start)
        for n, values in times.items():
            print(
                f"comparison_statistics, {n} resamples: median {statistics.median(values):.2f} s "
                f"(min {min(values):.2f}, max {max(values):.2f}, {args.repeats} runs)"
            )

        fold = predictions["model0"][0]
        calls = []
        for _ in range(50):
            start = time.perf_counter()
            classification_metrics(fold.y_true, fold.p_malignant, fold.threshold, fold.patients)
            calls.append(time.perf_counter() - start)
        per_call = statistics.median(calls)
        n = max(args.resamples)
        print(
            f"classification_metrics on one fold: median {per_call * 1e3:.1f} ms per call; "
            f"{n} resamples x {args.folds} folds x {args.models} models through it would take "
            f"~{per_call * n * args.folds * args.models:.0f} s"
        )


if __name__ == "__main__":
    main()

"""Split quality of `split --by patient`: class and subtype stratification on full-scale synthetic counts.

Splits the records of ``breastcnn synth --scale 1.0`` (the real per-subtype
patient and image counts; no image is drawn: a split only reads records) with
``--stratify subtype`` (the default) and ``--stratify class`` (the splits of
0.1.0, byte for byte) over several seeds, and prints a Markdown table:

- class %: mean share of each class's images in train/val/test;
- max class err: the largest |share - ratio| over classes, subsets and seeds (points);
- max mag err: the same per magnification;
- empty cells: (subtype, subset) pairs without a patient, mean (max) per split;
- subtype mix TV: total-variation distance between a subset's subtype mix and
  its class's, averaged over the two classes and the seeds;
- max subtype err: the largest |share - ratio| of a subtype's images (points).

    python benchmarks/bench_split.py [--seeds 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from breastcnn.data import synth  # noqa: E402
from breastcnn.data.breakhis import MAGNIFICATIONS, Record  # noqa: E402
from breastcnn.data.split import SUBSETS, split_by_patient  # noqa: E402
from breastcnn.data.tasks import SUBTYPE_CLASSES  # noqa: E402


def records(mags) -> list[Record]:
    return [
        Record(s.path, s.patient.label, s.patient.subtype, s.patient.folder, s.magnification)
        for s in synth.plan(1.0, mags)
    ]


def measure(recs: list[Record], ratios, seeds: int, stratify: str) -> dict:
    subsets = [s for s, q in zip(SUBSETS, ratios, strict=True) if q > 0]
    mags = sorted({r.magnification for r in recs}, key=MAGNIFICATIONS.index)
    share = {(c, s): [] for c in ("benign", "malignant") for s in subsets}
    class_err = mag_err = subtype_err = 0.0
    empty, mix, seconds = [], {s: [] for s in subsets}, []
    for seed in range(seeds):
        start = time.perf_counter()
        rows = split_by_patient(recs, ratios, seed=seed, stratify=stratify)
        seconds.append(time.perf_counter() - start)
        for s, q in zip(SUBSETS, ratios, strict=True):
            if q == 0:
                continue
            for label in ("benign", "malignant"):
                part = [r for r in rows if r.label == label]
                f = sum(r.split == s for r in part) / len(part)
                share[(label, s)].append(f)
                class_err = max(class_err, abs(f - q))
            for m in mags:
                part = [r for r in rows if r.magnification == m]
                mag_err = max(mag_err, abs(sum(r.split == s for r in part) / len(part) - q))
            for t in SUBTYPE_CLASSES:
                part = [r for r in rows if r.subtype == t]
                subtype_err = max(subtype_err, abs(sum(r.split == s for r in part) / len(part) - q))
            tv = []
            for label in ("benign", "malignant"):
                whole = [r for r in rows if r.label == label]
                part = [r for r in whole if r.split == s]
                tv.append(
                    0.5
                    * sum(
                        abs(
                            sum(r.subtype == t for r in part) / len(part)
                            - sum(r.subtype == t for r in whole) / len(whole)
                        )
                        for t in SUBTYPE_CLASSES
                    )
                )
            mix[s].append(np.mean(tv))
        empty.append(
            sum(not any(r.subtype == t and r.split == s for r in rows) for t in SUBTYPE_CLASSES for s in subsets)
        )
    return {
        "class": {
            label: " / ".join(f"{100 * np.mean(share[(label, s)]):.1f}" for s in subsets)
            for label in ("benign", "malignant")
        },
        "class_err": 100 * class_err,
        "mag_err": 100 * mag_err,
        "subtype_err": 100 * subtype_err,
        "empty": (np.mean(empty), max(empty)),
        "mix": " / ".join(f"{np.mean(mix[s]):.2f}" for s in subsets),
        "seconds": float(np.median(seconds)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    print(
        "| magnifications | ratios | --stratify | benign % (train/val/test) | malignant % | max class err (pts) "
        "| max mag err (pts) | empty (subtype, subset) cells: mean (max) | subtype mix TV | max subtype err (pts) "
        "| s/split (median) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mags in (("200X",), MAGNIFICATIONS):
        recs = records(mags)
        for ratios in ((0.8, 0.1, 0.1), (0.7, 0.0, 0.3)):
            for stratify in ("class", "subtype"):
                m = measure(recs, ratios, args.seeds, stratify)
                name = "all" if mags == MAGNIFICATIONS else mags[0]
                print(
                    f"| {name} | {'/'.join(f'{q:g}' for q in ratios if q)} | {stratify} | {m['class']['benign']} "
                    f"| {m['class']['malignant']} | {m['class_err']:.2f} | {m['mag_err']:.2f} "
                    f"| {m['empty'][0]:.2f} ({m['empty'][1]}) | {m['mix']} | {m['subtype_err']:.0f} "
                    f"| {m['seconds']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

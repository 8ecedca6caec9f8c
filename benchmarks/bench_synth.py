"""How hard is `synth --difficulty hard`? Shortcut, subtype and speed figures, easy vs hard.

    .venv/bin/python benchmarks/bench_synth.py [--scale 0.2] [--seed 0] [--splits 5] [--jobs 2] [--paired 12]

Renders the 200X plan at ``--scale`` in memory (no files) for both
difficulties and prints:

1. paired class gaps: every subtype drawn for the same ``--paired`` patients'
   nuisance (stain, scanner, composition); mean over patients of (malignant
   mean - benign mean) of the mean RGB, nuclear-area and white-space fractions;
2. the shortcut check: logistic regression (standardised inputs) on 16x16 RGB
   thumbnails and on the mean colour, trained on the train patients of a
   60/40 patient-wise split and scored on the others, mean over ``--splits``
   splits, against the majority-class rate;
3. a subtype check: a random forest on colour-free morphology features
   (sizes and counts of white-space and dark-blob components, their clustering
   at 3 scales, boundary/area ratios, nuclei lining white space), 8 subtypes
   and benign/malignant, same splits;
4. render speed: ms per image, easy and hard alternated in one process.

The machine may be shared: read timings as ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from joblib import Parallel, delayed
from PIL import Image
from scipy import ndimage
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from breastcnn.data import synth
from breastcnn.data.breakhis import SUBTYPES, Record
from breastcnn.data.split import split_by_patient

CODES = tuple(synth.REAL_COUNTS)


def morphology_features(img: np.ndarray) -> np.ndarray:
    """19 colour-free features of one image ``(H, W, 3)`` uint8 (thresholds relative to the image itself)."""
    grey = img.astype(np.float32).mean(-1)
    white = grey > 0.93 * np.percentile(grey, 99)
    dark = grey < np.percentile(grey, 12)
    out = []
    for mask in (white, dark):
        labels, n = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())[1:] if n else np.zeros(0)
        sizes = sizes[sizes >= 3] if (sizes >= 3).any() else np.ones(1)
        out += [
            np.log1p(len(sizes)),
            np.log(sizes.mean()),
            np.log(sizes.std() + 1),
            np.log(np.percentile(sizes, 90)),
            np.log(sizes.max()),
        ]
        for k in (8, 24, 64):  # clustering: spread of the mask's density over k x k blocks
            h, w = (mask.shape[0] // k) * k, (mask.shape[1] // k) * k
            out.append(mask[:h, :w].reshape(h // k, k, w // k, k).mean((1, 3)).std())
        out.append((mask ^ ndimage.binary_erosion(mask)).sum() / max(mask.sum(), 1))  # thin shapes: more boundary
    out.append((ndimage.binary_dilation(white, iterations=4) & dark).sum() / max(dark.sum(), 1))
    return np.array(out, np.float32)


def _describe(specs, seed: int, difficulty: str) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for spec in specs:
        img = synth.render(spec, seed, difficulty)
        thumb = np.asarray(Image.fromarray(img).resize((16, 16), Image.Resampling.BOX), np.float32).ravel()
        out.append((thumb, morphology_features(img)))
    return out


def _splits(specs, n: int):
    records = [Record(s.path, s.patient.label, s.patient.subtype, s.patient.folder, s.magnification) for s in specs]
    index = {s.path: i for i, s in enumerate(specs)}
    for seed in range(n):
        rows = split_by_patient(records, (0.6, 0.0, 0.4), seed=seed)
        yield (
            np.array([index[r.path] for r in rows if r.split == "train"]),
            np.array([index[r.path] for r in rows if r.split == "test"]),
        )


def paired_gaps(n_patients: int, seed: int) -> None:
    print(f"\n1. paired class gaps (malignant - benign), every subtype for the same {n_patients} patients' nuisance")
    for difficulty in ("easy", "hard"):
        gaps = []
        for i in range(n_patients):
            rows = {}
            for code in CODES:
                label = SUBTYPES[code][0]
                spec = synth.ImageSpec(synth.Patient(i, label, code, "13-1000"), "200X", 1)
                if difficulty == "hard":
                    tissue = synth.hard_tissue(spec, seed)
                    img = synth.paint_hard(tissue, spec, seed)
                    extra = [tissue.nuclear_fraction, tissue.white_fraction]
                else:
                    img, extra = synth.render(spec, seed), [np.nan, np.nan]
                rows.setdefault(label, []).append(np.r_[img.reshape(-1, 3).mean(0), extra])
            gaps.append(np.mean(rows["malignant"], 0) - np.mean(rows["benign"], 0))
        g, se = np.mean(gaps, 0), np.std(gaps, 0) / np.sqrt(len(gaps))
        print(
            f"   {difficulty}: mean RGB {np.round(g[:3], 2)} (se {np.round(se[:3], 2)}) grey levels; "
            f"nuclear fraction {g[3]:+.4f}, white fraction {g[4]:+.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--paired", type=int, default=12, help="patients for the paired class gaps")
    args = parser.parse_args()

    specs = synth.plan(args.scale, ("200X",))
    y = np.array([s.patient.label == "malignant" for s in specs], dtype=int)
    subtype = np.array([CODES.index(s.patient.code) for s in specs])
    print(f"{len(specs)} images (scale {args.scale}, 200X, seed {args.seed}), {args.splits} patient-wise 60/40 splits")
    paired_gaps(args.paired, args.seed)

    data = {}
    for difficulty in ("easy", "hard"):
        t0 = time.perf_counter()
        parts = Parallel(n_jobs=args.jobs)(
            delayed(_describe)(specs[i : i + 16], args.seed, difficulty) for i in range(0, len(specs), 16)
        )
        rows = [r for part in parts for r in part]
        data[difficulty] = (np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
        print(f"   ({difficulty}: rendered and described in {time.perf_counter() - t0:.0f} s)")

    print("\n2. shortcut check: logistic regression, test accuracy on held-out patients (mean over splits)")
    print("   | data | input | C=0.01 | C=1 | majority |\n   |---|---|---|---|---|")
    for difficulty, (thumbs, _) in data.items():
        for name, x in (("16x16 thumbnails", thumbs), ("mean RGB", thumbs.reshape(len(thumbs), 256, 3).mean(1))):
            scores = {c: [] for c in (0.01, 1.0)}
            majority = []
            for train, test in _splits(specs, args.splits):
                for c in scores:
                    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
                    scores[c].append(model.fit(x[train], y[train]).score(x[test], y[test]))
                majority.append(max(y[test].mean(), 1 - y[test].mean()))
            print(
                f"   | {difficulty} | {name} | {np.mean(scores[0.01]):.3f} | {np.mean(scores[1.0]):.3f} | "
                f"{np.mean(majority):.3f} |"
            )

    print("\n3. subtype check: random forest on 19 colour-free morphology features (mean over splits)")
    for difficulty, (_, feats) in data.items():
        acc, bal, maj, binary = [], [], [], []
        for k, (train, test) in enumerate(_splits(specs, args.splits)):
            forest = RandomForestClassifier(300, random_state=k, n_jobs=args.jobs, class_weight="balanced")
            pred = forest.fit(feats[train], subtype[train]).predict(feats[test])
            acc.append((pred == subtype[test]).mean())
            bal.append(balanced_accuracy_score(subtype[test], pred))
            maj.append(np.bincount(subtype[test]).max() / len(test))
            forest = RandomForestClassifier(300, random_state=k, n_jobs=args.jobs, class_weight="balanced")
            binary.append(forest.fit(feats[train], y[train]).score(feats[test], y[test]))
        print(
            f"   {difficulty}: 8 subtypes accuracy {np.mean(acc):.3f}, balanced accuracy {np.mean(bal):.3f} "
            f"(majority {np.mean(maj):.3f}, chance balanced 0.125); benign/malignant {np.mean(binary):.3f}"
        )

    print("\n4. render speed (one process, easy and hard alternated)")
    sample = specs[:: max(1, len(specs) // 40)]
    times = {"easy": [], "hard": []}
    for spec in sample:
        for difficulty in times:
            t0 = time.perf_counter()
            synth.render(spec, args.seed, difficulty)
            times[difficulty].append(time.perf_counter() - t0)
    easy, hard = np.median(times["easy"]), np.median(times["hard"])
    print(
        f"   easy {easy * 1e3:.1f} ms, hard {hard * 1e3:.1f} ms per image (medians of {len(sample)}); "
        f"hard/easy {hard / easy:.2f}"
    )


if __name__ == "__main__":
    main()

"""The studies of issue 13: the 8-subtype task, and stain shift between train and test patients.

Figures printed (Markdown), not asserted. Every run goes through the CLI
(``breastcnn train ... --json`` then ``breastcnn evaluate ... --json``), and
each result is appended to ``ROOT/study.jsonl``; re-running skips what is there.

Data: ``synth --difficulty hard --mags 200X --seed 0`` at ``--scale``, once
with ``--stain-profile default`` and once with ``shifted`` (the same tissue,
patients and file names in another lab's stain), each split with
``--seed 0`` (the same patients in each subset of both trees).

- ``--study subtype``: ``train --task subtype`` at the defaults (the default
  recipe, so HED stain jitter on; ``--epochs 10 --image-size 224``) on the default-stain tree, seeds 0, 1, 2; test
  accuracy, balanced accuracy, macro F1, patient accuracy and the derived
  benign/malignant accuracy.
- ``--study stain``: ``train`` (binary) on the default-stain tree with
  ``none``, ``--stain-augment``, ``--stain-norm macenko`` and both, seeds 0,
  1, 2; each model is evaluated on the test patients of the default tree
  (same stain) and of the shifted tree (another stain).

    nice -n 5 python benchmarks/study_subtype_stain.py --root /tmp/subtype/study --scale 0.2 --study subtype
    nice -n 5 python benchmarks/study_subtype_stain.py --root /tmp/subtype/study --scale 0.2 --study stain
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SEEDS = (0, 1, 2)
STAIN_SETTINGS = {
    "none": ["--no-stain-augment"],
    "augment": ["--stain-augment"],
    "macenko": ["--stain-norm", "macenko", "--no-stain-augment"],
    "macenko+augment": ["--stain-norm", "macenko", "--stain-augment"],
}
"""The stain study's settings (explicit: ``--stain-augment`` is a recipe value, on in ``default``)."""


def _cli(*args: str) -> dict:
    cmd = [sys.executable, "-m", "breastcnn", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def _tree(root: Path, scale: float, profile: str, jobs: int) -> Path:
    """The split of the ``profile`` tree (synth + split once)."""
    base = root / f"hard-{scale}-{profile}"
    split = base / "split"
    if not (split / "split.json").is_file():
        t0 = time.perf_counter()
        _cli(
            "synth",
            "--out",
            str(base),
            "--scale",
            str(scale),
            "--mags",
            "200X",
            "--seed",
            "0",
            "--difficulty",
            "hard",
            "--stain-profile",
            profile,
            "--jobs",
            str(jobs),
            "--force",
        )
        _cli(
            "split",
            "--data",
            str(base / "BreaKHis_v1"),
            "--out",
            str(split),
            "--mag",
            "200X",
            "--seed",
            "0",
            "--jobs",
            str(jobs),
            "--force",
        )
        print(f"synth + split {profile} (scale {scale}): {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return split


def _done(path: Path) -> dict:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["key"]: row for row in rows}


def _record(path: Path, row: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def _train_eval(
    root: Path, key: str, split: Path, extra: list[str], seed: int, epochs: int, jobs: int, tests: dict[str, Path]
) -> dict:
    out = root / "runs" / key
    t0 = time.perf_counter()
    summary = _cli(
        "train",
        "--split",
        str(split),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--jobs",
        str(jobs),
        "--force",
        *extra,
    )
    seconds = time.perf_counter() - t0
    scores = {
        name: _cli(
            "evaluate",
            "--model",
            str(out / "model.npz"),
            "--split",
            str(test_split),
            "--out",
            str(out / f"eval-{name}"),
            "--force",
        )
        for name, test_split in tests.items()
    }
    return {
        "key": key,
        "seed": seed,
        "extra": extra,
        "train_s": round(seconds, 1),
        "epochs_run": summary.get("epochs_run"),
        "scores": scores,
    }


def _ms(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.mean(values):.3f} +- {statistics.pstdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=0.2)
    parser.add_argument("--study", choices=("subtype", "stain"), required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--settings", default=",".join(STAIN_SETTINGS), help="stain study: settings to run")
    args = parser.parse_args()
    root = args.root / f"scale-{args.scale}"
    root.mkdir(parents=True, exist_ok=True)
    log = root / "study.jsonl"
    done = _done(log)
    default_split = _tree(root, args.scale, "default", args.jobs)
    if args.study == "subtype":
        name = "subtype" if args.epochs == 10 else f"subtype-e{args.epochs}"  # the defaults' runs keep their key
        for seed in SEEDS:
            key = f"{name}-s{seed}"
            if key not in done:
                done[key] = _train_eval(
                    root,
                    key,
                    default_split,
                    ["--task", "subtype"],
                    seed,
                    args.epochs,
                    args.jobs,
                    {"same": default_split},
                )
                _record(log, done[key])
        rows = [done[f"{name}-s{seed}"]["scores"]["same"] for seed in SEEDS]
        print(f"subtype task, scale {args.scale}, --epochs {args.epochs}, {rows[0]['n']} test images, seeds {SEEDS}:\n")
        print(
            "| test accuracy | balanced accuracy | macro F1 | patient accuracy | benign/malignant accuracy "
            "(derived) | train s |"
        )
        print("|---|---|---|---|---|---|")
        print(
            f"| {_ms([r['accuracy'] for r in rows])} | {_ms([r['balanced_accuracy'] for r in rows])} | "
            f"{_ms([r['macro_f1'] for r in rows])} | {_ms([r['patient_accuracy'] for r in rows])} | "
            f"{_ms([r['binary']['accuracy'] for r in rows])} | "
            f"{_ms([done[f'{name}-s{s}']['train_s'] for s in SEEDS])} |"
        )
        for seed, r in zip(SEEDS, rows, strict=True):
            print(
                f"\nseed {seed}: accuracy {r['accuracy']:.3f}, macro F1 {r['macro_f1']:.3f}, per-class recall "
                + ", ".join(f"{c} {v['recall']:.2f}" for c, v in r["per_class"].items())
            )
        return
    shifted_split = _tree(root, args.scale, "shifted", args.jobs)
    settings = [s for s in args.settings.split(",") if s]
    for name in settings:
        for seed in SEEDS:
            key = f"stain-{name}-s{seed}"
            if key not in done:
                done[key] = _train_eval(
                    root,
                    key,
                    default_split,
                    STAIN_SETTINGS[name],
                    seed,
                    args.epochs,
                    args.jobs,
                    {"same": default_split, "shifted": shifted_split},
                )
                _record(log, done[key])
    print(f"stain shift, binary task, scale {args.scale}, train on the default stain, seeds {SEEDS} (mean +- std):\n")
    print(
        "| setting | test accuracy, same stain | balanced accuracy, same stain | test accuracy, shifted stain "
        "| balanced accuracy, shifted | ROC AUC, shifted | train s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in settings:
        runs = [done[f"stain-{name}-s{seed}"] for seed in SEEDS]
        same = [r["scores"]["same"] for r in runs]
        shifted = [r["scores"]["shifted"] for r in runs]

        def balanced(rows):
            return [(r["recall"] + r["benign_recall"]) / 2 for r in rows]

        print(
            f"| {name} | {_ms([r['accuracy'] for r in same])} | {_ms(balanced(same))} | "
            f"{_ms([r['accuracy'] for r in shifted])} | {_ms(balanced(shifted))} | "
            f"{_ms([r['roc_auc'] for r in shifted])} | {_ms([r['train_s'] for r in runs])} |"
        )


if __name__ == "__main__":
    main()

"""Training speed of the NumPy CNN on a full-size synthetic 200X split (figures printed, not asserted).

Targets from issue #4 (2 cores): one epoch (1,610 training images at 224x224,
augmentation on, the default recipe's validation passes: 4 since issue #10,
20 before) under 10 s once the image cache exists; the whole default
``breastcnn train --epochs 5`` under 60 s including the first cache build.

    python benchmarks/bench_train.py                      # full size (scale 1.0, 224 px)
    python benchmarks/bench_train.py --scale 0.3 --image-size 64 --skip-cli
    # the recipe study of issue #10 (how the default recipe was chosen; see README):
    nice -n 5 python benchmarks/bench_train.py --study --scale 0.2 --root /tmp/recipe      # all settings, seeds 0,1,2
    nice -n 5 python benchmarks/bench_train.py --study --scale 1.0 --root /tmp/recipe --settings base,report
    nice -n 5 python benchmarks/bench_train.py --study --scale 1.0 --root /tmp/recipe --settings base --engine keras

``--study`` trains each setting of :data:`STUDY_SETTINGS` (a recipe plus
single options) with each seed on ``synth --difficulty hard --mags 200X``
data (seed 0, split seed 0) at ``--scale``, ``--epochs 10 --image-size 224``,
keeps every run's summary and scores in ``ROOT/<difficulty>-<scale>/study.jsonl``
(re-running skips what is there) and prints a Markdown table: mean +- std over
seeds of the kept model's validation balanced accuracy (what a choice may
look at) and of its test accuracy, balanced accuracy, benign recall and ROC
AUC (reported, never used to choose), with the count of one-class models.

Speed mode prints: the thread pools, synth/split time (not part of the targets), the
wall time of the CLI run with a cold cache (cache build + 5 epochs, early
stopping disabled with --patience 1000 so all 5 epochs run, and with the
defaults, whose patience of 5 epochs cannot end a 5-epoch run either), then per-epoch figures with a warm cache: total, and per phase
(data = batch gather + augment + preprocess; step = forward/backward/update in
the engine; validation = the inference passes; checkpoint = last.npz/model.npz
writes), each the median over --repeats epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from breastcnn.models.spec import DEFAULT_IMAGE_SIZE


def _prepare(root: Path, scale: float, jobs: int) -> Path:
    from breastcnn.data.split import create_split
    from breastcnn.data.synth import generate

    split_dir = root / "splits" / "200X"
    if not (split_dir / "split.json").is_file():
        t0 = time.perf_counter()
        generate(root, scale=scale, seed=0, jobs=jobs, force=True)
        create_split(root, out=split_dir, seed=0, jobs=jobs, force=True)
        print(f"synth + split (scale {scale}): {time.perf_counter() - t0:.1f} s  [not part of the targets]")
    return split_dir


def _cli_cold(
    root: Path, split_dir: Path, image_size: int, jobs: int, extra: list[str], label: str, recipe: str = "default"
) -> None:
    shutil.rmtree(split_dir / "cache", ignore_errors=True)
    out = root / "runs" / f"cli-{label}"
    cmd = [
        sys.executable,
        "-m",
        "breastcnn",
        "train",
        "--split",
        str(split_dir),
        "--out",
        str(out),
        "--force",
        "--epochs",
        "5",
        "--image-size",
        str(image_size),
        "--jobs",
        str(jobs),
        "--recipe",
        recipe,
        "--json",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        raise SystemExit(f"CLI run failed with exit code {proc.returncode}")
    summary = json.loads(proc.stdout)
    print(
        f"CLI `train --epochs 5 --recipe {recipe}` {label}, cold cache: {wall:.1f} s wall "
        f"({summary['stopped']} after {summary['steps']} steps, training loop {summary['elapsed_s']:.1f} s, "
        f"best {summary['monitor']} {summary['best_score']:.3f})"
    )


def _epochs_warm(
    root: Path, split_dir: Path, image_size: int, jobs: int, repeats: int, recipe: str = "default"
) -> None:
    from breastcnn.training.config import TrainConfig
    from breastcnn.training.numpy_run import run_training

    per_epoch = []
    for r in range(repeats + 1):  # the first is a warm-up (page cache, BLAS init)
        summary = run_training(
            TrainConfig(
                split=str(split_dir),
                out=str(root / "runs" / f"epoch-{r}"),
                force=True,
                epochs=1,
                patience=1000,
                image_size=image_size,
                jobs=jobs,
                recipe=recipe,
            )
        )
        if r:
            per_epoch.append(
                {
                    "total_s": summary["elapsed_s"],
                    **summary["timing"],
                    "steps": summary["steps"],
                    "evaluations": summary["evaluations"],
                }
            )
    med = {k: statistics.median(e[k] for e in per_epoch) for k in per_epoch[0]}
    print(
        f"one epoch --recipe {recipe}, warm cache ({int(med['steps'])} steps, {int(med['evaluations'])} validation passes), "
        f"median of {repeats}: {med['total_s']:.2f} s"
    )
    for key in ("data_s", "step_s", "validation_s", "checkpoint_s"):
        print(f"  {key:<13} {med[key]:7.2f} s  ({100 * med[key] / med['total_s']:4.1f}%)")
    print(
        f"  per step: data {1000 * med['data_s'] / med['steps']:.1f} ms, engine "
        f"{1000 * med['step_s'] / med['steps']:.1f} ms; per validation pass "
        f"{1000 * med['validation_s'] / med['evaluations']:.1f} ms"
    )


# --------------------------------------------------------------------------- the recipe study (issue #10)

START = {"patience_epochs": 3.0, "monitor": "val_balanced_accuracy"}
"""Round 1's centre: the default recipe as the study began (patience 3 epochs, best by balanced accuracy)."""

STUDY_SETTINGS: dict[str, tuple[str, dict]] = {
    # name: (recipe, single options overriding it)
    "report": ("report", {}),
    "report-nostop": ("report", {"patience": 100000}),
    "default": ("default", {}),  # the outcome: val_loss, patience 5 epochs
    # round 1 (0.2 scale): one knob at a time around START
    "start": ("default", START),
    "lr0.01": ("default", {**START, "lr": 0.01}),
    "lr0.001": ("default", {**START, "lr": 0.001}),
    "l2-0.1": ("default", {**START, "l2": 0.1}),
    "l2-0.001": ("default", {**START, "l2": 0.001}),
    "l2-0": ("default", {**START, "l2": 0.0}),
    "batch16": ("default", {**START, "batch_size": 16}),
    "batch64": ("default", {**START, "batch_size": 64}),
    "evals1": ("default", {**START, "evals_per_epoch": 1}),
    "evals20": ("default", {**START, "evals_per_epoch": 20}),
    "const-lr": ("default", {**START, "lr_decay": 1.0}),
    "decay0.8-1ep": ("default", {**START, "lr_decay": 0.8, "lr_decay_epochs": 1.0}),
    "nostop": ("default", {**START, "patience_epochs": 1000.0}),
    "mon-acc": ("default", {**START, "monitor": "val_accuracy"}),
    "mon-auc": ("default", {**START, "monitor": "val_auc"}),
    "mon-loss": ("default", {**START, "monitor": "val_loss"}),
    # round 2: patience, monitor, batch 16
    "p5": ("default", {**START, "patience_epochs": 5.0}),
    "b16-p5": ("default", {**START, "batch_size": 16, "patience_epochs": 5.0}),
    "b16-nostop": ("default", {**START, "batch_size": 16, "patience_epochs": 1000.0}),
    "b16-mon-loss": ("default", {**START, "batch_size": 16, "monitor": "val_loss"}),
    "b16-mon-acc": ("default", {**START, "batch_size": 16, "monitor": "val_accuracy"}),
    "b16-lr0.001": ("default", {**START, "batch_size": 16, "lr": 0.001}),
    "b16-l2-0.1": ("default", {**START, "batch_size": 16, "l2": 0.1}),
}
"""Settings of ``--study``: the report's recipe, the outcome (``default``), and the knobs tried on the way."""


def _synth_split(root: Path, scale: float, difficulty: str, jobs: int) -> Path:
    """``root/BreaKHis_v1`` (``breastcnn synth --difficulty ... --mags 200X --seed 0``) and its split (seed 0), once."""
    split_dir = root / "splits" / "200X"
    if (split_dir / "split.json").is_file():
        return split_dir
    t0 = time.perf_counter()
    synth = [
        sys.executable,
        "-m",
        "breastcnn",
        "synth",
        "--out",
        str(root),
        "--scale",
        str(scale),
        "--mags",
        "200X",
        "--seed",
        "0",
        "--jobs",
        str(jobs),
        "--force",
    ]
    if difficulty != "easy":  # older trees have no --difficulty (easy is the default)
        synth += ["--difficulty", difficulty]
    for cmd in (
        synth,
        [
            sys.executable,
            "-m",
            "breastcnn",
            "split",
            "--data",
            str(root),
            "--mag",
            "200X",
            "--out",
            str(split_dir),
            "--seed",
            "0",
            "--jobs",
            str(jobs),
            "--force",
        ],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    print(f"synth --difficulty {difficulty} --scale {scale} + split: {time.perf_counter() - t0:.1f} s", flush=True)
    return split_dir


def _scores(model, split, subset: str) -> dict:
    from breastcnn.evaluation import evaluate_model

    m, rows = evaluate_model(model, split, subset)
    p_true = [r["probability"] if r["true_label"] == "malignant" else 1 - r["probability"] for r in rows]
    loss = -statistics.fmean(math.log(min(max(p, 1e-12), 1.0)) for p in p_true)
    return {
        "accuracy": m["accuracy"],
        "balanced_accuracy": (m["recall"] + m["benign_recall"]) / 2,
        "benign_recall": m["benign_recall"],
        "recall": m["recall"],
        "roc_auc": m["roc_auc"],
        "patient_accuracy": m["patient_accuracy"],
        "loss": loss,
        "n": m["n"],
    }


def _study_run(
    split_dir: Path,
    out: Path,
    engine: str,
    recipe: str,
    options: dict,
    seed: int,
    epochs: int,
    image_size: int,
    jobs: int,
) -> dict:
    """Train one setting with one seed; the kept model scored on val (for choosing) and test (for reporting)."""
    from breastcnn.data.split import load_split
    from breastcnn.models import load_model

    t0 = time.perf_counter()
    if engine == "numpy":
        from breastcnn.training.config import TrainConfig
        from breastcnn.training.numpy_run import run_training

        summary = run_training(
            TrainConfig(
                split=str(split_dir),
                out=str(out),
                force=True,
                recipe=recipe,
                epochs=epochs,
                image_size=image_size,
                seed=seed,
                jobs=jobs,
                **options,
            )
        )
    else:
        from breastcnn.training.keras_loop import finetune_keras

        given = {k: options.pop(k) for k in ("lr", "batch_size", "patience", "monitor") if k in options}
        summary = finetune_keras(
            "custom-keras",
            split_dir,
            out,
            weights="none",
            epochs=epochs,
            image_size=image_size,
            seed=seed,
            jobs=jobs,
            force=True,
            recipe=recipe,
            recipe_options=options,
            **given,
        )
    seconds = time.perf_counter() - t0
    split = load_split(split_dir)
    model = load_model(summary["model_path"])
    return {
        "stopped": summary["stopped"],
        "epochs_run": summary["epochs_run"],
        "steps": summary["steps"],
        "best_score": summary["best_score"],
        "warnings": len(summary.get("warnings") or []),
        "seconds": round(seconds, 1),
        "val": _scores(model, split, "val"),
        "test": _scores(model, split, "test"),
    }


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} +- {statistics.pstdev(values):.3f}"


def _study(args) -> None:
    """Train every (setting, seed) not yet in --results, then print the table of all results matching the options."""
    names = list(STUDY_SETTINGS) if args.settings == "all" else args.settings.split(",")
    unknown = [n for n in names if n not in STUDY_SETTINGS]
    if unknown:
        raise SystemExit(f"unknown --settings {unknown}; known: {', '.join(STUDY_SETTINGS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    root = args.root / f"{args.difficulty}-{args.scale:g}"
    split_dir = _synth_split(root, args.scale, args.difficulty, args.jobs)
    results = args.results if args.results is not None else root / "study.jsonl"
    done = {}
    if results.is_file():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            done[tuple(row["key"])] = row

    def key(name, seed):
        return [args.engine, args.difficulty, args.scale, args.epochs, args.image_size, name, seed]

    for name in names:
        recipe, options = STUDY_SETTINGS[name]
        for seed in seeds:
            k = key(name, seed)
            if tuple(k) in done:
                continue
            out = root / "study-runs" / f"{args.engine}-{name}-e{args.epochs}-s{args.image_size}-seed{seed}"
            row = {
                "key": k,
                "setting": name,
                "recipe": recipe,
                "options": options,
                "seed": seed,
                **_study_run(
                    split_dir, out, args.engine, recipe, dict(options), seed, args.epochs, args.image_size, args.jobs
                ),
            }
            done[tuple(k)] = row
            with open(results, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            print(
                f"{name} seed {seed}: test acc {row['test']['accuracy']:.3f} bal {row['test']['balanced_accuracy']:.3f} "
                f"benign recall {row['test']['benign_recall']:.3f} | val bal {row['val']['balanced_accuracy']:.3f} "
                f"| {row['stopped']} after {row['epochs_run']} epochs, {row['seconds']:.0f} s",
                flush=True,
            )

    images = json.loads((split_dir / "split.json").read_text())["images"]
    counts = ", ".join(f"{subset} {images[subset]['total']}" for subset in ("train", "val", "test"))
    print(
        f"\n{args.engine}, synth --difficulty {args.difficulty} --scale {args.scale:g} ({counts} images), "
        f"--epochs {args.epochs} --image-size {args.image_size}, seeds {args.seeds}; mean +- std over seeds "
        f"(population std); models chosen on validation, test reported"
    )
    header = (
        "setting",
        "val bal acc",
        "val loss",
        "test acc",
        "test bal acc",
        "benign recall",
        "ROC AUC",
        "min test acc",
        "one-class",
        "epochs",
        "s/run",
    )
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in names:
        rows = [done[tuple(key(name, s))] for s in seeds if tuple(key(name, s)) in done]
        if not rows:
            continue
        one_class = sum(r["test"]["benign_recall"] < 0.1 or r["test"]["recall"] < 0.1 for r in rows)
        print(
            "| "
            + " | ".join(
                [
                    name,
                    _mean_std(r["val"]["balanced_accuracy"] for r in rows),
                    _mean_std(r["val"].get("loss") for r in rows),
                    _mean_std(r["test"]["accuracy"] for r in rows),
                    _mean_std(r["test"]["balanced_accuracy"] for r in rows),
                    _mean_std(r["test"]["benign_recall"] for r in rows),
                    _mean_std(r["test"]["roc_auc"] for r in rows),
                    f"{min(r['test']['accuracy'] for r in rows):.3f}",
                    f"{one_class}/{len(rows)}",
                    f"{statistics.mean(r['epochs_run'] for r in rows):.1f}",
                    f"{statistics.mean(r['seconds'] for r in rows):.0f}",
                ]
            )
            + " |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/breastcnn-bench-train"))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-cli", action="store_true", help="skip the cold-cache CLI runs")
    parser.add_argument("--recipe", default="default", help="speed mode: the training recipe (default or report)")
    parser.add_argument(
        "--study",
        action="store_true",
        help="the recipe study (issue #10): train --settings x --seeds, print mean +- std per setting",
    )
    parser.add_argument(
        "--settings", default="all", help=f"study settings, comma-separated: {', '.join(STUDY_SETTINGS)}"
    )
    parser.add_argument("--seeds", default="0,1,2", help="study: training seeds")
    parser.add_argument("--difficulty", default="hard", help="study: synth --difficulty (easy or hard)")
    parser.add_argument("--epochs", type=int, default=10, help="study: --epochs of every run")
    parser.add_argument(
        "--engine",
        default="numpy",
        choices=("numpy", "keras"),
        help="study: train the NumPy custom model, or custom-keras (weights none) with the same recipe",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="study: JSON-lines file of the runs (default ROOT/<difficulty>-<scale>/study.jsonl); "
        "runs already in it are not repeated",
    )
    args = parser.parse_args()

    from breastcnn.runs import environment_info

    env = environment_info()
    print(
        f"CPU: {env['cpu_model']}, os.cpu_count {env['cpu_count']}, affinity {env['cpu_affinity']}; "
        f"thread pools: {[(p['internal_api'], p['num_threads']) for p in env['threadpools']]}"
    )
    if args.study:
        _study(args)
        return
    split_dir = _prepare(args.root, args.scale, args.jobs)
    if not args.skip_cli:
        _cli_cold(args.root, split_dir, args.image_size, args.jobs, ["--patience", "1000"], "all 5 epochs", args.recipe)
        _cli_cold(args.root, split_dir, args.image_size, args.jobs, [], "defaults (early stopping on)", args.recipe)
    _epochs_warm(args.root, split_dir, args.image_size, args.jobs, args.repeats, args.recipe)


if __name__ == "__main__":
    main()

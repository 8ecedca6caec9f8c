"""Training speed of the NumPy CNN on a full-size synthetic 200X split (figures printed, not asserted).

Targets from issue #4 (2 cores): one epoch (1,610 training images at 224x224,
augmentation on, 20 validation passes) under 10 s once the image cache exists;
the whole default ``breastcnn train --epochs 5`` under 60 s including the
first cache build.

    python benchmarks/bench_train.py                      # full size (scale 1.0, 224 px)
    python benchmarks/bench_train.py --scale 0.3 --image-size 64 --skip-cli
    python benchmarks/bench_train.py --l2-sweep --image-size 64   # the L2 default measurement

Prints: the thread pools, synth/split time (not part of the targets), the
wall time of the CLI run with a cold cache (cache build + 5 epochs, early
stopping disabled with --patience 1000 so all 5 epochs run, and with the
defaults), then per-epoch figures with a warm cache: total, and per phase
(data = batch gather + augment + preprocess; step = forward/backward/update in
the engine; validation = the 20 inference passes; checkpoint = last.npz/model.npz
writes), each the median over --repeats epochs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


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


def _cli_cold(root: Path, split_dir: Path, image_size: int, jobs: int, extra: list[str], label: str) -> None:
    shutil.rmtree(split_dir / "cache", ignore_errors=True)
    out = root / "runs" / f"cli-{label}"
    cmd = [sys.executable, "-m", "breastcnn", "train", "--split", str(split_dir), "--out", str(out), "--force",
           "--epochs", "5", "--image-size", str(image_size), "--jobs", str(jobs), "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        raise SystemExit(f"CLI run failed with exit code {proc.returncode}")
    summary = json.loads(proc.stdout)
    print(f"CLI `train --epochs 5` {label}, cold cache: {wall:.1f} s wall "
          f"({summary['stopped']} after {summary['steps']} steps, training loop {summary['elapsed_s']:.1f} s, "
          f"best val_accuracy {summary['best_score']:.3f})")


def _epochs_warm(root: Path, split_dir: Path, image_size: int, jobs: int, repeats: int) -> None:
    from breastcnn.train import TrainConfig, run_training

    per_epoch = []
    for r in range(repeats + 1):  # the first is a warm-up (page cache, BLAS init)
        summary = run_training(TrainConfig(split=str(split_dir), out=str(root / "runs" / f"epoch-{r}"), force=True,
                                           epochs=1, patience=1000, image_size=image_size, jobs=jobs))
        if r:
            per_epoch.append({"total_s": summary["elapsed_s"], **summary["timing"], "steps": summary["steps"],
                              "evaluations": summary["evaluations"]})
    med = {k: statistics.median(e[k] for e in per_epoch) for k in per_epoch[0]}
    print(f"one epoch, warm cache ({int(med['steps'])} steps, {int(med['evaluations'])} validation passes), "
          f"median of {repeats}: {med['total_s']:.2f} s")
    for key in ("data_s", "step_s", "validation_s", "checkpoint_s"):
        print(f"  {key:<13} {med[key]:7.2f} s  ({100 * med[key] / med['total_s']:4.1f}%)")
    print(f"  per step: data {1000 * med['data_s'] / med['steps']:.1f} ms, engine "
          f"{1000 * med['step_s'] / med['steps']:.1f} ms; per validation pass "
          f"{1000 * med['validation_s'] / med['evaluations']:.1f} ms")


def _l2_sweep(root: Path, split_dir: Path, image_size: int, jobs: int, seeds: int, patience: int) -> None:
    from breastcnn.data.split import load_split
    from breastcnn.evaluation import evaluate_model
    from breastcnn.models import load_model
    from breastcnn.train import TrainConfig, run_training

    split = load_split(split_dir)
    print(f"L2 sweep at {image_size}px, defaults otherwise, patience {patience}, seeds 0..{seeds - 1}")
    print(f"{'l2':>8} {'val acc (best)':>15} {'test acc':>9} {'test AUC':>9} {'steps':>6}")
    for l2 in (0.1, 1e-3, 1e-4, 0.0):
        rows = []
        for seed in range(seeds):
            out = root / "runs" / f"l2-{l2}-{seed}"
            s = run_training(TrainConfig(split=str(split_dir), out=str(out), force=True, image_size=image_size,
                                         l2=l2, seed=seed, jobs=jobs, patience=patience))
            m, _ = evaluate_model(load_model(out / "model.npz"), split)
            rows.append((s["best_score"], m["accuracy"], m["roc_auc"] or 0.0, s["steps"]))
        mean = [statistics.mean(r[i] for r in rows) for i in range(4)]
        print(f"{l2:>8g} {mean[0]:>15.3f} {mean[1]:>9.3f} {mean[2]:>9.3f} {mean[3]:>6.0f}   "
              f"per seed test acc: {', '.join(f'{r[1]:.2f}' for r in rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/breastcnn-bench-train"))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-cli", action="store_true", help="skip the cold-cache CLI runs")
    parser.add_argument("--l2-sweep", action="store_true", help="measure the L2 default instead of speed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--patience", type=int, default=10)
    args = parser.parse_args()

    from breastcnn.runs import environment_info

    env = environment_info()
    print(f"CPU: {env['cpu_model']}, os.cpu_count {env['cpu_count']}, affinity {env['cpu_affinity']}; "
          f"thread pools: {[(p['internal_api'], p['num_threads']) for p in env['threadpools']]}")
    split_dir = _prepare(args.root, args.scale, args.jobs)
    if args.l2_sweep:
        _l2_sweep(args.root, split_dir, args.image_size, args.jobs, args.seeds, args.patience)
        return
    if not args.skip_cli:
        _cli_cold(args.root, split_dir, args.image_size, args.jobs, ["--patience", "1000"], "all 5 epochs")
        _cli_cold(args.root, split_dir, args.image_size, args.jobs, [], "defaults (early stopping on)")
    _epochs_warm(args.root, split_dir, args.image_size, args.jobs, args.repeats)


if __name__ == "__main__":
    main()

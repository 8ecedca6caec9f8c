"""Wall time of `breastcnn compare` on a full-size synthetic 200X tree (2,013 images), and the fine-tuning trade.

Part 1: ``compare --models custom,vgg16,resnet50 --folds 5 --trainable-layers 0 --weights none
--image-size 224`` (the linear probe: frozen features computed once per image, only the heads train),
target under 15 minutes on 2 cores. Prints the total, each cell's time and the feature-cache builds.

Part 2: the same models with the report's fine-tuning (``--trainable-layers 20``) on fold 1 only:
``finetune`` for vgg16 and resnet50 for ``--finetune-epochs`` epochs (default 1), printing the seconds
per epoch (the report's schedule runs up to 200 epochs with early stopping, patience 10).

Run from the repository root (the synthetic tree is made on first use and reused)::

    PYTHONPATH=$PWD python benchmarks/bench_compare.py --workdir /tmp/bench-compare
    PYTHONPATH=$PWD python benchmarks/bench_compare.py --workdir /tmp/bench-compare --skip-finetune
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "breastcnn", *args]
    print("$ breastcnn " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)


def compare_part(work: Path, image_size: int, folds: int, force: bool) -> dict:
    out = work / "compare-probe"
    start = time.perf_counter()
    done = _cli(
        "compare",
        "--data",
        str(work / "data"),
        "--mag",
        "200X",
        "--models",
        "custom,vgg16,resnet50",
        "--folds",
        str(folds),
        "--trainable-layers",
        "0",
        "--weights",
        "none",
        "--image-size",
        str(image_size),
        "--out",
        str(out),
        "--json",
        *(["--force"] if force else []),
    )
    wall = time.perf_counter() - start
    doc = json.loads(done.stdout)
    print(
        f"\ncompare (linear probe, {folds} folds, {image_size} px): {wall:.0f} s wall in total "
        f"(target < 900 s on 2 cores)"
    )
    print(f"{'model':<10} {'fold':>4} {'cell s':>8} {'train s':>8} {'features':>22}")
    for cell in doc["cells"]:
        cache = cell.get("feature_cache")
        feat = f"{cache['status']} {cache['seconds']:.1f} s" if cache else "-"
        print(
            f"{cell['model']:<10} {cell['fold']:>4} {cell['cell_seconds']:>8.1f} {cell['train_seconds']:>8.1f} "
            f"{feat:>22}"
        )
    for m in doc["models"]:
        print(
            f"{m['model']:<10} accuracy {m['mean']['accuracy']:.3f} ± {m['std']['accuracy']:.3f} "
            f"{m['ci95']['accuracy']}  latency {m['latency_ms_p50']:.1f} ms  size {m['size_kb']:,.0f} KB  "
            f"train {m['train_seconds']:.1f} s/fold"
        )
    return {"wall_s": wall, "document": doc, "out": str(out)}


def finetune_part(work: Path, image_size: int, epochs: int) -> list[dict]:
    fold1 = work / "compare-probe" / "splits" / "fold1"
    rows = []
    for arch in ("vgg16", "resnet50"):
        out = work / f"finetune20-{arch}"
        start = time.perf_counter()
        done = _cli(
            "finetune",
            "--model",
            arch,
            "--split",
            str(fold1),
            "--trainable-layers",
            "20",
            "--weights",
            "none",
            "--epochs",
            str(epochs),
            "--image-size",
            str(image_size),
            "--out",
            str(out),
            "--force",
            "--json",
        )
        wall = time.perf_counter() - start
        summary = json.loads(done.stdout)
        rows.append(
            {"model": arch, "wall_s": wall, "epochs": summary.get("epochs_run"), "train_s": summary.get("elapsed_s")}
        )
        per_epoch = summary.get("elapsed_s", wall) / max(1, summary.get("epochs_run") or 1)
        print(
            f"{arch}: --trainable-layers 20, fold 1: {wall:.0f} s wall for {summary.get('epochs_run')} epoch(s), "
            f"{per_epoch:.0f} s per epoch"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-compare"))
    parser.add_argument("--scale", type=float, default=1.0, help="synth --scale (1.0: 2,013 images at 200X)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--force", action="store_true", help="recompute the comparison (else a rerun resumes it)")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data" / "BreaKHis_v1").is_dir():
        _cli("synth", "--out", str(work / "data"), "--scale", str(args.scale), "--mags", "200")
    print(f"cores: {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}); load {os.getloadavg()}")
    compare_part(work, args.image_size, args.folds, args.force)
    if not args.skip_finetune:
        finetune_part(work, args.image_size, args.finetune_epochs)


if __name__ == "__main__":
    main()

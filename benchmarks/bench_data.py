"""Data pipeline timings: synth, split, cache build/load, augmentation, decode+resize.

    .venv/bin/python benchmarks/bench_data.py [--fraction 1.0] [--jobs 2] [--size 224] [--workdir DIR]
                                              [--difficulty easy|hard]

Generates the synthetic 200X tree at scale 1.0 (2,013 images) in a temporary
folder (or the first ``--fraction`` of its images, extrapolated to the full
tree), then times ``split``, the image cache (build with ``--jobs`` processes,
then a warm load), the Augmenter (median over batches of 32 after warm-up,
one thread) and decode+resize of single images. Prints one line per figure.
The machine may be shared: read the figures as rough, compare ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from breastcnn.data import Augmenter, decode_image, load_split, load_subset, synth
from breastcnn.data.split import create_split
from breastcnn.models.spec import DEFAULT_IMAGE_SIZE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the full 200X tree to generate")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--difficulty",
        choices=synth.DIFFICULTIES,
        default=synth.DEFAULT_DIFFICULTY,
        help="synth difficulty of the generated tree (the rest of the pipeline is the same)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_data.", dir=args.workdir))
    print(f"cores: {os.cpu_count()}, jobs: {args.jobs}, difficulty: {args.difficulty}, workdir: {work}")
    try:
        full = synth.plan(1.0, ("200X",))
        if args.fraction < 1.0:  # generate a spread-out subset: every k-th image
            step = max(1, round(1 / args.fraction))
            original = synth.plan
            synth.plan = lambda scale, mags: original(scale, mags)[::step]
        t0 = time.perf_counter()
        summary = synth.generate(work, scale=1.0, mags=("200X",), seed=0, jobs=args.jobs, difficulty=args.difficulty)
        wall = time.perf_counter() - t0
        n = summary["n_images"]
        print(
            f"synth: {n} images in {wall:.1f} s wall ({wall / n * 1e3:.1f} ms/image with {args.jobs} jobs); "
            f"full 200X tree ({len(full)} images) extrapolated: {wall * len(full) / n:.1f} s"
        )

        import io

        from PIL import Image

        specs = full[:: max(1, len(full) // 20)][:20]
        c0 = time.process_time()
        for spec in specs:
            Image.fromarray(synth.render(spec, 0, args.difficulty)).save(io.BytesIO(), format="PNG", compress_level=1)
        cpu = (time.process_time() - c0) / len(specs)
        print(
            f"synth CPU time: {cpu * 1e3:.1f} ms/image (render + PNG, 1 process); "
            f"full 200X tree on 2 idle cores ~ {cpu * len(full) / 2:.0f} s"
        )

        t0 = time.perf_counter()
        create_split(work / "BreaKHis_v1", "200X", out=work / "splits" / "200X", jobs=args.jobs)
        print(f"split --mag 200X ({n} images, decode check with {args.jobs} jobs): {time.perf_counter() - t0:.2f} s")

        split = load_split(work / "splits" / "200X")
        t0 = time.perf_counter()
        x, _ = load_subset(split, "train", args.size, jobs=args.jobs)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_subset(split, "train", args.size)
        print(
            f"cache train {x.shape} build: {build:.2f} s ({build / len(x) * 1e3:.2f} ms/image, "
            f"{args.jobs} jobs); load: {time.perf_counter() - t0:.2f} s"
        )

        aug, rng = Augmenter(), np.random.default_rng(0)
        batch = x[:32] if len(x) >= 32 else np.resize(x, (32,) + x.shape[1:])
        with threadpool_limits(1):
            for _ in range(3):
                aug(batch, rng)
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                aug(batch, rng)
                times.append(time.perf_counter() - t0)
        print(
            f"augment {batch.shape[1]}x{batch.shape[2]}: {np.median(times) / 32 * 1e3:.3f} ms/image "
            f"(median of 20 batches of 32, 1 thread)"
        )

        paths = [split.root / r.path for r in split.rows[:60]]
        for p in paths[:5]:
            decode_image(p, args.size)
        times, cpu = [], []
        for p in paths:
            t0, c0 = time.perf_counter(), time.process_time()
            decode_image(p, args.size)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        print(
            f"decode+resize 700x460 PNG -> {args.size}: {np.median(times) * 1e3:.2f} ms/image wall, "
            f"{np.median(cpu) * 1e3:.2f} ms CPU (median of {len(paths)}, 1 process)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

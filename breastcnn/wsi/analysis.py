"""Classify a whole slide: plan the tiles, find tissue, classify in streamed batches, write the outputs.

Per slide, into its own folder (atomic writes, :mod:`breastcnn.fsutil`):

- ``tiles.csv``: one row per classified (tissue) tile, :data:`TILE_COLUMNS`:
  ``x,y`` level-0 pixels of the top-left corner, ``level`` the pyramid level
  read, ``width,height`` the region read at that level (so
  ``read_region((x, y), level, (width, height))`` gives the tile back),
  ``probability`` P(malignant), ``label`` at ``threshold``;
- ``heatmap.png``: the probabilities over the thumbnail, with a colour bar;
- ``summary.json``: :data:`SUMMARY_KEYS` and how the slide was read.

Streaming: tissue tiles go to the executor in batches of ``batch_size``
(coordinates only); each batch is read, resized to the model's input,
classified, and its rows written before the next result is taken, so memory
is bounded by a few batches and the thumbnail whatever the slide size.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from breastcnn import CLASSES
from breastcnn.cluster import LocalExecutor, resolve_model
from breastcnn.data.images import RESAMPLE
from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write, atomic_write_json
from breastcnn.inference import check_threads, malignant_probability, model_input, model_threads
from breastcnn.models import model_spec
from breastcnn.models.spec import DEFAULT_IMAGE_SIZE
from breastcnn.wsi.heatmap import plot_heatmap
from breastcnn.wsi.magnification import (
    Resolution,
    TilePlan,
    format_magnification,
    mpp_to_magnification,
    parse_magnification,
    plan_tiles,
    slide_resolution,
)
from breastcnn.wsi.reader import open_slide, resolve_reader
from breastcnn.wsi.tissue import Thumbnail, TissueSettings, read_thumbnail, tile_tissue_fractions, tissue_mask

TILE_COLUMNS = ("x", "y", "level", "width", "height", "probability", "label")
SUMMARY_KEYS = ("tiles", "tissue_tiles", "malignant_fraction", "max_probability", "seconds")
TILES_CSV, HEATMAP_PNG, SUMMARY_JSON = "tiles.csv", "heatmap.png", "summary.json"
OUTPUT_FILES = (TILES_CSV, HEATMAP_PNG, SUMMARY_JSON)


@dataclass(frozen=True)
class SlideSettings:
    """Options of ``breastcnn slide``; the defaults live here.

    ``tile``/``stride``: pixels at the model's magnification (``stride`` None =
    ``tile``); ``tissue_threshold``: least tissue fraction of a tile to classify
    it; ``threshold``: P(malignant) at which a tile is labelled malignant;
    ``mpp``/``mag``: the slide's level-0 resolution, overriding its metadata.
    """

    tile: int = DEFAULT_IMAGE_SIZE
    stride: int | None = None
    tissue_threshold: float = 0.5
    threshold: float = 0.5
    batch_size: int = 64
    mpp: float | None = None
    mag: str | None = None
    threads: int | None = None
    """Engine threads of a NumPy model (None: the model's setting), here and on each dask worker."""
    tissue: TissueSettings = field(default_factory=TissueSettings)

    def validated(self) -> SlideSettings:
        """Self with ``stride`` filled in; UserInputError naming the option for bad values."""
        if self.tile < 8:
            raise UserInputError(f"--tile must be >= 8 pixels, got {self.tile}")
        stride = self.tile if self.stride is None else self.stride
        if stride < 1:
            raise UserInputError(f"--stride must be >= 1 pixel, got {stride}")
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise UserInputError(f"--tissue-threshold must be a fraction in [0, 1], got {self.tissue_threshold}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserInputError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.batch_size < 1:
            raise UserInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.mpp is not None and self.mag is not None:
            raise UserInputError("--mpp and --mag both give the slide's resolution; pass one")
        if self.mpp is not None and not (self.mpp > 0 and np.isfinite(self.mpp)):
            raise UserInputError(f"--mpp must be a positive number of microns per pixel, got {self.mpp}")
        if self.mag is not None:
            parse_magnification(self.mag)

        check_threads(self.threads)
        return replace(self, stride=stride)


@dataclass
class SlideLayout:
    """What is decided before any tile is classified."""

    resolution: Resolution
    model_resolution: Resolution
    plan: TilePlan
    thumbnail: Thumbnail
    mask: np.ndarray
    mask_threshold: float
    fractions: np.ndarray
    tissue: np.ndarray
    """Indices (raster order) of the tiles with ``fraction >= tissue_threshold``."""


def layout_slide(reader, model_resolution: Resolution, settings: SlideSettings) -> SlideLayout:
    """Resolution, level, tile grid, thumbnail, tissue mask and the tissue tiles of ``reader``."""
    settings = settings.validated()
    resolution = slide_resolution(reader, model_resolution, mpp=settings.mpp, mag=settings.mag)
    plan = plan_tiles(
        reader.dimensions,
        reader.level_downsamples,
        resolution.mpp,
        model_resolution.mpp,
        settings.tile,
        settings.stride,
    )
    thumbnail = read_thumbnail(reader, plan.tile0, settings.tissue)
    mask, mask_threshold = tissue_mask(thumbnail.pixels, settings.tissue)
    fractions = tile_tissue_fractions(mask, thumbnail.downsample, plan)
    tissue = np.flatnonzero(fractions.ravel() >= settings.tissue_threshold) if plan.count else np.zeros(0, np.int64)
    return SlideLayout(resolution, model_resolution, plan, thumbnail, mask, mask_threshold, fractions, tissue)


def read_tiles(reader, origins: np.ndarray, level: int, read_size: int, image_size: int) -> np.ndarray:
    """uint8 ``(n, image_size, image_size, 3)``: each region read at ``level``, resized once (Lanczos)."""
    from PIL import Image

    out = np.empty((len(origins), image_size, image_size, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(origins):
        region = reader.read_region(int(x), int(y), level, read_size, read_size)
        if read_size != image_size:
            region = np.asarray(Image.fromarray(region).resize((image_size, image_size), RESAMPLE, reducing_gap=3.0))
        out[i] = region
    return out


def classify_tile_batch(
    model_source,
    slide_source,
    origins: np.ndarray,
    level: int,
    read_size: int,
    batch_size: int,
    threads: int | None = None,
) -> np.ndarray:
    """P(malignant) ``(n,)`` float32 of the tiles at level-0 ``origins`` ``(n, 2)``.

    The task of ``slide``: it runs here (local objects) or on a dask worker
    (a model payload and a slide path, resolved once per worker process).
    """
    model = resolve_model(model_source)
    reader = resolve_reader(slide_source)
    x = read_tiles(reader, origins, level, read_size, model_spec(model).image_size)
    x, _ = model_input(model, x)  # stain-normalised as the model was trained; a tile it cannot is left as is
    with model_threads(model, threads):
        probs = malignant_probability(model, model.predict(x, batch_size=batch_size))
    return np.asarray(probs, dtype=np.float32)


def output_dirs(slides: Sequence[str | os.PathLike], out: str | os.PathLike) -> list[Path]:
    """One folder per slide under ``out``: the file name without its extension, ``-2``, ``-3``... on clashes."""
    used: set[str] = set()
    dirs = []
    for slide in slides:
        stem = Path(slide).stem or "slide"
        name, counter = stem, 2
        while name.lower() in used:
            name = f"{stem}-{counter}"
            counter += 1
        used.add(name.lower())
        dirs.append(Path(out) / name)
    return dirs


def existing_outputs(folder: Path) -> list[Path]:
    """Our output files already present in ``folder`` (refused without ``--force``)."""
    return [folder / name for name in OUTPUT_FILES if (folder / name).exists()]


def analyse_slide(
    path: str | os.PathLike,
    model,
    out_dir: str | os.PathLike,
    settings: SlideSettings,
    model_resolution: Resolution,
    executor=None,
    model_path: str | os.PathLike | None = None,
    on_start: Callable[[SlideLayout], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Classify the tissue tiles of slide ``path`` with ``model``; write the outputs into ``out_dir``.

    ``executor``: :class:`breastcnn.cluster.LocalExecutor` (default) or a
    ``DaskExecutor`` (which ships ``model_path``). ``on_start(layout)`` is
    called before classification (to size a progress bar), ``progress(n)``
    after each batch. Returns the summary (:data:`SUMMARY_KEYS` and more).
    Raises UserInputError for an unreadable or unsupported slide.
    """
    started = time.perf_counter()
    settings = settings.validated()
    executor = executor or LocalExecutor()
    out_dir = Path(out_dir)
    with open_slide(path) as reader:
        layout = layout_slide(reader, model_resolution, settings)
        if on_start:
            on_start(layout)
        plan = layout.plan
        grid = np.full(plan.count, np.nan, dtype=np.float32)
        model_source = executor.model_source(model, model_path)
        slide_source = executor.slide_source(reader)
        batches = [
            layout.tissue[i : i + settings.batch_size] for i in range(0, len(layout.tissue), settings.batch_size)
        ]
        tasks = (
            (
                model_source,
                slide_source,
                plan.origins(batch),
                plan.level,
                plan.read_size,
                settings.batch_size,
                settings.threads,
            )
            for batch in batches
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        malignant = 0
        with atomic_write(out_dir / TILES_CSV, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(TILE_COLUMNS)
            for batch, probs in zip(batches, executor.map(classify_tile_batch, tasks), strict=True):
                grid[batch] = probs
                for (x, y), p in zip(plan.origins(batch), probs, strict=True):
                    label = CLASSES[int(p >= settings.threshold)]
                    malignant += label == CLASSES[1]
                    writer.writerow(
                        [int(x), int(y), plan.level, plan.read_size, plan.read_size, f"{float(p):.6f}", label]
                    )
                if progress:
                    progress(len(batch))
        grid = grid.reshape(plan.rows, plan.columns)
        n_tissue = int(len(layout.tissue))
        summary = {
            "slide": str(path),
            "out": str(out_dir),
            "tiles": int(plan.count),
            "tissue_tiles": n_tissue,
            "malignant_fraction": malignant / n_tissue if n_tissue else None,
            "max_probability": float(np.nanmax(grid)) if n_tissue else None,
            "seconds": None,
            "malignant_tiles": int(malignant),
            "reader": reader.kind,
            "dimensions": list(reader.dimensions),
            "level": plan.level,
            "level_downsample": plan.downsample,
            "read_size": plan.read_size,
            "tile": plan.tile,
            "stride": plan.stride,
            "tile_level0": plan.tile0,
            "stride_level0": plan.stride0,
            "mpp": layout.resolution.mpp,
            "resolution_source": layout.resolution.source,
            "model_magnification": format_magnification(mpp_to_magnification(model_resolution.mpp)),
            "model_magnification_source": model_resolution.source,
            "tissue_threshold": settings.tissue_threshold,
            "threshold": settings.threshold,
            "saturation_threshold": layout.mask_threshold,
            "tissue_fraction": float(layout.mask.mean()) if layout.mask.size else 0.0,
        }
        title = f"{Path(path).name}: {n_tissue} tissue tiles"
        if n_tissue:
            title += f", {summary['malignant_fraction']:.1%} malignant, max P {summary['max_probability']:.3f}"
        plot_heatmap(layout.thumbnail, plan, grid, out_dir / HEATMAP_PNG, title=title)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_json(out_dir / SUMMARY_JSON, summary)
    return summary

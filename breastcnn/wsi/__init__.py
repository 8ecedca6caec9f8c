"""Whole-slide inference: read a slide, find tissue, classify its tiles, map the probabilities.

    reader.py         OpenSlide / tifffile / Pillow readers behind one interface (open_slide)
    magnification.py  model and slide resolutions, pyramid level choice, the tile grid (TilePlan)
    tissue.py         streamed thumbnail, Otsu tissue mask on saturation, tile tissue fractions
    analysis.py       SlideSettings, the streamed classification, tiles.csv / summary.json
    heatmap.py        heatmap.png

The command is ``breastcnn slide`` (:mod:`breastcnn.cli.slide`); batches run
here or on a dask cluster through :mod:`breastcnn.cluster`.
"""

from breastcnn.wsi.analysis import OUTPUT_FILES, SUMMARY_KEYS, TILE_COLUMNS, SlideSettings, analyse_slide
from breastcnn.wsi.magnification import model_magnification
from breastcnn.wsi.reader import open_slide

__all__ = [
    "analyse_slide",
    "SlideSettings",
    "open_slide",
    "model_magnification",
    "TILE_COLUMNS",
    "SUMMARY_KEYS",
    "OUTPUT_FILES",
]

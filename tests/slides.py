"""Helpers of the whole-slide tests: a generated pyramidal TIFF with known tissue, a tile model, references.

The fixtures built from them (``slide_deps``, ``pyramid_tiff``, ``cmu_slide``,
``tile_model``) are in ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LEVEL0 = (1536, 2048)  # (height, width) of the generated slide
MPP = 0.25  # its level-0 microns per pixel (a 40x scan)
TISSUE = (448, 896, 448, 1344)  # y0, y1, x0, x1: two full 448-px tiles at model 200X
HALF_TISSUE = (896, 1344, 1344, 1568)  # the left half of the tile at (1344, 896)
TILE_SEED = 0


def tissue_image(seed: int = TILE_SEED) -> np.ndarray:
    """Level 0 ``(1536, 2048, 3)`` uint8: near-white glass (saturation <= 0.04) and textured pink tissue
    (saturation >= 0.3) in :data:`TISSUE` and :data:`HALF_TISSUE`; edges on multiples of 4 pixels."""
    rng = np.random.default_rng(seed)
    h, w = LEVEL0
    image = rng.integers(246, 256, size=(h, w, 3), dtype=np.uint8)
    for y0, y1, x0, x1 in (TISSUE, HALF_TISSUE):
        base = np.array([200, 110, 175])
        noise = rng.integers(-25, 26, size=(y1 - y0, x1 - x0, 3))
        image[y0:y1, x0:x1] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return image


def block_mean(image: np.ndarray, k: int) -> np.ndarray:
    """Downsample by ``k`` (mean of k x k blocks, rounded): how the pyramid levels are made."""
    h, w, c = image.shape
    blocks = image[: h // k * k, : w // k * k].reshape(h // k, k, w // k, k, c).astype(np.float64)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def write_pyramid_tiff(
    path: Path,
    image: np.ndarray,
    downsamples=(1, 2, 4),
    mpp: float | None = MPP,
    tile: int = 128,
    compression: str = "zlib",
) -> list[np.ndarray]:
    """A tiled pyramidal TIFF (levels in SubIFDs of the first page, resolution tags in px/cm); returns the levels."""
    import tifffile

    levels = [image if d == 1 else block_mean(image, d) for d in downsamples]
    with tifffile.TiffWriter(path) as writer:
        for i, (d, level) in enumerate(zip(downsamples, levels, strict=True)):
            extra = {"resolution": (1e4 / (mpp * d),) * 2, "resolutionunit": "CENTIMETER"} if mpp else {}
            writer.write(
                level,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                subifds=len(levels) - 1 if i == 0 else None,
                subfiletype=1 if i else 0,
                **extra,
            )
    return levels


def make_tile_model(path: Path, size: int = 64, seed: int = 0, **meta) -> Path:
    """A freshly created custom CNN (random weights) with ``minmax`` preprocessing, so its
    probabilities spread around 0.3-0.7 instead of saturating; saved as .npz."""
    from breastcnn.models import create_model, save_model

    model = create_model("custom", input_shape=(size, size, 3), seed=seed)
    model.meta.update({"preprocess": "minmax", **meta})
    save_model(model, path)
    return path


def model_probabilities(model_path: Path, tiles: np.ndarray) -> np.ndarray:
    """P(malignant) of uint8 tiles ``(n, s, s, 3)`` straight through the model (the reference)."""
    from breastcnn.data.images import preprocess
    from breastcnn.models import load_model

    model = load_model(model_path)
    return model.predict(preprocess(tiles, model.meta["preprocess"]), batch_size=64)[:, 1]


def resize_tile(region: np.ndarray, size: int) -> np.ndarray:
    """The reference resize: Pillow Lanczos with reducing_gap=3 (as ``decode_image``)."""
    from PIL import Image

    return np.asarray(Image.fromarray(region).resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0))

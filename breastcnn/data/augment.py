"""Training-time augmentation and class balance helpers.

:class:`Augmenter` applies the report's augmentation (rotation 40 deg,
width/height shift 20%, shear 20%, zoom 20%, horizontal and vertical flips)
to a uint8 NHWC batch. Each image gets one combined affine matrix (flips
folded in); the output grid is mapped back into the input in one vectorised
pass over the whole batch and sampled with a numpy gather (nearest or
bilinear), with reflected borders. New random draws on every call, from the
caller's ``np.random.Generator``, so every epoch sees new images (the report
froze one augmented copy).

With ``stain_jitter=HEDJitter()`` (:mod:`breastcnn.data.stain`) each warped
image also gets the HED colour jitter of Tellez et al. (2018); its draws come
after the affine ones, so without it the random stream (and every output
byte) is what it was before the option existed.

Differences from Keras ``ImageDataGenerator`` (on purpose): ``shear`` is a
shear *factor* (0.2 ~ 11 deg; Keras reads ``shear_range=0.2`` as 0.2 degrees,
which does nothing visible); the border fill is ``reflect`` by default
(``nearest`` available), which suits tissue better than smeared edges.

:func:`class_weights` and :func:`oversample_indices` help with the 1:2.2
benign:malignant imbalance of BreakHis.
"""

from __future__ import annotations

import numpy as np

from breastcnn.data.stain import HEDJitter
from breastcnn.errors import UserInputError


class Augmenter:
    """Random affine augmentation of uint8 image batches ``(N, H, W, C)``.

    ``rotation``: max angle in degrees (uniform in ``[-rotation, rotation]``);
    ``shift``: max translation as a fraction of width/height; ``shear``: max
    shear factor; ``zoom``: scale drawn per axis in ``[1 - zoom, 1 + zoom]``;
    ``hflip``/``vflip``: flip with probability 1/2; ``fill``: ``"reflect"`` or
    ``"nearest"``; ``interpolation``: ``"nearest"`` or ``"bilinear"``;
    ``stain_jitter``: a :class:`~breastcnn.data.stain.HEDJitter` applied to each
    warped image, or None (off).
    """

    def __init__(
        self,
        rotation: float = 40.0,
        shift: float = 0.2,
        shear: float = 0.2,
        zoom: float = 0.2,
        hflip: bool = True,
        vflip: bool = True,
        fill: str = "reflect",
        interpolation: str = "nearest",
        stain_jitter: HEDJitter | None = None,
    ):
        for name, value in (("rotation", rotation), ("shift", shift), ("shear", shear), ("zoom", zoom)):
            if not np.isfinite(value) or value < 0:
                raise UserInputError(f"Augmenter {name} must be a non-negative number, got {value!r}")
        if zoom >= 1:
            raise UserInputError(f"Augmenter zoom must be below 1, got {zoom!r}")
        if fill not in ("reflect", "nearest"):
            raise UserInputError(f"Augmenter fill must be 'reflect' or 'nearest', got {fill!r}")
        if interpolation not in ("nearest", "bilinear"):
            raise UserInputError(f"Augmenter interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
        self.rotation = float(rotation)
        self.shift = float(shift)
        self.shear = float(shear)
        self.zoom = float(zoom)
        self.hflip = bool(hflip)
        self.vflip = bool(vflip)
        if stain_jitter is not None and not isinstance(stain_jitter, HEDJitter):
            raise UserInputError(f"Augmenter stain_jitter must be a HEDJitter or None, got {stain_jitter!r}")
        self.fill = fill
        self.interpolation = interpolation
        self.stain_jitter = stain_jitter

    def get_config(self) -> dict:
        """JSON-able settings; ``stain_jitter`` is ``HEDJitter.to_dict()`` or None."""
        config = {
            k: getattr(self, k)
            for k in ("rotation", "shift", "shear", "zoom", "hflip", "vflip", "fill", "interpolation")
        }
        config["stain_jitter"] = None if self.stain_jitter is None else self.stain_jitter.to_dict()
        return config

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"Augmenter({args})"

    # ------------------------------------------------------------------ parameters

    def sample_matrices(self, n: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """Per-image affine maps from output to input pixel coordinates: float64 ``(n, 2, 3)``.

        ``[x_in, y_in] = M[:, :2] @ [x_out, y_out] + M[:, 2]`` (x = column, y = row).
        """
        theta = np.deg2rad(rng.uniform(-self.rotation, self.rotation, n))
        tx = rng.uniform(-self.shift, self.shift, n) * width
        ty = rng.uniform(-self.shift, self.shift, n) * height
        shear = rng.uniform(-self.shear, self.shear, n)
        zx = rng.uniform(1 - self.zoom, 1 + self.zoom, n)
        zy = rng.uniform(1 - self.zoom, 1 + self.zoom, n)
        fx = np.where(rng.random(n) < 0.5, -1.0, 1.0) if self.hflip else np.ones(n)
        fy = np.where(rng.random(n) < 0.5, -1.0, 1.0) if self.vflip else np.ones(n)

        cos, sin = np.cos(theta), np.sin(theta)
        rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # (n, 2, 2)
        she = np.zeros((n, 2, 2))
        she[:, 0, 0] = 1.0
        she[:, 0, 1] = shear
        she[:, 1, 1] = 1.0
        scale = np.zeros((n, 2, 2))
        scale[:, 0, 0] = zx * fx
        scale[:, 1, 1] = zy * fy
        linear = rot @ she @ scale
        # rotate/shear/zoom about the image centre, then shift
        centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
        offset = centre - linear @ centre + np.stack([tx, ty], -1)
        return np.concatenate([linear, offset[:, :, None]], axis=2)

    # ------------------------------------------------------------------ applying

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment a uint8 batch ``(N, H, W, C)`` -> new uint8 array, same shape."""
        x = np.asarray(x)
        if x.ndim != 4:
            raise UserInputError(f"Augmenter expects a batch (N, H, W, C), got shape {x.shape}")
        if x.dtype != np.uint8:
            raise UserInputError(f"Augmenter expects uint8 images, got {x.dtype}")
        n, height, width, channels = x.shape
        if n == 0:
            return x.copy()
        if self.stain_jitter is not None and channels != 3:
            raise UserInputError(f"Augmenter stain_jitter needs RGB images (N, H, W, 3), got shape {x.shape}")
        matrices = self.sample_matrices(n, height, width, rng)
        stain = None if self.stain_jitter is None else self.stain_jitter.sample(n, rng)
        return self.apply(x, matrices, stain=stain)

    def apply(
        self, x: np.ndarray, matrices: np.ndarray, chunk: int = 4, stain: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """Warp ``x`` (uint8 ``(N, H, W, C)``) with given output->input ``matrices`` ``(N, 2, 3)``.

        ``stain``: ``(alpha, beta)`` ``(N, 3)`` of :meth:`HEDJitter.sample`, applied
        after the warp (needs ``stain_jitter``). Works on ``chunk`` images at a
        time: the per-pixel temporaries then stay in the CPU cache, which
        measured twice as fast as one pass over the batch.
        """
        if stain is not None and self.stain_jitter is None:
            raise UserInputError("Augmenter.apply got stain parameters but the Augmenter has no stain_jitter")
        out = np.empty_like(x)
        for start in range(0, len(x), chunk):
            part = self._warp(x[start : start + chunk], matrices[start : start + chunk])
            if stain is not None:
                part = self.stain_jitter.apply(part, stain[0][start : start + chunk], stain[1][start : start + chunk])
            out[start : start + chunk] = part
        return out

    def _warp(self, x: np.ndarray, matrices: np.ndarray) -> np.ndarray:
        """:meth:`apply` on one chunk."""
        n, height, width, channels = x.shape
        m = matrices.astype(np.float32)
        cols = np.arange(width, dtype=np.float32)[None, None, :]
        rows = np.arange(height, dtype=np.float32)[None, :, None]
        # input coordinates of every output pixel, (n, H, W) float32, by broadcasting
        x_in = m[:, 0, 0, None, None] * cols + (m[:, 0, 1, None, None] * rows + m[:, 0, 2, None, None])
        y_in = m[:, 1, 0, None, None] * cols + (m[:, 1, 1, None, None] * rows + m[:, 1, 2, None, None])
        flat = np.ascontiguousarray(x).reshape(n * height * width, channels)
        base = (np.arange(n, dtype=np.int64) * (height * width))[:, None, None]

        if self.interpolation == "nearest":
            ix = self._nearest_index(x_in, width)
            iy = self._nearest_index(y_in, height)
            iy *= width
            iy += ix
            index = iy.astype(np.int64) + base
            return np.take(flat, index.reshape(-1), axis=0).reshape(x.shape)

        x_in = self._fold(x_in, width)
        y_in = self._fold(y_in, height)
        x0f, y0f = np.floor(x_in), np.floor(y_in)
        wx = (x_in - x0f)[..., None]
        wy = (y_in - y0f)[..., None]
        x0 = np.clip(x0f, 0, width - 1).astype(np.int64)
        y0 = np.clip(y0f, 0, height - 1).astype(np.int64)
        x1 = np.minimum(x0 + 1, width - 1)
        y1 = np.minimum(y0 + 1, height - 1)

        def gather(iy, ix):
            return np.take(flat, (base + iy * width + ix).reshape(-1), axis=0).reshape(x.shape).astype(np.float32)

        top = gather(y0, x0) * (1 - wx) + gather(y0, x1) * wx
        bottom = gather(y1, x0) * (1 - wx) + gather(y1, x1) * wx
        out = top * (1 - wy) + bottom * wy
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def _fold(self, coord: np.ndarray, size: int) -> np.ndarray:
        """Bring continuous coordinates into ``[-0.5, size - 0.5]`` (reflect about the borders, or clamp).

        Reflection is half-sample symmetric (``... b a | a b c d | d c ...``) and
        exact for one fold on each side, i.e. coordinates in ``[-size, 2 size]``,
        which covers every draw of the default ranges; beyond that it clamps.
        """
        if self.fill == "nearest":
            return np.clip(coord, -0.5, size - 0.5, out=coord)
        # shifted by +0.5 the borders sit at 0 and size: t -> |t|, then t -> size - |size - t|
        coord += 0.5
        np.abs(coord, out=coord)
        np.subtract(size, coord, out=coord)
        np.abs(coord, out=coord)
        np.subtract(size, coord, out=coord)
        coord -= 0.5
        return np.clip(coord, -0.5, size - 0.5, out=coord)

    def _nearest_index(self, coord: np.ndarray, size: int) -> np.ndarray:
        """Integer pixel index (int32, in ``[0, size)``) nearest to each folded coordinate."""
        coord = self._fold(coord, size)
        coord += 0.5
        np.floor(coord, out=coord)
        return np.minimum(coord, size - 1, out=coord).astype(np.int32)


# --------------------------------------------------------------------------- class balance


def class_weights(y: np.ndarray, mode: str | None = "balanced", num_classes: int = 2) -> dict[int, float] | None:
    """Per-class loss weights: ``"balanced"`` -> ``n / (k * count_c)`` (scikit-learn), None -> None.

    Classes absent from ``y`` get weight 1.0.
    """
    if mode in (None, "none"):
        return None
    if mode != "balanced":
        raise UserInputError(f"--class-weights must be 'balanced' or 'none', got {mode!r}")
    from sklearn.utils.class_weight import compute_class_weight

    y = np.asarray(y, dtype=np.int64)
    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    out = {c: 1.0 for c in range(num_classes)}
    out.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
    return out


def oversample_indices(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One epoch of indices in which every class appears as often as the largest one.

    All original indices appear; smaller classes are topped up by drawing
    their indices again with replacement; the result is shuffled. int64 ``(k * max_count,)``.
    """
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) == 0:
        return np.empty(0, dtype=np.int64)
    largest = counts.max()
    parts = []
    for c, count in zip(classes, counts, strict=True):
        idx = np.flatnonzero(y == c)
        extra = rng.choice(idx, size=largest - count, replace=True) if largest > count else idx[:0]
        parts.append(np.concatenate([idx, extra]))
    out = np.concatenate(parts).astype(np.int64)
    rng.shuffle(out)
    return out

"""Stain normalisation (Macenko, Reinhard) and stain augmentation (HED jitter) of uint8 RGB images.

Every function takes uint8 RGB images, one ``(H, W, 3)`` or a batch
``(N, H, W, 3)``, and returns a new uint8 array of the same shape; the input
is never modified.

Optical density (Beer-Lambert), per channel: ``OD = -ln(max(I, 1) / 255)``,
so white is OD 0 and the floor at 1 keeps black finite (OD <= ln 255). This
is scikit-image's ``rgb2hed`` convention except for its scale: skimage divides
OD by ``ln(1e6)`` (:data:`HED_UNIT`) and clamps negative stain amounts to 0.
:func:`rgb_to_hed` keeps skimage's unit but not the clamp, so that
``hed_to_rgb(rgb_to_hed(x)) == x``.

Normalisers are fitted once (on a target image or on training tiles), stored
as a small JSON-able dict (e.g. in a model file's metadata) and applied to any
batch::

    norm = MacenkoNormaliser().fit(train_tiles)            # or ReinhardNormaliser(), fit_normaliser("macenko", ...)
    meta["stain_norm"] = norm.to_dict()                     # plain floats
    norm = normaliser_from_dict(meta["stain_norm"], source="model.npz")   # validated
    out, fallback = norm.transform(batch, return_fallback=True)           # fallback: bool (N,)

An image whose own stains cannot be estimated (background only, nearly white,
one flat colour, too few tissue pixels) is returned unchanged and flagged in
``fallback``, so a command can say how many images it left unnormalised; no
NaN and no division by zero can reach the output.

:class:`HEDJitter` is the stain augmentation of Tellez et al. (2018): per
image and per haematoxylin/eosin/DAB channel, ``hed' = alpha * hed + beta``
with ``alpha ~ U(1 - scale, 1 + scale)``, ``beta ~ U(-shift, shift)``, in
skimage's HED unit (the shift faded out on the white background). :class:`~breastcnn.data.augment.Augmenter` applies it
after the affine warp when given ``stain_jitter=HEDJitter()``.

The colour maths is NumPy (float32), with the same matrices and constants as
scikit-image (``rgb_from_hed``, ``xyz_from_rgb``, D65 white), which the tests
use as the reference: on 224 px images it measured 3x faster than
``skimage.color.rgb2hed``/``hed2rgb`` for the HED jitter (which has to fit the
1 ms augmentation budget) and 5x faster than ``rgb2lab``/``lab2rgb``
(``benchmarks/bench_stain.py``), and the package needs no scikit-image at run time.

References: Macenko et al., "A method for normalizing histology slides for
quantitative analysis", ISBI 2009; Reinhard et al., "Color transfer between
images", IEEE CG&A 2001; Ruifrok & Johnston, "Quantification of histochemical
staining by color deconvolution", AQCH 2001; Tellez et al., "Whole-slide
mitosis detection in H&E breast histology using PHH3 as a reference to train
distilled stain-invariant convolutional networks", IEEE TMI 2018.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from breastcnn.errors import UserInputError

STAIN_METHODS = ("none", "macenko", "reinhard")
"""Values of ``--stain-norm``; ``"none"`` means no normaliser."""

DICT_VERSION = 1
"""``version`` written by ``to_dict``; a newer version is refused on load."""

TISSUE_OD = 0.15
"""Optical density below which a channel counts as background (Macenko's beta)."""

HED_UNIT = math.log(1e6)
"""scikit-image's HED values are ``OD @ hed_from_rgb / HED_UNIT``."""

LN255 = math.log(255.0)

# Ruifrok & Johnston's H, E and DAB optical-density directions (rows), as skimage.color.rgb_from_hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# sRGB (D65) <-> CIE XYZ and the D65 2-degree white, as skimage.color.
XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
WHITE_D65 = np.array([0.95047, 1.0, 1.08883])

_MIN_STAIN_ANGLE = math.radians(3.0)  # Macenko: the 1st..99th percentile angle spread below this is one colour
_MIN_MAX_CONCENTRATION = 1e-3  # a stain whose 99th-percentile amount is below this is absent
_MIN_LAB_STD = 0.5  # Reinhard: a LAB channel flatter than this (in LAB units) cannot be rescaled


def _srgb_to_linear_table() -> np.ndarray:
    c = np.arange(256) / 255.0
    return np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92).astype(np.float32)


_LINEAR_FROM_SRGB = _srgb_to_linear_table()  # 256 entries: uint8 sRGB -> linear light


# --------------------------------------------------------------------------- colour spaces


def check_images(images, name: str = "images") -> tuple[np.ndarray, bool]:
    """``(batch (N, H, W, 3) uint8, was_single)``; one ``(H, W, 3)`` image becomes a batch of one.

    Raises :class:`UserInputError` naming ``name`` for another dtype or shape.
    """
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise UserInputError(f"{name} must be uint8 RGB, got dtype {x.dtype}")
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise UserInputError(f"{name} must be RGB (H, W, 3) or (N, H, W, 3), got shape {x.shape}")
    return (x[None], True) if x.ndim == 3 else (x, False)


def channel_min(x: np.ndarray) -> np.ndarray:
    """Smallest of the 3 channels, ``x.shape[:-1]`` (``x.min(-1)`` reduces 3 values per call: 50x slower)."""
    return np.minimum(np.minimum(x[..., 0], x[..., 1]), x[..., 2])


def _log(x: np.ndarray) -> np.ndarray:
    """``ln(max(x, 1))``: float32, same shape as uint8 ``x``."""
    out = np.bitwise_or(x, x == 0).astype(np.float32)  # 0 -> 1; np.maximum is 7x slower here (not vectorised)
    return np.log(out, out=out)


def optical_density(x: np.ndarray) -> np.ndarray:
    """``-ln(max(x, 1) / 255)`` per channel: float32, same shape as uint8 ``x``; white -> 0."""
    od = _log(x)
    np.subtract(np.float32(LN255), od, out=od)
    return od


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`optical_density`: ``round(255 exp(-od))`` clipped to uint8, same shape."""
    out = np.negative(od, dtype=np.float32)
    np.exp(out, out=out)
    out *= 255.0
    out += 0.5
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)


def rgb_to_hed(x: np.ndarray) -> np.ndarray:
    """Haematoxylin, eosin and DAB amounts (float32, shape of uint8 ``x``) in skimage's unit.

    Equals ``skimage.color.rgb2hed(np.maximum(x, 1))`` where that is positive;
    negative amounts are kept (skimage clamps them to 0) so that
    :func:`hed_to_rgb` inverts this exactly.
    """
    return optical_density(x) @ (HED_FROM_RGB / HED_UNIT).astype(np.float32)


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """HED amounts (skimage's unit) -> uint8 RGB, as ``skimage.color.hed2rgb`` rounded to uint8."""
    return od_to_rgb(np.asarray(hed, dtype=np.float32) @ (RGB_FROM_HED * HED_UNIT).astype(np.float32))


def rgb_to_lab(x: np.ndarray) -> np.ndarray:
    """uint8 sRGB -> CIE L*a*b* (D65, 2 degrees; as ``skimage.color.rgb2lab``), float32, same shape."""
    lin = np.take(_LINEAR_FROM_SRGB, x)
    xyz = lin @ (XYZ_FROM_RGB / WHITE_D65[:, None]).T.astype(np.float32)  # already divided by the white
    small = xyz <= 0.008856
    f = np.cbrt(xyz)
    f[small] = 7.787 * xyz[small] + 16.0 / 116.0
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) -> uint8 sRGB, as ``skimage.color.lab2rgb`` (out-of-gamut values clipped) rounded."""
    lab = np.asarray(lab, dtype=np.float32)
    f = np.empty_like(lab)
    f[..., 1] = (lab[..., 0] + 16.0) / 116.0
    f[..., 0] = f[..., 1] + lab[..., 1] / 500.0
    f[..., 2] = np.maximum(f[..., 1] - lab[..., 2] / 200.0, 0.0)  # skimage sets z < 0 to 0
    small = f <= 0.2068966
    xyz = f * f * f
    xyz[small] = (f[small] - 16.0 / 116.0) / 7.787
    lin = xyz @ (RGB_FROM_XYZ * WHITE_D65[None, :]).T.astype(np.float32)
    np.clip(lin, 0.0, 1.0, out=lin)
    dark = lin <= 0.0031308
    srgb = np.power(lin, np.float32(1 / 2.4))
    srgb *= 1.055
    srgb -= 0.055
    srgb[dark] = 12.92 * lin[dark]
    srgb *= 255.0
    srgb += 0.5
    np.clip(srgb, 0.0, 255.0, out=srgb)
    return srgb.astype(np.uint8)


def tissue_weight_table(background_od: float) -> np.ndarray:
    """256-entry float32 table: ``min(1, OD(v) / background_od)`` for the darkest channel value ``v``.

    ``table[channel_min(x)]`` is 0 on pure white, 1 where some channel's OD
    reaches ``background_od``, a ramp in between (a soft tissue mask).
    """
    od = -np.log(np.maximum(np.arange(256), 1) / 255.0)
    return np.minimum(od / background_od, 1.0).astype(np.float32)


def tissue_mask(x: np.ndarray, beta: float = TISSUE_OD) -> np.ndarray:
    """Stained (not background) pixels: some channel's OD at least ``beta``. bool, ``x.shape[:-1]``.

    Equals ``tissue_weight_table(beta)[channel_min(x)] == 1``.
    """
    return np.take(tissue_weight_table(beta), channel_min(x)) >= 1.0


# --------------------------------------------------------------------------- normalisers


def _as_image_list(images, name: str) -> list[np.ndarray]:
    """One image, a batch, or a sequence of images/batches of any sizes -> list of (H, W, 3) uint8."""
    if isinstance(images, np.ndarray) or not isinstance(images, Sequence):
        batch, _ = check_images(images, name)
        return list(batch)
    if len(images) == 0:
        raise UserInputError(f"{name}: no images given")
    out: list[np.ndarray] = []
    for item in images:
        batch, _ = check_images(item, name)
        out.extend(batch)
    return out


def _pooled_pixels(images: list[np.ndarray], max_pixels: int) -> np.ndarray:
    """All pixels of ``images`` as uint8 ``(P, 3)``, thinned by a regular stride to at most ``max_pixels``."""
    total = sum(im.shape[0] * im.shape[1] for im in images)
    stride = max(1, math.ceil(total / max_pixels))
    pixels = np.concatenate([im.reshape(-1, 3) for im in images])
    return pixels[::stride]


class _Normaliser:
    """Shared fit/transform/dict plumbing; subclasses estimate and apply one image."""

    method: str = ""
    _target_keys: tuple[str, ...] = ()

    # subclass API --------------------------------------------------------
    def _fit_pixels(self, pixels: np.ndarray) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _transform_pixels(self, pixels: np.ndarray) -> np.ndarray | None:  # pragma: no cover - abstract
        raise NotImplementedError

    # public API ----------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return all(getattr(self, key) is not None for key in self._target_keys)

    def fit(self, images, max_pixels: int = 2_000_000):
        """Fit the target on one image, a batch, or a list of images of any sizes (pixels pooled).

        At most ``max_pixels`` pixels are used (a regular stride over all of
        them, so the fit is deterministic). Raises :class:`UserInputError`
        when the images hold too little stained tissue. Returns ``self``.
        """
        if (
            isinstance(max_pixels, bool)
            or not isinstance(max_pixels, (int, np.integer))
            or max_pixels < self.min_tissue_pixels
        ):
            raise UserInputError(
                f"max_pixels must be an integer >= min_tissue_pixels ({self.min_tissue_pixels}), got {max_pixels!r}"
            )
        pixels = _pooled_pixels(_as_image_list(images, f"{self.method} stain target"), int(max_pixels))
        if not self._fit_pixels(pixels):
            raise UserInputError(
                f"{self.method} stain target: too little stained tissue to fit on "
                f"({pixels.shape[0]} pixels; need at least {self.min_tissue_pixels} with OD above {self.beta})"
            )
        return self

    def transform(self, images, return_fallback: bool = False):
        """Normalise uint8 RGB ``(H, W, 3)`` or ``(N, H, W, 3)`` -> new uint8 array, same shape.

        Each image is normalised on its own; one whose stains cannot be
        estimated is copied unchanged. With ``return_fallback`` returns
        ``(out, fallback)``, ``fallback`` a bool array ``(N,)`` (``(1,)`` for
        one image) that is True for the images left unchanged.
        """
        if not self.is_fitted:
            raise UserInputError(f"{self.method} normaliser is not fitted: call fit() or load it with from_dict()")
        x, single = check_images(images)
        out = np.empty_like(x)
        fallback = np.zeros(len(x), dtype=bool)
        for i, image in enumerate(x):
            result = self._transform_pixels(image.reshape(-1, 3))
            if result is None:
                out[i] = image
                fallback[i] = True
            else:
                out[i] = result.reshape(image.shape)
        if single:
            out = out[0]
        return (out, fallback) if return_fallback else out

    __call__ = transform

    def to_dict(self) -> dict:
        """JSON-able description: ``method``, ``version``, the parameters, the fitted target (plain floats)."""
        if not self.is_fitted:
            raise UserInputError(f"{self.method} normaliser is not fitted: nothing to save")
        out: dict = {"method": self.method, "version": DICT_VERSION}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = np.asarray(value, dtype=float).tolist() if isinstance(value, np.ndarray) else value
        return out

    @classmethod
    def from_dict(cls, d: dict, source: str = "stain normaliser"):
        """Rebuild a fitted normaliser from :meth:`to_dict` output, checking every value.

        Raises :class:`UserInputError` naming ``source`` and the key for a
        missing, unknown, non-finite or wrongly shaped value.
        """
        return normaliser_from_dict(d, source, expect=cls.method)


@dataclass(eq=False)
class MacenkoNormaliser(_Normaliser):
    """Macenko et al. (2009) stain normalisation to a target's H and E directions and amounts.

    Per image: OD of every pixel; the tissue pixels (:func:`tissue_mask`: some
    channel's OD at least ``beta``) give the plane of the two largest
    eigenvectors of their OD covariance; the angles of their projections in that plane, at the
    ``alpha`` and ``100 - alpha`` percentiles, give the two stain directions,
    haematoxylin first (the one with the larger red OD, as in Macenko's code,
    torchstain and staintools); least-squares concentrations of every pixel;
    each stain's amounts scaled so that their 99th percentile over the tissue
    pixels matches the target's; OD rebuilt with the target's stain directions.

    ``keep_residual`` (default): the part of each pixel's OD off the plane of
    its two stains is kept, moved along the target's plane normal (the
    "complement stain" of HistomicsTK's colour deconvolution), so an image
    normalised to its own target is unchanged. Plain Macenko drops it (the
    output is a pure two-stain image): normalising the H&E test slide's tiles
    to their own targets that way moves them by 6-16 mean Delta E (median 11).

    Two departures from Macenko's code (and torchstain), both for robustness:
    it keeps a pixel only when *every* channel's OD exceeds ``beta``, which
    also drops pure eosin (red OD ~0.1) and pulls the eosin vector towards
    haematoxylin ("some channel" excludes the background all the same); and it
    takes the 99th percentile over all pixels, so a tile that is mostly glass
    gets a near-zero maximum and its few tissue pixels are blown out.

    ``stain_matrix``: target ``(2, 3)`` unit OD vectors (rows H, E);
    ``max_concentrations``: target ``(2,)`` 99th-percentile amounts.
    """

    method = "macenko"
    _target_keys = ("stain_matrix", "max_concentrations")

    alpha: float = 1.0
    beta: float = TISSUE_OD
    min_tissue_pixels: int = 256
    keep_residual: bool = True
    stain_matrix: np.ndarray | None = field(default=None, repr=False)
    max_concentrations: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        for key, value in _validated(self.method, _field_values(self), "stain normaliser").items():
            setattr(self, key, value)

    def estimate(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Stains of uint8 pixels ``(P, 3)``: ``(stain_matrix (2, 3), max_concentrations (2,), od (P, 3))``.

        None when they cannot be estimated (fewer than ``min_tissue_pixels``
        stained pixels, one colour, a stain absent, anything non-finite).
        """
        mask = tissue_mask(pixels, self.beta)
        if int(mask.sum()) < max(self.min_tissue_pixels, 2):
            return None
        od = optical_density(pixels)
        stained = od[mask]
        cov = np.cov(stained.astype(np.float64), rowvar=False)
        if not np.all(np.isfinite(cov)):
            return None
        _, vectors = np.linalg.eigh(cov)  # ascending eigenvalues
        plane = vectors[:, [2, 1]]
        plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD: angles near 0, far from +-pi
        projected = stained @ plane.astype(np.float32)
        angles = np.arctan2(projected[:, 1], projected[:, 0])
        low, high = np.percentile(angles, [self.alpha, 100.0 - self.alpha])
        if not high - low >= _MIN_STAIN_ANGLE:  # also catches NaN
            return None
        v_low = plane @ np.array([math.cos(low), math.sin(low)])
        v_high = plane @ np.array([math.cos(high), math.sin(high)])
        stains = np.stack([v_low, v_high] if v_low[0] > v_high[0] else [v_high, v_low])
        stains /= np.linalg.norm(stains, axis=1, keepdims=True)
        concentrations = stained @ np.linalg.pinv(stains.T).T.astype(np.float32)  # (tissue, 2) least squares
        max_c = np.percentile(concentrations, 99, axis=0).astype(np.float64)
        if not (np.all(np.isfinite(stains)) and np.all(np.isfinite(max_c)) and np.all(max_c > _MIN_MAX_CONCENTRATION)):
            return None
        return stains, max_c, od

    def _fit_pixels(self, pixels: np.ndarray) -> bool:
        estimate = self.estimate(pixels)
        if estimate is None:
            return False
        self.stain_matrix, self.max_concentrations, _ = estimate
        return True

    def _transform_pixels(self, pixels: np.ndarray) -> np.ndarray | None:
        estimate = self.estimate(pixels)
        if estimate is None:
            return None
        stains, max_c, od = estimate
        # od = (C_h, C_e, C_n) @ [h; e; n], n the unit normal of the stain plane: C_h, C_e are the least-squares
        # amounts, C_n the residual. od_out = (C_h r_h, C_e r_e, C_n) @ [h'; e'; n'] (target's), one 3x3 map.
        ratio = np.array([*(self.max_concentrations / max_c), 1.0 if self.keep_residual else 0.0])
        to_target = np.linalg.inv(_with_normal(stains)) @ (ratio[:, None] * _with_normal(self.stain_matrix))
        return od_to_rgb(od @ to_target.astype(np.float32))


@dataclass(eq=False)
class ReinhardNormaliser(_Normaliser):
    """Reinhard et al. (2001) colour transfer: match the mean and std of each CIE L*a*b* channel.

    Statistics come from tissue pixels (some channel's OD at least ``beta``).
    The mapped colour is blended with the original by a soft tissue weight
    (``min(1, max OD / beta)``), so pure white stays white and a bright
    background is not tinted. ``lab_mean``, ``lab_std``: the target's ``(3,)``.
    """

    method = "reinhard"
    _target_keys = ("lab_mean", "lab_std")

    beta: float = TISSUE_OD
    min_tissue_pixels: int = 256
    lab_mean: np.ndarray | None = field(default=None, repr=False)
    lab_std: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        for key, value in _validated(self.method, _field_values(self), "stain normaliser").items():
            setattr(self, key, value)

    def estimate(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """``(lab_mean (3,), lab_std (3,), lab (P, 3), weight (P,))`` of uint8 pixels ``(P, 3)``, or None.

        None with fewer than ``min_tissue_pixels`` tissue pixels or a LAB
        channel flatter than :data:`_MIN_LAB_STD` (a single colour).
        """
        weight = np.take(tissue_weight_table(self.beta), channel_min(pixels))
        tissue = weight >= 1.0
        if int(tissue.sum()) < self.min_tissue_pixels:
            return None
        lab = rgb_to_lab(pixels)
        values = lab[tissue].astype(np.float64)
        mean, std = values.mean(axis=0), values.std(axis=0)
        if not (np.all(np.isfinite(mean)) and np.all(std >= _MIN_LAB_STD)):
            return None
        return mean, std, lab, weight

    def _fit_pixels(self, pixels: np.ndarray) -> bool:
        estimate = self.estimate(pixels)
        if estimate is None:
            return False
        self.lab_mean, self.lab_std = estimate[0], estimate[1]
        return True

    def _transform_pixels(self, pixels: np.ndarray) -> np.ndarray | None:
        estimate = self.estimate(pixels)
        if estimate is None:
            return None
        mean, std, lab, weight = estimate
        gain = (self.lab_std / std).astype(np.float32)
        offset = (self.lab_mean - mean * self.lab_std / std).astype(np.float32)
        for c in range(3):  # lab + w * (gain * lab + offset - lab), channel by channel (long loops)
            lab[:, c] += weight * (lab[:, c] * (gain[c] - 1.0) + offset[c])
        return lab_to_rgb(lab)


def _with_normal(stains: np.ndarray) -> np.ndarray:
    """``(3, 3)``: the two stain rows and the unit normal of their plane (HistomicsTK's complement stain)."""
    normal = np.cross(stains[0], stains[1])
    return np.vstack([stains, normal / np.linalg.norm(normal)])


_NORMALISERS = {"macenko": MacenkoNormaliser, "reinhard": ReinhardNormaliser}


def fit_normaliser(method: str, images, **params):
    """A fitted :class:`MacenkoNormaliser` or :class:`ReinhardNormaliser` (``method``), see ``fit``."""
    if method not in _NORMALISERS:
        raise UserInputError(f"unknown stain normalisation method {method!r} (expected one of: macenko, reinhard)")
    return _NORMALISERS[method](**params).fit(images)


def _validated(method: str, values: dict, source: str) -> dict:
    """Checked copy of a normaliser's fields (parameters, and the target where not None): arrays as float64.

    Raises :class:`UserInputError` naming ``source``, the method and the key.
    """
    name = f"{source} ({method})"
    out = dict(values)

    def number(key, low, high, integer=False):
        value = values[key]
        kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value < high:
            kind = "an integer" if integer else "a number"
            raise UserInputError(f"{name}: {key!r} must be {kind} in [{low}, {high}), got {value!r}")
        out[key] = int(value) if integer else float(value)

    if "alpha" in values:
        number("alpha", 0.0, 50.0)
    if "keep_residual" in values and not isinstance(values["keep_residual"], (bool, np.bool_)):
        raise UserInputError(f"{name}: 'keep_residual' must be true or false, got {values['keep_residual']!r}")
    number("beta", 0.01, LN255)
    number("min_tissue_pixels", 2, 2**62, integer=True)
    shapes = {"stain_matrix": (2, 3), "max_concentrations": (2,), "lab_mean": (3,), "lab_std": (3,)}
    for key in _NORMALISERS[method]._target_keys:
        value = values[key]
        if value is None:
            continue
        try:
            arr = np.array(value, dtype=np.float64)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.shape != shapes[key] or not np.all(np.isfinite(arr)):
            raise UserInputError(f"{name}: {key!r} must be finite numbers of shape {shapes[key]}, got {value!r}")
        if key in ("max_concentrations", "lab_std") and not np.all(arr > 0):
            raise UserInputError(f"{name}: {key!r} must be positive, got {arr.tolist()}")
        out[key] = arr
    stains = out.get("stain_matrix")
    if stains is not None:
        norms = np.linalg.norm(stains, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-3) or abs(float(stains[0] @ stains[1])) > math.cos(_MIN_STAIN_ANGLE):
            raise UserInputError(
                f"{name}: 'stain_matrix' rows must be two distinct unit vectors, got {stains.tolist()}"
            )
    return out


def _field_values(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def normaliser_from_dict(d, source: str = "stain normaliser", expect: str | None = None):
    """Rebuild a fitted normaliser from ``to_dict()`` output (e.g. read from a model file).

    Checks the method, the version, that the keys are exactly the expected
    ones, and every value (finite, shape, range); raises
    :class:`UserInputError` whose message starts with ``source``.
    """
    if not isinstance(d, dict):
        raise UserInputError(f"{source}: expected a JSON object, got {type(d).__name__}")
    method = d.get("method")
    if method not in _NORMALISERS:
        raise UserInputError(
            f"{source}: unknown stain normalisation method {method!r} (expected one of: macenko, reinhard)"
        )
    if expect is not None and method != expect:
        raise UserInputError(f"{source}: expected method {expect!r}, got {method!r}")
    version = d.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= DICT_VERSION:
        raise UserInputError(f"{source}: unsupported version {version!r} (this breastcnn reads up to {DICT_VERSION})")
    cls = _NORMALISERS[method]
    names = {f.name for f in fields(cls)}
    given = set(d) - {"method", "version"}
    if given != names:
        missing, unknown = sorted(names - given), sorted(given - names)
        raise UserInputError(f"{source} ({method}): missing keys {missing}, unknown keys {unknown}")
    obj = cls(**_validated(method, {k: d[k] for k in names}, source))
    if not obj.is_fitted:
        raise UserInputError(f"{source} ({method}): the fitted target is missing ({', '.join(cls._target_keys)})")
    return obj


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class HEDJitter:
    """HED colour jitter (Tellez et al. 2018) of uint8 RGB batches, vectorised over the batch.

    Per image and per H/E/DAB channel ``hed' = alpha * hed + beta * w`` with
    ``alpha ~ U(1 - scale, 1 + scale)`` and ``beta ~ U(-shift, shift)``
    (skimage's HED unit, :data:`HED_UNIT`; typical H&E tissue is 0.02-0.3 in
    H). ``w`` is the soft tissue weight of :func:`tissue_weight_table`
    (``background_od``): the shift is not applied to pure white and only
    partly to pale background, so white stays white (OD 0 is also fixed by
    the scaling).

    The whole map is one 3x3 matrix per image on optical densities,
    ``od' = od @ A + w * b``, then ``255 exp(-od')`` (float32).

    Defaults: ``scale`` 0.05 is Tellez's "HED-light"; ``shift`` 0.01 (0.14
    OD) is a fifth of their 0.05, which is as large as the median
    haematoxylin amount of the H&E test slide (0.04) and tints tissue
    strongly. Which strength helps BreakHis is for the training experiments
    to measure.
    """

    scale: float = 0.05
    shift: float = 0.01
    background_od: float = TISSUE_OD

    def __post_init__(self):
        for name, value, upper in (("scale", self.scale, 1.0), ("shift", self.shift, 0.5)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < upper):
                raise UserInputError(f"HED jitter {name} must be a number in [0, {upper}), got {value!r}")
        od = self.background_od
        if isinstance(od, bool) or not isinstance(od, (int, float)) or not 0 < od < LN255:
            raise UserInputError(f"HED jitter background_od must be in (0, {LN255:.2f}), got {self.background_od!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HEDJitter:
        if not isinstance(d, dict) or not set(d) <= {f.name for f in fields(cls)}:
            raise UserInputError(f"HED jitter: expected keys among scale, shift, background_od, got {d!r}")
        return cls(**d)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(alpha, beta)``, float64 ``(n, 3)`` each (columns H, E, DAB): scales then shifts."""
        alpha = rng.uniform(1.0 - self.scale, 1.0 + self.scale, (n, 3))
        beta = rng.uniform(-self.shift, self.shift, (n, 3))
        return alpha, beta

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Jitter uint8 ``(N, H, W, 3)`` or ``(H, W, 3)`` with fresh draws from ``rng`` -> new uint8 array."""
        batch, single = check_images(x, "HED jitter input")
        alpha, beta = self.sample(len(batch), rng)
        out = self.apply(batch, alpha, beta)
        return out[0] if single else out

    def apply(self, x: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """Jitter uint8 ``(N, H, W, 3)`` with given ``alpha``, ``beta`` ``(N, 3)`` -> new uint8 array.

        One image at a time, so that the float32 temporaries stay in the CPU
        cache (measured faster than 4 at a time).
        """
        x, _ = check_images(x, "HED jitter input")
        n = len(x)
        alpha, beta = np.asarray(alpha, dtype=np.float64), np.asarray(beta, dtype=np.float64)
        if alpha.shape != (n, 3) or beta.shape != (n, 3):
            raise UserInputError(
                f"HED jitter alpha and beta must have shape ({n}, 3), got {alpha.shape} and {beta.shape}"
            )
        # out = 255 exp(-od'), od' = od @ A + w b, od = ln 255 - ln x, A = hed_from_rgb diag(alpha) rgb_from_hed:
        # ln(out) = ln(x) @ A + c - w b with c = ln 255 (1 - column sums of A)
        maps = HED_FROM_RGB[None] @ (alpha[:, :, None] * RGB_FROM_HED[None])  # (n, 3, 3)
        consts = (LN255 * (1.0 - maps.sum(axis=1))).astype(np.float32)  # (n, 3)
        shifts = ((beta * HED_UNIT) @ RGB_FROM_HED).astype(np.float32)  # (n, 3): OD added on tissue
        maps = maps.astype(np.float32)
        weights = tissue_weight_table(self.background_od) if np.any(shifts) else None
        out = np.empty_like(x)
        for i in range(n):
            pixels = x[i].reshape(-1, 3)
            y = _log(pixels) @ maps[i]  # (P, 3)
            w = None if weights is None else np.take(weights, channel_min(pixels))  # (P,)
            for j in range(3):  # channel by channel: broadcasting over a last axis of 3 is 10x slower
                if w is None:
                    y[:, j] += consts[i, j]
                else:
                    term = w * -shifts[i, j]
                    term += consts[i, j]
                    y[:, j] += term
            np.exp(y, out=y)
            y += 0.5
            bright = y > 255.0  # brighter than white; rare, and np.minimum is slow here (not vectorised)
            if bright.any():
                y[bright] = 255.0
            np.copyto(out[i].reshape(y.shape), y, casting="unsafe")
        return out


# --------------------------------------------------------------------------- a model's stain settings

STAIN_META_KEYS = ("method", "target", "normaliser", "augment")
"""Keys of a model's ``stain`` metadata (:func:`stain_meta`)."""


def stain_meta(normaliser=None, target: str | None = None, augment: HEDJitter | None = None) -> dict | None:
    """A model file's ``stain`` entry (plain JSON), or None when there is neither normalisation nor augmentation.

    ``{"method": "none"|"macenko"|"reinhard", "target": where the target came from ("training subset" or
    an image path; None without normalisation), "normaliser": normaliser.to_dict() (the fitted target as
    plain numbers) or None, "augment": HEDJitter.to_dict() or None (what training used; inference ignores it)}``.
    """
    if normaliser is None and augment is None:
        return None
    return {
        "method": normaliser.method if normaliser is not None else "none",
        "target": target if normaliser is not None else None,
        "normaliser": normaliser.to_dict() if normaliser is not None else None,
        "augment": augment.to_dict() if augment is not None else None,
    }


def check_stain_meta(value, source: str = "the model"):
    """``(normaliser or None, HEDJitter or None)`` of a model's ``stain`` metadata, every value checked.

    Raises :class:`UserInputError` starting with ``source`` (the model file) for an unknown key or method,
    a method without its fitted normaliser (or the other way round), or a bad normaliser/jitter value.
    """
    if not isinstance(value, dict):
        raise UserInputError(f"{source}: 'stain' must be a JSON object or absent, received {value!r}")
    unknown = sorted(set(value) - set(STAIN_META_KEYS))
    if unknown:
        raise UserInputError(f"{source}: 'stain' has unknown keys {unknown} (expected {', '.join(STAIN_META_KEYS)})")
    method = value.get("method", "none")
    if method not in STAIN_METHODS:
        raise UserInputError(f"{source}: stain 'method' must be one of {', '.join(STAIN_METHODS)}, got {method!r}")
    fitted = value.get("normaliser")
    if (method == "none") != (fitted is None):
        raise UserInputError(
            f"{source}: stain method {method!r} "
            + ("has no fitted 'normaliser'" if fitted is None else "must not carry a 'normaliser'")
        )
    normaliser = None if fitted is None else normaliser_from_dict(fitted, f"{source}: stain normaliser", expect=method)
    augment = value.get("augment")
    try:
        jitter = None if augment is None else HEDJitter.from_dict(augment)
    except UserInputError as exc:
        raise UserInputError(f"{source}: stain 'augment': {exc}") from None
    return normaliser, jitter


def normaliser_key(normaliser) -> str:
    """Short name of a fitted normaliser for file names: method + 10 hex digits of its parameters' SHA-1."""
    text = json.dumps(normaliser.to_dict(), sort_keys=True)
    return f"{normaliser.method}{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def normalise_batch(normaliser, images: np.ndarray, jobs: int = 1, chunk: int = 64) -> tuple[np.ndarray, int]:
    """``(normalised uint8 (N, H, W, 3), how many images were left unchanged)``; ``normaliser`` None copies nothing.

    ``jobs`` joblib threads over chunks of ``chunk`` images (the NumPy work releases the GIL); the result does
    not depend on ``jobs``.
    """
    if normaliser is None:
        return images, 0
    x, _ = check_images(images)
    if jobs == 1 or len(x) <= chunk:
        out, fallback = normaliser.transform(x, return_fallback=True)
        return out, int(fallback.sum())
    from joblib import Parallel, delayed

    from breastcnn.nn.parallel import resolve_jobs

    parts = Parallel(n_jobs=resolve_jobs(jobs), prefer="threads")(
        delayed(normaliser.transform)(x[i : i + chunk], return_fallback=True) for i in range(0, len(x), chunk)
    )
    return np.concatenate([p[0] for p in parts]), int(sum(p[1].sum() for p in parts))

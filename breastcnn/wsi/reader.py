"""Whole-slide readers: OpenSlide formats, (pyramidal) TIFF via tifffile, plain images via Pillow.

Every reader gives the same small interface (:class:`SlideReader`):
``level_dimensions`` / ``level_downsamples`` (level 0 = full resolution),
``mpp`` (level-0 microns per pixel, or None) and ``objective_power`` from the
file's metadata, and ``read_region(x, y, level, width, height)`` -> uint8 RGB
``(height, width, 3)`` with ``(x, y)`` in level-0 pixels, as OpenSlide does.
Areas outside the image read as white (bare glass), transparent pixels are
composited on white.

Which reader opens a file (:func:`open_slide`):

1. A vendor format OpenSlide recognises (Aperio ``.svs``, Hamamatsu ``.ndpi``,
   MIRAX, Leica, Philips, Ventana, ...; not its "generic-tiff"): OpenSlide
   (``openslide-python`` + the ``openslide-bin`` wheel).
2. A TIFF: tifffile. Pyramid levels come from the series (SubIFDs or a chain of
   reduced pages); a region decodes only the tiles or strips it touches (and an
   uncompressed contiguous level is memory-mapped), so memory stays bounded
   whatever the file size. A TIFF whose compression tifffile cannot decode
   here (JPEG without imagecodecs) falls back to OpenSlide when that reads it.
3. Any other image (PNG, JPEG, BMP...): Pillow, decoded whole, up to
   :data:`PLAIN_IMAGE_MAX_PIXELS` (a PNG cannot be read region by region).
   Pillow's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, ~89 Mpx) is
   replaced for this open only by that documented cap; larger images must be
   converted to a tiled TIFF first.

The optional packages are imported lazily; a missing one raises
:class:`~breastcnn.errors.MissingDependencyError` with the install command.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
from pathlib import Path

import numpy as np

from breastcnn.cluster import SlideSource
from breastcnn.data.images import _to_rgb
from breastcnn.errors import MissingDependencyError, UserInputError

PLAIN_IMAGE_MAX_PIXELS = 400_000_000
"""Largest plain (non-TIFF, non-OpenSlide) image ``slide`` decodes: 400 Mpx = 1.2 GB as RGB in memory.

Pillow's own guard stops at ~179 Mpx (2 x ``Image.MAX_IMAGE_PIXELS``); a
plain PNG/JPEG slide is decoded whole, so this cap bounds its memory."""

SEGMENT_CACHE_BYTES = 64 * 2**20
"""Decoded TIFF tiles/strips kept per reader (neighbouring regions share tiles)."""

MAX_SEGMENT_BYTES = 512 * 2**20
"""Refuse a TIFF whose single tile or strip decodes to more than this (one strip for a huge image)."""

MIN_PLAUSIBLE_MPP, MAX_PLAUSIBLE_MPP = 0.05, 20.0
"""TIFF resolution tags outside this range (e.g. the 72 dpi default = 353 um/px) are ignored."""

SLIDE_INSTALL = "pip install 'breastcnn[slide]'"

VENDOR_EXTENSIONS = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
"""Whole-slide formats only OpenSlide reads (an Aperio .svs is a TIFF, but with JPEG tiles and vendor metadata)."""


def require_openslide():
    """Import ``openslide`` (with its bundled library), or raise MissingDependencyError."""
    try:
        import openslide
    except (ImportError, OSError) as exc:  # OSError: the shared library itself is missing
        raise MissingDependencyError(f"OpenSlide is not installed: {SLIDE_INSTALL} ({exc})") from None
    return openslide


def require_tifffile():
    """Import ``tifffile``, or raise MissingDependencyError."""
    try:
        import tifffile
    except ImportError as exc:
        raise MissingDependencyError(f"tifffile is not installed: {SLIDE_INSTALL} ({exc})") from None
    return tifffile


class SlideReader:
    """Common interface; see the module docstring. Subclasses set the attributes and ``_read``."""

    kind = "?"

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.level_dimensions: list[tuple[int, int]] = []  # (width, height) per level
        self.level_downsamples: list[float] = []
        self.mpp: float | None = None
        self.objective_power: float | None = None

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """uint8 RGB ``(height, width, 3)`` of ``level`` whose top-left corner is level-0 pixel ``(x, y)``."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range 0..{self.level_count - 1} for {self.path}")
        if width < 1 or height < 1:
            raise ValueError(f"region size must be positive, got {width}x{height}")
        return self._read(int(x), int(y), int(level), int(width), int(height))

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        w, h = self.dimensions
        mpp = f"{self.mpp:.4g} um/px" if self.mpp else "unknown um/px"
        return f"{self.kind}, {w}x{h}, {self.level_count} level(s), {mpp}"


# --------------------------------------------------------------------------- OpenSlide


class OpenSlideReader(SlideReader):
    """Any format OpenSlide reads; RGBA composited on white."""

    def __init__(self, path, slide=None):
        super().__init__(path)
        openslide = require_openslide()
        self._slide = slide if slide is not None else openslide.OpenSlide(self.path)
        self.vendor = self._slide.properties.get("openslide.vendor", "openslide")
        self.kind = f"openslide ({self.vendor})"
        self.level_dimensions = [tuple(int(v) for v in d) for d in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        props = self._slide.properties
        self.mpp = _positive_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        self.objective_power = _positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))

    def _read(self, x, y, level, width, height):
        from PIL import Image

        region = self._slide.read_region((x, y), level, (width, height))  # RGBA, transparent outside
        white = Image.new("RGB", region.size, (255, 255, 255))
        white.paste(region, mask=region.getchannel("A"))
        return np.asarray(white, dtype=np.uint8)

    def close(self):
        self._slide.close()


# --------------------------------------------------------------------------- TIFF (tifffile)


class _TiffLevel:
    """One pyramid level of a TIFF: decodes only the segments a region touches."""

    def __init__(self, page, filehandle, lock: threading.Lock, path: str):
        self.page = page
        self.fh = filehandle
        self.lock = lock
        self.path = path
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        if int(page.planarconfig) != 1 or int(page.imagedepth) != 1:
            raise UserInputError(
                f"{path}: unsupported TIFF layout (planar configuration "
                f"{int(page.planarconfig)}, depth {int(page.imagedepth)})"
            )
        self.samples = int(page.samplesperpixel)
        self.photometric = int(page.photometric)
        if self.photometric not in (1, 2) or self.samples not in (1, 2, 3, 4):  # MINISBLACK, RGB (+ alpha)
            raise UserInputError(
                f"{path}: unsupported TIFF colour model (photometric {self.photometric}, "
                f"{self.samples} samples); RGB or greyscale expected"
            )
        if page.dtype not in (np.uint8, np.uint16):
            raise UserInputError(f"{path}: unsupported TIFF sample type {page.dtype}; 8 or 16 bit expected")
        if page.is_tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.seg_h, self.seg_w = int(page.rowsperstrip) or self.height, self.width
            self.seg_h = min(self.seg_h, self.height)
        self.across = -(-self.width // self.seg_w)
        seg_bytes = self.seg_h * self.seg_w * self.samples * page.dtype.itemsize
        self.memmap = None
        if page.is_contiguous and not page.is_tiled:
            # one uncompressed block: map it, read rows lazily (no full decode)
            dtype = page.dtype.newbyteorder(page.parent.byteorder)  # the file's byte order, not ours
            self.memmap = np.memmap(
                page.parent.filehandle.path,
                dtype=dtype,
                mode="r",
                offset=int(page.dataoffsets[0]),
                shape=(self.height, self.width, self.samples),
            )
        elif seg_bytes > MAX_SEGMENT_BYTES:
            raise UserInputError(
                f"{path}: one TIFF {'tile' if page.is_tiled else 'strip'} decodes to "
                f"{seg_bytes / 2**20:.0f} MiB; convert it to a tiled TIFF"
            )
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_size = max(4, SEGMENT_CACHE_BYTES // max(1, seg_bytes))

    def _segment(self, index: int) -> np.ndarray | None:
        """Decoded segment ``index`` as ``(seg_h', seg_w', samples)`` (None: empty segment)."""
        page = self.page
        with self.lock:  # the file position and the cache are shared by a worker's threads
            hit = self._cache.get(index)
            if hit is not None:
                self._cache.move_to_end(index)
                return hit
            offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
            data = None
            if offset and count:
                self.fh.seek(offset)
                data = self.fh.read(count)
        segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)  # outside the lock
        if segment is not None:
            segment = segment.reshape(segment.shape[-3:])  # (1, h, w, s) -> (h, w, s)
            with self.lock:
                self._cache[index] = segment
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return segment

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Raw samples ``(height, width, samples)`` of this level; outside the image -> 0 with alpha 0."""
        out = np.zeros((height, width, self.samples), dtype=self.page.dtype)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        if x0 >= x1 or y0 >= y1:
            return out
        if self.memmap is not None:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.memmap[y0:y1, x0:x1]
            return out
        for row in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
            for col in range(x0 // self.seg_w, (x1 - 1) // self.seg_w + 1):
                index = row * self.across + col if self.page.is_tiled else row
                segment = self._segment(index)
                if segment is None:
                    continue
                sy, sx = row * self.seg_h, col * self.seg_w
                ay0, ay1 = max(y0, sy), min(y1, sy + segment.shape[0], self.height)
                ax0, ax1 = max(x0, sx), min(x1, sx + segment.shape[1], self.width)
                if ay0 < ay1 and ax0 < ax1:
                    out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = segment[ay0 - sy : ay1 - sy, ax0 - sx : ax1 - sx]
        return out

    def check_decodable(self) -> None:
        """Decode one segment now, so an unsupported compression fails at open time."""
        if self.memmap is None and len(self.page.dataoffsets):
            self._segment(0)


class TiffReader(SlideReader):
    """Tiled or stripped TIFF, pyramid levels from tifffile's series; level 0 = the first series."""

    kind = "tiff"

    def __init__(self, path):
        super().__init__(path)
        tifffile = require_tifffile()
        with _quiet_tifffile():
            self._tif = tifffile.TiffFile(self.path)
        try:
            if not self._tif.series or not self._tif.pages:
                raise UserInputError(f"{self.path}: the TIFF holds no image")
            series = self._tif.series[0]
            self._lock = threading.Lock()
            self._levels = [
                _TiffLevel(level.keyframe, self._tif.filehandle, self._lock, self.path) for level in series.levels
            ]
            self._levels[0].check_decodable()
            base_w = self._levels[0].width
            self.level_dimensions = [(lv.width, lv.height) for lv in self._levels]
            self.level_downsamples = [base_w / lv.width for lv in self._levels]
            self.mpp = _tiff_mpp(self._levels[0].page)
        except BaseException:
            self._tif.close()
            raise

    def _read(self, x, y, level, width, height):
        lv = self._levels[level]
        d = self.level_downsamples[level]
        raw = lv.read(round(x / d), round(y / d), width, height)  # round: level-0 coords are rounded multiples of d
        return _samples_to_rgb(raw, lv.photometric, inside=_inside_mask(lv, x, y, d, width, height))

    def close(self):
        self._tif.close()


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile logs warnings for damaged files; the error we raise names the file once instead."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _inside_mask(lv: _TiffLevel, x, y, d, width, height) -> np.ndarray:
    lx, ly = round(x / d), round(y / d)
    cols = (np.arange(lx, lx + width) >= 0) & (np.arange(lx, lx + width) < lv.width)
    rows = (np.arange(ly, ly + height) >= 0) & (np.arange(ly, ly + height) < lv.height)
    return rows[:, None] & cols[None, :]


def _samples_to_rgb(raw: np.ndarray, photometric: int, inside: np.ndarray) -> np.ndarray:
    """``(h, w, s)`` uint8/uint16 samples -> uint8 RGB; alpha composited on white, outside = white."""
    if raw.dtype == np.uint8 and photometric == 2 and raw.shape[-1] == 3:  # the common case, no arithmetic
        rgb = np.ascontiguousarray(raw)
        rgb[~inside] = 255
        return rgb
    if raw.dtype == np.uint16:
        raw = (raw.astype(np.uint32) * 255 + 32767) // 65535
    raw = raw.astype(np.float32)
    samples = raw.shape[-1]
    colour = raw[..., :3] if photometric == 2 else np.repeat(raw[..., :1], 3, axis=-1)
    has_alpha = samples == 4 or (photometric == 1 and samples == 2)
    if has_alpha:
        alpha = raw[..., -1:] / 255.0
        colour = colour * alpha + 255.0 * (1.0 - alpha)
    rgb = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
    rgb[~inside] = 255
    return rgb


def _tiff_mpp(page) -> float | None:
    """Level-0 microns per pixel from XResolution/ResolutionUnit (inch or cm), if plausible."""
    try:
        unit = int(page.resolutionunit)
        x_res = float(page.resolution[0])
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
    per_unit_um = {2: 25_400.0, 3: 10_000.0}.get(unit)
    if per_unit_um is None or not x_res > 0:
        return None
    mpp = per_unit_um / x_res
    return mpp if MIN_PLAUSIBLE_MPP <= mpp <= MAX_PLAUSIBLE_MPP else None


# --------------------------------------------------------------------------- plain images (Pillow)

_PILLOW_GUARD_LOCK = threading.Lock()


class ImageReader(SlideReader):
    """A plain image decoded whole (one level); resolution unknown unless the file says (dpi)."""

    kind = "image"

    def __init__(self, path):
        super().__init__(path)
        from PIL import Image

        # Pillow refuses > 2 x MAX_IMAGE_PIXELS at open time. The guard is a module global: it is
        # lifted only while the header is parsed, under a lock, and our own cap replaces it.
        with _PILLOW_GUARD_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(self.path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with im:
            width, height = im.size
            if width * height > PLAIN_IMAGE_MAX_PIXELS:
                raise UserInputError(
                    f"{self.path}: plain image of {width}x{height} pixels exceeds the {PLAIN_IMAGE_MAX_PIXELS:,} "
                    "pixel cap for non-tiled images; convert it to a tiled pyramidal TIFF"
                )
            im.load()
            self._pixels = np.asarray(_to_rgb(im), dtype=np.uint8)
        self.level_dimensions = [(width, height)]
        self.level_downsamples = [1.0]

    def _read(self, x, y, level, width, height):
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        h, w = self._pixels.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x0 < x1 and y0 < y1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._pixels[y0:y1, x0:x1]
        return out

    def close(self):
        self._pixels = np.empty((0, 0, 3), np.uint8)


# --------------------------------------------------------------------------- dispatch


def _positive_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 and np.isfinite(number) else None


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    return magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_slide(path: str | os.PathLike) -> SlideReader:
    """Open ``path`` with the reader that fits (see the module docstring).

    Raises UserInputError naming the file for a missing, unreadable or
    unsupported file, MissingDependencyError when the package it needs is absent.
    """
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path}: is a folder; give slide files (a shell glob such as {path}/*.svs)")
    if not path.is_file():
        raise UserInputError(f"{path}: no such file")
    try:
        is_tiff = _is_tiff(path)
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    vendor = _openslide_vendor(path, required=path.suffix.lower() in VENDOR_EXTENSIONS)
    try:
        if vendor is not None and vendor != "generic-tiff":
            return OpenSlideReader(path)
        if is_tiff:
            try:
                return TiffReader(path)
            except (ValueError, NotImplementedError, KeyError) as exc:
                if vendor == "generic-tiff":  # e.g. JPEG tiles without imagecodecs: OpenSlide decodes them
                    return OpenSlideReader(path)
                if isinstance(exc, UserInputError):
                    raise
                raise UserInputError(f"{path}: unsupported TIFF ({_one_line(exc)})") from None
        return ImageReader(path)
    except (UserInputError, MissingDependencyError):
        raise
    except Exception as exc:  # decoder/library errors of any kind: one line naming the file
        raise UserInputError(f"{path}: cannot open as a slide ({type(exc).__name__}: {_one_line(exc)})") from None


def _openslide_vendor(path: Path, required: bool) -> str | None:
    """OpenSlide's format name for ``path``, or None (also when OpenSlide is absent and not ``required``)."""
    try:
        openslide = require_openslide()
    except MissingDependencyError:
        if required:
            raise
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # detection never decides alone: the other readers still get their chance
        return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------- slides on workers

READER_CACHE_SIZE = 2
_READERS: collections.OrderedDict[str, SlideReader] = collections.OrderedDict()
_READERS_LOCK = threading.Lock()


def resolve_reader(source):
    """A slide reader from a local reader (as is) or a :class:`SlideSource` (opened once per process)."""
    if not isinstance(source, SlideSource):
        return source
    key = source.path
    with _READERS_LOCK:
        try:
            stat = os.stat(key)
        except OSError as exc:
            raise UserInputError(
                f"{key}: worker {socket.gethostname()} cannot read it ({exc.strerror}); "
                "workers open slides at the client's path: use a shared filesystem"
            ) from None
        key = f"{key}\0{stat.st_mtime_ns}\0{stat.st_size}"
        reader = _READERS.get(key)
        if reader is None:
            reader = open_slide(source.path)
            _READERS[key] = reader
            while len(_READERS) > READER_CACHE_SIZE:
                _READERS.popitem(last=False)[1].close()
        return reader

"""Safe image decoding, resizing, the on-disk array cache, and preprocessing.

- :func:`decode_image`: Pillow, always RGB (RGBA/LA/palette composited on
  white, grayscale and 16-bit scaled to 8 bit), guarded against decompression
  bombs, resized to ``(size, size)`` with an antialiasing filter.
- :func:`load_subset`: decoded, resized uint8 arrays of a split subset, cached
  as plain ``.npy`` files in ``<split dir>/cache/``; the file name carries the
  manifest hash and the size, so a new manifest or size builds a new cache.
  The images do not depend on the task: labels of any task come from the
  manifest (the cached ``y`` holds the binary labels, as a consistency check).
  Stain-normalised images (``normaliser=``) have a cache of their own, built
  from the plain one, whose name adds the normaliser's key
  (:func:`breastcnn.data.stain.normaliser_key`: method + a hash of the fitted
  target), so another target never reads these.
- :func:`preprocess`: ``caffe`` (Keras VGG16/ResNet50 ``preprocess_input``) or
  ``minmax`` ([0, 1]); always a new float32 array.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from breastcnn import __version__
from breastcnn.data.tasks import DEFAULT_TASK
from breastcnn.errors import BreastCNNWarning, UserInputError
from breastcnn.fsutil import atomic_write, atomic_write_json


class SplitSubsets(Protocol):
    """What the cache reads of a loaded split (:class:`breastcnn.data.split.Split`, which satisfies this;
    typed structurally because ``data/split.py`` imports this module)."""

    dir: Path
    root: Path
    hash: str

    def subset(self, name: str) -> Sequence: ...


MAX_PIXELS = 64_000_000
"""Refuse images larger than this many pixels (decompression-bomb guard; BreakHis images are 0.32 MP)."""

IMAGENET_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
"""ImageNet channel means in BGR order, as Keras ``preprocess_input`` (caffe mode) subtracts them."""

DEFAULT_JOBS = -1
"""Default ``--jobs`` of every command (synth, split, train, finetune, evaluate, predict): -1 = all
cores. What ``--jobs`` spreads is decoding (or drawing) images, which scales with cores; fewer than
two chunks of images are handled in-process anyway, so small inputs pay no worker start-up."""

PREPROCESS_MODES = ("caffe", "minmax")
"""What :func:`preprocess` accepts (the one list: ``train --preprocess`` and ``ModelSpec`` check against it)."""

RESAMPLE = Image.Resampling.LANCZOS
"""Resize filter: antialiased Lanczos (Pillow widens the kernel when downsampling)."""

_16BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode ``path`` as an 8-bit RGB Pillow image.

    Transparent pixels are composited on white (like a bare glass slide);
    16-bit grayscale is scaled (not clipped) to 8 bit. Raises ``UserInputError``
    for images above :data:`MAX_PIXELS`; decoder errors propagate.
    """
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:
        # Pillow refuses far larger images (2 x its MAX_IMAGE_PIXELS) at open, before our check sees the size
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{pixels.group(1)} pixels " if pixels else ""
        raise UserInputError(
            f"{path}: image of {size}exceeds the {MAX_PIXELS} pixel limit (decompression-bomb guard)"
        ) from None
    with im:
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise UserInputError(f"{path}: image of {width}x{height} pixels exceeds the {MAX_PIXELS} pixel limit")
        im.load()
        return _to_rgb(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode in _16BIT_MODES:
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit PNG data span 0..65535; 32-bit "I" images may span anything: scale by the type's range
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if im.mode == "F":
        arr8 = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode ``path`` to a uint8 array of shape ``(size, size, 3)`` (RGB, aspect ratio not kept).

    The whole image is resized to a square, as Keras ``flow_from_directory`` does.
    """
    im = open_rgb(path)
    if im.size != (size, size):
        im = im.resize((size, size), RESAMPLE, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8)


def decode_many(paths: list[str], size: int) -> np.ndarray:
    """Decode a list of paths into one uint8 array ``(len(paths), size, size, 3)``.

    A file that does not decode is a UserInputError naming it (the split checked
    every image, so it changed since).
    """
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = decode_image(path, size)
        except UserInputError:
            raise
        except Exception as exc:  # any decoder failure (truncated file, bad header...) names the file
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise UserInputError(
                f"{path}: cannot decode this image ({reason}); it changed since "
                "'breastcnn split' checked it: re-run split to leave it out"
            ) from None
    return out


# --------------------------------------------------------------------------- preprocessing


def preprocess(x: np.ndarray, mode: str) -> np.ndarray:
    """Model input from uint8 images ``(..., H, W, 3)`` RGB -> new float32 array, same shape.

    ``caffe``: RGB -> BGR, then the ImageNet mean subtracted per channel (no
    scaling), exactly like ``keras.applications.vgg16.preprocess_input`` (which
    modifies float arrays in place; this never does). ``minmax``: ``x / 255``.
    """
    if mode == "caffe":
        return np.asarray(x)[..., ::-1].astype(np.float32) - IMAGENET_MEAN_BGR
    if mode == "minmax":
        return np.asarray(x).astype(np.float32) * np.float32(1.0 / 255.0)
    raise UserInputError(f"preprocess mode {mode!r} is unknown; valid: {', '.join(PREPROCESS_MODES)}")


def deprocess(x: np.ndarray, mode: str) -> np.ndarray:
    """Inverse of :func:`preprocess`: float32 model input -> uint8 RGB images (for plots)."""
    x = np.asarray(x, dtype=np.float32)
    if mode == "caffe":
        rgb = (x + IMAGENET_MEAN_BGR)[..., ::-1]
    elif mode == "minmax":
        rgb = x * 255.0
    else:
        raise UserInputError(f"preprocess mode {mode!r} is unknown; valid: {', '.join(PREPROCESS_MODES)}")
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- cache

CACHE_DIR_NAME = "cache"


def cache_paths(split: SplitSubsets, subset: str, image_size: int, normaliser=None) -> tuple[Path, Path, Path]:
    """``(x.npy, y.npy, meta.json)`` paths of the cache of ``subset`` at ``image_size`` (stain-normalised by
    ``normaliser`` when given: the key of :func:`~breastcnn.data.stain.normaliser_key` ends the name)."""
    stem = f"{subset}-{image_size}-{split.hash[:16]}"
    if normaliser is not None:
        from breastcnn.data.stain import normaliser_key

        stem += f"-{normaliser_key(normaliser)}"
    base = Path(split.dir) / CACHE_DIR_NAME
    return base / f"{stem}.x.npy", base / f"{stem}.y.npy", base / f"{stem}.json"


def _checksum(arr: np.ndarray) -> str:
    """CRC-32 (hex) of an array's bytes: catches a cache file changed in place at a fraction of the load time.

    (Not a cryptographic hash: whoever can rewrite the cache can rewrite its metadata too; measured:
    CRC-32 0.21 s, SHA-1 0.42 s, SHA-256 0.49 s, BLAKE2b 0.91 s over 1,610 x 224 x 224 x 3 bytes.)
    """
    return f"{zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast('B')):08x}"


def load_subset(
    split: SplitSubsets,
    subset: str,
    image_size: int,
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
    task: str = DEFAULT_TASK,
    normaliser=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one subset: ``x`` uint8 ``(N, S, S, 3)`` RGB, ``y`` int64 ``(N,)`` for ``task``
    (``binary``: 0/1; ``subtype``: 0..7, see :mod:`breastcnn.data.tasks`).

    Rows are in manifest order. The first call decodes every image (``jobs``
    joblib workers, ``progress(n)`` per chunk) and writes the cache next to the
    split; later calls read two ``.npy`` files and check them against the
    checksums in the cache metadata. A damaged cache (checksum, metadata, shape)
    is rebuilt with a :class:`BreastCNNWarning`. Caches of other manifest
    hashes for the same subset and size are removed when a new one is built.
    One cache serves every task: the images are the same, and the labels of
    ``task`` are read from the manifest (whose hash names the cache).

    ``normaliser``: a fitted stain normaliser (:mod:`breastcnn.data.stain`): the images come normalised,
    from a cache of their own built from the plain one. Images it cannot normalise (background only,
    too little tissue) stay as they are and are counted in a :class:`BreastCNNWarning` (at every load).
    """
    if image_size < 8 or image_size > 2048:
        raise UserInputError(f"--image-size must be between 8 and 2048, got {image_size}")
    rows = split.subset(subset)
    y_task = split.labels(subset, task)  # checked before any decoding: a subtype task needs subtypes
    if normaliser is not None:
        return _load_normalised(split, subset, image_size, jobs, progress, normaliser), y_task
    y = split.labels(subset, "binary")  # what the cache stores (its format predates tasks)
    x_path, y_path, meta_path = cache_paths(split, subset, image_size)
    cached, problem = _read_cache(x_path, y_path, meta_path, split.hash, len(rows), image_size)
    if cached is not None and not np.array_equal(cached[1], y):
        cached, problem = None, f"{y_path}: labels differ from the manifest's"
    if cached is not None:
        if progress:
            progress(len(rows))
        return cached[0], y_task
    if problem:
        warnings.warn(f"{problem}; rebuilding the cache from the images", BreastCNNWarning, stacklevel=2)

    paths = [str(Path(split.root) / r.path) for r in rows]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserInputError(
            f"{len(missing)} image(s) of split {split.dir} are missing under data root {split.root}, "
            f"e.g. {missing[0]}; re-run 'breastcnn split'"
        )
    x = np.empty((len(rows), image_size, image_size, 3), dtype=np.uint8)
    offset = 0
    for part in _decode_chunks(paths, image_size, jobs, progress):
        x[offset : offset + len(part)] = part
        offset += len(part)

    _remove_stale(x_path.parent, subset, image_size, split.hash)
    _write_cache(
        x_path,
        y_path,
        meta_path,
        x,
        y,
        {"manifest_hash": split.hash, "subset": subset, "image_size": image_size, "n": len(rows)},
    )
    return x, y_task


def _write_cache(x_path: Path, y_path: Path, meta_path: Path, x: np.ndarray, y: np.ndarray, meta: dict) -> None:
    """Write the two arrays, then the metadata (with their checksums) last: a cache without it is no cache."""
    with atomic_write(x_path, "wb") as fh:
        np.save(fh, x, allow_pickle=False)
    with atomic_write(y_path, "wb") as fh:
        np.save(fh, y, allow_pickle=False)
    atomic_write_json(
        meta_path,
        {
            **meta,
            "resample": "lanczos",
            "layout": "NHWC uint8 RGB",
            "created_by": f"breastcnn {__version__}",
            "files": [x_path.name, y_path.name],
            "checksums": {"x": _checksum(x), "y": _checksum(y)},
            "checksum": "crc32",
        },
    )


def _load_normalised(split: SplitSubsets, subset: str, image_size: int, jobs: int, progress, normaliser) -> np.ndarray:
    """The stain-normalised images of ``subset`` (see :func:`load_subset`), from their cache or built now."""
    from breastcnn.data.stain import normalise_batch

    stain = normaliser.to_dict()
    n = len(split.subset(subset))
    x_path, y_path, meta_path = cache_paths(split, subset, image_size, normaliser)
    cached, problem = _read_cache(x_path, y_path, meta_path, split.hash, n, image_size, stain=stain)
    if cached is not None:
        if progress:
            progress(n)
        fallback = json.loads(meta_path.read_text(encoding="utf-8")).get("stain_fallback", 0)
    else:
        if problem:
            warnings.warn(f"{problem}; rebuilding the cache from the images", BreastCNNWarning, stacklevel=3)
        raw, _ = load_subset(split, subset, image_size, jobs=jobs, progress=progress)
        x, fallback = normalise_batch(normaliser, raw, jobs=jobs)
        y = split.labels(subset, "binary")
        _write_cache(
            x_path,
            y_path,
            meta_path,
            x,
            y,
            {
                "manifest_hash": split.hash,
                "subset": subset,
                "image_size": image_size,
                "n": n,
                "stain": stain,
                "stain_fallback": fallback,
            },
        )
        cached = (x, y)
    if fallback:
        warnings.warn(
            f"{normaliser.method} stain normalisation left {fallback} of {n} {subset} images unchanged "
            "(background only or too little stained tissue to estimate their stains)",
            BreastCNNWarning,
            stacklevel=3,
        )
    return cached[0]


def _decode_chunks(paths: list[str], image_size: int, jobs: int, progress, chunk: int = 32):
    """Yield decoded uint8 chunks of ``paths`` in order (joblib processes when ``jobs != 1``)."""
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    if jobs == 1 or len(chunks) <= 1:
        results = (decode_many(c, image_size) for c in chunks)
    else:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=jobs, return_as="generator")(delayed(decode_many)(c, image_size) for c in chunks)
    for c, part in zip(chunks, results, strict=True):
        if progress:
            progress(len(c))
        yield part


def _read_cache(
    x_path: Path, y_path: Path, meta_path: Path, manifest_hash: str, n: int, size: int, stain: dict | None = None
):
    """``((x, y), None)`` when the cache is present and intact (and normalised by ``stain``, a normaliser's
    ``to_dict()``, when given); ``(None, problem)`` otherwise.

    ``problem`` is None when there is simply no cache (or one written before caches
    carried checksums), else one line naming the damaged file.
    """
    if not meta_path.is_file():
        return None, None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{meta_path}: unreadable cache metadata ({' '.join(str(exc).split())})"
    if not isinstance(meta, dict):
        return None, f"{meta_path}: cache metadata is not a JSON object"
    if meta.get("manifest_hash") != manifest_hash or meta.get("image_size") != size or meta.get("n") != n:
        return None, f"{meta_path}: cache metadata does not match the split (manifest hash, size or count)"
    if meta.get("stain") != stain:
        return None, f"{meta_path}: cache metadata does not match the stain normalisation"
    checksums = meta.get("checksums")
    if not isinstance(checksums, dict):
        return None, None  # a cache from before checksums: rebuilt once, nothing is wrong with it
    try:
        x = np.load(x_path, allow_pickle=False)
        y = np.load(y_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return None, f"{x_path.parent}: unreadable cache file ({' '.join(str(exc).split())})"
    if x.shape != (n, size, size, 3) or x.dtype != np.uint8 or y.shape != (n,) or y.dtype.kind != "i":
        return None, f"{x_path}: cache arrays have the wrong shape or type"
    for arr, path, key in ((x, x_path, "x"), (y, y_path, "y")):
        if _checksum(arr) != checksums.get(key):
            return None, f"{path}: checksum does not match the cache metadata (the file changed after it was written)"
    return (x, y.astype(np.int64, copy=False)), None


def _remove_stale(cache_dir: Path, subset: str, image_size: int, manifest_hash: str) -> None:
    """Delete cache files of ``subset``/``image_size`` built from other manifests (plain or normalised)."""
    if not cache_dir.is_dir():
        return
    for path in cache_dir.iterdir():
        match = _CACHE_STEM.match(path.name.split(".")[0])
        if (
            match
            and match.group("subset") == subset
            and match.group("size") == str(image_size)
            and match.group("hash") != manifest_hash[:16]
        ):
            with contextlib.suppress(OSError):
                path.unlink()


_CACHE_STEM = re.compile(
    r"^(?P<subset>train|val|test)-(?P<size>\d+)-(?P<hash>[0-9a-f]{16})(?:-(?P<stain>[a-z]+[0-9a-f]{10}))?$"
)


def owned_cache_files(split_dir: str | os.PathLike) -> list[str]:
    """Cache files in ``<split_dir>/cache`` (relative to ``split_dir``) that :func:`load_subset` wrote.

    Recognised by their metadata file: a ``<subset>-<size>-<hash>.json`` JSON object
    whose subset and manifest hash match its name claims it and its two ``.npy``
    files. Anything else in ``cache/`` is not ours.
    """
    cache = Path(split_dir) / CACHE_DIR_NAME
    if not cache.is_dir() or cache.is_symlink():
        return []
    owned = []
    for meta_path in sorted(cache.glob("*.json")):
        match = _CACHE_STEM.match(meta_path.stem)
        if not match or not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (
            isinstance(meta, dict)
            and meta.get("subset") == match.group("subset")
            and str(meta.get("manifest_hash", "")).startswith(match.group("hash"))
        ):
            stem = meta_path.stem
            owned += [
                f"{CACHE_DIR_NAME}/{stem}.json",
                f"{CACHE_DIR_NAME}/{stem}.x.npy",
                f"{CACHE_DIR_NAME}/{stem}.y.npy",
            ]
    return owned

"""Run any classifier on images: predict image files, and the helpers evaluation shares.

Works only through the classifier interface (``model.predict(x_pre,
batch_size)`` and the model's :class:`~breastcnn.models.spec.ModelSpec`:
``image_size``, ``preprocess``, ``capabilities``), so NumPy ``.npz``, Keras
``.keras`` and ONNX models are treated the same. Scoring a split lives in
:mod:`breastcnn.evaluation`.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from breastcnn import CLASSES
from breastcnn.data.images import decode_image, preprocess
from breastcnn.errors import BreastCNNWarning, UserInputError
from breastcnn.models.classifier import capabilities, model_source, model_spec
from breastcnn.nn.parallel import resolve_jobs

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""File types picked up when a folder is given (case-insensitive)."""

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
"""Text cells starting with these are formulas to a spreadsheet (OWASP "CSV injection")."""


def csv_cell(value):
    """A CSV cell that a spreadsheet shows as text: text starting with ``= + - @`` (or tab/CR) gets a leading ``'``.

    Only text is changed (a path, a patient id); numbers stay numbers, a negative
    number included. Used for every CSV we write from user-controlled strings.
    """
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def check_threads(threads: int | None) -> None:
    """``--threads``: None (the model's setting: all available cores by default) or >= 1."""
    if threads is not None and threads < 1:
        raise UserInputError(f"--threads must be >= 1 (default: all available cores), got {threads}")


def model_threads(model, threads: int | None):
    """A context in which a NumPy model runs on ``threads`` engine threads (None: its own setting).

    Models without engine threads (Keras: TensorFlow's pools; ONNX Runtime: its session) are left as they are."""
    check_threads(threads)
    if threads is None or not capabilities(model).engine_threads:
        return contextlib.nullcontext(model)
    return model.using_threads(threads)


def model_input(model, x: np.ndarray, normalise: bool = True) -> tuple[np.ndarray, int]:
    """``(float32 model input, images left unnormalised)`` of uint8 images ``(N, S, S, 3)`` already resized to
    the model's ``image_size``: stain-normalised as the model was trained (``spec.normaliser``; skipped when
    ``normalise`` is False: images from a normalised cache), then ``preprocess``-ed.

    The one place every consumer (predict, evaluate, bench, featuremaps, slide) prepares images.
    """
    from breastcnn.data.stain import normalise_batch

    spec = model_spec(model)
    x, unchanged = normalise_batch(spec.normaliser if normalise else None, x)
    return preprocess(x, spec.preprocess), unchanged


def malignant_probability(model, probabilities: np.ndarray) -> np.ndarray:
    """P(malignant) ``(N,)`` from the model's class probabilities ``(N, C)``: column 1 of a binary model, the
    sum over the malignant subtypes of a subtype model (:func:`breastcnn.data.tasks.binary_probabilities`)."""
    if model_spec(model).task == "subtype":
        from breastcnn.data.tasks import binary_probabilities

        return binary_probabilities(probabilities)[:, 1]
    return probabilities[:, 1]


def predict_proba_uint8(
    model,
    x: np.ndarray,
    batch_size: int = 64,
    chunk: int = 512,
    progress: Callable[[int], None] | None = None,
    normalise: bool = True,
) -> np.ndarray:
    """Class probabilities ``(N, num_classes)`` float32 for uint8 images ``(N, S, S, 3)``, prepared
    (:func:`model_input`) chunk by chunk.

    Chunks keep the float32 copy small (a 224px float image is 600 KB); ``progress(n)`` after each.
    ``normalise``: False when ``x`` is already stain-normalised (a normalised image cache).
    """
    out = np.empty((len(x), model_spec(model).num_classes), dtype=np.float32)
    for start in range(0, len(x), chunk):
        probs = model.predict(model_input(model, x[start : start + chunk], normalise)[0], batch_size=batch_size)
        out[start : start + chunk] = probs
        if progress is not None:
            progress(len(probs))
    return out


def predict_uint8(
    model,
    x: np.ndarray,
    batch_size: int = 64,
    chunk: int = 512,
    progress: Callable[[int], None] | None = None,
    normalise: bool = True,
) -> np.ndarray:
    """P(malignant) ``(N,)`` float32 for uint8 images ``(N, S, S, 3)`` (see :func:`predict_proba_uint8`)."""
    probs = predict_proba_uint8(model, x, batch_size, chunk, progress, normalise)
    return np.asarray(malignant_probability(model, probs), dtype=np.float32)


# --------------------------------------------------------------------------- predict


@dataclass
class Prediction:
    """One image's result: ``probability`` of malignant and ``label``, or ``error`` when unreadable.

    For a subtype model ``label`` is the most probable subtype and ``probabilities`` holds every class's
    probability (``{class: p}``); ``probability`` stays P(malignant) (the sum over the malignant subtypes).
    """

    path: str
    label: str | None = None
    probability: float | None = None
    error: str | None = None
    probabilities: dict[str, float] | None = None

    def as_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        out = {"path": self.path, "label": self.label, "probability": self.probability}
        if self.probabilities is not None:
            out["probabilities"] = self.probabilities
        return out


def collect_images(items: Sequence[str | os.PathLike]) -> tuple[list[str], list[Prediction]]:
    """Expand files, folders (recursive, :data:`IMAGE_EXTENSIONS`) and glob patterns.

    Returns ``(paths, problems)``: existing files in argument order without
    duplicates, and a :class:`Prediction` with ``error`` for each argument that
    matched nothing. A file given explicitly is kept whatever its extension
    (decoding then decides).
    """
    paths: list[str] = []
    seen: set[str] = set()
    problems: list[Prediction] = []

    def add(path: str) -> None:
        key = os.path.normpath(path)
        if key not in seen:
            seen.add(key)
            paths.append(path)

    for item in items:
        text = os.fspath(item)
        if os.path.isdir(text):
            found = sorted(
                str(p) for p in Path(text).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                problems.append(Prediction(text, error=f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {text}"))
            for p in found:
                add(p)
        elif os.path.isfile(text):
            add(text)
        elif glob.has_magic(text):
            matches = sorted(m for m in glob.glob(text, recursive=True) if os.path.isfile(m))
            if not matches:
                problems.append(Prediction(text, error=f"no file matches {text}"))
            for m in matches:
                add(m)
        else:
            problems.append(Prediction(text, error=f"{text}: no such file or directory"))
    return paths, problems


def _decode_one(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode_image(path, size), None
    except Exception as exc:  # any decoder failure is reported per file, the others go on
        message = " ".join(str(exc).split()) or type(exc).__name__
        return None, f"{path}: cannot read image ({type(exc).__name__}: {message})"


def _decode_chunk(paths: Sequence[str], size: int) -> list[tuple[np.ndarray | None, str | None]]:
    return [_decode_one(p, size) for p in paths]


def predict_paths(
    model,
    paths: Sequence[str],
    threshold: float = 0.5,
    batch_size: int = 64,
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> Iterator[Prediction]:
    """Classify image files, streaming: decode a chunk in parallel, predict it, yield its results.

    Memory stays bounded by the chunk (``batch_size * 4 * jobs`` images) however
    many paths are given. Decoding runs in ``jobs`` joblib threads (Pillow
    releases the GIL). Unreadable files yield a :class:`Prediction` with ``error``.
    Results come in input order. ``threads``: engine threads of a NumPy model
    (None: the model's setting, all available cores).
    """
    from joblib import Parallel, delayed  # third-party, imported when used: it costs CLI start-up time

    if not 0.0 <= threshold <= 1.0:
        raise UserInputError(f"--threshold must be in [0, 1], got {threshold}")
    check_threads(threads)
    size = model_spec(model).image_size
    jobs = resolve_jobs(jobs)
    chunk = max(1, batch_size) * 4 * jobs
    per_worker = max(1, -(-chunk // jobs))
    with Parallel(n_jobs=jobs, prefer="threads") as parallel:
        for start in range(0, len(paths), chunk):
            part = list(paths[start : start + chunk])
            if jobs == 1:
                decoded = _decode_chunk(part, size)
            else:
                pieces = [part[i : i + per_worker] for i in range(0, len(part), per_worker)]
                decoded = [d for piece in parallel(delayed(_decode_chunk)(p, size) for p in pieces) for d in piece]
            yield from chunk_predictions(model, part, decoded, threshold, batch_size, threads)
            if progress:
                progress(len(part))


def chunk_predictions(
    model,
    part: Sequence[str],
    decoded: Sequence[tuple[np.ndarray | None, str | None]],
    threshold: float,
    batch_size: int,
    threads: int | None = None,
) -> list[Prediction]:
    """Classify the decoded images of one chunk; one :class:`Prediction` per path, in order.

    ``decoded[i]`` is ``(image, None)`` or ``(None, error message)``. Shared by
    :func:`predict_paths` and the cluster tasks (:mod:`breastcnn.cluster`).
    """
    spec = model_spec(model)
    good = [i for i, (img, _) in enumerate(decoded) if img is not None]
    probs = np.empty((0, spec.num_classes), np.float32)
    if good:
        x, unchanged = model_input(model, np.stack([decoded[i][0] for i in good]))
        if unchanged:
            warnings.warn(
                f"{spec.normaliser.method} stain normalisation left {unchanged} of {len(good)} images "
                "unchanged (background only or too little stained tissue)",
                BreastCNNWarning,
                stacklevel=2,
            )
        with model_threads(model, threads):
            probs = model.predict(x, batch_size=batch_size)
    malignant = malignant_probability(model, probs)
    by_index = {i: k for k, i in enumerate(good)}
    results = []
    for i, path in enumerate(part):
        if i not in by_index:
            results.append(Prediction(path, error=decoded[i][1]))
            continue
        k = by_index[i]
        p = float(malignant[k])
        if not np.all(np.isfinite(probs[k])):
            results.append(
                Prediction(
                    path,
                    error=f"{path}: {model_source(model)} gives a non-finite probability "
                    f"({p}) for this image; not classified",
                )
            )
        elif spec.task == "subtype":
            results.append(
                Prediction(
                    path,
                    spec.classes[int(np.argmax(probs[k]))],
                    p,
                    probabilities={c: float(v) for c, v in zip(spec.classes, probs[k], strict=True)},
                )
            )
        else:
            results.append(Prediction(path, CLASSES[int(p >= threshold)], p))
    return results


def predictions_csv_rows(rows: Iterable[dict], columns: Sequence[str]) -> str:
    """CSV text (header + rows) for ``columns``; floats with 6 decimals, text cells through :func:`csv_cell`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else csv_cell(v)) for k, v in row.items()})
    return buffer.getvalue()

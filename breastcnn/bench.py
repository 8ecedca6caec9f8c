"""One harness that measures every model the same way (the report's Tables 3.1/3.2).

For each model, in this process: parameters (total, trainable), model file
size, batch-1 latency (p50/p95) and throughput at each batch size on the
in-process forward pass of preprocessed arrays, the time of one training step,
the end-to-end latency of classifying one PNG from disk (decode + preprocess +
forward, through :mod:`breastcnn.inference`), and, given a split and a model
file, the test metrics of ``evaluate``.

What is timed, and why (the report's timings were not comparable, defect 10):

- Model loading and graph tracing are never timed: every measurement starts
  after ``warmup`` untimed calls of the same shape.
- NumPy models: ``model.predict`` (inference mode, one process) on ``threads``
  engine threads with one BLAS thread each (recorded per model as
  ``threads: {"engine", "blas"}``, read inside the engine's limits). Keras
  models: TensorFlow's intra-op pool pinned to ``threads`` (recorded in
  ``machine.threads``); ``KerasClassifier.predict``, which
  runs a compiled ``tf.function``; ``keras.Model.predict()`` would add tens of
  ms of per-call overhead (it builds a data pipeline each call), see
  :data:`KERAS_NOTE`.
- Every measurement (forward passes, ``Model.predict()``, end-to-end, test
  metrics, train step) stops once ``max_seconds`` have been spent on it,
  warm-up included (the first warm-up call and ``min_calls`` timed calls always
  run), so the README's three-model command ends in under two minutes on two
  cores; the number of calls (and of test images scored) is recorded.
  :data:`FULL_SETTINGS` are the report's settings (``bench --full``).

Library code: returns dicts and strings, never prints.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from breastcnn import inference
from breastcnn.data.images import DEFAULT_JOBS, load_subset, preprocess
from breastcnn.data.split import load_split
from breastcnn.errors import BreastCNNWarning, MissingDependencyError, UserInputError
from breastcnn.fsutil import atomic_write
from breastcnn.metrics import classification_metrics
from breastcnn.models import create_model, list_models, load_model, model_spec, save_model
from breastcnn.models.keras_models import require_keras
from breastcnn.models.registry import model_framework
from breastcnn.models.spec import DEFAULT_IMAGE_SIZE
from breastcnn.nn.optim import Adam
from breastcnn.nn.parallel import available_cores, blas_thread_count, blas_threads
from breastcnn.runs import environment_info, resolve_model_path
from breastcnn.training.config import TrainConfig

KERAS_NOTE = (
    "Keras latency/throughput are the compiled tf.function forward pass (KerasClassifier.predict); "
    "keras Model.predict() would add tens of ms of overhead per call and is not what is timed."
)
TIMING_NOTE = (
    "Medians/percentiles after warm-up, model loading and graph tracing excluded; "
    "end-to-end = decode PNG + resize + preprocess + forward for one image; "
    "each measurement stops after --max-seconds (warm-up included, at least one timed call)."
)
KERAS_MODELS = tuple(list_models(framework="keras"))
"""The Keras architectures of the model registry (TensorFlow is pinned when one is measured)."""
DEFAULT_MODELS = ("custom", "vgg16", "resnet50")
"""``bench --models`` by default: the report's three models."""
REPORT_KERAS_TRAIN_BATCH = 64
"""The report's fine-tuning batch size: VGG16 takes ~46 s per step at 224x224 on 2 CPU cores, so the
default train step runs at :attr:`BenchOptions.keras_train_batch_size` (the batch used is recorded)."""

METRIC_COLUMNS = ("accuracy", "precision", "recall", "f1", "benign_recall")
"""Test metrics shown in the table (the report's Table 3.1); every metric is in the JSON."""
METRIC_LABELS = {
    "accuracy": "test accuracy",
    "precision": "precision (malignant)",
    "recall": "recall (malignant)",
    "f1": "F1 (malignant)",
    "benign_recall": "recall (benign)",
}


@dataclass
class BenchOptions:
    """Settings of one bench run (all recorded in ``bench.json``).

    The defaults fit ``bench --models custom,vgg16,resnet50`` into under two minutes on two CPU cores:
    each measurement stops after ``max_seconds`` (warm-up included), throughput at batch 1 and 8, the
    Keras train step at batch 4. :data:`FULL_SETTINGS` are the report's (``--full``).
    """

    image_size: int = DEFAULT_IMAGE_SIZE
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 50
    warmup: int = 2
    min_calls: int = 1
    max_seconds: float = 2.0
    threads: int | None = None
    train_steps: int = 5
    train_batch_size: int = 32
    keras_train_batch_size: int = 4
    weights: str = "none"
    seed: int = 0

    def validate(self) -> BenchOptions:
        """Raise :class:`UserInputError` naming the option for impossible values."""
        checks = [
            (self.image_size >= 32, "--image-size", self.image_size, "an integer >= 32"),
            (
                len(self.batch_sizes) > 0 and all(b >= 1 for b in self.batch_sizes),
                "--batch-sizes",
                ",".join(map(str, self.batch_sizes)),
                "positive integers",
            ),
            (self.repeats >= 1, "--repeats", self.repeats, ">= 1"),
            (self.threads is None or self.threads >= 1, "--threads", self.threads, ">= 1"),
            (self.train_steps >= 0, "--train-steps", self.train_steps, ">= 0 (0 skips the train step)"),
            (self.train_batch_size >= 1, "train batch size", self.train_batch_size, ">= 1"),
            (self.keras_train_batch_size >= 1, "--keras-train-batch", self.keras_train_batch_size, ">= 1"),
            (self.weights in ("none", "imagenet"), "--weights", self.weights, "'none' or 'imagenet'"),
            (self.max_seconds > 0, "--max-seconds", self.max_seconds, "> 0"),
            (
                self.warmup >= 0 and self.min_calls >= 1,
                "warm-up / minimum calls",
                (self.warmup, self.min_calls),
                ">= 0 and >= 1",
            ),
        ]
        for ok, option, value, expected in checks:
            if not ok:
                raise UserInputError(f"{option} must be {expected}, got {value!r}")
        return self

    @classmethod
    def full(cls, **overrides) -> BenchOptions:
        """The report's settings (:data:`FULL_SETTINGS`), then ``overrides``."""
        return cls(**{**FULL_SETTINGS, **overrides})


FULL_SETTINGS = {
    "batch_sizes": (1, 32),
    "min_calls": 3,
    "max_seconds": 10.0,
    "keras_train_batch_size": REPORT_KERAS_TRAIN_BATCH,
}
"""``bench --full``: the report's Tables 3.1/3.2 (throughput at batch 32, the Keras train step at the
report's batch 64) and 10 s per measurement: about 10 minutes for the three models on 2 CPU cores."""


class Progress:
    """What the harness tells while it runs; this base class ignores it (the CLI draws bars from it).

    For each model, ``plan`` says how many measurements it will take, ``measurement`` starts one (at
    most ``max_calls`` calls including warm-up, at most ``budget_s`` seconds), ``tick`` follows each
    call, ``model_done`` ends the model.
    """

    def message(self, text: str) -> None:
        """Something other than a measurement (loading a model, building the image cache...)."""

    def plan(self, model: str, measurements: int) -> None:
        """``model`` will take ``measurements`` measurements in all (told again if that grows)."""

    def measurement(self, model: str, what: str, max_calls: int, budget_s: float) -> None:
        """A measurement of ``model`` starts."""

    def tick(self, calls: int, spent_s: float) -> None:
        """``calls`` calls (warm-up included) of the current measurement took ``spent_s`` so far."""

    def model_done(self, model: str) -> None:
        """Every measurement of ``model`` is done."""


class _Messages(Progress):
    """A plain ``callable(message)`` as a :class:`Progress` (one line per step)."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say

    def message(self, text: str) -> None:
        self.say(text)

    def measurement(self, model: str, what: str, max_calls: int, budget_s: float) -> None:
        self.say(f"{model}: {what}")


def as_progress(progress: Progress | Callable[[str], None] | None) -> Progress:
    """A :class:`Progress` from one, from a message callable, or from ``None`` (silent)."""
    if progress is None:
        return Progress()
    return progress if isinstance(progress, Progress) else _Messages(progress)


# ---------------------------------------------------------------- parsing helpers
def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """``"1,32"`` -> ``(1, 32)``; a clear error naming ``option`` otherwise."""
    try:
        values = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise UserInputError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UserInputError(f"{option} must be comma-separated positive integers, got {text!r}")
    return tuple(dict.fromkeys(values))  # keep order, drop repeats


def parse_model_names(text: str, known: Sequence[str]) -> list[str]:
    """``"custom,vgg16"`` -> ``["custom", "vgg16"]``, each checked against ``known``."""
    names = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    if not names:
        raise UserInputError(f"--models must name at least one model, got {text!r}")
    for name in names:
        if name not in known:
            raise UserInputError(f"--models: unknown model {name!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(names))


def parse_model_files(items: Sequence[str], names: Sequence[str]) -> dict[str, Path]:
    """``["custom=runs/x/model.npz", ...]`` -> ``{"custom": Path(...)}``; files must exist."""
    files: dict[str, Path] = {}
    for item in items or ():
        name, sep, path = str(item).partition("=")
        name = name.strip().lower()
        if not sep or not name or not path:
            raise UserInputError(f"--model-file must be NAME=PATH, got {item!r}")
        if name not in names:
            raise UserInputError(f"--model-file {item!r}: {name!r} is not in --models ({', '.join(names)})")
        files[name] = resolve_model_path(path)
    return files


# ---------------------------------------------------------------- timing
def time_calls(
    fn: Callable[[], object],
    repeats: int,
    warmup: int = 2,
    max_seconds: float = 10.0,
    min_calls: int = 3,
    tick: Callable[[int, float], None] | None = None,
) -> np.ndarray:
    """Wall-clock milliseconds of ``fn()`` per call, after up to ``warmup`` untimed calls.

    ``max_seconds`` caps the measurement, warm-up included, from the end of the
    first warm-up call (which traces/compiles graphs and builds caches: never
    timed, never cut): the other warm-up calls stop once it is spent, and timing
    stops then too, but never before ``min(min_calls, repeats)`` timed calls; at
    most ``repeats`` timed calls. ``tick(calls, seconds)`` is told after every
    call (seconds since the start, the first call included).
    Returns ``(n_timed_calls,)`` float64 ms.
    """
    spent = 0.0
    calls = 0

    def call() -> float:
        nonlocal spent, calls
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        spent += elapsed
        calls += 1
        if tick is not None:
            tick(calls, spent)
        return elapsed

    first = 0.0
    for i in range(max(int(warmup), 0)):
        if i == 0:
            first = call()
        elif spent - first >= max_seconds:
            break
        else:
            call()
    times = []
    floor = min(int(min_calls), int(repeats))
    while len(times) < repeats and (len(times) < floor or spent - first < max_seconds):
        times.append(call() * 1e3)
    return np.asarray(times, dtype=np.float64)


def summarise_ms(times_ms: np.ndarray) -> dict:
    """``{"p50", "p95", "mean", "min", "calls"}`` of a vector of ms (linear-interpolated percentiles)."""
    times_ms = np.asarray(times_ms, dtype=np.float64)
    return {
        "p50": float(np.percentile(times_ms, 50)),
        "p95": float(np.percentile(times_ms, 95)),
        "mean": float(times_ms.mean()),
        "min": float(times_ms.min()),
        "calls": int(times_ms.size),
    }


# ---------------------------------------------------------------- threads / machine
@contextlib.contextmanager
def pinned_threads(threads: int | None, tensorflow: bool) -> Iterator[dict]:
    """Pin BLAS (threadpoolctl) and, when ``tensorflow``, TF's thread pools to ``threads``.

    Yields a dict describing the thread counts in force (printed and recorded).
    TensorFlow's pools can only be set before its runtime starts; if it already
    has, the counts in force are recorded with a note.
    """
    n = int(threads) if threads else available_cores()
    info: dict = {"requested": n}
    with blas_threads(n):
        info["blas"] = blas_thread_count()
        if tensorflow:
            info.update(_pin_tensorflow(n))
        yield info


def _pin_tensorflow(n: int) -> dict:
    try:
        require_keras()  # quiet TF logging, checks the backend
    except MissingDependencyError:
        return {}
    import tensorflow as tf

    note = None
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # the runtime is already initialised in this process
        note = "TensorFlow was already initialised; its thread pools could not be changed"
    out = {
        "tf_intra_op": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "tf_inter_op": tf.config.threading.get_inter_op_parallelism_threads() or "default",
    }
    if note:
        out["tf_note"] = note
    return out


def machine_info(threads: dict) -> dict:
    """CPU model, cores, library versions (:func:`breastcnn.runs.environment_info`) and threads."""
    env = environment_info()
    env["threads"] = threads
    return env


def file_size_kb(path: str | os.PathLike) -> float:
    """Size of a file in KB (1 KB = 1024 bytes), as the report's Table 3.2."""
    return Path(path).stat().st_size / 1024.0


# ---------------------------------------------------------------- one model
def _empty_entry(name: str) -> dict:
    return {
        "model": name,
        "framework": None,
        "file": None,
        "image_size": None,
        "params_total": None,
        "params_trainable": None,
        "size_kb": None,
        "latency_ms_p50": None,
        "latency_ms_p95": None,
        "throughput_ips": {},
        "throughput_ips_one_thread": {},
        "train_step_ms": None,
        "train_ms_per_image": None,
        "train_batch_size": None,
        "e2e_ms_p50": None,
        "e2e_ms_p95": None,
        "keras_predict_ms_p50": None,
        "threads": None,
        "calls": {},
        "skipped": None,
        "notes": [],
    }


def _load_or_create(name: str, path: Path | None, options: BenchOptions, workdir: Path):
    """The model to measure and its file (a fresh build, saved to ``workdir``, when no file)."""
    if path is not None:
        return load_model(path), path, False
    kwargs = {}
    if model_framework(name) == "keras":
        kwargs["weights"] = None if options.weights == "none" else options.weights
    model = create_model(name, input_shape=(options.image_size, options.image_size, 3), seed=options.seed, **kwargs)
    saved = save_model(model, workdir / f"{name}{model_spec(model).capabilities.suffix}")
    return model, saved, True


def _rng_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``(n, size, size, 3)`` uint8 noise with a tissue-like pink mean (content does not change timings)."""
    base = np.array([200, 140, 180], dtype=np.float32)
    noise = rng.normal(0.0, 30.0, size=(n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _write_png(path: Path, rng: np.random.Generator) -> Path:
    """A 700x460 RGB PNG (the BreakHis image size) to time the end-to-end path on."""
    pixels = _rng_images(rng, 1, 1)[0, 0]
    image = np.broadcast_to(pixels, (460, 700, 3)).copy()
    image[::7] = 255 - image[::7]  # some structure so PNG compression is not trivial
    image = np.clip(image.astype(np.int16) + rng.integers(-20, 21, size=image.shape), 0, 255).astype(np.uint8)
    with atomic_write(path, "wb") as handle:
        Image.fromarray(image).save(handle, format="PNG")
    return path


def bench_model(
    name: str,
    path: Path | None,
    options: BenchOptions,
    workdir: Path,
    split=None,
    progress: Progress | Callable[[str], None] | None = None,
) -> dict:
    """Measure one model; a missing optional dependency gives ``skipped`` (the reason), not an error.

    Args:
        name: registry name (``custom``, ``vgg16``, ``resnet50``, ``custom-keras``).
        path: model file to load, or ``None`` for a freshly built model.
        options: :class:`BenchOptions`.
        workdir: scratch directory (fresh model files, the PNG).
        split: a loaded ``breastcnn.data.split.Split``; test metrics are added
            when given together with a model file.
        progress: a :class:`Progress` (or ``callable(message)``) told what is being measured.
    """
    report = as_progress(progress)
    entry = _empty_entry(name)
    try:
        report.message(f"{name}: loading {path}" if path else f"{name}: building a fresh model")
        model, file, fresh = _load_or_create(name, path, options, workdir)
    except MissingDependencyError as exc:
        entry["skipped"] = str(exc)
        report.model_done(name)
        return entry
    spec = model_spec(model)
    can = spec.capabilities
    size, mode = spec.image_size, spec.preprocess
    _describe(model, entry, file, fresh, split is not None, options)

    def measure(what: str, fn: Callable[[], object], repeats: int, warmup: int) -> dict:
        report.measurement(name, what, warmup + repeats, options.max_seconds)
        wall, cpu = time.perf_counter(), time.process_time()
        stats = summarise_ms(time_calls(fn, repeats, warmup, options.max_seconds, options.min_calls, report.tick))
        # CPU seconds of this process (all threads) per wall second: < 1 for one thread = other processes ran
        stats["cpu_per_wall"] = (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
        return stats

    rng = np.random.default_rng(options.seed)
    # Forward pass on preprocessed arrays, per batch size (batch 1, the latency contract, even when not listed).
    batches = list(options.batch_sizes) + ([] if 1 in options.batch_sizes else [1])
    planned = (
        len(batches)
        + (spec.framework == "keras")
        + 1
        + (split is not None and not fresh)
        + (options.train_steps > 0 and can.train_step)
    )
    report.plan(name, planned)
    _time_forward_passes(model, entry, batches, rng, size, mode, options, measure)
    if can.engine_threads:
        _explain_slow_batches(
            model, entry, rng, size, mode, options, measure, lambda extra: report.plan(name, planned + extra)
        )

    if spec.framework == "keras":  # back the claim in KERAS_NOTE with a number
        x = preprocess(_rng_images(rng, 1, size), mode)
        stats = measure(
            "keras Model.predict(), batch 1", lambda: model.model.predict(x, verbose=0), min(options.repeats, 5), 1
        )
        entry["keras_predict_ms_p50"] = round(stats["p50"], 3)

    # End to end: one PNG from disk, decode + preprocess + forward.
    entry.update(_time_end_to_end(model, workdir, rng, options, measure))

    # Test metrics, when a split and a trained model file were given.
    if split is not None and not fresh:
        report.message(f"{name}: loading the test images of {split.dir} at {size}px (cached after the first run)")
        metrics = _evaluate(model, split, options, report, name)
        entry["notes"] += metrics.pop("notes", [])
        entry.update(metrics)

    # Train step last: it updates the weights of the in-memory model.
    if options.train_steps > 0 and not can.train_step:
        entry["notes"].append("ONNX Runtime runs inference only: no train step")
    elif options.train_steps > 0:
        entry.update(_time_train_step(model, rng, size, mode, options, measure))
    report.model_done(name)
    return entry


def _describe(model, entry: dict, file: Path, fresh: bool, with_split: bool, options: BenchOptions) -> None:
    """Fill ``entry``'s framework, arch, file, size, parameter counts and threads; apply ``--threads``."""
    spec = model_spec(model)
    if spec.capabilities.session_threads and options.threads:  # ONNX Runtime's threads are set per session
        model.set_threads(options.threads)
    if spec.capabilities.engine_threads:  # --threads flows down to the engine; record what is in force there
        model.threads = options.threads
        entry["threads"] = model.thread_settings()
    entry.update(
        framework=spec.framework,
        arch=spec.arch,
        file=None if fresh else str(file),
        image_size=spec.image_size,
        size_kb=round(file_size_kb(file), 1),
    )
    if fresh:
        entry["notes"].append(
            "freshly built, random weights: size and timings only"
            + (" (test metrics need a trained model: runs/latest or --model-file NAME=PATH)" if with_split else "")
        )
    counts = model.count_params()
    entry["params_trainable"] = int(counts["trainable"])
    entry["params_total"] = int(counts["trainable"]) + int(counts["non_trainable"])


def _time_forward_passes(
    model, entry: dict, batches: list[int], rng, size: int, mode: str, options: BenchOptions, measure
) -> None:
    """Latency (batch 1) and throughput (each of ``options.batch_sizes``) of ``model.predict`` on
    preprocessed arrays."""
    for batch in batches:
        x = preprocess(_rng_images(rng, batch, size), mode)
        stats = measure(
            f"forward pass, batch {batch}",
            lambda x=x, batch=batch: model.predict(x, batch_size=batch),
            options.repeats,
            options.warmup,
        )
        if batch in options.batch_sizes:
            entry["throughput_ips"][str(batch)] = round(batch / (stats["p50"] / 1e3), 2)
        entry["calls"][f"forward_b{batch}"] = stats["calls"]
        if batch == 1:
            entry["latency_ms_p50"] = round(stats["p50"], 3)
            entry["latency_ms_p95"] = round(stats["p95"], 3)


def _explain_slow_batches(
    model, entry: dict, rng, size: int, mode: str, options: BenchOptions, measure, plan_more: Callable[[int], None]
) -> None:
    """When a batch > 1 gives fewer images/s than batch 1, time it again on one engine thread and say why.

    Batch 1 runs on one thread in well under a millisecond; a batch > 1 cuts every layer into chunks
    run on the engine threads (``Sequential.threads``, one fork-join per layer). On a machine busy
    with other processes a long call shares the CPU with them, and a fork-join waits at every layer
    for a worker that is not running (measured at 160 px, load average ~7 on 2 cores: batch 8 gave
    2,100 img/s on 2 threads, 5,300 on one, batch 1 4,200; the CPU time per image was lower at batch
    8 than at batch 1). The note gives this run's figures: both throughputs, the load average and the
    share of a core the process got.
    """
    single = entry["throughput_ips"].get("1")
    slow = [b for b in options.batch_sizes if b > 1 and single and entry["throughput_ips"][str(b)] < single]
    if not slow:
        return
    threads = getattr(model, "threads", None)
    one_thread, shares = {}, []
    if threads != 1 and available_cores() > 1:
        plan_more(len(slow))
        try:
            model.threads = 1
            for batch in slow:
                x = preprocess(_rng_images(rng, batch, size), mode)
                stats = measure(
                    f"forward pass, batch {batch}, one engine thread",
                    lambda x=x, batch=batch: model.predict(x, batch_size=batch),
                    options.repeats,
                    options.warmup,
                )
                one_thread[str(batch)] = round(batch / (stats["p50"] / 1e3), 2)
                shares.append(stats["cpu_per_wall"])
        finally:
            model.threads = threads
    entry["throughput_ips_one_thread"] = one_thread
    shown = "; ".join(
        f"b{b}: {entry['throughput_ips'][str(b)]:,.0f} img/s"
        + (f" on all engine threads, {one_thread[str(b)]:,.0f} on one" if one_thread else "")
        for b in slow
    )
    load = _load_averages()
    machine = [f"load average {load[0]:.1f} on {available_cores()} cores"] if load else []
    if shares:
        machine.append(f"this process got {min(shares):.0%} of a core while on one thread")
    entry["notes"].append(
        f"img/s at batch > 1 below batch 1 ({'; '.join([shown, *machine])}): other processes were running. "
        "A batch-1 call (sub-millisecond) mostly runs between their turns, a longer call shares the CPU with "
        "them, and a batch > 1 split over the engine threads also waits at every layer for a worker thread "
        "that is not running. Re-measure on a quiet machine (there the threads win)."
    )


def _time_end_to_end(model, workdir: Path, rng: np.random.Generator, options: BenchOptions, measure) -> dict:
    png = str(_write_png(workdir / "bench-input.png", rng))

    def classify() -> None:  # a stain-normalised model normalises too (noise may fall back: not worth a warning)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BreastCNNWarning)
            (result,) = inference.predict_paths(model, [png], batch_size=1)
        if result.error:  # pragma: no cover - our own PNG always decodes
            raise RuntimeError(result.error)

    stats = measure("end-to-end (PNG from disk)", classify, options.repeats, options.warmup)
    return {"e2e_ms_p50": round(stats["p50"], 3), "e2e_ms_p95": round(stats["p95"], 3)}


def _evaluate(model, split, options: BenchOptions, report: Progress, name: str, chunk: int = 32) -> dict:
    """The test metrics of ``evaluate`` (same images, same scores), within ``max_seconds``.

    Images are scored in chunks in a seeded random order until the budget is spent (at least one
    chunk); ``metrics_images`` / ``test_images`` say how many were scored, with a note when not all.
    Building the image cache (a one-off data step) is not part of the budget.
    """
    spec = model_spec(model)
    x, y = load_subset(split, "test", spec.image_size, jobs=DEFAULT_JOBS, normaliser=spec.normaliser)
    patients = np.asarray(split.patients("test"))
    total = len(y)
    if total == 0:
        return {"notes": [f"the test subset of {split.dir} is empty: no test metrics"]}
    order = np.random.default_rng(options.seed).permutation(total)
    chunks = [order[i : i + chunk] for i in range(0, total, chunk)]
    report.measurement(name, f"test metrics ({total} images)", len(chunks), options.max_seconds)
    probabilities, scored, spent = [], [], 0.0
    for i, index in enumerate(chunks):
        if i and spent >= options.max_seconds:
            break
        start = time.perf_counter()
        # x comes normalised from the cache (normalise=False); a subtype model's P(malignant) is its derived one
        probabilities.append(inference.predict_uint8(model, x[index], batch_size=chunk, normalise=False))
        spent += time.perf_counter() - start
        scored.append(index)
        report.tick(i + 1, spent)
    index = np.concatenate(scored)
    metrics = classification_metrics(y[index], np.concatenate(probabilities), patients=patients[index])
    metrics.update(subset="test", metrics_images=int(index.size), test_images=int(total))
    if index.size < total:
        metrics["notes"] = [
            f"test metrics on {index.size} of {total} test images (a seeded random sample: "
            f"--max-seconds {options.max_seconds:g} was spent; --full or a larger --max-seconds "
            "scores them all)"
        ]
    return metrics


def _time_train_step(model, rng: np.random.Generator, size: int, mode: str, options: BenchOptions, measure) -> dict:
    """Median ms of one optimizer step (after one untimed step that builds optimizer state/traces)."""
    batch = options.train_batch_size if model_spec(model).framework == "numpy" else options.keras_train_batch_size
    x = preprocess(_rng_images(rng, batch, size), mode)
    y = np.arange(batch, dtype=np.int64) % 2
    step = _train_step_fn(model, x, y)
    stats = measure(f"train step, batch {batch}", step, options.train_steps, 1)
    return {
        "train_step_ms": round(stats["p50"], 2),
        "train_batch_size": batch,
        "train_ms_per_image": round(stats["p50"] / batch, 3),
        "train_steps_timed": stats["calls"],
    }


def _train_step_fn(model, x: np.ndarray, y: np.ndarray) -> Callable[[], object]:
    """One optimizer step with the training settings of each side.

    NumPy: ``train`` defaults (Adam at the default recipe's lr, its L2,
    weighted cross-entropy). Keras: as ``finetune`` compiles it (Adam 1e-4,
    sparse categorical cross-entropy, class weights), on the wrapped
    ``keras.Model`` through ``train_on_batch`` (a compiled train function).
    """
    weights = {0: 1.5, 1: 0.75}  # balanced-like weights: the same arithmetic as real ones
    if model_spec(model).framework == "numpy":
        defaults = TrainConfig().validate()  # the default recipe's lr and L2
        model.compile(optimizer=Adam(defaults.lr), l2=defaults.l2)
        cw = np.array([weights[0], weights[1]], dtype=np.float32)
        return lambda: model.train_on_batch(x, y, class_weights=cw)
    keras = require_keras()
    kmodel = model.model
    kmodel.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-4), loss="sparse_categorical_crossentropy")
    return lambda: kmodel.train_on_batch(x, y, class_weight=weights)


# ---------------------------------------------------------------- the run
def run_bench(
    names: Sequence[str],
    model_files: dict[str, Path] | None = None,
    options: BenchOptions | None = None,
    split_dir: str | os.PathLike | None = None,
    progress: Progress | Callable[[str], None] | None = None,
    sources: dict[str, str] | None = None,
) -> dict:
    """Measure every model in one process; returns ``{"machine", "options", "notes", "models", "seconds"}``.

    ``models`` keeps the order of ``names``; ratios to the custom model are
    added when the custom model was measured (:func:`add_ratios`). Each entry's
    ``source`` says where its model came from: ``sources[name]`` (e.g.
    ``"runs/latest"``), else ``"--model-file"`` or ``"fresh"``. ``machine``
    records the load average at the start and the end (timings depend on it).
    """
    started = time.perf_counter()
    load_start = _load_averages()
    options = (options or BenchOptions()).validate()
    model_files = dict(model_files or {})
    split = None
    if split_dir is not None:
        split = load_split(split_dir)
    uses_tf = any(model_framework(name) == "keras" for name in names) or any(
        str(p).endswith(".keras") for p in model_files.values()
    )
    entries = []
    with (
        pinned_threads(options.threads, tensorflow=uses_tf and _tensorflow_importable()) as threads,
        tempfile.TemporaryDirectory(prefix="breastcnn-bench-") as tmp,
    ):
        for name in names:
            entry = bench_model(name, model_files.get(name), options, Path(tmp), split, progress)
            entry["source"] = (sources or {}).get(name) or ("--model-file" if name in model_files else "fresh")
            entries.append(entry)
        machine = machine_info(threads)
    machine["load_average"] = {"start": load_start, "end": _load_averages()}
    add_ratios(entries)
    notes = [TIMING_NOTE]
    if any(e["framework"] == "keras" for e in entries):
        notes.append(KERAS_NOTE)
        measured = [
            f"{e['model']} {e['keras_predict_ms_p50']:.1f} ms vs {e['latency_ms_p50']:.1f} ms"
            for e in entries
            if e.get("keras_predict_ms_p50") is not None
        ]
        if measured:
            notes.append("Measured here, batch 1 p50, Model.predict() vs tf.function: " + "; ".join(measured) + ".")
    opts = asdict(options)
    opts["batch_sizes"] = list(options.batch_sizes)
    return {
        "machine": machine,
        "options": opts,
        "notes": notes,
        "models": entries,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _load_averages() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _tensorflow_importable() -> bool:
    import importlib.util

    return "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is not None


RATIO_KEYS = ("params_total", "size_kb", "latency_ms_p50", "e2e_ms_p50", "train_step_ms", "train_ms_per_image")


def add_ratios(entries: list[dict], reference: str = "custom") -> None:
    """Add ``ratio_to_custom`` (this model / the custom model, per :data:`RATIO_KEYS` and
    throughput) to every measured entry, in place; ``None`` where not measurable."""
    ref = next((e for e in entries if e["model"] == reference and not e.get("skipped")), None)
    for entry in entries:
        if ref is None or entry.get("skipped"):
            entry["ratio_to_custom"] = None
            continue
        ratios = {key: _ratio(entry.get(key), ref.get(key)) for key in RATIO_KEYS}
        ratios["throughput_ips"] = {
            b: _ratio(v, ref["throughput_ips"].get(b)) for b, v in entry.get("throughput_ips", {}).items()
        }
        entry["ratio_to_custom"] = ratios


def _ratio(value, reference) -> float | None:
    if value is None or reference in (None, 0):
        return None
    return round(float(value) / float(reference), 3)


# ---------------------------------------------------------------- rendering
def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _with_ratio(entry: dict, key: str, digits: int = 1) -> str:
    return _fmt(entry.get(key), digits) + _ratio_suffix(entry, key)


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows shared by the rich table and the markdown table."""
    models = result["models"]
    batches = [str(b) for b in result.get("options", {}).get("batch_sizes", [])] or sorted(
        {b for e in models for b in e.get("throughput_ips", {})}, key=int
    )
    show_metrics = [k for k in METRIC_COLUMNS if any(e.get(k) is not None for e in models)]
    headers = ["model", "params", "size KB", "latency ms b1 p50 / p95"]
    headers += [f"img/s b{b}" for b in batches]
    headers += ["train step ms", "1 PNG end-to-end ms"]
    headers += [METRIC_LABELS[k] for k in show_metrics]
    rows = []
    for e in models:
        if e.get("skipped"):
            rows.append([e["model"], f"skipped: {e['skipped']}"] + [""] * (len(headers) - 2))
            continue
        label = ", ".join(
            ([f"{e['image_size']}px"] if e.get("image_size") else [])
            + (["runs/latest"] if e.get("source") == "runs/latest" else [])
        )
        row = [
            e["model"] + (f" ({label})" if label else ""),
            _with_ratio(e, "params_total", 0),
            _with_ratio(e, "size_kb"),
            f"{_fmt(e['latency_ms_p50'], 2)} / {_fmt(e['latency_ms_p95'], 2)}" + _ratio_suffix(e, "latency_ms_p50"),
        ]
        row += [_fmt(e["throughput_ips"].get(b)) for b in batches]
        step = _fmt(e.get("train_step_ms"))
        if e.get("train_batch_size"):
            step += f" @ b{e['train_batch_size']}"
        # per image: the Keras step runs at a smaller batch than the NumPy one by default
        row += [step + _ratio_suffix(e, "train_ms_per_image", " per image"), _with_ratio(e, "e2e_ms_p50", 2)]
        row += [_fmt(e.get(k), 4) for k in show_metrics]
        rows.append(row)
    return headers, rows


def _ratio_suffix(entry: dict, key: str, unit: str = "") -> str:
    ratio = (entry.get("ratio_to_custom") or {}).get(key)
    if ratio is None or entry["model"] == "custom":
        return ""
    return f" (x{ratio:,.0f}{unit})" if ratio >= 10 else f" (x{ratio:.1f}{unit})"


def machine_line(result: dict) -> str:
    """One line: CPU, cores, threads in force, library versions."""
    m = result["machine"]
    threads = m.get("threads", {})
    parts = [
        f"{m.get('cpu_model', '?')}, {m.get('cpu_affinity') or m.get('cpu_count')} cores",
        f"threads: BLAS {threads.get('blas', '?')}",
    ]
    engine = next((e["threads"] for e in result.get("models", []) if e.get("threads")), None)
    if engine:
        parts[-1] += f", NumPy engine {engine['engine']} x BLAS {engine['blas']}"
    if "tf_intra_op" in threads:
        parts[-1] += f", TF intra-op {threads['tf_intra_op']} / inter-op {threads['tf_inter_op']}"
    versions = [f"{lib} {m[lib]}" for lib in ("python", "numpy", "tensorflow", "keras") if m.get(lib)]
    load = m.get("load_average") or {}
    if load.get("start") and load.get("end"):
        versions.append(f"load average {load['start'][0]:.1f} -> {load['end'][0]:.1f}")
    if result.get("seconds") is not None:
        versions.append(f"{result['seconds']:.0f} s in all")
    return "; ".join(parts + [", ".join(versions)])


def to_markdown(result: dict) -> str:
    """A GitHub markdown table with the machine line and notes underneath."""
    headers, rows = table_rows(result)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    lines.append("")
    lines.append(f"Machine: {machine_line(result)}. (xN) = ratio to the custom model, same run.")
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    for e in result["models"]:
        for note in e.get("notes", []):
            lines.append(f"- {e['model']}: {note}")
    return "\n".join(lines) + "\n"

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
- NumPy models: ``model.predict`` (inference mode, one process, BLAS threads
  pinned with threadpoolctl). Keras models: ``KerasClassifier.predict``, which
  runs a compiled ``tf.function``; ``keras.Model.predict()`` would add tens of
  ms of per-call overhead (it builds a data pipeline each call), see
  :data:`KERAS_NOTE`.
- A measurement stops after ``repeats`` calls or ``max_seconds`` (at least
  ``min_calls``), so VGG16 at batch 32 on two cores does not take an hour; the
  number of calls is recorded.

Library code: returns dicts and strings, never prints.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from breastcnn.errors import MissingDependencyError, UserInputError

KERAS_NOTE = (
    "Keras latency/throughput are the compiled tf.function forward pass (KerasClassifier.predict); "
    "keras Model.predict() would add tens of ms of overhead per call and is not what is timed."
)
TIMING_NOTE = (
    "Medians/percentiles after warm-up, model loading and graph tracing excluded; "
    "end-to-end = decode PNG + resize + preprocess + forward for one image."
)
KERAS_MODELS = ("vgg16", "resnet50", "custom-keras")
REPORT_KERAS_TRAIN_BATCH = 64
"""The report's fine-tuning batch size (heavy on 2 CPU cores at 224x224: make it smaller with
``keras_train_batch_size``; the batch used is recorded)."""

METRIC_COLUMNS = ("accuracy", "precision", "recall", "f1", "benign_recall")
"""Test metrics shown in the table (the report's Table 3.1); every metric is in the JSON."""
METRIC_LABELS = {"accuracy": "test accuracy", "precision": "precision (malignant)", "recall": "recall (malignant)",
                 "f1": "F1 (malignant)", "benign_recall": "recall (benign)"}


@dataclass
class BenchOptions:
    """Settings of one bench run (all recorded in ``bench.json``)."""

    image_size: int = 224
    batch_sizes: tuple[int, ...] = (1, 32)
    repeats: int = 50
    warmup: int = 2
    min_calls: int = 3
    max_seconds: float = 10.0
    threads: int | None = None
    train_steps: int = 5
    train_batch_size: int = 32
    keras_train_batch_size: int = REPORT_KERAS_TRAIN_BATCH
    weights: str = "none"
    seed: int = 0

    def validate(self) -> "BenchOptions":
        """Raise :class:`UserInputError` naming the option for impossible values."""
        checks = [
            (self.image_size >= 32, "--image-size", self.image_size, "an integer >= 32"),
            (len(self.batch_sizes) > 0 and all(b >= 1 for b in self.batch_sizes), "--batch-sizes",
             ",".join(map(str, self.batch_sizes)), "positive integers"),
            (self.repeats >= 1, "--repeats", self.repeats, ">= 1"),
            (self.threads is None or self.threads >= 1, "--threads", self.threads, ">= 1"),
            (self.train_steps >= 0, "--train-steps", self.train_steps, ">= 0 (0 skips the train step)"),
            (self.train_batch_size >= 1, "train batch size", self.train_batch_size, ">= 1"),
            (self.keras_train_batch_size >= 1, "--keras-train-batch", self.keras_train_batch_size, ">= 1"),
            (self.weights in ("none", "imagenet"), "--weights", self.weights, "'none' or 'imagenet'"),
            (self.max_seconds > 0, "--max-seconds", self.max_seconds, "> 0"),
        ]
        for ok, option, value, expected in checks:
            if not ok:
                raise UserInputError(f"{option} must be {expected}, got {value!r}")
        return self


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
        from breastcnn.runs import resolve_model_path

        files[name] = resolve_model_path(path)
    return files


# ---------------------------------------------------------------- timing
def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 2, max_seconds: float = 10.0,
               min_calls: int = 3) -> np.ndarray:
    """Wall-clock milliseconds of ``fn()`` per call, after ``warmup`` untimed calls.

    Stops after ``repeats`` timed calls or once ``max_seconds`` have been spent
    timing (but never before ``min(min_calls, repeats)`` calls).
    Returns ``(n_calls,)`` float64 ms.
    """
    for _ in range(max(int(warmup), 0)):
        fn()
    times = []
    spent = 0.0
    floor = min(int(min_calls), int(repeats))
    while len(times) < repeats and (len(times) < floor or spent < max_seconds):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        spent += elapsed
        times.append(elapsed * 1e3)
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
    from breastcnn.nn.parallel import blas_thread_count, blas_threads

    n = int(threads) if threads else _available_cores()
    info: dict = {"requested": n}
    with blas_threads(n):
        info["blas"] = blas_thread_count()
        if tensorflow:
            info.update(_pin_tensorflow(n))
        yield info


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pin_tensorflow(n: int) -> dict:
    from breastcnn.models.keras_models import require_keras

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
    from breastcnn.runs import environment_info

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
        "train_step_ms": None,
        "train_batch_size": None,
        "e2e_ms_p50": None,
        "e2e_ms_p95": None,
        "keras_predict_ms_p50": None,
        "calls": {},
        "skipped": None,
        "notes": [],
    }


def _load_or_create(name: str, path: Path | None, options: BenchOptions, workdir: Path):
    """The model to measure and its file (a fresh build, saved to ``workdir``, when no file)."""
    from breastcnn.models import create_model, load_model

    if path is not None:
        return load_model(path), path, False
    kwargs = {}
    if name in KERAS_MODELS:
        kwargs["weights"] = None if options.weights == "none" else options.weights
    model = create_model(name, input_shape=(options.image_size, options.image_size, 3), seed=options.seed, **kwargs)
    suffix = ".npz" if model.framework == "numpy" else ".keras"
    saved = workdir / f"{name}{suffix}"
    model.save(saved)
    return model, saved, True


def _rng_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``(n, size, size, 3)`` uint8 noise with a tissue-like pink mean (content does not change timings)."""
    base = np.array([200, 140, 180], dtype=np.float32)
    noise = rng.normal(0.0, 30.0, size=(n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _write_png(path: Path, rng: np.random.Generator) -> Path:
    """A 700x460 RGB PNG (the BreakHis image size) to time the end-to-end path on."""
    from PIL import Image

    from breastcnn.fsutil import atomic_write

    pixels = _rng_images(rng, 1, 1)[0, 0]
    image = np.broadcast_to(pixels, (460, 700, 3)).copy()
    image[::7] = 255 - image[::7]  # some structure so PNG compression is not trivial
    image = np.clip(image.astype(np.int16) + rng.integers(-20, 21, size=image.shape), 0, 255).astype(np.uint8)
    with atomic_write(path, "wb") as handle:
        Image.fromarray(image).save(handle, format="PNG")
    return path


def bench_model(name: str, path: Path | None, options: BenchOptions, workdir: Path, split=None,
                progress: Callable[[str], None] | None = None) -> dict:
    """Measure one model; a missing optional dependency gives ``skipped`` (the reason), not an error.

    Args:
        name: registry name (``custom``, ``vgg16``, ``resnet50``, ``custom-keras``).
        path: model file to load, or ``None`` for a freshly built model.
        options: :class:`BenchOptions`.
        workdir: scratch directory (fresh model files, the PNG).
        split: a loaded ``breastcnn.data.split.Split``; test metrics are added
            when given together with a model file.
        progress: ``callable(message)`` told what is being measured.
    """
    say = progress or (lambda message: None)
    entry = _empty_entry(name)
    try:
        say(f"{name}: loading" if path else f"{name}: building a fresh model")
        model, file, fresh = _load_or_create(name, path, options, workdir)
    except MissingDependencyError as exc:
        entry["skipped"] = str(exc)
        return entry
    from breastcnn.data.images import preprocess

    meta = dict(getattr(model, "meta", {}) or {})
    size = int(meta.get("image_size") or options.image_size)
    mode = meta.get("preprocess", "caffe")
    entry.update(
        framework=model.framework,
        arch=meta.get("arch", name),
        file=None if fresh else str(file),
        image_size=size,
        size_kb=round(file_size_kb(file), 1),
    )
    if fresh:
        entry["notes"].append("freshly built, random weights: size and timings only"
                              + (" (test metrics need --model-file NAME=PATH)" if split is not None else ""))
    counts = model.count_params()
    entry["params_trainable"] = int(counts["trainable"])
    entry["params_total"] = int(counts["trainable"]) + int(counts["non_trainable"])

    rng = np.random.default_rng(options.seed)
    # Forward pass on preprocessed arrays, per batch size.
    for batch in options.batch_sizes:
        say(f"{name}: forward pass, batch {batch}")
        x = preprocess(_rng_images(rng, batch, size), mode)
        times = time_calls(lambda: model.predict(x, batch_size=batch), options.repeats, options.warmup,
                           options.max_seconds, options.min_calls)
        stats = summarise_ms(times)
        entry["throughput_ips"][str(batch)] = round(batch / (stats["p50"] / 1e3), 2)
        entry["calls"][f"forward_b{batch}"] = stats["calls"]
        if batch == 1:
            entry["latency_ms_p50"] = round(stats["p50"], 3)
            entry["latency_ms_p95"] = round(stats["p95"], 3)
    if entry["latency_ms_p50"] is None:  # batch 1 is the latency contract even when not listed
        x = preprocess(_rng_images(rng, 1, size), mode)
        stats = summarise_ms(time_calls(lambda: model.predict(x, batch_size=1), options.repeats,
                                        options.warmup, options.max_seconds, options.min_calls))
        entry["latency_ms_p50"], entry["latency_ms_p95"] = round(stats["p50"], 3), round(stats["p95"], 3)
        entry["calls"]["forward_b1"] = stats["calls"]

    if model.framework == "keras":  # back the claim in KERAS_NOTE with a number
        x = preprocess(_rng_images(rng, 1, size), mode)
        stats = summarise_ms(time_calls(lambda: model.model.predict(x, verbose=0), min(options.repeats, 5),
                                        1, options.max_seconds, options.min_calls))
        entry["keras_predict_ms_p50"] = round(stats["p50"], 3)

    # End to end: one PNG from disk, decode + preprocess + forward.
    say(f"{name}: end-to-end (PNG from disk)")
    entry.update(_time_end_to_end(model, workdir, rng, options))

    # Test metrics, when a split and a trained model file were given.
    if split is not None and not fresh:
        say(f"{name}: evaluating on the test subset")
        entry.update(_evaluate(model, split))

    # Train step last: it updates the weights of the in-memory model.
    if options.train_steps > 0:
        say(f"{name}: train step")
        entry.update(_time_train_step(model, rng, size, mode, options))
    return entry


def _time_end_to_end(model, workdir: Path, rng: np.random.Generator, options: BenchOptions) -> dict:
    from breastcnn import inference

    png = str(_write_png(workdir / "bench-input.png", rng))
    first = list(inference.predict_paths(model, [png], batch_size=1))
    if first[0].error:  # pragma: no cover - our own PNG always decodes
        raise RuntimeError(first[0].error)
    times = time_calls(lambda: list(inference.predict_paths(model, [png], batch_size=1)), options.repeats,
                       options.warmup, options.max_seconds, options.min_calls)
    stats = summarise_ms(times)
    return {"e2e_ms_p50": round(stats["p50"], 3), "e2e_ms_p95": round(stats["p95"], 3)}


def _evaluate(model, split) -> dict:
    from breastcnn import inference

    metrics, _rows = inference.evaluate_model(model, split)
    return dict(metrics)


def _time_train_step(model, rng: np.random.Generator, size: int, mode: str, options: BenchOptions) -> dict:
    """Median ms of one optimizer step (after one untimed step that builds optimizer state/traces)."""
    from breastcnn.data.images import preprocess

    batch = options.train_batch_size if model.framework == "numpy" else options.keras_train_batch_size
    x = preprocess(_rng_images(rng, batch, size), mode)
    y = np.arange(batch, dtype=np.int64) % 2
    step = _train_step_fn(model, x, y)
    times = time_calls(step, options.train_steps, warmup=1, max_seconds=math.inf, min_calls=options.train_steps)
    return {"train_step_ms": round(float(np.median(times)), 2), "train_batch_size": batch}


def _train_step_fn(model, x: np.ndarray, y: np.ndarray) -> Callable[[], object]:
    """One optimizer step with the training settings of each side.

    NumPy: ``train`` defaults (Adam at ``TrainConfig.lr``, L2 ``TrainConfig.l2``,
    weighted cross-entropy). Keras: as ``finetune`` compiles it (Adam 1e-4,
    sparse categorical cross-entropy, class weights), on the wrapped
    ``keras.Model`` through ``train_on_batch`` (a compiled train function).
    """
    weights = {0: 1.5, 1: 0.75}  # balanced-like weights: the same arithmetic as real ones
    if model.framework == "numpy":
        from breastcnn.nn.optim import Adam
        from breastcnn.train import TrainConfig

        defaults = TrainConfig().validate()  # the default recipe's lr and L2
        model.compile(optimizer=Adam(defaults.lr), l2=defaults.l2)
        cw = np.array([weights[0], weights[1]], dtype=np.float32)
        return lambda: model.train_on_batch(x, y, class_weights=cw)
    from breastcnn.models.keras_models import require_keras

    keras = require_keras()
    kmodel = model.model
    kmodel.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-4), loss="sparse_categorical_crossentropy")
    return lambda: kmodel.train_on_batch(x, y, class_weight=weights)


# ---------------------------------------------------------------- the run
def run_bench(names: Sequence[str], model_files: dict[str, Path] | None = None, options: BenchOptions | None = None,
              split_dir: str | os.PathLike | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Measure every model in one process; returns ``{"machine", "options", "notes", "models"}``.

    ``models`` keeps the order of ``names``; ratios to the custom model are
    added when the custom model was measured (:func:`add_ratios`).
    """
    options = (options or BenchOptions()).validate()
    model_files = dict(model_files or {})
    split = None
    if split_dir is not None:
        from breastcnn.data.split import load_split

        split = load_split(split_dir)
    uses_tf = any(name in KERAS_MODELS for name in names) or any(
        str(p).endswith(".keras") for p in model_files.values())
    entries = []
    with pinned_threads(options.threads, tensorflow=uses_tf and _tensorflow_importable()) as threads, \
            tempfile.TemporaryDirectory(prefix="breastcnn-bench-") as tmp:
        for name in names:
            entries.append(bench_model(name, model_files.get(name), options, Path(tmp), split, progress))
        machine = machine_info(threads)
    add_ratios(entries)
    notes = [TIMING_NOTE]
    if any(e["framework"] == "keras" for e in entries):
        notes.append(KERAS_NOTE)
        measured = [f"{e['model']} {e['keras_predict_ms_p50']:.1f} ms vs {e['latency_ms_p50']:.1f} ms"
                    for e in entries if e.get("keras_predict_ms_p50") is not None]
        if measured:
            notes.append("Measured here, batch 1 p50, Model.predict() vs tf.function: " + "; ".join(measured) + ".")
    opts = asdict(options)
    opts["batch_sizes"] = list(options.batch_sizes)
    return {"machine": machine, "options": opts, "notes": notes, "models": entries}


def _tensorflow_importable() -> bool:
    import importlib.util

    return "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is not None


RATIO_KEYS = ("params_total", "size_kb", "latency_ms_p50", "e2e_ms_p50", "train_step_ms")


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
        {b for e in models for b in e.get("throughput_ips", {})}, key=int)
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
        row = [e["model"] + (f" ({e['image_size']}px)" if e.get("image_size") else ""),
               _with_ratio(e, "params_total", 0), _with_ratio(e, "size_kb"),
               f"{_fmt(e['latency_ms_p50'], 2)} / {_fmt(e['latency_ms_p95'], 2)}"
               + _ratio_suffix(e, "latency_ms_p50")]
        row += [_fmt(e["throughput_ips"].get(b)) for b in batches]
        step = _fmt(e.get("train_step_ms"))
        if e.get("train_batch_size"):
            step += f" @ b{e['train_batch_size']}"
        row += [step + _ratio_suffix(e, "train_step_ms"), _with_ratio(e, "e2e_ms_p50", 2)]
        row += [_fmt(e.get(k), 4) for k in show_metrics]
        rows.append(row)
    return headers, rows


def _ratio_suffix(entry: dict, key: str) -> str:
    ratio = (entry.get("ratio_to_custom") or {}).get(key)
    if ratio is None or entry["model"] == "custom":
        return ""
    return f" (x{ratio:,.0f})" if ratio >= 10 else f" (x{ratio:.1f})"


def machine_line(result: dict) -> str:
    """One line: CPU, cores, threads in force, library versions."""
    m = result["machine"]
    threads = m.get("threads", {})
    parts = [f"{m.get('cpu_model', '?')}, {m.get('cpu_affinity') or m.get('cpu_count')} cores",
             f"threads: BLAS {threads.get('blas', '?')}"]
    if "tf_intra_op" in threads:
        parts[-1] += f", TF intra-op {threads['tf_intra_op']} / inter-op {threads['tf_inter_op']}"
    versions = [f"{lib} {m[lib]}" for lib in ("python", "numpy", "tensorflow", "keras") if m.get(lib)]
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

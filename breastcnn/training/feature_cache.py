"""Linear probe of a pretrained backbone: frozen pooled features cached on disk, only the head trains.

With ``--trainable-layers 0`` no layer of the VGG16/ResNet50 base changes during
training, so the output of its global-average-pooling layer (``avg_pool``,
``(D,)`` per image: 512 for VGG16, 2048 for ResNet50) is a fixed function of the
image. :func:`ensure_features` computes it **once per image** and keeps it in
``CACHE_DIR/<arch>-<size>-<key>.npz``; the head (dropout + dense softmax, the
same layers and names as :func:`~breastcnn.models.keras_models.create_vgg16`
builds) then trains on the cached vectors in seconds (:func:`train_linear_probe`),
and its weights are copied into the full model, which is saved as a normal
``model.keras`` (``evaluate``/``predict``/``bench`` use it unchanged).

The cache key (:func:`feature_key`) covers everything the features depend on:
architecture, the weights (SHA-256 of the weights file; ``none`` plus the seed,
since random weights come from the seed), image size, preprocessing, the Keras
version, and the hash of the image list (paths relative to the data root and
the data root). A changed input is a new file, never a stale hit.

Augmentation: the features are those of the unaugmented images (an augmented
image would need the backbone again at every epoch, which is what the cache
avoids), so a linear probe trains without augmentation; the run's
``config.json`` records ``"augment": false``. Dropout on the features still
regularises the head.

Concurrent builders (several folds on a Dask cluster) serialise on a blocking
``flock`` on ``<file>.lock``: the first builds, the others wait and then read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from breastcnn import runs
from breastcnn.data.augment import class_weights
from breastcnn.data.images import decode_many, load_subset, preprocess
from breastcnn.data.split import load_split
from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write, atomic_write_json
from breastcnn.metrics import degenerate_model_warnings
from breastcnn.models.io import save_model
from breastcnn.models.keras_models import BUILDERS, _resolve_weights, require_keras
from breastcnn.nn.schedules import BestScore
from breastcnn.training.callbacks import TrainingCallback
from breastcnn.training.common import require_both_classes
from breastcnn.training.recipes import MONITORS

PROBE_ARCHS = ("vgg16", "resnet50")
"""Architectures with a frozen-backbone linear probe (custom-keras always trains whole)."""
FEATURE_LAYER = "avg_pool"
CACHE_FORMAT = 2
"""Part of the cache key: 2 since random backbones are drawn with explicit initialiser seeds."""
EXTRACT_BATCH = 32


@dataclass(frozen=True)
class FeatureTable:
    """Cached features: ``paths`` ``(N,)`` image paths relative to the data root, ``features`` float32 ``(N, D)``."""

    key: str
    file: Path
    paths: np.ndarray
    features: np.ndarray
    status: str  # "built" (computed by this call) or "hit" (read from the cache)
    seconds: float

    def rows(self, paths: Sequence[str]) -> np.ndarray:
        """``(len(paths), D)`` features of ``paths`` (each must be in the table)."""
        index = {p: i for i, p in enumerate(self.paths.tolist())}
        missing = [p for p in paths if p not in index]
        if missing:
            raise UserInputError(
                f"{self.file}: no features for {missing[0]} ({len(missing)} image(s)); delete the file to rebuild it"
            )
        return self.features[[index[p] for p in paths]]


def weights_identity(arch: str, weights: str | None, seed: int) -> str:
    """What the backbone's weights are: ``sha256:<hex>`` of the weights file, or ``none:seed<k>``."""
    path = _resolve_weights(weights, arch)
    if path is None:
        return f"none:seed{int(seed)}"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def feature_key(
    arch: str,
    weights_id: str,
    image_size: int,
    preprocess: str,
    data_root: str,
    paths: Sequence[str],
    keras_version: str,
) -> str:
    """SHA-256 (hex) over everything the cached features depend on (see the module docstring)."""
    manifest = hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()
    ident = {
        "format": CACHE_FORMAT,
        "arch": arch,
        "weights": weights_id,
        "image_size": int(image_size),
        "preprocess": preprocess,
        "data_root": str(data_root),
        "manifest": manifest,
        "keras": keras_version,
        "layer": FEATURE_LAYER,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def build_backbone(arch: str, image_size: int, weights: str | None, seed: int):
    """The full classifier with every base layer frozen (``trainable_layers=0``)."""
    if arch not in PROBE_ARCHS:
        raise UserInputError(f"--trainable-layers 0 (linear probe) applies to {', '.join(PROBE_ARCHS)}, not {arch}")
    classifier = BUILDERS[arch](
        input_shape=(image_size, image_size, 3), num_classes=2, seed=seed, weights=weights, trainable_layers=0
    )
    reseed_random_weights(classifier.model, seed, head_only=str(weights).lower() != "none")
    return classifier


def reseed_random_weights(model, seed: int, head_only: bool = False) -> None:
    """Re-draw the randomly initialised weights from initialisers with explicit seeds ``(seed, layer index)``.

    Keras gives an initialiser without a seed one from Python's global ``random`` module; on a Dask worker
    other threads draw from that module too, so the same seed built different networks there (measured:
    1 build in 3). Explicit seeds make the weights a function of ``seed`` alone. ``head_only``: only the
    layers after the base (its weights came from a file).
    """
    layers = model.layers
    start = next(i for i, layer in enumerate(layers) if layer.name == FEATURE_LAYER) if head_only else 0
    for index, layer in enumerate(layers[start:], start=start):
        for weight_name, init_name in (("kernel", "kernel_initializer"), ("bias", "bias_initializer")):
            variable, initializer = getattr(layer, weight_name, None), getattr(layer, init_name, None)
            if variable is None or initializer is None:
                continue
            config = initializer.get_config()
            if "seed" in config:  # random initialisers (constant ones, e.g. zero biases, have no seed)
                config["seed"] = int((seed * 100_003 + index * 2 + (weight_name == "bias")) % 2**31)
                fresh = type(initializer).from_config(config)
                variable.assign(fresh(tuple(variable.shape), dtype=variable.dtype))


@contextlib.contextmanager
def _build_lock(path: Path):
    """Blocking exclusive ``flock`` on ``path`` (released when the holder exits, however it exits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(file: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(file, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return data["paths"], data["features"]
    except (OSError, ValueError, KeyError):
        return None  # unreadable or partial: rebuilt (the writer is atomic, so this is a foreign file)


def ensure_features(
    classifier,
    weights: str | None,
    seed: int,
    data_root: str | Path,
    paths: Sequence[str],
    cache_dir: str | Path,
    progress: Callable[[str], None] | None = None,
    batch_size: int = EXTRACT_BATCH,
) -> FeatureTable:
    """The pooled features of ``paths`` (relative to ``data_root``) through the frozen base of ``classifier``
    (:func:`build_backbone` with ``weights`` and ``seed``), from the cache or computed now.

    Returns a :class:`FeatureTable` whose ``status`` says which. ``paths`` are deduplicated; the
    file is written atomically.
    """
    keras = require_keras()
    paths = sorted(set(paths))
    arch, image_size = classifier.meta["arch"], int(classifier.meta["image_size"])
    mode = classifier.meta["preprocess"]
    key = feature_key(
        arch, weights_identity(arch, weights, seed), image_size, mode, str(data_root), paths, keras.__version__
    )
    cache_dir = Path(cache_dir)
    file = cache_dir / f"{arch}-{image_size}-{key[:16]}.npz"
    start = time.perf_counter()
    with _build_lock(cache_dir / f".{file.name}.lock"):
        cached = _read(file, key) if file.is_file() else None
        if cached is not None:
            return FeatureTable(key, file, cached[0], cached[1], "hit", time.perf_counter() - start)
        if progress:
            progress(f"{arch}: computing frozen features of {len(paths)} images at {image_size}px -> {file}")
        features = extract_features(classifier, [str(Path(data_root) / p) for p in paths], image_size, batch_size)
        with atomic_write(file, "wb") as handle:
            np.savez(handle, key=np.array(key), paths=np.array(paths), features=features)
    return FeatureTable(key, file, np.array(paths), features, "built", time.perf_counter() - start)


def feature_extractor(classifier):
    """``keras.Model``: image batch ``(B, S, S, 3)`` preprocessed -> ``(B, D)`` pooled features."""
    keras = require_keras()
    model = classifier.model
    return keras.Model(model.input, model.get_layer(FEATURE_LAYER).output)


def extract_features(classifier, files: Sequence[str], image_size: int, batch_size: int = EXTRACT_BATCH) -> np.ndarray:
    """``(len(files), D)`` float32 pooled features, decoded and preprocessed batch by batch (bounded memory)."""
    extractor = feature_extractor(classifier)
    mode = classifier.meta["preprocess"]
    chunks = []
    for i in range(0, len(files), batch_size):
        x = preprocess(decode_many(list(files[i : i + batch_size]), image_size), mode)
        chunks.append(np.asarray(extractor(x, training=False), dtype=np.float32))
    width = extractor.output.shape[-1]
    return np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)


# --------------------------------------------------------------------------- the head


@dataclass
class ProbeSettings:
    """The head's training: the transfer-learning schedule of ``finetune`` (``TRANSFER_DEFAULTS``)."""

    epochs: int = 200
    batch_size: int = 64
    lr: float = 1e-4
    patience: int = 10
    monitor: str = "val_accuracy"
    dropout: float = 0.5


def train_linear_probe(
    classifier,
    f_train: np.ndarray,
    y_train: np.ndarray,
    f_val: np.ndarray,
    y_val: np.ndarray,
    settings: ProbeSettings,
    seed: int,
) -> dict:
    """Train the head of ``classifier`` on features ``(N, D)``; copy the best head's weights into it.

    The head is the model's own ``head_dropout`` + ``predictions`` layers on a ``(D,)`` input, trained by
    :func:`fit_top`. Returns ``{"epochs_run", "best_epoch", "best_score", "monitor", "head"}``.
    """
    keras = require_keras()
    keras.utils.set_random_seed(int(seed))
    inputs = keras.Input(shape=(f_train.shape[1],), name="features")
    # an explicit dropout seed: an unseeded layer takes one from Python's global random (see reseed_random_weights)
    x = keras.layers.Dropout(settings.dropout, seed=int(seed), name="head_dropout")(inputs)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    head = keras.Model(inputs, outputs, name="probe_head")
    # the full model's freshly initialised head (same seed) is the starting point
    head.get_layer("predictions").set_weights(classifier.model.get_layer("predictions").get_weights())
    result = fit_top(head, [f_train], y_train, [f_val], y_val, settings, seed)
    classifier.model.get_layer("predictions").set_weights(head.get_layer("predictions").get_weights())
    classifier.meta.update(
        {"linear_probe": True, "best_epoch": result["best_epoch"], "best_score": result["best_score"]}
    )
    return {**result, "head": head}


def fit_top(
    top,
    x_train: list[np.ndarray],
    y_train: np.ndarray,
    x_val: list[np.ndarray],
    y_val: np.ndarray,
    settings: ProbeSettings,
    seed: int,
) -> dict:
    """Train ``top`` (a Keras model on cached inputs: a list of arrays, one per model input) with ``finetune``'s
    transfer-learning schedule: Adam at ``settings.lr``, balanced class weights, early stopping on
    ``settings.monitor`` (patience in epochs, Keras' rule as ``finetune``), the best epoch's weights restored
    at the end (a tie goes to the later epoch: :class:`~breastcnn.nn.schedules.BestScore`, as ``finetune``
    saves its best model), LR halved on val_loss plateaus. Batch order from NumPy generators seeded by
    ``seed`` (TensorFlow's op-level random state depends on what the process ran before).

    Returns ``{"epochs_run", "best_epoch", "best_score", "monitor"}``.
    """
    keras = require_keras()
    top.compile(
        optimizer=keras.optimizers.Adam(learning_rate=settings.lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stopper = keras.callbacks.EarlyStopping(
        monitor=settings.monitor, mode=MONITORS.get(settings.monitor, "auto"), patience=settings.patience, verbose=0
    )
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", mode="min", factor=0.5, patience=max(1, settings.patience // 2), min_lr=1e-7, verbose=0
    )
    keeper = _best_weights(keras)(settings.monitor)
    weights = class_weights(y_train, "balanced")
    batches = _feature_batches(keras)(
        x_train, y_train, np.array([weights[int(k)] for k in y_train], np.float32), settings.batch_size, seed
    )
    validation = (x_val[0] if len(x_val) == 1 else tuple(x_val), y_val)
    history = top.fit(
        batches,
        validation_data=validation,
        epochs=settings.epochs,
        shuffle=False,
        verbose=0,
        callbacks=[keeper, stopper, plateau],
    )
    scores = history.history.get(settings.monitor, [])
    if keeper.weights is not None:
        top.set_weights(keeper.weights)
    best = keeper.best.best_step if keeper.weights is not None else len(scores) - 1
    return {
        "epochs_run": len(scores),
        "best_epoch": best + 1,
        "best_score": float(scores[best]) if scores else None,
        "monitor": settings.monitor,
    }


def _best_weights(keras):
    """A callback class keeping the weights of the best epoch by ``monitor`` (:class:`BestScore`'s tie rule)."""

    class KeepBest(keras.callbacks.Callback):
        def __init__(self, monitor: str):
            super().__init__()
            self.monitor = monitor
            self.best = BestScore(MONITORS[monitor])
            self.weights = None

        def on_epoch_end(self, epoch, logs=None):
            if self.best.update((logs or {}).get(self.monitor, float("nan"))):
                self.weights = self.model.get_weights()

    return KeepBest


def _feature_batches(keras):
    """A ``keras.utils.PyDataset`` of shuffled ``(inputs, labels, class weights)`` batches (``inputs``: a tuple, one
    array per model input); the order of epoch ``e`` is ``default_rng([seed, e]).permutation`` (the same on any
    machine and after anything else ran)."""

    class FeatureBatches(keras.utils.PyDataset):
        def __init__(self, x, y, w, batch_size, seed):
            super().__init__(workers=1, use_multiprocessing=False)
            self.x, self.y, self.w = x, y.astype(np.int64), w
            self.batch_size, self.seed, self.epoch = int(batch_size), int(seed), 0
            self.order = np.random.default_rng([self.seed, 0]).permutation(len(y))

        @property
        def num_batches(self) -> int:
            return -(-len(self.y) // self.batch_size)

        def __getitem__(self, index: int):
            idx = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            inputs = tuple(x[idx] for x in self.x)
            return inputs[0] if len(inputs) == 1 else inputs, self.y[idx], self.w[idx]

        def on_epoch_end(self):
            self.epoch += 1
            self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.y))

    return FeatureBatches


def head_probabilities(head, features: np.ndarray) -> np.ndarray:
    """P(malignant) ``(N,)`` of the trained head on cached features (inference: no dropout)."""
    return np.asarray(head.predict(features, batch_size=256, verbose=0), dtype=np.float64)[:, 1]


# --------------------------------------------------------------------------- a whole linear-probe run


def run_linear_probe(
    arch: str,
    split,
    run_dir: Path,
    *,
    weights: str | None,
    seed: int,
    image_size: int,
    settings: ProbeSettings,
    cache_dir: str | Path,
    images: Sequence[str] | None = None,
    options: dict | None = None,
    message: Callable[[str], None] | None = None,
) -> dict:
    """One linear-probe run into ``run_dir`` (held by the caller): ``config.json``, ``model.keras`` (+ sidecar),
    ``summary.json``. ``images``: the paths to cache features for (default: the split's; a k-fold comparison
    passes every fold's, so the cache serves all folds).

    Returns the summary plus, under ``"_probe"``, ``(head, table, features by subset)`` for the caller.
    """
    classifier = build_backbone(arch, image_size, weights, seed)
    table = ensure_features(
        classifier, weights, seed, split.root, images or [r.path for r in split.rows], cache_dir, progress=message
    )
    recorded = {
        "model": arch,
        "weights": str(weights),
        "trainable_layers": 0,
        "linear_probe": True,
        "augment": False,
        "feature_cache": str(table.file),
        "image_size": image_size,
        "seed": seed,
        **dataclasses.asdict(settings),
        **(options or {}),
    }
    recorded.update(trainable_layers=0, augment=False)
    runs.write_run_config(run_dir, recorded, split)
    features = {s: table.rows([r.path for r in split.subset(s)]) for s in ("train", "val", "test")}
    start = time.perf_counter()
    trained = train_linear_probe(
        classifier, features["train"], split.labels("train"), features["val"], split.labels("val"), settings, seed
    )
    train_seconds = time.perf_counter() - start
    classifier.meta.update(
        {
            "split_hash": split.hash,
            "split_dir": str(split.dir),
            "seed": int(seed),
            "magnification": (split.info or {}).get("magnification"),
            "feature_cache": table.key,
        }
    )
    model_path = Path(run_dir) / "model.keras"
    save_model(classifier, model_path)
    summary = {
        "run_dir": str(run_dir),
        "model_path": str(model_path),
        "arch": arch,
        "framework": "keras",
        "stopped": "early_stopping" if trained["epochs_run"] < settings.epochs else "completed",
        "epochs_run": trained["epochs_run"],
        "best_epoch": trained["best_epoch"],
        "best_score": trained["best_score"],
        "monitor": settings.monitor,
        "elapsed_s": round(train_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "params": classifier.count_params(),
        "n_train": int(len(features["train"])),
        "n_val": int(len(features["val"])),
        "weights": str(weights),
        "linear_probe": True,
        "feature_cache": {"status": table.status, "seconds": round(table.seconds, 3), "file": table.file.name},
        "warnings": degenerate_model_warnings(
            split.labels("val"), head_probabilities(trained["head"], features["val"]), "validation"
        ),
    }
    atomic_write_json(Path(run_dir) / "summary.json", summary)
    return {**summary, "_probe": (trained["head"], table, features)}


def finetune_linear_probe(
    arch: str,
    split_dir,
    out,
    *,
    weights: str | None,
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int | None,
    monitor: str,
    image_size: int,
    seed: int,
    augment: bool,
    force: bool = False,
    callback=None,
    runs_root=None,
) -> dict:
    """``finetune --trainable-layers 0`` for vgg16/resnet50: :func:`run_linear_probe` in a run directory, the
    features cached in ``<split>/cache/features`` (reused by later runs on the split). Returns the run summary."""
    hooks = callback if callback is not None else TrainingCallback()
    split = load_split(split_dir)
    require_both_classes(split)
    if not split.subset("val"):
        raise UserInputError(f"--split {split.dir}: the linear probe needs a validation subset (early stopping)")
    if augment:
        hooks.on_message(
            "--trainable-layers 0: the head trains on features of the unaugmented images (no augmentation in this mode)"
        )
    settings = ProbeSettings(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience or 10, monitor=monitor)
    run_kwargs = {"runs_root": runs_root} if runs_root is not None else {}
    with runs.run_directory(arch, out, force=force, **run_kwargs) as run:
        summary = run_linear_probe(
            arch,
            split,
            run.path,
            weights=weights,
            seed=seed,
            image_size=image_size,
            settings=settings,
            cache_dir=Path(split.dir) / "cache" / "features",
            message=hooks.on_message,
        )
        run.model_written()
    summary.pop("_probe")
    hooks.on_train_end(summary)
    return summary


# --------------------------------------------------------------------------- partial fine-tuning, frozen prefix cached


def split_at_trainable(classifier) -> tuple | None:
    """``(prefix, top, crossing layer names)`` of a vgg16/resnet50 classifier built with ``trainable_layers`` N.

    ``prefix``: ``keras.Model`` from the image to the tensors the trainable part reads from the frozen part
    (one for VGG16; a residual block cut in the middle gives two: the branch and the shortcut); ``top``:
    those tensors -> the softmax, sharing its layers (and weights) with ``classifier.model``, so training
    ``top`` trains the classifier. ``top(prefix(x)) == model(x)`` (tested). None when nothing is frozen.
    """
    keras = require_keras()
    model = classifier.model
    cut = int(classifier.meta["base_layers"]) - int(classifier.meta["trainable_layers"])
    if cut <= 1:  # only the input layer (or nothing) is frozen
        return None
    frozen = {id(layer) for layer in model.layers[:cut]}
    crossing, seen = [], set()
    for layer in model.layers[cut:]:
        for tensor in layer._inbound_nodes[0].input_tensors:  # the node of the model's own graph
            source = tensor._keras_history.operation
            if id(source) in frozen and id(tensor) not in seen:
                seen.add(id(tensor))
                crossing.append((tensor, source.name))
    tensors = [t for t, _ in crossing]
    prefix = keras.Model(model.input, tensors if len(tensors) > 1 else tensors[0], name="frozen_prefix")
    top = keras.Model(tensors if len(tensors) > 1 else tensors[0], model.output, name="trainable_top")
    return prefix, top, [name for _, name in crossing]


def prefix_activations(prefix, x_uint8: np.ndarray, mode: str, batch_size: int = EXTRACT_BATCH) -> list[np.ndarray]:
    """The frozen prefix's outputs for uint8 images ``(N, S, S, 3)``: one float32 array per output, batch by batch."""
    parts: list[list[np.ndarray]] = []
    for i in range(0, len(x_uint8), batch_size):
        out = prefix(preprocess(x_uint8[i : i + batch_size], mode), training=False)
        out = out if isinstance(out, (list, tuple)) else [out]
        parts.append([np.asarray(o, dtype=np.float32) for o in out])
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def finetune_cached_prefix(
    arch: str,
    split_dir,
    out,
    *,
    weights: str | None,
    trainable_layers: int,
    dropout: float,
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int | None,
    monitor: str,
    image_size: int,
    seed: int,
    jobs: int = 1,
    force: bool = False,
    callback=None,
    runs_root=None,
) -> dict | None:
    """``finetune --no-augment --trainable-layers N`` for vgg16/resnet50: the frozen prefix runs once per image.

    Its outputs for the train and val images are kept in memory, and only the trainable top trains on them
    (:func:`fit_top`: the transfer-learning schedule). Returns the run summary, or None when nothing is
    frozen (N covers the whole base: the regular loop runs). Writes ``config.json``, ``model.keras`` (the
    whole network) and ``summary.json``.
    """
    keras = require_keras()
    hooks = callback if callback is not None else TrainingCallback()
    split = load_split(split_dir)
    require_both_classes(split)
    classifier = BUILDERS[arch](
        input_shape=(image_size, image_size, 3),
        num_classes=2,
        seed=seed,
        weights=weights,
        trainable_layers=trainable_layers,
        dropout=dropout,
    )
    parts = split_at_trainable(classifier)
    if parts is None:
        return None
    prefix, top, crossing = parts
    settings = ProbeSettings(
        epochs=epochs, batch_size=batch_size, lr=lr, patience=patience or 10, monitor=monitor, dropout=dropout
    )
    run_kwargs = {"runs_root": runs_root} if runs_root is not None else {}
    with runs.run_directory(arch, out, force=force, **run_kwargs) as run:
        runs.write_run_config(
            run.path,
            {
                "model": arch,
                "weights": str(weights),
                "trainable_layers": trainable_layers,
                "augment": False,
                "prefix_cache": crossing,
                "image_size": image_size,
                "seed": seed,
                **dataclasses.asdict(settings),
            },
            split,
        )
        mode = classifier.meta["preprocess"]
        start = time.perf_counter()
        cached = {}
        for subset in ("train", "val"):
            x, y = load_subset(split, subset, image_size, jobs=jobs)
            if len(y) == 0:
                raise UserInputError(f"--split {split.dir}: fine-tuning needs train and val images; {subset} is empty")
            cached[subset] = (prefix_activations(prefix, x, mode), y)
        prefix_seconds = time.perf_counter() - start
        hooks.on_message(
            f"{arch}: frozen prefix (up to {', '.join(crossing)}) ran once per image in "
            f"{prefix_seconds:.1f} s; training the top {trainable_layers} layers on its outputs"
        )
        keras.utils.set_random_seed(int(seed))
        start = time.perf_counter()
        result = fit_top(top, *cached["train"], *cached["val"], settings, seed)
        train_seconds = time.perf_counter() - start
        classifier.meta.update(
            {
                "split_hash": split.hash,
                "split_dir": str(split.dir),
                "seed": int(seed),
                "magnification": (split.info or {}).get("magnification"),
                "best_epoch": result["best_epoch"],
                "best_score": result["best_score"],
            }
        )
        model_path = run.path / "model.keras"
        save_model(classifier, model_path)
        run.model_written()
        summary = {
            "run_dir": str(run.path),
            "model_path": str(model_path),
            "arch": arch,
            "framework": "keras",
            "stopped": "early_stopping" if result["epochs_run"] < epochs else "completed",
            "epochs_run": result["epochs_run"],
            "best_epoch": result["best_epoch"],
            "best_score": result["best_score"],
            "monitor": monitor,
            "elapsed_s": round(train_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "params": classifier.count_params(),
            "n_train": int(len(cached["train"][1])),
            "n_val": int(len(cached["val"][1])),
            "weights": str(weights),
            "prefix_cache": {"tensors": crossing, "seconds": round(prefix_seconds, 3)},
            "warnings": degenerate_model_warnings(
                cached["val"][1], head_probabilities(top, cached["val"][0]), "validation"
            ),
        }
        atomic_write_json(run.path / "summary.json", summary)
    hooks.on_train_end(summary)
    return summary


def frozen_shortcut(
    arch: str,
    split_dir,
    out,
    *,
    weights: str | None,
    trainable_layers: int,
    dropout: float,
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int | None,
    monitor: str,
    image_size: int,
    seed: int,
    augment: bool,
    class_weights: str | None,
    strategy: str,
    recipe: str | None,
    jobs: int = 1,
    force: bool = False,
    callback=None,
    runs_root=None,
) -> dict | None:
    """What ``finetune_keras`` runs instead of its loop when part of the network is frozen and can be cached:

    - ``trainable_layers == 0`` (vgg16/resnet50): :func:`finetune_linear_probe` (features cached on disk);
    - ``trainable_layers > 0`` without augmentation: :func:`finetune_cached_prefix` (frozen prefix run once).

    Only for the transfer-learning schedule with balanced class weights on the default strategy (what these
    paths implement); returns None when the regular loop should run.
    """
    if arch not in PROBE_ARCHS or recipe is not None or strategy != "default" or class_weights != "balanced":
        return None
    weights = weights or "imagenet"
    common = {
        "weights": weights,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "patience": patience,
        "monitor": monitor,
        "image_size": image_size,
        "seed": seed,
        "force": force,
        "callback": callback,
        "runs_root": runs_root,
    }
    if trainable_layers == 0:
        return finetune_linear_probe(arch, split_dir, out, augment=augment, **common)
    if not augment:
        return finetune_cached_prefix(
            arch, split_dir, out, trainable_layers=trainable_layers, dropout=dropout, jobs=jobs, **common
        )
    return None

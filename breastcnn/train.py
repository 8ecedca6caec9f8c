"""The NumPy training loop: ``breastcnn train`` as a library.

One run = one directory (:mod:`breastcnn.runs`) with ``config.json``,
``history.csv`` (one row per validation evaluation), ``model.npz`` (the best
model by ``monitor``), ``last.npz`` (a resumable checkpoint), ``training.png``
and ``summary.json``.

What the loop does per epoch: shuffle the training images with the shuffle
generator, then per batch take the uint8 images from memory, augment them
(fresh draws from the augmentation generator), preprocess, and take one
optimizer step (class weights and L2 inside ``Sequential.train_on_batch``).
``evals_per_epoch`` times per epoch it scores the validation subset (inference
mode, batched, deterministic), logs a history row, and hands the monitored
score to the run's :class:`~breastcnn.recipes.TrainingSchedule`, which says
whether this is the best model so far (kept as ``model.npz``; a tie goes to the
later pass), the LR for the next steps (``lr = lr0 * lr_decay ** floor(t /
every)`` on a clock counted over the whole run, in epochs or evaluations, so it
never resets at an epoch boundary) and whether early stopping ends the run
(patience in epochs or evaluations, never at or before ``min_epochs``). Then
it writes ``last.npz``. The values come from a recipe (:mod:`breastcnn.recipes`:
``default`` or ``report``), single options overriding it.

At the end, a best model that predicts (almost) one class on the validation
subset, or is no more accurate there than the majority class, is reported in
the summary's ``warnings`` (and on stderr by the CLI).

Exact resume: every random draw comes from three generators (shuffle,
augmentation, and the model's dropout layers) whose states go into
``last.npz`` together with the weights, the optimizer state, the epoch's
permutation and the position in it. ``--resume`` therefore ends with the same
weights as an uninterrupted run. Ctrl-C is deferred to the end of the current
step (a second Ctrl-C aborts at once, keeping the previous checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from breastcnn import CLASSES
from breastcnn.data.images import DEFAULT_JOBS
from breastcnn.data.stain_options import check_stain_options, training_stain
from breastcnn.data.tasks import TASK_CLASSES, TASKS
from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write_json
from breastcnn.recipes import (
    DEFAULT_RECIPE,
    RECIPE_OPTIONS,
    RECIPES,
    TrainingSchedule,
    evaluation_points,  # noqa: F401  (its home before recipes.py; scripts import it from here)
)
from breastcnn.recipes import MONITORS as RECIPE_MONITORS
from breastcnn.recipes import resolve as resolve_recipe
from breastcnn.runs import (
    HISTORY_COLUMNS,
    HistoryLogger,
    TrainingCallback,
    read_history,
    read_run_config,
    write_run_config,
)

NUMPY_ARCHS = ("custom", "custom-k4")
MONITORS = tuple(RECIPE_MONITORS)
CLASS_WEIGHT_MODES = ("balanced", "none")
ACTIVATIONS = ("relu", "leaky_relu")
PREPROCESS_MODES = ("caffe", "minmax")
CHECKPOINT_NAME = "last.npz"
MODEL_NAME = "model.npz"
SUMMARY_NAME = "summary.json"
STATE_FORMAT = 1

EXIT_DIVERGED = 1
"""Exit code of ``breastcnn train`` when the loss became NaN/inf (bad input is 2, Ctrl-C 130)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``summary`` holds the run summary."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


@dataclass
class TrainConfig:
    """Every option of ``breastcnn train`` (same names, underscores for dashes).

    The options of :data:`~breastcnn.recipes.RECIPE_OPTIONS` default to ``None``:
    :meth:`resolved` fills them from the recipe named by ``recipe`` (their
    defaults live there). ``patience``/``lr_decay_every`` count evaluations,
    ``patience_epochs``/``lr_decay_epochs``/``min_epochs`` count epochs.
    """

    split: str = "splits/200X"
    out: str | None = None
    arch: str = "custom"
    recipe: str = DEFAULT_RECIPE
    epochs: int = 5
    batch_size: int | None = None
    lr: float | None = None
    l2: float | None = None
    class_weights: str = "balanced"
    evals_per_epoch: int | None = None
    patience: int | None = None
    patience_epochs: float | None = None
    min_epochs: float | None = None
    lr_decay: float | None = None
    lr_decay_every: int | None = None
    lr_decay_epochs: float | None = None
    monitor: str | None = None
    image_size: int = 224
    preprocess: str = "caffe"
    activation: str = "relu"
    augment: bool = True
    task: str = "binary"
    """``binary`` (benign/malignant) or ``subtype`` (the 8 BreakHis classes, :mod:`breastcnn.data.tasks`)."""
    stain_norm: str = "none"
    """``--stain-norm``: none, macenko or reinhard (:mod:`breastcnn.data.stain_options`)."""
    stain_target: str | None = None
    """``--stain-target``: the image whose stains are the target (None: fitted on the training subset)."""
    stain_augment: bool | None = None
    """``--stain-augment``: HED colour jitter after the affine augmentation (a recipe option: None = the
    recipe's; on in ``default``, off in ``report``)."""
    seed: int = 0
    jobs: int = DEFAULT_JOBS
    threads: int | None = None
    """Engine threads of the NumPy model (None: all available cores). A setting of the machine, not of
    the recipe: ``--resume`` takes it from the command, not from ``config.json``; results do not depend on it."""
    force: bool = False
    eval_batch_size: int = 128

    def resolved(self) -> TrainConfig:
        """A copy whose recipe options are all set: ``None`` ones from the recipe (idempotent)."""
        if self.recipe not in RECIPES:
            raise UserInputError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        try:
            values, _ = resolve_recipe(self.recipe, {k: getattr(self, k) for k in RECIPE_OPTIONS}, self.epochs)
        except ValueError as exc:
            raise UserInputError(str(exc)) from None
        return dataclasses.replace(self, **values)

    def recipe_overrides(self) -> list[str]:
        """The recipe options whose value differs from what the recipe alone would give (resolved configs)."""
        plain, _ = resolve_recipe(self.recipe, {}, self.epochs)
        return [name for name in RECIPE_OPTIONS if getattr(self, name) != plain[name]]

    def validate(self) -> TrainConfig:
        """The :meth:`resolved` config; raises :class:`UserInputError` naming the option for any out-of-range value."""
        self.check_types(self.to_dict())
        self = self.resolved()
        optional = lambda value, ok: value is None or ok(value)  # noqa: E731 (one of a unit pair is None)
        checks = [
            (self.arch.removesuffix("-finetuned") in NUMPY_ARCHS, "--arch", self.arch,
             f"must be one of {', '.join(NUMPY_ARCHS)} (train vgg16/resnet50/custom-keras with "
             "'breastcnn finetune --arch NAME')"),
            (self.epochs >= 1, "--epochs", self.epochs, "must be >= 1"),
            (self.batch_size >= 1, "--batch-size", self.batch_size, "must be >= 1"),
            (math.isfinite(self.lr) and self.lr > 0, "--lr", self.lr, "must be > 0"),
            (math.isfinite(self.l2) and self.l2 >= 0, "--l2", self.l2, "must be >= 0"),
            (self.class_weights in CLASS_WEIGHT_MODES, "--class-weights", self.class_weights,
             f"must be one of {', '.join(CLASS_WEIGHT_MODES)}"),
            (self.evals_per_epoch >= 1, "--evals-per-epoch", self.evals_per_epoch, "must be >= 1"),
            (optional(self.patience, lambda v: v >= 1), "--patience", self.patience, "must be >= 1 (evaluations)"),
            (optional(self.patience_epochs, lambda v: math.isfinite(v) and v > 0), "--patience-epochs",
             self.patience_epochs, "must be > 0 (epochs; fractions allowed)"),
            (math.isfinite(self.min_epochs) and self.min_epochs >= 0, "--min-epochs", self.min_epochs,
             "must be >= 0"),
            (0 < self.lr_decay <= 1, "--lr-decay", self.lr_decay, "must be in (0, 1] (1 = constant LR)"),
            (optional(self.lr_decay_every, lambda v: v >= 1), "--lr-decay-every", self.lr_decay_every,
             "must be >= 1 (evaluations)"),
            (optional(self.lr_decay_epochs, lambda v: math.isfinite(v) and v > 0), "--lr-decay-epochs",
             self.lr_decay_epochs, "must be > 0 (epochs; fractions allowed)"),
            (self.monitor in MONITORS, "--monitor", self.monitor, f"must be one of {', '.join(MONITORS)}"),
            (8 <= self.image_size <= 2048, "--image-size", self.image_size, "must be between 8 and 2048"),
            (self.preprocess in PREPROCESS_MODES, "--preprocess", self.preprocess,
             f"must be one of {', '.join(PREPROCESS_MODES)}"),
            (self.activation in ACTIVATIONS, "--activation", self.activation,
             f"must be one of {', '.join(ACTIVATIONS)}"),
            (self.jobs >= 1 or self.jobs == -1, "--jobs", self.jobs, "must be >= 1 (or -1 for all cores)"),
            (self.threads is None or self.threads >= 1, "--threads", self.threads,
             "must be >= 1 (default: all available cores)"),
            (self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be >= 1"),
            (self.seed >= 0, "--seed", self.seed, "must be >= 0"),
            (self.task in TASKS, "--task", self.task, f"must be one of {', '.join(TASKS)}"),
        ]
        for ok, option, value, why in checks:
            if not ok:
                raise UserInputError(f"{option} {why}, got {value!r}")
        check_stain_options(self.stain_norm, self.stain_target, self.stain_augment)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, options: dict, source: str | Path | None = None, **overrides) -> "TrainConfig":
        """Build from a ``config.json`` ``options`` object (unknown keys ignored; ``source`` names it in errors).

        A ``config.json`` from before recipes existed (no ``recipe`` key) ran the
        report's schedule: it is read as ``recipe="report"``.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in options.items() if k in names}
        cls.check_types(kwargs, source)
        kwargs.setdefault("recipe", "report")
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def check_types(cls, options: dict, source: str | Path | None = None) -> None:
        """Refuse values of the wrong JSON type (a hand-edited ``"epochs": "12"``), naming the option and file."""
        for f in dataclasses.fields(cls):
            if f.name not in options:
                continue
            value = options[f.name]
            allowed = _OPTION_TYPES[str(f.type)]
            if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
                where = f"{source}: option" if source is not None else "option"
                names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
                raise UserInputError(f"{where} '{f.name}' must be {names}, got {value!r}")


_OPTION_TYPES = {"str": (str,), "str | None": (str, type(None)), "int": (int,), "int | None": (int, type(None)),
                 "float": (float, int), "float | None": (float, int, type(None)), "bool": (bool,),
                 "bool | None": (bool, type(None))}
"""JSON types accepted for each TrainConfig field type (bool is never taken for a number)."""


# --------------------------------------------------------------------------- small helpers


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state


def _json_text(obj) -> np.ndarray:
    """A JSON string as a 0-d unicode array (goes into an ``.npz`` without pickle)."""
    return np.array(json.dumps(obj, sort_keys=True))


def _dropout_layers(model) -> list:
    return [layer for layer in getattr(model, "layers", []) if isinstance(getattr(layer, "rng", None), np.random.Generator)]


def validation_scores(probs: np.ndarray, y: np.ndarray, task: str = "binary") -> dict:
    """The ``val_*`` history columns from validation probabilities ``(M, C)`` and labels ``(M,)``.

    ``val_loss``: unweighted mean cross-entropy (no class weights, no L2);
    accuracy, F1 and recall of the malignant class; balanced accuracy (mean of
    the two class recalls) and ROC AUC (scikit-learn; NaN with one class).
    ``task="subtype"``: accuracy, balanced accuracy and (macro) F1 of the subtypes, recall and AUC of
    the derived benign/malignant call (:func:`breastcnn.metrics.fast_subtype_validation_scores`).
    """
    from breastcnn.metrics import fast_subtype_validation_scores, fast_validation_scores

    p_true = np.clip(probs[np.arange(y.size), y].astype(np.float64), 1e-12, 1.0)
    if task == "subtype":
        scores = fast_subtype_validation_scores(y, probs)
    else:
        scores = fast_validation_scores(y, probs[:, 1])
    return {
        "val_loss": float(-np.mean(np.log(p_true))),
        "val_accuracy": scores["accuracy"],
        "val_f1": scores["f1"],
        "val_recall": scores["recall"],
        "val_balanced_accuracy": scores["balanced_accuracy"],
        "val_auc": scores["roc_auc"],
    }


class _DeferredInterrupt:
    """Turn the first SIGINT into a flag checked between steps (main thread only).

    A second SIGINT raises ``KeyboardInterrupt`` immediately. Outside the main
    thread, signals are left alone (a KeyboardInterrupt then still stops the
    run, at whatever point it arrives).
    """

    def __init__(self):
        self.requested = False
        self.hard = False  # a second Ctrl-C: the state may be mid-step, do not checkpoint it
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            self.hard = True
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class _Hooks:
    """Fan-out of the :class:`TrainingCallback` hooks to several callbacks."""

    def __init__(self, callbacks: Iterable[TrainingCallback]):
        self.callbacks = [c for c in callbacks if c is not None]

    def __getattr__(self, name: str) -> Callable:
        def call(*args, **kwargs):
            for cb in self.callbacks:
                method = getattr(cb, name, None)
                if method is not None:
                    method(*args, **kwargs)

        return call


# --------------------------------------------------------------------------- data


@dataclass
class _Data:
    x_train: np.ndarray  # uint8 (N, S, S, 3)
    y_train: np.ndarray  # int64 (N,)
    x_val: np.ndarray  # float32 (M, S, S, 3), preprocessed once
    y_val: np.ndarray  # int64 (M,)


VAL_CARVE_FRACTION = 0.125
"""Share of training images (whole patients, per class) held out for validation when a split has no val subset."""


def carve_validation(split, seed: int = 0):
    """A copy of ``split`` whose train subset gives whole patients (about 12.5%, per class) to ``val``.

    Used for splits without a validation subset (the 70/30 Spanhol k-fold
    protocol), so that model selection and early stopping never see test.
    The copy has its own hash (its image cache is separate); test is untouched.
    """
    import hashlib

    from breastcnn.data.split import Split, split_by_patient

    train_rows = split.subset("train")
    carved = split_by_patient([r.record for r in train_rows], (1 - VAL_CARVE_FRACTION, VAL_CARVE_FRACTION, 0.0), seed)
    rows = carved + [r for r in split.rows if r.split != "train"]
    digest = hashlib.sha256(f"{split.hash}:carve-val:{VAL_CARVE_FRACTION}:{seed}".encode()).hexdigest()
    return Split(dir=split.dir, root=split.root, rows=rows, hash=digest,
                 info={**split.info, "validation": f"carved from train (seed {seed})"})


def _load_data(split, config: TrainConfig, hooks: _Hooks, normaliser=None) -> _Data:
    from breastcnn.data.images import cache_paths, load_subset, preprocess

    arrays = {}
    for subset in ("train", "val"):
        x_path = cache_paths(split, subset, config.image_size, normaliser)[0]
        if not x_path.is_file():
            hooks.on_message(
                f"building the {subset} image cache at {config.image_size}px ({len(split.subset(subset))} images, "
                f"--jobs {config.jobs}{', ' + normaliser.method + ' stain normalisation' if normaliser else ''})"
                f" -> {x_path.parent}"
            )
        arrays[subset] = load_subset(split, subset, config.image_size, jobs=config.jobs, task=config.task,
                                     normaliser=normaliser)
    x_train, y_train = arrays["train"]
    x_val, y_val = arrays["val"]
    if len(y_train) == 0:
        raise UserInputError(f"--split {split.dir}: the train subset is empty")
    if len(y_val) == 0:
        raise UserInputError(
            f"--split {split.dir}: the val subset is empty; training scores on validation (never on test), "
            "so re-run 'breastcnn split' with a validation ratio"
        )
    return _Data(x_train, y_train, preprocess(x_val, config.preprocess), y_val)


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, model, optimizer, state: dict, rngs: dict, permutation) -> None:
    extra = {
        "train_state": _json_text({**state, "rngs": {k: _rng_state(r) for k, r in rngs.items()},
                                   "dropout_rngs": [_rng_state(l.rng) for l in _dropout_layers(model)]}),
        "permutation": np.asarray(permutation if permutation is not None else np.zeros(0), dtype=np.int64),
    }
    model.save(path, optimizer=optimizer, extra=extra)


def _load_checkpoint(path: Path):
    """``(model, optimizer_state dict, train_state dict, permutation)`` from ``last.npz``."""
    from breastcnn.models.io import load_checkpoint

    model, optimizer_state, extra = load_checkpoint(path)
    if "train_state" not in extra:
        raise UserInputError(f"{path}: not a training checkpoint (no train_state)")
    try:
        state = json.loads(str(np.asarray(extra["train_state"])))
    except ValueError as exc:
        raise UserInputError(f"{path}: train_state is not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise UserInputError(f"{path}: train_state is not a JSON object")
    if state.get("format") != STATE_FORMAT:
        raise UserInputError(f"{path}: checkpoint format {state.get('format')} is not supported")
    missing = sorted(set(_STATE_KEYS) - set(state))
    if not {"schedule", "early_stopping"} & set(state):
        missing.append("schedule")
    if missing:
        raise UserInputError(f"{path}: incomplete training checkpoint (train_state lacks {', '.join(missing)})")
    try:
        for name in ("shuffle", "augment"):
            _set_rng_state(np.random.default_rng(), state["rngs"][name])
        for rng_state in state.get("dropout_rngs", []):
            _set_rng_state(np.random.default_rng(), rng_state)
        # "schedule" since recipes; "early_stopping" in checkpoints written before (resumed as they were)
        schedule = state.get("schedule", state.get("early_stopping"))
        if not isinstance(schedule, dict) or not isinstance(state["running"], list) \
                or len(state["running"]) not in (3, 5):
            raise ValueError("schedule or running is malformed")
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"{path}: damaged training checkpoint ({type(exc).__name__}: {exc})") from None
    permutation = np.asarray(extra.get("permutation", np.zeros(0)), dtype=np.int64)
    return model, optimizer_state, state, permutation


_STATE_KEYS = ("epoch", "step_in_epoch", "global_step", "evaluations", "running", "elapsed_s", "lr", "rngs")
"""Keys a ``last.npz`` train state must have to be resumed."""


# --------------------------------------------------------------------------- the loop


class _AccuracyRecordingLoss:
    """Wraps the model's loss to record batch scores from the logits it already computes.

    ``Sequential.train_on_batch`` returns only the loss (class-weighted
    cross-entropy + L2 penalty); this avoids a second forward pass for the
    running training accuracy and keeps the parts of that loss apart:
    ``last_loss`` (class-weighted cross-entropy, what the gradient follows) and
    ``last_data_loss`` (unweighted cross-entropy, the definition of ``val_loss``).
    """

    def __init__(self, loss):
        self.loss = loss
        self.last_accuracy = float("nan")
        self.last_loss = float("nan")
        self.last_data_loss = float("nan")

    def __call__(self, logits, y, class_weights=None):
        y = np.asarray(y)
        self.last_accuracy = float(np.mean(np.argmax(logits, axis=1) == y))
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        self.last_data_loss = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(y.size), y]))
        loss, grad = self.loss(logits, y, class_weights)
        self.last_loss = float(loss)
        return loss, grad

    def get_config(self) -> dict:
        return self.loss.get_config()


def _compile(model, optimizer, l2: float) -> None:
    from breastcnn.nn.losses import WeightedSoftmaxCrossEntropy

    model.compile(optimizer=optimizer, loss=_AccuracyRecordingLoss(WeightedSoftmaxCrossEntropy()), l2=l2)


def _train_step(model, xb: np.ndarray, yb: np.ndarray, class_weights) -> tuple[float, float]:
    """One optimizer step; returns the batch loss (incl. L2) and the batch accuracy (training mode)."""
    loss = model.train_on_batch(xb, yb, class_weights=class_weights)
    return float(loss), getattr(model.loss, "last_accuracy", float("nan"))


def _loss_parts(model, loss: float) -> tuple[float, float]:
    """``(data_loss, l2_penalty)`` of the step that returned ``loss`` (see :class:`_AccuracyRecordingLoss`)."""
    recorder = model.loss
    return recorder.last_data_loss, loss - recorder.last_loss


def training_schedule(config: TrainConfig, steps_per_epoch: int) -> TrainingSchedule:
    """The :class:`~breastcnn.recipes.TrainingSchedule` of a resolved config (also used by the Keras loop)."""
    return TrainingSchedule(
        lr=config.lr, lr_decay=config.lr_decay, monitor=config.monitor, evals_per_epoch=config.evals_per_epoch,
        steps_per_epoch=steps_per_epoch, lr_decay_every=config.lr_decay_every,
        lr_decay_epochs=config.lr_decay_epochs, patience=config.patience, patience_epochs=config.patience_epochs,
        min_epochs=config.min_epochs,
    )


def _legacy_schedule_state(state: dict) -> dict:
    """The schedule state of a checkpoint written before :class:`TrainingSchedule` existed."""
    stopper = state["early_stopping"]
    return {"evaluations": state["evaluations"], "lr": state["lr"], "early_stopping": stopper,
            "best": {"best": stopper["best"], "best_step": stopper["best_step"], "step": stopper["step"]}}


def _fit(
    model,
    optimizer,
    config: TrainConfig,
    run_dir: Path,
    data: _Data,
    hooks: _Hooks,
    resume: dict | None = None,
    fold: int | None = None,
) -> dict:
    """Train ``model`` (compiled with ``optimizer``) and write the run outputs; returns the summary.

    ``resume``: ``{"state": ..., "permutation": ...}`` from :func:`_load_checkpoint`
    (the model and optimizer already hold the checkpointed weights and state).
    """
    from breastcnn.data.augment import Augmenter
    from breastcnn.data.augment import class_weights as compute_class_weights
    from breastcnn.data.images import preprocess
    from breastcnn.data.stain import HEDJitter
    from breastcnn.metrics import degenerate_model_warnings

    model.threads = config.threads
    n_train = len(data.y_train)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    schedule = training_schedule(config, steps_per_epoch)
    eval_points = set(schedule.eval_points)
    class_weights = compute_class_weights(data.y_train, config.class_weights,
                                          num_classes=len(TASK_CLASSES[config.task]))
    augmenter = Augmenter(stain_jitter=HEDJitter() if config.stain_augment else None) if config.augment else None

    seeds = np.random.SeedSequence(config.seed).spawn(2)
    rngs = {"shuffle": np.random.default_rng(seeds[0]), "augment": np.random.default_rng(seeds[1])}
    history_path = run_dir / "history.csv"
    checkpoint_path = run_dir / CHECKPOINT_NAME
    model_path = run_dir / MODEL_NAME

    state = {
        "format": STATE_FORMAT,
        "epoch": 1,  # 1-based epoch in progress
        "step_in_epoch": 0,  # batches of this epoch already done
        "global_step": 0,
        "evaluations": 0,
        "best_score": None,
        "best_step": None,
        "warnings": [],  # about the best model (degenerate_model_warnings on validation)
        "schedule": schedule.state_dict(),
        # loss, accuracy, batches, data loss, L2 penalty: sums since the last evaluation
        "running": [0.0, 0.0, 0, 0.0, 0.0],
        "elapsed_s": 0.0,
        "lr": config.lr,
        "stopped": None,
    }
    permutation = None
    if resume is not None:
        state.update(resume["state"])
        for name, rng in rngs.items():
            _set_rng_state(rng, state["rngs"][name])
        for layer, rng_state in zip(_dropout_layers(model), state.get("dropout_rngs", [])):
            _set_rng_state(layer.rng, rng_state)
        try:
            schedule.load_state_dict(state["schedule"] if "schedule" in state else _legacy_schedule_state(state))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"{checkpoint_path}: damaged training checkpoint (schedule: "
                                 f"{type(exc).__name__}: {exc})") from None
        state["running"] = list(state["running"]) + [0.0] * (5 - len(state["running"]))
        permutation = resume["permutation"] if resume["permutation"].size == n_train else None
        history = HistoryLogger(history_path)
        history.truncate(state["evaluations"])  # drop rows logged after the checkpoint
    else:
        if history_path.exists():
            history_path.unlink()
        history = HistoryLogger(history_path)
    optimizer.lr = float(state["lr"])

    timing = {"data_s": 0.0, "step_s": 0.0, "validation_s": 0.0, "checkpoint_s": 0.0}
    started = time.perf_counter() - float(state["elapsed_s"])
    loss_sum, acc_sum, batches, data_loss_sum, l2_sum = state["running"]

    def snapshot_state() -> dict:
        state.update(
            running=[loss_sum, acc_sum, batches, data_loss_sum, l2_sum],
            elapsed_s=time.perf_counter() - started,
            lr=float(optimizer.lr),
            schedule=schedule.state_dict(),
        )
        state.pop("early_stopping", None)  # a resumed pre-recipe checkpoint's, now in "schedule"
        return state

    def checkpoint() -> None:
        t0 = time.perf_counter()
        _save_checkpoint(checkpoint_path, model, optimizer, snapshot_state(), rngs, permutation)
        timing["checkpoint_s"] += time.perf_counter() - t0

    def evaluate() -> dict:
        nonlocal loss_sum, acc_sum, batches, data_loss_sum, l2_sum
        t0 = time.perf_counter()
        probs = model.predict(data.x_val, batch_size=config.eval_batch_size)
        timing["validation_s"] += time.perf_counter() - t0
        scores = validation_scores(probs, data.y_val, config.task)
        state["evaluations"] += 1
        mean = (lambda total: total / batches) if batches else (lambda total: None)
        row = {
            "step": state["global_step"],
            "epoch": state["epoch"],
            "loss": mean(loss_sum),
            "accuracy": mean(acc_sum),
            **scores,
            "lr": float(optimizer.lr),
            "elapsed_s": time.perf_counter() - started,
            "data_loss": mean(data_loss_sum),
            "l2_penalty": mean(l2_sum),
        }
        loss_sum, acc_sum, batches, data_loss_sum, l2_sum = 0.0, 0.0, 0, 0.0, 0.0
        history.log(row)
        # best model (ties: the later pass), then the LR for the next steps and the stop decision
        improved = schedule.update(scores[config.monitor])
        if improved:
            state["best_score"], state["best_step"] = scores[config.monitor], state["global_step"]
            state["warnings"] = degenerate_model_warnings(*_binary_view(data.y_val, probs, config.task), "validation")
            t1 = time.perf_counter()
            model.save(model_path)
            timing["checkpoint_s"] += time.perf_counter() - t1
        optimizer.lr = schedule.lr
        hooks.on_evaluation({**row, "improved": improved, "monitor": config.monitor})
        return row

    hooks.on_train_begin(
        config.epochs, steps_per_epoch, initial_epoch=state["epoch"], initial_step=state["step_in_epoch"],
        n_train=n_train, n_val=len(data.y_val), run_dir=str(run_dir), fold=fold,
    )
    stopped = state.get("stopped")
    diverged_message = None
    interrupt = _DeferredInterrupt()
    try:
        with interrupt:
            if schedule.should_stop and state["step_in_epoch"] in eval_points:
                # interrupted during the evaluation that ended the run (a hook raised in on_evaluation)
                stopped = "early_stopping"
            while stopped is None and state["epoch"] <= config.epochs:
                epoch = state["epoch"]
                if state["step_in_epoch"] >= steps_per_epoch:  # checkpointed right after an epoch's end
                    state["epoch"], state["step_in_epoch"], permutation = epoch + 1, 0, None
                    continue
                if permutation is None:
                    permutation = rngs["shuffle"].permutation(n_train)
                hooks.on_epoch_begin(epoch)
                while state["step_in_epoch"] < steps_per_epoch:
                    i = state["step_in_epoch"]
                    t0 = time.perf_counter()
                    idx = np.sort(permutation[i * config.batch_size : (i + 1) * config.batch_size])
                    xb = data.x_train[idx]
                    if augmenter is not None:
                        xb = augmenter(xb, rngs["augment"])
                    xb = preprocess(xb, config.preprocess)
                    yb = data.y_train[idx]
                    t1 = time.perf_counter()
                    loss, accuracy = _train_step(model, xb, yb, class_weights)
                    data_loss, l2_penalty = _loss_parts(model, loss)
                    timing["data_s"] += t1 - t0
                    timing["step_s"] += time.perf_counter() - t1
                    if not math.isfinite(loss):
                        stopped = "nan"
                        diverged_message = (
                            f"training diverged: the loss is {loss} at step {state['global_step'] + 1} "
                            f"(epoch {epoch}); try a lower --lr (got {config.lr}). "
                            + (f"The best model so far is kept at {model_path}."
                               if model_path.exists() else "No model was saved (no evaluation before).")
                        )
                        break
                    state["step_in_epoch"] = i + 1
                    state["global_step"] += 1
                    loss_sum += loss
                    acc_sum += accuracy
                    data_loss_sum += data_loss
                    l2_sum += l2_penalty
                    batches += 1
                    if state["step_in_epoch"] in eval_points:
                        evaluate()
                        # Early stopping ends the whole run, but never within --min-epochs:
                        # while BatchNorm's moving statistics settle (about an epoch)
                        # validation scores are those of a constant predictor.
                        if schedule.should_stop:
                            stopped = state["stopped"] = "early_stopping"
                        checkpoint()
                    # After the evaluation and its checkpoint: an interruption raised
                    # here (hook or deferred Ctrl-C) leaves nothing half done.
                    hooks.on_batch_end(state["global_step"], loss, accuracy)
                    if stopped:
                        break
                    if interrupt.requested:
                        raise KeyboardInterrupt
                hooks.on_epoch_end(epoch)
                if stopped is None:
                    state["epoch"], state["step_in_epoch"], permutation = epoch + 1, 0, None
            if stopped is None:
                stopped = "completed"
    except KeyboardInterrupt:
        if interrupt.hard:
            raise  # the previous checkpoint (last evaluation) stays the resume point
        # The state is consistent at a step boundary (hooks and the deferred
        # SIGINT raise only there): save it so that --resume continues exactly.
        stopped = "interrupted"
        checkpoint()

    state["stopped"] = stopped if stopped != "interrupted" else None
    if stopped == "completed":
        checkpoint()  # a finished run's last.npz says so; --resume then has nothing to do
    summary = _summary(config, run_dir, state, stopped, timing, fold)
    if history_path.is_file():
        _plot_history(history_path, run_dir / "training.png", config, fold)
    atomic_write_json(run_dir / SUMMARY_NAME, summary)
    hooks.on_train_end(summary)
    if diverged_message:
        raise TrainingDiverged(diverged_message, summary)
    return summary


def _binary_view(y: np.ndarray, probs: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """``(benign/malignant labels, P(malignant))`` of a task's labels and probabilities (subtypes summed)."""
    if task == "subtype":
        from breastcnn.data.tasks import binary_probabilities, subtype_to_binary

        return subtype_to_binary(y), binary_probabilities(probs)[:, 1]
    return y, probs[:, 1]


def _plot_history(history_path: Path, png: Path, config: TrainConfig, fold: int | None) -> None:
    from breastcnn.plots import plot_training

    rows = read_history(history_path)
    if rows:
        title = f"{config.arch} (lr {config.lr}, batch {config.batch_size})" + (f", fold {fold}" if fold else "")
        plot_training(rows, png, title=title)


def _summary(config: TrainConfig, run_dir: Path, state: dict, stopped: str, timing: dict, fold) -> dict:
    model_path = run_dir / MODEL_NAME
    return {
        "run_dir": str(run_dir),
        "model_path": str(model_path) if model_path.exists() else None,
        "checkpoint_path": str(run_dir / CHECKPOINT_NAME),
        "fold": fold,
        "stopped": stopped,
        "recipe": config.recipe,
        "monitor": config.monitor,
        "best_score": state.get("best_score"),
        "best_step": state.get("best_step"),
        "epochs_run": state["epoch"] if state["step_in_epoch"] else state["epoch"] - 1,
        "steps": state["global_step"],
        "evaluations": state["evaluations"],
        "final_lr": state.get("lr"),
        "elapsed_s": state.get("elapsed_s"),
        "timing": {k: round(v, 3) for k, v in timing.items()},
        "warnings": list(state.get("warnings") or []),
    }


# --------------------------------------------------------------------------- public entry points


def _recorded_options(config: TrainConfig, extra: dict | None) -> dict:
    """``config.json``'s ``options``: every resolved option, the recipe and which of its values were overridden."""
    return {**config.to_dict(), "recipe_overrides": config.recipe_overrides(), **(extra or {})}


def _build_model(config: TrainConfig, meta_extra: dict):
    from breastcnn.models import create_model
    from breastcnn.nn.optim import Adam

    if config.arch not in NUMPY_ARCHS:
        raise UserInputError(
            f"--arch {config.arch!r}: train builds the NumPy models ({', '.join(NUMPY_ARCHS)}); "
            "train vgg16/resnet50/custom-keras with 'breastcnn finetune --arch NAME'"
        )
    try:
        model = create_model(
            config.arch,
            input_shape=(config.image_size, config.image_size, 3),
            num_classes=len(TASK_CLASSES[config.task]),
            seed=config.seed,
            activation=config.activation,
        )
    except UserInputError as exc:  # the options were validated: what is left is the size (too small)
        raise UserInputError(f"--image-size {config.image_size}: {exc}") from None
    if getattr(model, "framework", "numpy") != "numpy":
        raise UserInputError(
            f"--arch {config.arch} is a Keras model; train it with 'breastcnn finetune --arch {config.arch}'"
        )
    model.meta.update(
        {"arch": config.arch, "classes": list(TASK_CLASSES[config.task]), "preprocess": config.preprocess,
         "image_size": config.image_size, "task": config.task, **meta_extra}
    )
    optimizer = Adam(lr=config.lr)
    _compile(model, optimizer, config.l2)
    return model, optimizer


def _restore(run_dir: Path, config: TrainConfig):
    """Model + optimizer + resume dict from ``run_dir/last.npz``."""
    from breastcnn.nn.optim import optimizer_from_state

    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise UserInputError(f"--resume {run_dir}: no {CHECKPOINT_NAME} checkpoint in this directory")
    model, optimizer_state, state, permutation = _load_checkpoint(path)
    optimizer = optimizer_from_state(optimizer_state)
    _compile(model, optimizer, config.l2)
    return model, optimizer, {"state": state, "permutation": permutation}


def require_both_classes(split, task: str = "binary") -> None:
    """Refuse a split whose train subset lacks a class (one-class data trains to a constant, "100%" on val),
    or, for the subtype task, an image without a BreakHis subtype."""
    if task != "binary":
        split.labels("train", task)  # a UserInputError naming the first image without a subtype
    labels = split.labels("train")
    if labels.size == 0:
        return  # reported as an empty train subset where the data are loaded
    counts = {c: int(np.sum(labels == i)) for i, c in enumerate(CLASSES)}
    if min(counts.values()) == 0:
        found = ", ".join(f"{n} {c}" for c, n in counts.items())
        raise UserInputError(
            f"--split {split.dir}: the train subset holds one class only ({found}); a classifier needs both "
            f"{' and '.join(CLASSES)} images"
        )


def _previous_summary(path: Path) -> dict | None:
    """``summary.json`` of a run (None when absent); anything but a JSON object is a user error naming it."""
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc}); delete it to resume") from None
    if not isinstance(summary, dict):
        raise UserInputError(f"{path}: expected a JSON object, got {type(summary).__name__}; delete it to resume")
    return summary


def _train_one(config: TrainConfig, run_dir: Path, split_dir: Path, hooks: _Hooks, resume: bool,
               fold: int | None = None, base_model: Callable | None = None, extra_options: dict | None = None) -> dict:
    from breastcnn.data.split import load_split

    split = load_split(split_dir)
    split_hash = split.hash
    require_both_classes(split, config.task)
    if not split.subset("val"):
        split = carve_validation(split, seed=config.seed)
        hooks.on_message(
            f"{split_dir} has no validation subset (e.g. a 70/30 k-fold split): validating on "
            f"{len(split.subset('val'))} images of {VAL_CARVE_FRACTION:.1%} of the training patients, never on test"
        )
    if resume:
        previous = _previous_summary(run_dir / SUMMARY_NAME)
        if previous is not None and previous.get("stopped") in ("completed", "early_stopping", "nan"):
            hooks.on_message(f"{run_dir}: already finished ({previous['stopped']}), nothing to resume")
            return previous
    run_dir.mkdir(parents=True, exist_ok=True)
    meta_extra = {"split_hash": split_hash, "seed": config.seed,
                  "magnification": (split.info or {}).get("magnification")}  # read by `breastcnn slide`
    # the model before the data: a size the architecture cannot take is refused before any cache is written
    if resume and (run_dir / CHECKPOINT_NAME).is_file():
        model, optimizer, resume_state = _restore(run_dir, config)  # its meta has the stain target it was fitted
    else:
        if base_model is not None:
            model, optimizer = base_model()
            model.meta.update(meta_extra)
            _check_base_task(model, config)
        else:
            model, optimizer = _build_model(config, meta_extra)
        resume_state = None
        stain = training_stain(split, config.image_size, config.stain_norm, config.stain_target,
                               config.stain_augment, jobs=config.jobs)
        model.meta.pop("stain", None)
        if stain.meta is not None:
            model.meta["stain"] = stain.meta
    data = _load_data(split, config, hooks, model.spec.normaliser)
    if config.monitor == "val_auc" and np.unique(data.y_val).size < 2:
        raise UserInputError(
            f"--monitor val_auc: the validation subset of {split_dir} holds one class only, so ROC AUC is "
            "undefined; use --monitor val_loss or val_balanced_accuracy"
        )
    if resume_state is None:
        write_run_config(run_dir, _recorded_options(config, extra_options), split)
    return _fit(model, optimizer, config, run_dir, data, hooks, resume=resume_state, fold=fold)


def _check_base_task(model, config: TrainConfig) -> None:
    """A fine-tuned NumPy model keeps its outputs: ``--task`` must be the task it was trained for."""
    task = model.spec.task
    if task != config.task:
        raise UserInputError(f"--task {config.task}: the model to fine-tune ({model.meta.get('finetuned_from')}) "
                             f"was trained for the {task} task; pass --task {task}")


class _PointLatest(TrainingCallback):
    """Moves ``runs/latest`` to the run once it has written a model (an evaluation that improved saves one)."""

    def __init__(self, run):
        self.run = run

    def on_evaluation(self, row: dict) -> None:
        if row.get("improved"):
            self.run.model_written()


class _SplitIdentity:
    """What ``config.json`` records of a k-fold split: its absolute dir and combined hash."""

    def __init__(self, directory: Path, digest: str):
        self.dir, self.hash = directory, digest


def _recorded_split(run_dir: Path, recorded: dict) -> tuple[Path, str, Path]:
    """The split a run was trained on, checked: ``(absolute dir, hash, data root)``.

    ``config.json`` records the absolute split directory and its manifest hash
    (older files: the ``--split`` as typed, relative to the directory training
    ran in, which is tried against the current directory). A split that is
    gone, or whose manifest changed since, is refused naming both.
    """
    from breastcnn.data.split import split_identity

    config_path = run_dir / "config.json"
    info = recorded.get("split")
    if info is not None and not isinstance(info, dict):
        raise UserInputError(f"{config_path}: 'split' must be an object with 'dir' and 'hash', got {info!r}")
    info = info or {}
    where = info.get("dir") or recorded["options"].get("split")
    expected = info.get("hash")
    if not isinstance(where, str) or not where or (expected is not None and not isinstance(expected, str)):
        raise UserInputError(f"{config_path}: no usable split path/hash recorded (got {where!r}, {expected!r})")
    path = Path(where)
    if not path.exists():
        relative = "" if path.is_absolute() else f" (relative to {Path.cwd()}: it was recorded as typed)"
        raise UserInputError(f"--resume {run_dir}: the split it was trained on, {where}, does not exist{relative}")
    actual, root = split_identity(path)
    if expected is not None and actual != expected:
        raise UserInputError(
            f"--resume {run_dir}: the split changed: {config_path} records {where} with manifest hash "
            f"{expected[:12]}, but {path.resolve()} now has manifest hash {actual[:12]}; resume with the same split, "
            "or train a new run"
        )
    return path.resolve(), actual, root


def run_training(
    config: TrainConfig,
    progress_callbacks: Sequence[TrainingCallback] = (),
    resume: str | Path | None = None,
    _base_model: Callable | None = None,
    _extra_options: dict | None = None,
) -> dict:
    """Train per ``config`` (or continue the run in ``resume``); returns the summary dict.

    A k-fold split directory trains one model per fold into ``RUN_DIR/fold1..K``
    and returns ``{"folds": [summary, ...], "run_dir": ..., "stopped": ...}``.
    Raises :class:`TrainingDiverged` on a NaN/inf loss (best model kept);
    an interruption returns a summary with ``stopped == "interrupted"``.

    The run directory is locked while training (a second run into it is refused
    naming the holder's pid); ``runs/latest`` moves to a default run once it has
    written a model; a run that fails before writing anything is removed again.
    A resumed run trains on the split recorded in its ``config.json`` (absolute
    path; the manifest hash must still match).
    """
    from breastcnn.data.breakhis import check_outside_data
    from breastcnn.data.split import fold_dirs, split_identity
    from breastcnn.fsutil import remove_stale_temps
    from breastcnn.runs import RUN_FILES, RUNS_ROOT, fold_run_dirs, run_directory

    latest_root = None
    if resume is not None:
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise UserInputError(f"--resume {run_dir}: no such run directory")
        recorded = read_run_config(run_dir)
        options = recorded["options"]
        # --threads comes from this command, not from the recorded run
        config = TrainConfig.from_dict(options, source=run_dir / "config.json", threads=config.threads)
        split_path, split_hash, data_root = _recorded_split(run_dir, recorded)
        config = dataclasses.replace(config, split=str(split_path)).validate()
        latest_root = run_dir.parent if options.get("out") is None else None
        if _base_model is None and options.get("finetune_from"):
            # a fine-tuning run interrupted before its first checkpoint starts again from its source model
            _base_model = _finetune_base(Path(options["finetune_from"]), int(options.get("freeze") or 0), config)
            _extra_options = {"finetune_from": options["finetune_from"], "freeze": int(options.get("freeze") or 0)}
    else:
        config = config.validate()
        if not Path(config.split).exists():
            raise UserInputError(
                f"--split {config.split}: no such split directory; run 'breastcnn split --mag 200X' first"
            )
        config = dataclasses.replace(config, split=str(Path(config.split).resolve()),  # a replay finds them
                                     stain_target=config.stain_target and str(Path(config.stain_target).resolve()))
        split_hash, data_root = split_identity(config.split)
    check_outside_data(resume or config.out or RUNS_ROOT, data_root, "--resume" if resume else "--out")
    split_dir = Path(config.split)
    folds = fold_dirs(split_dir)
    with run_directory(config.arch, config.out, config.force, resume=resume, latest_root=latest_root) as run:
        run_dir = run.path
        if resume is not None:  # a run killed while writing leaves temporary files; we hold the lock
            for folder in (run_dir, *fold_run_dirs(run_dir)):
                remove_stale_temps(folder, RUN_FILES)
        hooks = _Hooks([*progress_callbacks, _PointLatest(run)])
        if not folds:
            return _train_one(config, run_dir, split_dir, hooks, resume is not None, base_model=_base_model,
                              extra_options=_extra_options)

        if resume is None:
            write_run_config(run_dir, {**_recorded_options(config, _extra_options), "folds": len(folds)},
                             _SplitIdentity(split_dir, split_hash))
        summaries = []
        for k, fold_split in enumerate(folds, start=1):
            fold_run = run_dir / f"fold{k}"
            summary = _train_one(config, fold_run, fold_split, hooks, resume is not None, fold=k,
                                 base_model=_base_model, extra_options=_extra_options)
            summaries.append(summary)
            if summary["stopped"] == "interrupted":
                break
        stopped = "interrupted" if summaries[-1]["stopped"] == "interrupted" else "completed"
        warnings = [f"fold {s['fold']}: {w}" for s in summaries for w in s.get("warnings", [])]
        result = {"run_dir": str(run_dir), "folds": summaries, "stopped": stopped, "recipe": config.recipe,
                  "monitor": config.monitor, "warnings": warnings}
        if stopped != "interrupted":
            atomic_write_json(run_dir / SUMMARY_NAME, result)
        return result


def finetune_numpy(
    model_path: str | Path,
    config: TrainConfig,
    freeze: int = 0,
    progress_callbacks: Sequence[TrainingCallback] = (),
    resume: str | Path | None = None,
) -> dict:
    """Continue training a saved NumPy model (``.npz``) on ``config.split``; same outputs as training.

    The first ``freeze`` layers (indices as in ``model.summary()``) are frozen
    (no gradient, no update). ``config.image_size`` and ``config.preprocess``
    are taken from the model's meta (a model knows its input); ``config.arch``
    becomes ``"<arch>-finetuned"`` for the run directory name. The optimizer is
    a fresh Adam at ``config.lr`` (the fine-tuning LR, e.g. 1e-3).
    ``resume``: a run directory from an interrupted fine-tuning.
    """
    from breastcnn.models import load_model

    if resume is not None:
        return run_training(config, progress_callbacks, resume=resume)
    config = config.resolved()
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserInputError(f"--model {model_path}: no such file; run 'breastcnn train' first")
    if model_path.suffix != ".npz":
        raise UserInputError(f"--model {model_path}: finetune_numpy needs a NumPy .npz model")
    probe = load_model(model_path)
    n_layers = len(probe.layers)
    if not 0 <= freeze <= n_layers:
        raise UserInputError(f"--freeze must be between 0 and {n_layers} (layers of {model_path}), got {freeze}")
    config = dataclasses.replace(
        config,
        image_size=int(probe.meta.get("image_size", config.image_size)),
        preprocess=str(probe.meta.get("preprocess", config.preprocess)),
        arch=f"{probe.meta.get('arch', 'custom')}-finetuned" if not config.arch.endswith("-finetuned") else config.arch,
    )

    config = config.validate()
    model_path = model_path.resolve()  # recorded in config.json: a resume from elsewhere finds it
    return run_training(config, progress_callbacks, _base_model=_finetune_base(model_path, freeze, config),
                        _extra_options={"finetune_from": str(model_path), "freeze": freeze})


def _finetune_base(model_path: Path, freeze: int, config: TrainConfig) -> Callable:
    """The model builder of a fine-tuning run: the saved model, its first ``freeze`` layers frozen, fresh Adam."""
    from breastcnn.models import load_model
    from breastcnn.nn.optim import Adam

    def base_model():
        if not model_path.is_file():
            raise UserInputError(f"{model_path}: the model this fine-tuning run starts from no longer exists")
        model = load_model(model_path)
        model.freeze(freeze)
        model.meta.update({"finetuned_from": str(model_path), "frozen_layers": freeze})
        optimizer = Adam(lr=config.lr)
        _compile(model, optimizer, config.l2)
        return model, optimizer

    return base_model

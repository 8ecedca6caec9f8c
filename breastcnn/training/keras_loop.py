"""Fine-tune VGG16 / ResNet50 / custom-keras on a breastcnn split.

The comparison with the NumPy model is fair because everything but the
network is shared: the same split manifest, the same uint8 image cache
(``data.images.load_subset``), the same :class:`~breastcnn.data.augment.Augmenter`
(seeded, new draws every epoch), the same preprocessing
(``data.images.preprocess``), the same balanced class weights, the same
``history.csv`` columns (:data:`breastcnn.runs.HISTORY_COLUMNS`) and the same
progress hooks (:class:`breastcnn.training.callbacks.TrainingCallback`). Batches reach Keras
through a ``keras.utils.PyDataset`` (no deprecated ``ImageDataGenerator``).

Two schedules:

- VGG16/ResNet50 (transfer learning): validation once per epoch on the
  validation subset (never test); Keras ``EarlyStopping`` (patience in
  epochs) and ``ReduceLROnPlateau`` (on ``val_loss``) watch it.
- ``custom-keras`` with a ``recipe`` (what ``breastcnn finetune --model
  custom-keras`` does): the NumPy loop's schedule (:mod:`breastcnn.training.recipes`):
  the same lr, batch size, L2 (``keras.regularizers.L2`` on the same kernels),
  validation passes per epoch, LR step decay and patience (epochs or
  evaluations), minimum epochs and monitor, driven by the same
  :class:`~breastcnn.training.recipes.TrainingSchedule`, so that the two engines train
  the same network the same way.

Either way the best model by ``monitor`` (a tie goes to the later pass) is
written to ``RUN_DIR/model.keras`` (+ ``model.keras.json``) every time it
improves, so an interrupted run keeps its best model, and the summary's
``warnings`` name a best model that predicts (almost) one class.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from breastcnn import runs
from breastcnn.data.augment import Augmenter
from breastcnn.data.augment import class_weights as compute_class_weights
from breastcnn.data.breakhis import check_outside_data
from breastcnn.data.images import load_subset, preprocess
from breastcnn.data.split import DEFAULT_SPLIT_DIR, load_split
from breastcnn.data.stain_options import DEFAULT_STAIN_NORM, check_stain_options, training_stain
from breastcnn.data.tasks import DEFAULT_TASK, TASK_CLASSES, check_task
from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write_json
from breastcnn.metrics import degenerate_model_warnings
from breastcnn.models.io import save_model
from breastcnn.models.keras_models import (
    BUILDERS,
    DEFAULT_DROPOUT,
    DEFAULT_TRAINABLE_LAYERS,
    KERAS_ARCHS,
    library_versions,
    require_keras,
)
from breastcnn.models.spec import DEFAULT_IMAGE_SIZE
from breastcnn.nn.schedules import BestScore
from breastcnn.plots import plot_training
from breastcnn.training.callbacks import TrainingCallback
from breastcnn.training.common import (
    SUMMARY_NAME,
    TrainingDiverged,
    binary_view,
    require_both_classes,
    validation_scores,
)
from breastcnn.training.config import TrainConfig
from breastcnn.training.feature_cache import frozen_shortcut
from breastcnn.training.recipes import MONITORS, RECIPE_OPTIONS

TRANSFER_EPOCHS = 200
"""Maximum epochs of the transfer-learning schedule (early stopping usually ends it sooner)."""
TRANSFER_DEFAULTS = {"batch_size": 64, "lr": 1e-4, "patience": 10, "monitor": "val_accuracy", "stain_augment": False}
"""Defaults of the transfer-learning schedule (no recipe): the report's fine-tuning settings; patience in epochs."""
STRATEGIES = ("default", "mirrored")
LR_FACTOR = 0.5
"""ReduceLROnPlateau factor; it waits ``max(1, patience // 2)`` epochs without a lower val_loss."""
MIN_LR = 1e-7


def _batches(keras):
    """The PyDataset class, defined on first use so that importing this module never imports TF."""

    class AugmentedBatches(keras.utils.PyDataset):
        """Shuffled, augmented, preprocessed training batches from the uint8 cache.

        Batch ``i`` of epoch ``e`` (0-based) is drawn from ``np.random.default_rng([seed, e, i])``
        and the order of epoch ``e`` from ``default_rng([seed, e])``: the stream depends only
        on the seed, not on when or in which thread Keras asks for a batch, and every epoch
        sees fresh draws.

        ``x``: uint8 ``(N, S, S, 3)``; ``y``: int64 ``(N,)``. Yields ``(float32 (B, S, S, 3), int64 (B,))``.
        """

        def __init__(self, x, y, batch_size, preprocess_mode, augmenter, seed):
            super().__init__(workers=1, use_multiprocessing=False)
            self.x, self.y = x, y
            self.batch_size = int(batch_size)
            self.preprocess_mode = preprocess_mode
            self.augmenter = augmenter
            self.seed = int(seed)
            self.epoch = 0
            self._order_epoch = -1
            self._order = None

        @property
        def num_batches(self) -> int:
            return math.ceil(len(self.x) / self.batch_size)

        def batch_sizes(self) -> list[int]:
            n, b = len(self.x), self.batch_size
            return [min(b, n - i * b) for i in range(self.num_batches)]

        def _epoch_order(self) -> np.ndarray:
            if self._order_epoch != self.epoch:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x))
                self._order_epoch = self.epoch
            return self._order

        def __getitem__(self, index: int):
            idx = self._epoch_order()[index * self.batch_size : (index + 1) * self.batch_size]
            xb = self.x[idx]
            if self.augmenter is not None:
                xb = self.augmenter(xb, np.random.default_rng([self.seed, self.epoch, index]))
            return preprocess(xb, self.preprocess_mode), self.y[idx]

        def on_epoch_end(self):
            self.epoch += 1

    return AugmentedBatches


def default_weights(arch: str) -> str:
    """``--weights`` when not given: imagenet for vgg16/resnet50 (the report's), none for custom-keras."""
    return "none" if arch == "custom-keras" else "imagenet"


def _unweighted_cross_entropy(keras):
    """A Keras metric: mean cross-entropy ignoring sample (class) weights: the ``data_loss`` history column."""

    class UnweightedCrossEntropy(keras.metrics.Mean):
        def update_state(self, y_true, y_pred, sample_weight=None):
            return super().update_state(keras.losses.sparse_categorical_crossentropy(y_true, y_pred))

    return UnweightedCrossEntropy(name="data_loss")


def _resolve_recipe(arch, recipe, recipe_options, epochs, image_size, given):
    """The resolved recipe options (a ``TrainConfig``) for ``custom-keras``; ``given`` are explicit values."""
    if arch != "custom-keras":
        raise UserInputError(
            f"--recipe applies to custom-keras and NumPy .npz models, not to {arch} "
            "(vgg16/resnet50 keep the transfer-learning schedule: patience in epochs, ReduceLROnPlateau)"
        )
    explicit = {k: v for k, v in {**given, **(recipe_options or {})}.items() if v is not None}
    unknown = set(explicit) - set(RECIPE_OPTIONS)
    if unknown:
        raise UserInputError(f"recipe_options: unknown options {sorted(unknown)}")
    return TrainConfig(recipe=recipe, epochs=epochs, image_size=image_size, **explicit).validate()


def _schedule_options(arch, recipe, recipe_options, epochs, image_size, given: dict) -> tuple:
    """``(plan, values)``: the resolved recipe (``None`` without one) and lr/batch_size/patience/monitor to use.

    Without a recipe, ``None`` values take :data:`TRANSFER_DEFAULTS`.
    """
    if recipe is not None:
        plan = _resolve_recipe(arch, recipe, recipe_options, epochs, image_size, given)
        return plan, {k: getattr(plan, k) for k in given}
    if recipe_options:
        raise UserInputError(f"{', '.join(sorted(recipe_options))}: recipe options need a recipe (--recipe)")
    return None, {k: TRANSFER_DEFAULTS[k] if v is None else v for k, v in given.items()}


def _transfer_callbacks(keras, monitor: str, patience: int) -> list:
    """The transfer-learning schedule's Keras callbacks: early stopping on ``monitor``, LR on plateaus of val_loss."""
    return [
        keras.callbacks.EarlyStopping(monitor=monitor, mode=MONITORS[monitor], patience=patience, verbose=0),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", mode="min", factor=LR_FACTOR, patience=max(1, patience // 2), min_lr=MIN_LR, verbose=0
        ),
    ]


def _check_options(arch, epochs, batch_size, lr, patience, monitor, strategy, image_size, seed=0):
    if arch not in KERAS_ARCHS:
        raise UserInputError(f"--model {arch!r}: expected one of {', '.join(KERAS_ARCHS)} or a .npz file")
    if epochs < 1:
        raise UserInputError(f"--epochs must be >= 1, received {epochs}")
    if batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, received {batch_size}")
    if not (lr > 0 and math.isfinite(lr)):
        raise UserInputError(f"--lr must be a positive number, received {lr}")
    if patience is not None and patience < 1:
        raise UserInputError(f"--patience must be >= 1, received {patience}")
    if monitor not in MONITORS:
        raise UserInputError(f"--monitor must be one of {', '.join(MONITORS)}, received {monitor!r}")
    if strategy not in STRATEGIES:
        raise UserInputError(f"--strategy must be one of {', '.join(STRATEGIES)}, received {strategy!r}")
    minimum = 51 if arch == "custom-keras" else 32
    if image_size < minimum:
        raise UserInputError(f"--image-size must be at least {minimum} for {arch}, received {image_size}")
    if seed < 0:
        raise UserInputError(f"--seed must be >= 0, received {seed}")


def _distribution(tf, strategy: str, hooks) -> tuple:
    """``(tf.distribute strategy, device names)`` for ``--strategy``."""
    gpus = tf.config.list_physical_devices("GPU")
    if strategy == "mirrored":
        dist = tf.distribute.MirroredStrategy()
        if not gpus:
            hooks.on_message("--strategy mirrored: no GPU visible, MirroredStrategy runs on the CPU")
    else:
        dist = tf.distribute.get_strategy()
    return dist, [d.name for d in gpus] or ["CPU"]


def _outcome(adapter, keras_callbacks: list) -> str:
    """``summary["stopped"]`` of a ``model.fit`` that returned: ``nan``, ``early_stopping`` or ``completed``."""
    if adapter.nan:
        return "nan"
    if adapter.early_stopped or any(getattr(cb, "stopped_epoch", 0) > 0 for cb in keras_callbacks):
        return "early_stopping"
    return "completed"


def finetune_keras(
    arch: str,
    split_dir=DEFAULT_SPLIT_DIR,
    out=None,
    *,
    weights: str | None = None,
    trainable_layers: int = DEFAULT_TRAINABLE_LAYERS,
    dropout: float = DEFAULT_DROPOUT,
    epochs: int = TRANSFER_EPOCHS,
    batch_size: int | None = None,
    lr: float | None = None,
    patience: int | None = None,
    class_weights: str | None = "balanced",
    image_size: int = DEFAULT_IMAGE_SIZE,
    monitor: str | None = None,
    augment: bool = True,
    seed: int = 0,
    deterministic: bool = False,
    strategy: str = "default",
    jobs: int = 1,
    force: bool = False,
    callback: TrainingCallback | None = None,
    runs_root=None,
    options: dict | None = None,
    recipe: str | None = None,
    recipe_options: dict | None = None,
    task: str = "binary",
    stain_norm: str = "none",
    stain_target: str | None = None,
    stain_augment: bool | None = None,
) -> dict:
    """Fine-tune ``arch`` (vgg16 | resnet50 | custom-keras) on ``split_dir``; return the run summary.

    Writes to the run directory (``out`` or a new ``runs/<arch>-<stamp>``):
    ``config.json``, ``history.csv`` (one row per epoch), ``model.keras`` +
    ``model.keras.json`` (best by ``monitor``) and ``training.png``.

    ``weights``: ``"imagenet"``/``"none"``/a path; None -> imagenet for
    vgg16/resnet50, none for custom-keras. ``options``: what to record as the
    run's options in ``config.json`` (default: these arguments).

    ``recipe`` (``custom-keras`` only; a name from :data:`breastcnn.training.recipes.RECIPES`):
    train with the NumPy loop's schedule; ``lr``, ``batch_size``, ``patience``
    (evaluations) and ``monitor`` then override single recipe values, as do
    ``recipe_options`` (any other of :data:`~breastcnn.training.recipes.RECIPE_OPTIONS`,
    e.g. ``{"l2": 0.0, "patience_epochs": 2.0}``). Without a recipe, ``None``
    values take :data:`TRANSFER_DEFAULTS`.

    ``task``: binary or subtype (8 outputs); ``stain_norm``/``stain_target``/``stain_augment``: as
    ``breastcnn train`` (:mod:`breastcnn.data.stain_options`; the fitted target goes into the sidecar);
    ``stain_augment`` None: the recipe's (custom-keras), else off (:data:`TRANSFER_DEFAULTS`).

    Returns a dict with ``run_dir``, ``model_path``, ``arch``, ``stopped``
    (``completed`` | ``early_stopping`` | ``interrupted`` | ``nan``),
    ``epochs_run``, ``steps``, ``best_score``, ``best_epoch``, ``best_step``,
    ``monitor``, ``elapsed_s``, ``params``, ``strategy``, ``devices``, ``recipe``, ``warnings``. A
    KeyboardInterrupt is caught: the best model so far stays on disk and the
    summary says ``interrupted``.
    """
    given = {
        "lr": lr,
        "batch_size": batch_size,
        "patience": patience,
        "monitor": monitor,
        "stain_augment": stain_augment,
    }
    plan, chosen = _schedule_options(arch, recipe, recipe_options, epochs, image_size, given)
    lr, batch_size, patience, monitor, stain_augment = (
        chosen[k] for k in ("lr", "batch_size", "patience", "monitor", "stain_augment")
    )
    _check_options(arch, epochs, batch_size, lr, patience, monitor, strategy, image_size, seed)
    check_task(task)
    check_stain_options(stain_norm, stain_target, stain_augment)
    # after the cheap option checks (TensorFlow takes seconds to import), before any data work: the
    # feature-cache shortcuts below decode and cache images first
    require_keras()
    stain_target = stain_target and str(Path(stain_target).resolve())  # recorded: a replay finds it
    hooks = callback if callback is not None else TrainingCallback()
    # a frozen part whose output can be cached (linear probe; no augmentation): train only what is trainable.
    # Those shortcuts train a binary head on unnormalised images, so a subtype task or a stain normalisation
    # takes the regular loop (slower, the same frozen layers) rather than being ignored.
    plain = task == DEFAULT_TASK and (stain_norm or DEFAULT_STAIN_NORM) == DEFAULT_STAIN_NORM
    summary = (
        None
        if not plain
        else frozen_shortcut(
            arch,
            split_dir,
            out,
            weights=weights,
            trainable_layers=trainable_layers,
            dropout=dropout,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            patience=patience,
            monitor=monitor,
            image_size=image_size,
            seed=seed,
            augment=augment,
            class_weights=class_weights,
            strategy=strategy,
            recipe=recipe,
            jobs=jobs,
            force=force,
            callback=hooks,
            runs_root=runs_root,
        )
    )
    if summary is not None:
        return summary
    weights = default_weights(arch) if weights is None else weights
    split = load_split(split_dir)
    require_both_classes(split, task)
    run_kwargs = {"runs_root": runs_root} if runs_root is not None else {}
    check_outside_data(out if out is not None else (runs_root or runs.RUNS_ROOT), split.root, "--out")
    # The run directory is locked (and a non-empty --out refused) before the slow model build; a build
    # that fails (missing weights) leaves nothing behind: the directory is removed again.
    with runs.run_directory(arch, out, force=force, **run_kwargs) as run:
        keras = require_keras()
        import tensorflow as tf

        # Seeds before anything random is built; op determinism must precede graph building.
        keras.utils.set_random_seed(int(seed))
        if deterministic:
            tf.config.experimental.enable_op_determinism()

        recorded = (
            dict(options)
            if options is not None
            else {
                "model": arch,
                "split": str(split_dir),
                "weights": str(weights),
                "trainable_layers": trainable_layers,
                "dropout": dropout,
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "patience": patience,
                "class_weights": class_weights,
                "image_size": image_size,
                "monitor": monitor,
                "augment": augment,
                "seed": seed,
                "deterministic": deterministic,
                "strategy": strategy,
                "task": task,
                "stain_norm": stain_norm,
            }
        )
        recorded.setdefault("seed", seed)
        recorded["split"] = str(Path(split.dir).resolve())  # a later evaluate finds it from any directory
        recorded.update(stain_augment=stain_augment, stain_target=stain_target)  # resolved: a recipe's, absolute
        if plan is not None:
            recorded.update({name: getattr(plan, name) for name in RECIPE_OPTIONS})
            recorded.update(recipe=recipe, recipe_overrides=plan.recipe_overrides())

        dist, devices = _distribution(tf, strategy, hooks)
        with dist.scope():
            if arch != "custom-keras":
                builder_kwargs = {"weights": weights, "trainable_layers": trainable_layers, "dropout": dropout}
            else:
                builder_kwargs = {"weights": weights, "l2": plan.l2 if plan is not None else 0.0}
            classifier = BUILDERS[arch](
                input_shape=(image_size, image_size, 3),
                num_classes=len(TASK_CLASSES[task]),
                seed=seed,
                **builder_kwargs,
            )
            classifier.meta.update(classes=list(TASK_CLASSES[task]), task=task)
            model = classifier.model
            model.compile(
                optimizer=keras.optimizers.Adam(learning_rate=lr),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy", _unweighted_cross_entropy(keras)],
            )

        run_dir = run.path
        runs.write_run_config(run_dir, recorded, split)

        hooks.on_message(f"loading {split.dir} at {image_size}x{image_size} (cached after the first run)")
        stain = training_stain(split, image_size, stain_norm, stain_target, stain_augment, jobs=jobs)
        classifier.meta.update({"stain": stain.meta} if stain.meta is not None else {})
        x_train, y_train = load_subset(split, "train", image_size, jobs=jobs, task=task, normaliser=stain.normaliser)
        x_val, y_val = load_subset(split, "val", image_size, jobs=jobs, task=task, normaliser=stain.normaliser)
        if len(x_train) == 0 or len(x_val) == 0:
            raise UserInputError(
                f"--split {split.dir}: fine-tuning needs train and val images, found {len(x_train)} train / {len(x_val)} val"
            )
        mode = classifier.meta["preprocess"]
        x_val_pre = preprocess(x_val, mode)
        weights_by_class = compute_class_weights(y_train, class_weights, num_classes=len(TASK_CLASSES[task]))
        batches = _batches(keras)(
            x_train, y_train, batch_size, mode, Augmenter(stain_jitter=stain.jitter) if augment else None, seed
        )

        classifier.meta.update(
            {
                "split_hash": split.hash,
                "split_dir": str(split.dir),
                "magnification": (split.info or {}).get("magnification"),  # read by `breastcnn slide`
                "seed": int(seed),
                "deterministic": bool(deterministic),
                "monitor": monitor,
                "versions": library_versions(),
            }
        )
        model_path = Path(run_dir) / "model.keras"
        history = runs.HistoryLogger(Path(run_dir) / "history.csv")
        schedule = plan.training_schedule(batches.num_batches) if plan is not None else None
        adapter = _make_keras_hooks(keras)(
            classifier,
            hooks,
            history,
            model_path,
            batches,
            x_val_pre,
            y_val,
            batch_size,
            monitor,
            schedule=schedule,
            on_saved=run.model_written,
        )
        # with a recipe the adapter applies the schedule itself
        keras_callbacks = _transfer_callbacks(keras, monitor, patience) if schedule is None else []
        hooks.on_train_begin(
            total_epochs=epochs,
            steps_per_epoch=batches.num_batches,
            initial_epoch=1,
            initial_step=0,
            n_train=len(x_train),
            n_val=len(x_val),
            run_dir=str(run_dir),
            fold=None,
        )
        try:
            # The adapter comes first: it adds val_* to the epoch logs the two callbacks after it read.
            model.fit(
                batches,
                epochs=epochs,
                shuffle=False,
                verbose=0,
                class_weight=weights_by_class,
                callbacks=[adapter, keras.callbacks.TerminateOnNaN(), *keras_callbacks],
            )
            stopped = _outcome(adapter, keras_callbacks)
        except KeyboardInterrupt:
            stopped = "interrupted"

        rows = history.rows()
        if rows:
            plot_training(rows, Path(run_dir) / "training.png", title=f"{arch} fine-tuning")
        summary = {
            "run_dir": str(run_dir),
            "model_path": str(model_path) if adapter.best_epoch is not None else None,
            "arch": arch,
            "framework": "keras",
            "stopped": stopped,
            "epochs_run": adapter.epochs_run,
            "steps": adapter.step,
            "best_score": adapter.best_score,
            "best_epoch": adapter.best_epoch,
            "best_step": adapter.best_step,
            "recipe": recipe,
            "monitor": monitor,
            "elapsed_s": round(time.perf_counter() - adapter.start, 3) if adapter.start else 0.0,
            "params": classifier.count_params(),
            "strategy": strategy,
            "devices": devices,
            "n_train": int(len(x_train)),
            "n_val": int(len(x_val)),
            "weights": str(weights),
            "warnings": list(adapter.warnings),
        }
        if stopped != "interrupted":
            atomic_write_json(Path(run_dir) / SUMMARY_NAME, summary)
        hooks.on_train_end(summary)
        if stopped == "nan":
            raise TrainingDiverged(
                f"{arch}: the training loss became NaN or infinite after {adapter.step} steps; "
                f"the best model so far is in {run_dir} (try a lower --lr)",
                summary,
            )
        return summary


def _make_keras_hooks(keras):
    """The callback adapter class, made on first use (subclassing keras needs keras imported)."""

    class KerasHooks(_KerasHooksLogic, keras.callbacks.Callback):
        pass

    KerasHooks.keras = keras
    return KerasHooks


class _KerasHooksLogic:
    """Adapter: Keras callback events -> TrainingCallback hooks, history.csv and best-model saving.

    Keras reports running means over the epoch; the display wants per-batch
    values and history.csv means since the previous validation pass, both
    recovered from consecutive means weighted by batch sizes.

    With a ``schedule`` (:class:`~breastcnn.training.recipes.TrainingSchedule`) it
    validates at the schedule's points inside each epoch, sets the LR after
    each pass and stops the run (``model.stop_training``) when the schedule
    says so; without one it validates at each epoch's end and leaves LR
    and stopping to Keras callbacks placed after it.
    """

    TRACKED = ("loss", "accuracy", "data_loss", "l2_penalty")

    def __init__(
        self,
        classifier,
        hooks,
        history,
        model_path,
        batches,
        x_val_pre,
        y_val,
        batch_size,
        monitor,
        schedule=None,
        on_saved=None,
    ):
        super().__init__()
        self.on_saved = on_saved  # told after each best-model save (moves runs/latest)
        self.classifier = classifier
        self.hooks = hooks
        self.history = history
        self.model_path = model_path
        self.sizes = batches.batch_sizes()
        self.x_val_pre, self.y_val = x_val_pre, y_val
        self.batch_size = batch_size
        self.monitor = monitor
        self.schedule = schedule
        self.eval_points = set(schedule.eval_points) if schedule is not None else set()
        self.best = schedule.best if schedule is not None else BestScore(MONITORS[monitor])
        self.step = 0
        self.epoch = 0
        self.epochs_run = 0
        self.best_score = None
        self.best_epoch = None
        self.best_step = None
        self.warnings: list[str] = []
        self.nan = False
        self.early_stopped = False
        self.start = None
        self._seen = 0
        self._sums = dict.fromkeys(self.TRACKED, 0.0)  # mean * images seen, this epoch
        self._seen_at_eval = 0
        self._sums_at_eval = dict(self._sums)

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1
        self._seen = self._seen_at_eval = 0
        self._sums = dict.fromkeys(self.TRACKED, 0.0)
        self._sums_at_eval = dict(self._sums)
        self.hooks.on_epoch_begin(epoch + 1)

    def _l2_penalty(self) -> float:
        losses = self.model.losses
        return float(sum(float(self.keras.ops.convert_to_numpy(v)) for v in losses)) if losses else 0.0

    def on_train_batch_end(self, batch, logs=None):
        logs = dict(logs or {})
        self.step += 1
        size = self.sizes[batch] if batch < len(self.sizes) else self.sizes[-1]
        seen = self._seen + size
        previous = dict(self._sums)
        # l2_penalty is not a Keras metric: keep its running mean the same way
        l2_mean = (previous["l2_penalty"] + self._l2_penalty() * size) / seen
        for key in self.TRACKED:
            mean = l2_mean if key == "l2_penalty" else float(logs.get(key, float("nan")))
            self._sums[key] = mean * seen
        self._seen = seen
        batch_loss = (self._sums["loss"] - previous["loss"]) / size
        batch_acc = (self._sums["accuracy"] - previous["accuracy"]) / size
        if not math.isfinite(float(logs.get("loss", float("nan")))):
            self.nan = True
        self.hooks.on_batch_end(step=self.step, loss=batch_loss, accuracy=batch_acc)
        if self.schedule is not None and batch + 1 in self.eval_points and not self.nan:
            self._evaluate(logs=None)
            if self.schedule.should_stop:
                self.early_stopped = self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_run = epoch + 1
        if self.schedule is None:
            # EarlyStopping / ReduceLROnPlateau (after us in the callback list) read the val_* we add
            self._evaluate(logs=logs if logs is not None else {})
        self.hooks.on_epoch_end(epoch + 1)

    def _since_last_evaluation(self) -> dict:
        seen = self._seen - self._seen_at_eval
        means = {k: (self._sums[k] - self._sums_at_eval[k]) / seen if seen else None for k in self.TRACKED}
        self._seen_at_eval, self._sums_at_eval = self._seen, dict(self._sums)
        return means

    def _evaluate(self, logs: dict | None) -> None:
        probs = self.classifier.predict(self.x_val_pre, batch_size=self.batch_size)
        val = validation_scores(probs, self.y_val, self.classifier.spec.task)  # the NumPy loop's definitions
        if logs is not None:
            logs.update(val)
        train = self._since_last_evaluation()
        row = {
            "step": self.step,
            "epoch": self.epoch,
            **train,
            **val,
            "lr": float(self.keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "elapsed_s": round(time.perf_counter() - self.start, 3),
        }
        loss = row["loss"]
        if loss is not None and not math.isfinite(float(loss)):
            self.nan = True
        score = val[self.monitor]
        if self.schedule is not None:
            improved = self.schedule.update(score) and not self.nan
            self.model.optimizer.learning_rate.assign(self.schedule.lr)
        else:
            improved = not self.nan and self.best.update(score)
        if improved:
            self.best_score, self.best_epoch, self.best_step = float(score), self.epoch, self.step
            self.warnings = degenerate_model_warnings(
                *binary_view(self.y_val, probs, self.classifier.spec.task), "validation"
            )
            self.classifier.meta.update(
                {
                    "best_epoch": self.epoch,
                    "best_step": self.step,
                    "best_score": float(score),
                }
            )
            save_model(self.classifier, self.model_path)
            if self.on_saved is not None:
                self.on_saved()
        self.history.log(row)
        self.hooks.on_evaluation({**row, "improved": improved, "monitor": self.monitor})

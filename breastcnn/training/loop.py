"""The NumPy training loop.

Per epoch: shuffle the training images with the shuffle generator, then per
batch take the uint8 images from memory, augment them (fresh draws from the
augmentation generator), preprocess, and take one optimizer step (class
weights and L2 inside ``Sequential.train_on_batch``). ``evals_per_epoch``
times per epoch it scores the validation subset (inference mode, batched,
deterministic) and hands the history row to the callbacks
(:mod:`breastcnn.training.callbacks`: history, schedule, best model, progress,
checkpoint). The schedule's LR step decay runs on a clock counted over the
whole run (it never resets at an epoch boundary), and early stopping never
acts at or before ``min_epochs``.

Exact resume: every random draw comes from three generators (shuffle,
augmentation, and the model's dropout layers) whose states go into
``last.npz`` (:mod:`breastcnn.training.state`) together with the weights, the
optimizer state, the epoch's permutation and the position in it. ``--resume``
therefore ends with the same weights as an uninterrupted run. Ctrl-C is
deferred to the end of the current step (a second Ctrl-C aborts at once,
keeping the previous checkpoint).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from breastcnn.data.augment import Augmenter
from breastcnn.data.augment import class_weights as compute_class_weights
from breastcnn.data.images import preprocess
from breastcnn.data.stain import HEDJitter
from breastcnn.data.tasks import TASK_CLASSES
from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write_json
from breastcnn.nn.losses import WeightedSoftmaxCrossEntropy
from breastcnn.plots import plot_training
from breastcnn.runs import read_history
from breastcnn.training.callbacks import (
    BestModel,
    CallbackList,
    Checkpoint,
    HistoryCSV,
    Schedule,
    TrainingCallback,
)
from breastcnn.training.common import CHECKPOINT_NAME, MODEL_NAME, SUMMARY_NAME, TrainingDiverged, validation_scores
from breastcnn.training.config import TrainConfig
from breastcnn.training.data import TrainData
from breastcnn.training.state import TrainState


class BatchScores(NamedTuple):
    """One training step's numbers for the history: ``loss`` (class-weighted cross-entropy + L2, what the
    gradient follows), ``accuracy`` (training mode), ``data_loss`` (unweighted cross-entropy, the definition
    of ``val_loss``) and ``l2_penalty``."""

    loss: float
    accuracy: float
    data_loss: float
    l2_penalty: float


_UNWEIGHTED = WeightedSoftmaxCrossEntropy()


def compile_model(model, optimizer, l2: float) -> None:
    """Compile ``model`` for this loop: weighted softmax cross-entropy, ``optimizer``, L2 factor."""
    model.compile(optimizer=optimizer, loss=WeightedSoftmaxCrossEntropy(), l2=l2)


def train_step(model, xb: np.ndarray, yb: np.ndarray, class_weights) -> BatchScores:
    """One optimizer step; its scores from the logits the step computed (no second forward pass)."""
    step = model.train_step(xb, yb, class_weights=class_weights)
    accuracy = float(np.mean(np.argmax(step.logits, axis=1) == np.asarray(yb)))
    data_loss, _ = _UNWEIGHTED(step.logits, yb)  # the engine's cross-entropy without class weights
    return BatchScores(step.loss, accuracy, data_loss, step.l2_penalty)


class DeferredInterrupt:
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


def fit(
    model,
    optimizer,
    config: TrainConfig,
    run_dir: Path,
    data: TrainData,
    progress: Sequence[TrainingCallback] = (),
    resume: tuple | None = None,
    fold: int | None = None,
) -> dict:
    """Train ``model`` (compiled with ``optimizer``) and write the run outputs; returns the summary.

    ``resume``: ``(TrainState, permutation)`` from :func:`~breastcnn.training.state.read_checkpoint`
    (the model and optimizer already hold the checkpointed weights and state).
    Raises :class:`TrainingDiverged` on a NaN/inf loss (after writing the summary).
    """
    return TrainingLoop(model, optimizer, config, run_dir, data, progress, resume, fold).run()


class TrainingLoop:
    """One run of the NumPy loop; the callbacks read ``model``, ``optimizer``, ``state``, ``data`` and ``timing``."""

    def __init__(
        self,
        model,
        optimizer,
        config: TrainConfig,
        run_dir: Path,
        data: TrainData,
        progress: Sequence[TrainingCallback] = (),
        resume: tuple | None = None,
        fold: int | None = None,
    ):
        model.threads = config.threads
        self.model, self.optimizer, self.config, self.data = model, optimizer, config, data
        self.run_dir, self.fold = run_dir, fold
        self.n_train = len(data.y_train)
        self.steps_per_epoch = math.ceil(self.n_train / config.batch_size)
        self.schedule = config.training_schedule(self.steps_per_epoch)
        self.eval_points = set(self.schedule.eval_points)
        self.class_weights = compute_class_weights(
            data.y_train, config.class_weights, num_classes=len(TASK_CLASSES[config.task])
        )
        jitter = HEDJitter() if config.stain_augment else None
        self.augmenter = Augmenter(stain_jitter=jitter) if config.augment else None
        seeds = np.random.SeedSequence(config.seed).spawn(2)
        self.rngs = {"shuffle": np.random.default_rng(seeds[0]), "augment": np.random.default_rng(seeds[1])}
        self.timing = dict.fromkeys(("data_s", "step_s", "validation_s", "checkpoint_s"), 0.0)
        self.last_val_probs: np.ndarray | None = None
        self.diverged_message: str | None = None
        self.permutation: np.ndarray | None = None
        self.checkpoint = Checkpoint(run_dir / CHECKPOINT_NAME)
        if resume is None:
            self.state = TrainState(lr=config.lr, schedule=self.schedule.state_dict())
        else:
            self._resume(*resume)
        optimizer.lr = float(self.state.lr)
        self.stopped = self.state.stopped
        history = HistoryCSV(run_dir / "history.csv", self.state.evaluations if resume is not None else None)
        self.callbacks = CallbackList(
            [
                history,
                Schedule(self.schedule, config.monitor),
                BestModel(run_dir / MODEL_NAME),
                *progress,
                self.checkpoint,
            ]
        )
        self.callbacks.set_loop(self)
        self.started = time.perf_counter() - float(self.state.elapsed_s)

    def _resume(self, state: TrainState, permutation: np.ndarray) -> None:
        self.state = state
        state.restore_rngs(self.rngs, self.model)
        try:
            self.schedule.load_state_dict(state.schedule)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(
                f"{self.checkpoint.path}: damaged training checkpoint (schedule: {type(exc).__name__}: {exc})"
            ) from None
        self.permutation = permutation if permutation.size == self.n_train else None

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        state = self.state
        self.callbacks.on_train_begin(
            self.config.epochs,
            self.steps_per_epoch,
            initial_epoch=state.epoch,
            initial_step=state.step_in_epoch,
            n_train=self.n_train,
            n_val=len(self.data.y_val),
            run_dir=str(self.run_dir),
            fold=self.fold,
        )
        self.interrupt = DeferredInterrupt()
        try:
            with self.interrupt:
                if self.schedule.should_stop and state.step_in_epoch in self.eval_points:
                    # interrupted during the evaluation that ended the run (a hook raised in on_evaluation)
                    self.stopped = "early_stopping"
                while self.stopped is None and state.epoch <= self.config.epochs:
                    self._run_epoch()
                self.stopped = self.stopped or "completed"
        except KeyboardInterrupt:
            if self.interrupt.hard:
                raise  # the previous checkpoint (last evaluation) stays the resume point
            # The state is consistent at a step boundary (hooks and the deferred
            # SIGINT raise only there): save it so that --resume continues exactly.
            self.stopped = "interrupted"
            self.checkpoint.save()
        return self._finish()

    def _run_epoch(self) -> None:
        state, epoch = self.state, self.state.epoch
        if state.step_in_epoch >= self.steps_per_epoch:  # checkpointed right after an epoch's end
            self._next_epoch()
            return
        if self.permutation is None:
            self.permutation = self.rngs["shuffle"].permutation(self.n_train)
        self.callbacks.on_epoch_begin(epoch)
        while state.step_in_epoch < self.steps_per_epoch:
            self._step()
            if self.stopped:
                break
            if self.interrupt.requested:
                raise KeyboardInterrupt
        self.callbacks.on_epoch_end(epoch)
        if self.stopped is None:
            self._next_epoch()

    def _next_epoch(self) -> None:
        self.state.epoch, self.state.step_in_epoch, self.permutation = self.state.epoch + 1, 0, None

    def _step(self) -> None:
        """One batch: augment, preprocess, optimizer step; an evaluation where the schedule has one."""
        state, config = self.state, self.config
        i = state.step_in_epoch
        t0 = time.perf_counter()
        idx = np.sort(self.permutation[i * config.batch_size : (i + 1) * config.batch_size])
        xb = self.data.x_train[idx]
        if self.augmenter is not None:
            xb = self.augmenter(xb, self.rngs["augment"])
        xb = preprocess(xb, config.preprocess)
        yb = self.data.y_train[idx]
        t1 = time.perf_counter()
        loss, accuracy, data_loss, l2_penalty = train_step(self.model, xb, yb, self.class_weights)
        self.timing["data_s"] += t1 - t0
        self.timing["step_s"] += time.perf_counter() - t1
        if not math.isfinite(loss):
            self._diverged(loss)
            return
        state.step_in_epoch = i + 1
        state.global_step += 1
        state.running.add(loss, accuracy, data_loss, l2_penalty)
        if state.step_in_epoch in self.eval_points:
            self._evaluate()
        # After the evaluation and its checkpoint: an interruption raised
        # here (hook or deferred Ctrl-C) leaves nothing half done.
        self.callbacks.on_batch_end(state.global_step, loss, accuracy)

    def _evaluate(self) -> None:
        state = self.state
        t0 = time.perf_counter()
        probs = self.model.predict(self.data.x_val, batch_size=self.config.eval_batch_size)
        self.timing["validation_s"] += time.perf_counter() - t0
        self.last_val_probs = probs
        scores = validation_scores(probs, self.data.y_val, self.config.task)
        state.evaluations += 1
        means = state.running.take_means()
        row = {
            "step": state.global_step,
            "epoch": state.epoch,
            "loss": means["loss"],
            "accuracy": means["accuracy"],
            **scores,
            "lr": float(self.optimizer.lr),
            "elapsed_s": time.perf_counter() - self.started,
            "data_loss": means["data_loss"],
            "l2_penalty": means["l2_penalty"],
        }
        self.callbacks.on_evaluation(row)

    def stop(self, reason: str) -> None:
        """End the run after the current step (a callback's request: ``"early_stopping"``)."""
        self.stopped = self.state.stopped = reason

    def _diverged(self, loss: float) -> None:
        self.stopped = "nan"
        model_path = self.run_dir / MODEL_NAME
        self.diverged_message = (
            f"training diverged: the loss is {loss} at step {self.state.global_step + 1} "
            f"(epoch {self.state.epoch}); try a lower --lr (got {self.config.lr}). "
            + (
                f"The best model so far is kept at {model_path}."
                if model_path.exists()
                else "No model was saved (no evaluation before)."
            )
        )

    def snapshot(self) -> TrainState:
        """The state brought up to date for a checkpoint: elapsed time, LR, schedule, generators."""
        state = self.state
        state.elapsed_s = time.perf_counter() - self.started
        state.lr = float(self.optimizer.lr)
        state.schedule = self.schedule.state_dict()
        state.capture_rngs(self.rngs, self.model)
        return state

    # ------------------------------------------------------------------ the end

    def _finish(self) -> dict:
        self.state.stopped = self.stopped if self.stopped != "interrupted" else None
        if self.stopped == "completed":
            self.checkpoint.save()  # a finished run's last.npz says so; --resume then has nothing to do
        summary = self._summary()
        self._plot()
        atomic_write_json(self.run_dir / SUMMARY_NAME, summary)
        self.callbacks.on_train_end(summary)
        if self.diverged_message:
            raise TrainingDiverged(self.diverged_message, summary)
        return summary

    def _plot(self) -> None:
        history_path = self.run_dir / "history.csv"
        rows = read_history(history_path) if history_path.is_file() else []
        if rows:
            config = self.config
            title = f"{config.arch} (lr {config.lr}, batch {config.batch_size})" + (
                f", fold {self.fold}" if self.fold else ""
            )
            plot_training(rows, self.run_dir / "training.png", title=title)

    def _summary(self) -> dict:
        state, model_path = self.state, self.run_dir / MODEL_NAME
        return {
            "run_dir": str(self.run_dir),
            "model_path": str(model_path) if model_path.exists() else None,
            "checkpoint_path": str(self.run_dir / CHECKPOINT_NAME),
            "fold": self.fold,
            "stopped": self.stopped,
            "recipe": self.config.recipe,
            "monitor": self.config.monitor,
            "best_score": state.best_score,
            "best_step": state.best_step,
            "epochs_run": state.epochs_run,
            "steps": state.global_step,
            "evaluations": state.evaluations,
            "final_lr": state.lr,
            "elapsed_s": state.elapsed_s,
            "timing": {k: round(v, 3) for k, v in self.timing.items()},
            "warnings": list(state.warnings),
        }

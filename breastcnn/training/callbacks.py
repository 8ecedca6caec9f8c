"""Callbacks of a training run, in the style of Keras's.

:class:`TrainingCallback` is the set of hooks a loop calls (progress display,
``runs/latest``, tests that interrupt a run); the NumPy loop's own duties are
callbacks too, each small and in the order the loop hands them an evaluation:

1. :class:`HistoryCSV` appends the row to ``history.csv``;
2. :class:`Schedule` feeds the monitored score to the run's
   :class:`~breastcnn.training.recipes.TrainingSchedule`: whether the model is
   the best so far (``row["improved"]``), the LR for the next steps, and
   whether early stopping ends the run;
3. :class:`BestModel` writes ``model.npz`` when it improved;
4. the progress hooks (the caller's);
5. :class:`Checkpoint` writes ``last.npz`` (the resume point).

A callback that needs the loop gets it from :meth:`TrainingCallback.set_loop`
(Keras's ``set_model``) before ``on_train_begin``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

from breastcnn.metrics import degenerate_model_warnings
from breastcnn.models.io import save_model
from breastcnn.runs import HistoryLogger
from breastcnn.training.state import save_checkpoint


class TrainingCallback:
    """Hooks a training loop calls (the NumPy loop and the Keras fine-tuning alike).

    Subclass and override what you need; every method is a no-op here. Order:
    ``on_train_begin`` once, then per epoch ``on_epoch_begin``, ``on_batch_end``
    per optimizer step, ``on_evaluation`` per validation pass (``row`` has the
    :data:`~breastcnn.runs.HISTORY_COLUMNS`), ``on_epoch_end``; finally ``on_train_end`` with the
    summary dict (also after an early stop, an interruption or a NaN loss).
    ``on_message`` carries one-line notes (cache building, early stop, resume).
    A hook may raise ``KeyboardInterrupt`` to interrupt the run as Ctrl-C would.
    """

    def set_loop(self, loop) -> None:
        """The NumPy loop (:class:`~breastcnn.training.loop.TrainingLoop`) about to run; progress hooks ignore it."""

    def on_train_begin(self, total_epochs: int, steps_per_epoch: int, **info) -> None:
        """``info``: ``initial_epoch`` (1-based), ``initial_step`` (within it), ``n_train``, ``n_val``, ``run_dir``, ``fold``."""

    def on_epoch_begin(self, epoch: int) -> None:
        """``epoch`` is 1-based."""

    def on_batch_end(self, step: int, loss: float, accuracy: float) -> None:
        """``step``: global optimizer step (1-based); ``loss``/``accuracy`` of this batch."""

    def on_evaluation(self, row: dict) -> None:
        """One ``history.csv`` row, plus ``improved`` (bool) and ``monitor`` (the metric name)."""

    def on_epoch_end(self, epoch: int) -> None:
        """After the last batch (and evaluation) of ``epoch``."""

    def on_message(self, text: str) -> None:
        """A one-line note for the user."""

    def on_train_end(self, summary: dict) -> None:
        """The run's summary dict (``stopped``: ``"completed"``, ``"early_stopping"``, ``"interrupted"``, ``"nan"``)."""


class CallbackList:
    """Fan-out of the :class:`TrainingCallback` hooks to several callbacks, in order (``None`` entries skipped)."""

    def __init__(self, callbacks: Iterable[TrainingCallback | None]):
        self.callbacks = [c for c in callbacks if c is not None]

    def __getattr__(self, name: str) -> Callable:
        def call(*args, **kwargs):
            for callback in self.callbacks:
                method = getattr(callback, name, None)
                if method is not None:
                    method(*args, **kwargs)

        return call


class HistoryCSV(TrainingCallback):
    """Appends each evaluation row to ``history.csv``; a resumed run first drops rows logged after its checkpoint."""

    def __init__(self, path: Path, resumed_evaluations: int | None):
        if resumed_evaluations is None and path.exists():
            path.unlink()
        self.logger = HistoryLogger(path)
        if resumed_evaluations is not None:
            self.logger.truncate(resumed_evaluations)

    def on_evaluation(self, row: dict) -> None:
        self.logger.log(row)


class Schedule(TrainingCallback):
    """LR schedule, early stopping and best-model choice: the run's :class:`TrainingSchedule` after each evaluation.

    Sets ``row["improved"]`` (ties go to the later pass), the optimizer's LR
    for the next steps, and asks the loop to stop when early stopping ends the run.
    """

    def __init__(self, schedule, monitor: str):
        self.schedule, self.monitor = schedule, monitor

    def set_loop(self, loop) -> None:
        self.loop = loop

    def on_evaluation(self, row: dict) -> None:
        row["improved"] = self.schedule.update(row[self.monitor])
        row["monitor"] = self.monitor
        self.loop.optimizer.lr = self.schedule.lr
        if self.schedule.should_stop:
            # never within --min-epochs: while BatchNorm's moving statistics settle (about an epoch)
            # validation scores are those of a constant predictor
            self.loop.stop("early_stopping")


class BestModel(TrainingCallback):
    """Writes ``model.npz`` each time the monitored score improved, and records it in the loop's state."""

    def __init__(self, path: Path):
        self.path = path

    def set_loop(self, loop) -> None:
        self.loop = loop

    def on_evaluation(self, row: dict) -> None:
        if not row["improved"]:
            return
        state = self.loop.state
        state.best_score, state.best_step = row[row["monitor"]], state.global_step
        state.warnings = degenerate_model_warnings(self.loop.data.y_val, self.loop.last_val_probs[:, 1], "validation")
        t0 = time.perf_counter()
        save_model(self.loop.model, self.path)
        self.loop.timing["checkpoint_s"] += time.perf_counter() - t0


class Checkpoint(TrainingCallback):
    """Writes ``last.npz`` after each evaluation (and when the loop calls :meth:`save`: interruption, completion)."""

    def __init__(self, path: Path):
        self.path = path

    def set_loop(self, loop) -> None:
        self.loop = loop

    def on_evaluation(self, row: dict) -> None:
        self.save()

    def save(self) -> None:
        loop = self.loop
        t0 = time.perf_counter()
        save_checkpoint(self.path, loop.model, loop.optimizer, loop.snapshot(), loop.permutation)
        loop.timing["checkpoint_s"] += time.perf_counter() - t0


class PointLatest(TrainingCallback):
    """Moves ``runs/latest`` to the run once it has written a model (an evaluation that improved saves one)."""

    def __init__(self, run):
        self.run = run

    def on_evaluation(self, row: dict) -> None:
        if row.get("improved"):
            self.run.model_written()

"""The resumable state of a NumPy training run and its checkpoint, ``last.npz``.

:class:`TrainState` is what ``last.npz`` stores next to the weights and the
optimizer state (as the JSON text ``train_state``, no pickle) together with
the epoch's permutation. The three generators of a run (shuffle, augmentation,
and the dropout layers' own) are part of it, so ``--resume`` ends with the
same weights as an uninterrupted run. Checkpoints written before training
recipes existed (``early_stopping`` instead of ``schedule``, three running
sums) are read as they were written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from breastcnn.errors import UserInputError
from breastcnn.models.io import load_checkpoint, save_model

STATE_FORMAT = 1
REQUIRED_KEYS = ("epoch", "step_in_epoch", "global_step", "evaluations", "running", "elapsed_s", "lr", "rngs")
"""Keys a ``last.npz`` train state must have to be resumed."""
RNG_NAMES = ("shuffle", "augment")


@dataclass
class RunningSums:
    """Sums over the optimizer steps since the last evaluation (the training columns of a history row)."""

    loss: float = 0.0
    accuracy: float = 0.0
    batches: int = 0
    data_loss: float = 0.0
    l2_penalty: float = 0.0

    def add(self, loss: float, accuracy: float, data_loss: float, l2_penalty: float) -> None:
        self.loss += loss
        self.accuracy += accuracy
        self.data_loss += data_loss
        self.l2_penalty += l2_penalty
        self.batches += 1

    def take_means(self) -> dict:
        """Means per batch (None without a batch) of loss, accuracy, data_loss and l2_penalty; then reset."""
        n = self.batches
        means = {
            name: (getattr(self, name) / n if n else None) for name in ("loss", "accuracy", "data_loss", "l2_penalty")
        }
        self.loss, self.accuracy, self.batches, self.data_loss, self.l2_penalty = 0.0, 0.0, 0, 0.0, 0.0
        return means

    def to_list(self) -> list:
        """The JSON form: ``[loss, accuracy, batches, data_loss, l2_penalty]``."""
        return [self.loss, self.accuracy, self.batches, self.data_loss, self.l2_penalty]

    @classmethod
    def from_list(cls, values: list) -> RunningSums:
        """From :meth:`to_list` (a pre-recipe checkpoint's 3 values: the two L2 sums start at 0)."""
        loss, accuracy, batches, data_loss, l2_penalty = list(values) + [0.0] * (5 - len(values))
        return cls(loss, accuracy, batches, data_loss, l2_penalty)


@dataclass
class TrainState:
    """Where a run is: position, counters, best model so far, schedule state, generators, elapsed time.

    ``epoch`` is the 1-based epoch in progress and ``step_in_epoch`` the
    batches of it already done; ``schedule`` is
    :meth:`TrainingSchedule.state_dict`; ``rngs`` the bit-generator states of
    the shuffle and augmentation generators, ``dropout_rngs`` those of the
    model's dropout layers (in layer order); ``warnings`` are about the best
    model (degenerate predictions on validation); ``stopped`` is set once the
    run has finished (``completed``/``early_stopping``).
    """

    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    evaluations: int = 0
    best_score: float | None = None
    best_step: int | None = None
    warnings: list = field(default_factory=list)
    schedule: dict = field(default_factory=dict)
    running: RunningSums = field(default_factory=RunningSums)
    elapsed_s: float = 0.0
    lr: float = 0.0
    stopped: str | None = None
    rngs: dict = field(default_factory=dict)
    dropout_rngs: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON object stored as ``train_state`` (keys as since format 1)."""
        state = dataclasses.asdict(self)
        state["running"] = self.running.to_list()
        state["format"] = STATE_FORMAT
        return state

    @classmethod
    def from_dict(cls, state: dict) -> TrainState:
        """From :meth:`to_dict`, or from a checkpoint written before recipes (``early_stopping``, 3 sums)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in state.items() if k in names}
        if "schedule" not in state:
            values["schedule"] = _legacy_schedule_state(state)
        values["running"] = RunningSums.from_list(state["running"])
        return cls(**values)

    @property
    def epochs_run(self) -> int:
        """Epochs begun (a partly trained epoch counts)."""
        return self.epoch if self.step_in_epoch else self.epoch - 1

    def capture_rngs(self, rngs: dict, model) -> None:
        """Record the states of the run's generators and of ``model``'s dropout layers."""
        self.rngs = {name: rng.bit_generator.state for name, rng in rngs.items()}
        self.dropout_rngs = [layer.rng.bit_generator.state for layer in dropout_layers(model)]

    def restore_rngs(self, rngs: dict, model) -> None:
        """Put the recorded generator states back into ``rngs`` and ``model``'s dropout layers."""
        for name, rng in rngs.items():
            rng.bit_generator.state = self.rngs[name]
        # a checkpoint from before dropout states were recorded has none: those layers keep their seeds
        for layer, rng_state in zip(dropout_layers(model), self.dropout_rngs, strict=False):
            layer.rng.bit_generator.state = rng_state


def _legacy_schedule_state(state: dict) -> dict:
    """The schedule state of a checkpoint written before :class:`TrainingSchedule` existed."""
    stopper = state["early_stopping"]
    return {
        "evaluations": state["evaluations"],
        "lr": state["lr"],
        "early_stopping": stopper,
        "best": {"best": stopper["best"], "best_step": stopper["best_step"], "step": stopper["step"]},
    }


def dropout_layers(model) -> list:
    """The layers of ``model`` that draw from their own generator (dropout), in order."""
    return [
        layer for layer in getattr(model, "layers", []) if isinstance(getattr(layer, "rng", None), np.random.Generator)
    ]


def save_checkpoint(path: Path, model, optimizer, state: TrainState, permutation: np.ndarray | None) -> None:
    """Write ``last.npz``: weights, optimizer state, ``state`` (JSON text) and the epoch's permutation."""
    extra = {
        "train_state": np.array(json.dumps(state.to_dict(), sort_keys=True)),  # a 0-d unicode array, no pickle
        "permutation": np.asarray(permutation if permutation is not None else np.zeros(0), dtype=np.int64),
    }
    save_model(model, path, optimizer=optimizer, extra=extra)


def read_checkpoint(path: Path) -> tuple:
    """``(model, optimizer_state dict, TrainState, permutation)`` from ``last.npz``, checked.

    A file that is not a training checkpoint, or whose state is incomplete or
    damaged, is a :class:`UserInputError` naming it.
    """
    model, optimizer_state, extra = load_checkpoint(path)
    if "train_state" not in extra:
        raise UserInputError(f"{path}: not a training checkpoint (no train_state)")
    try:
        state = json.loads(str(np.asarray(extra["train_state"])))
    except ValueError as exc:
        raise UserInputError(f"{path}: train_state is not valid JSON ({exc})") from None
    _check_state(path, state)
    try:
        train_state = TrainState.from_dict(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"{path}: damaged training checkpoint ({type(exc).__name__}: {exc})") from None
    permutation = np.asarray(extra.get("permutation", np.zeros(0)), dtype=np.int64)
    return model, optimizer_state, train_state, permutation


def _check_state(path: Path, state) -> None:
    if not isinstance(state, dict):
        raise UserInputError(f"{path}: train_state is not a JSON object")
    if state.get("format") != STATE_FORMAT:
        raise UserInputError(f"{path}: checkpoint format {state.get('format')} is not supported")
    missing = sorted(set(REQUIRED_KEYS) - set(state))
    if not {"schedule", "early_stopping"} & set(state):
        missing.append("schedule")
    if missing:
        raise UserInputError(f"{path}: incomplete training checkpoint (train_state lacks {', '.join(missing)})")
    try:
        for name in RNG_NAMES:
            np.random.default_rng().bit_generator.state = state["rngs"][name]
        for rng_state in state.get("dropout_rngs", []):
            np.random.default_rng().bit_generator.state = rng_state
        # "schedule" since recipes; "early_stopping" in checkpoints written before (resumed as they were)
        schedule = state.get("schedule", state.get("early_stopping"))
        if (
            not isinstance(schedule, dict)
            or not isinstance(state["running"], list)
            or len(state["running"]) not in (3, 5)
        ):
            raise ValueError("schedule or running is malformed")
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"{path}: damaged training checkpoint ({type(exc).__name__}: {exc})") from None

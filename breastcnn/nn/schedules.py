"""Learning-rate schedules, early stopping and best-score tracking.

Schedules count on a global clock over the whole run, never per epoch (the
report's schedule restarted every epoch: a sawtooth). The clock is whatever the
caller passes: an evaluation or step index (int), or a position in epochs
(float, e.g. 2.25 = a quarter into epoch 3), so that a schedule given in epochs
does not depend on the data-set size.
Step-based schedules: ``lr = schedule(t)``. Metric-based: ``lr = plateau.update(value)``.
All have ``state_dict()`` / ``load_state_dict()`` with JSON-able values, for resume.
"""

from __future__ import annotations

import math


def _better(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    if mode == "max":
        return value > best + min_delta
    return value < best - min_delta


_CLOCK_TOLERANCE = 1e-9
"""Float clocks (epochs = evaluations / evaluations per epoch) are compared with this slack,
so that 0.75 / 0.25 epochs counts as 3 decays, not 2.999..."""


def _check_mode(mode: str) -> str:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return mode


class StepDecay:
    """lr = initial_lr * factor ** floor(t / every).

    ``t`` and ``every`` share a unit: evaluations (ints, the report's "x0.8 every
    5 evaluations") or epochs (floats, "x0.5 every 2.5 epochs").
    """

    def __init__(self, initial_lr: float, factor: float = 0.5, every: float = 5, min_lr: float = 0.0):
        if not every > 0:
            raise ValueError(f"every must be > 0, got {every}")
        self.initial_lr, self.factor, self.every, self.min_lr = float(initial_lr), float(factor), every, float(min_lr)

    def decays(self, t: float) -> int:
        """How many decays have happened by clock position ``t``."""
        if isinstance(t, (int,)) and isinstance(self.every, int):
            return t // self.every
        return math.floor(t / self.every + _CLOCK_TOLERANCE)

    def __call__(self, t: float) -> float:
        return max(self.initial_lr * self.factor ** self.decays(t), self.min_lr)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CosineDecay:
    """Cosine from initial_lr to min_lr over total_steps (then stays at min_lr)."""

    def __init__(self, initial_lr: float, total_steps: int, min_lr: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.initial_lr, self.total_steps, self.min_lr = float(initial_lr), int(total_steps), float(min_lr)

    def __call__(self, step: int) -> float:
        t = min(max(int(step), 0), self.total_steps) / self.total_steps
        return self.min_lr + 0.5 * (self.initial_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ReduceOnPlateau:
    """Multiply lr by ``factor`` when the metric has not improved for ``patience`` updates."""

    def __init__(
        self,
        initial_lr: float,
        factor: float = 0.1,
        patience: int = 5,
        mode: str = "min",
        min_delta: float = 0.0,
        min_lr: float = 0.0,
        cooldown: int = 0,
    ):
        self.lr, self.factor, self.patience = float(initial_lr), float(factor), int(patience)
        self.mode, self.min_delta, self.min_lr, self.cooldown = (
            _check_mode(mode),
            float(min_delta),
            float(min_lr),
            int(cooldown),
        )
        self.best: float | None = None
        self.wait = 0
        self.cooldown_left = 0

    def update(self, value: float) -> float:
        """Record a metric value; returns the (possibly reduced) learning rate."""
        value = float(value)
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
        if _better(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
        elif self.cooldown_left == 0:
            self.wait += 1
            if self.wait >= self.patience:
                self.lr = max(self.lr * self.factor, self.min_lr)
                self.wait, self.cooldown_left = 0, self.cooldown
        return self.lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": self.best, "wait": self.wait, "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.best = float(state["lr"]), state["best"]
        self.wait, self.cooldown_left = int(state["wait"]), int(state["cooldown_left"])


class EarlyStopping:
    """Stop once the metric has not improved for ``patience`` units of the clock.

    ``improved = es.update(value, at)``: ``at`` is the clock position of this
    update (default: the update index 0, 1, 2, ..., i.e. patience counted in
    updates); pass epochs (floats) for a patience in epochs. ``improved`` means
    better than the best so far by more than ``min_delta`` (a tie is not an
    improvement). After each update ``should_stop`` says whether
    ``at - best_at >= patience`` and ``at > min_at``: the decision is taken
    anew at every update, so an improvement always restarts the wait (no
    stop decided earlier, e.g. during the ``min_at`` window, survives it).
    """

    def __init__(self, patience: float = 10, mode: str = "max", min_delta: float = 0.0, min_at: float = -math.inf):
        if not patience > 0:
            raise ValueError(f"patience must be > 0, got {patience}")
        self.patience, self.mode, self.min_delta = patience, _check_mode(mode), float(min_delta)
        self.min_at = float(min_at)
        self.best: float | None = None
        self.best_step = -1
        self.best_at: float | None = None
        self.step = -1
        self.wait = 0
        self.should_stop = False

    def update(self, value: float, at: float | None = None) -> bool:
        self.step += 1
        at = self.step if at is None else at
        value = float(value)
        improved = _better(value, self.best, self.mode, self.min_delta) and not math.isnan(value)
        if improved or self.best_at is None:
            # the first update starts the clock even when its value is NaN (patience runs from there)
            self.best_at = at
        if improved:
            self.best, self.best_step, self.wait = value, self.step, 0
        else:
            self.wait += 1
        self.should_stop = at - self.best_at >= self.patience - _CLOCK_TOLERANCE and at > self.min_at + _CLOCK_TOLERANCE
        return improved

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "best_at": self.best_at,
            "step": self.step,
            "wait": self.wait,
            "should_stop": self.should_stop,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.best_step, self.step, self.wait = int(state["best_step"]), int(state["step"]), int(state["wait"])
        # checkpoints written before the clock existed counted updates
        self.best_at = state.get("best_at", self.best_step if self.best_step >= 0 else None)
        self.should_stop = bool(state["should_stop"])


class BestScore:
    """The best value of a metric so far; a tie goes to the later update.

    ``is_best = tracker.update(value)`` says whether the model of this update
    is to be kept as the best one: at least as good as every earlier one
    (``>=`` for ``mode="max"``, ``<=`` for ``"min"``). Keeping the later of two
    equal scores favours the model that has trained longer: at the start of a
    run a constant (one-class) predictor scores the same as later, real
    models on a coarse metric, and must not win the tie. NaN never wins.
    """

    def __init__(self, mode: str = "max"):
        self.mode = _check_mode(mode)
        self.best: float | None = None
        self.best_step = -1
        self.step = -1

    def update(self, value: float) -> bool:
        self.step += 1
        value = float(value)
        if math.isnan(value):
            return False
        if self.best is None or (value >= self.best if self.mode == "max" else value <= self.best):
            self.best, self.best_step = value, self.step
            return True
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.step = state["best"], int(state["best_step"]), int(state["step"])

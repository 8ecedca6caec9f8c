"""Learning-rate schedules and early stopping.

Schedules count *evaluations* (or steps) globally over the whole run, never
per epoch (the report's schedule restarted every epoch: a sawtooth).
Step-based schedules: ``lr = schedule(step)``. Metric-based: ``lr = plateau.update(value)``.
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


def _check_mode(mode: str) -> str:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return mode


class StepDecay:
    """lr = initial_lr * factor ** (step // every)."""

    def __init__(self, initial_lr: float, factor: float = 0.5, every: int = 5, min_lr: float = 0.0):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.initial_lr, self.factor, self.every, self.min_lr = float(initial_lr), float(factor), int(every), float(min_lr)

    def __call__(self, step: int) -> float:
        return max(self.initial_lr * self.factor ** (int(step) // self.every), self.min_lr)

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

    def __init__(self, initial_lr: float, factor: float = 0.1, patience: int = 5, mode: str = "min",
                 min_delta: float = 0.0, min_lr: float = 0.0, cooldown: int = 0):
        self.lr, self.factor, self.patience = float(initial_lr), float(factor), int(patience)
        self.mode, self.min_delta, self.min_lr, self.cooldown = _check_mode(mode), float(min_delta), float(min_lr), int(cooldown)
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
    """Stop after ``patience`` updates without improvement (the caller must then stop).

    ``improved = es.update(value)``; ``es.should_stop``; ``es.best``, ``es.best_step``.
    """

    def __init__(self, patience: int = 10, mode: str = "max", min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.mode, self.min_delta = int(patience), _check_mode(mode), float(min_delta)
        self.best: float | None = None
        self.best_step = -1
        self.step = -1
        self.wait = 0
        self.should_stop = False

    def update(self, value: float) -> bool:
        self.step += 1
        value = float(value)
        if _better(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.wait = value, self.step, 0
            return True
        self.wait += 1
        if self.wait >= self.patience:
            self.should_stop = True
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "step": self.step, "wait": self.wait,
                "should_stop": self.should_stop}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.best_step, self.step, self.wait = int(state["best_step"]), int(state["step"]), int(state["wait"])
        self.should_stop = bool(state["should_stop"])

"""Training recipes and the schedule of one run (shared by the NumPy loop and the Keras fine-tuning).

A *recipe* is a named set of the options that shape training: learning rate,
L2 factor, batch size, validation passes per epoch, LR decay, early-stopping
patience, the minimum training length and the metric that selects the best
model. ``breastcnn train --recipe NAME`` starts from one; an option given on
the command line overrides that single value. ``config.json`` records the
recipe's name, every resolved value and which values were overridden.

Units. Schedules given in *epochs* (``patience_epochs``, ``lr_decay_epochs``,
fractions allowed) mean the same on any data-set size; the report's schedule
was given in *evaluations* (``patience``, ``lr_decay_every``), which makes it
shorter the smaller the data set is and the more often it evaluates. Both
stay available: ``--patience``/``--lr-decay-every`` keep their old unit
(evaluations), ``--patience-epochs``/``--lr-decay-epochs`` count epochs.

The clock: evaluation ``k`` (1-based over the whole run) of a run that
evaluates ``E`` times per epoch sits at ``k / E`` epochs (evaluation points are
spread evenly over each epoch and the last one ends it), so "x0.8 every 5
evaluations" at 20 per epoch is exactly "x0.8 every 0.25 epochs".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from breastcnn.nn.schedules import BestScore, EarlyStopping, StepDecay

MONITORS = {
    "val_balanced_accuracy": "max",
    "val_auc": "max",
    "val_loss": "min",
    "val_accuracy": "max",
    "val_f1": "max",
    "val_recall": "max",
}
"""Metrics that can select the best model and drive early stopping, with their direction.

``val_accuracy`` (and ``val_recall``) can be won by a model that predicts one class
(it scores the majority share); ``val_balanced_accuracy`` (mean of the two class
recalls) and ``val_auc`` (ROC AUC) give such a model 0.5; ``val_loss`` (unweighted
cross-entropy) is minimised."""


@dataclass(frozen=True)
class Recipe:
    """The options a recipe fixes. Exactly one of each unit pair is set.

    ``min_epochs``: no early stop at or before this many epochs, and never
    before ``min_epochs_fraction * --epochs`` either (the larger one counts).
    """

    lr: float
    l2: float
    batch_size: int
    evals_per_epoch: int
    lr_decay: float
    monitor: str
    lr_decay_every: int | None = None
    lr_decay_epochs: float | None = None
    patience: int | None = None
    patience_epochs: float | None = None
    min_epochs: float = 1.0
    min_epochs_fraction: float = 0.0
    stain_augment: bool = False
    """HED colour jitter in the augmentation (``--stain-augment``; :class:`breastcnn.data.stain.HEDJitter`)."""
    summary: str = ""


RECIPE_OPTIONS = (
    "lr",
    "l2",
    "batch_size",
    "evals_per_epoch",
    "lr_decay",
    "lr_decay_every",
    "lr_decay_epochs",
    "patience",
    "patience_epochs",
    "min_epochs",
    "monitor",
    "stain_augment",
)
"""The ``TrainConfig`` options a recipe provides (``None`` there = take the recipe's value)."""

UNIT_PAIRS = (("patience", "patience_epochs"), ("lr_decay_every", "lr_decay_epochs"))
"""Options given either in evaluations (first) or in epochs (second): setting one drops the recipe's other."""

REPORT = Recipe(
    lr=0.01,
    l2=0.1,
    batch_size=32,
    evals_per_epoch=20,
    lr_decay=0.8,
    lr_decay_every=5,
    patience=10,
    min_epochs=1.0,
    monitor="val_accuracy",
    summary="the report's schedule as breastcnn ran it before recipes existed: 20 evaluations per epoch, "
    "patience 10 evaluations, LR x0.8 every 5 evaluations, lr 0.01, L2 0.1, best by val_accuracy",
)

DEFAULT = Recipe(
    lr=0.003,
    l2=0.01,
    batch_size=32,
    evals_per_epoch=4,
    lr_decay=0.5,
    lr_decay_epochs=3.0,
    patience_epochs=5.0,
    min_epochs=1.0,
    min_epochs_fraction=0.3,
    monitor="val_loss",
    stain_augment=True,
    summary="tuned on hard synthetic data (benchmarks/bench_train.py --study; table and reasons in the README): "
    "lr 0.003, L2 0.01, batch 32, 4 evaluations per epoch, LR x0.5 every 3 epochs, best and early "
    "stopping by val_loss with a patience of 5 epochs, never stopping in the first 30% of --epochs; "
    "HED stain jitter on (benchmarks/study_subtype_stain.py: it kept test patients in another stain "
    "from losing 27 points of accuracy, and cost nothing on the same stain)",
)
"""The study's outcome (hard synthetic 200X splits at scales 0.2 and 1.0, ``--epochs 10 --image-size 224``,
seeds 0-2). Why: lr 0.01 and 0.001, L2 0.1/0.001/0, batch 64 and a constant LR all gave a higher
validation loss and lower, more scattered test accuracy; on small validation subsets balanced
accuracy and ROC AUC reach 1.0 within a few epochs and then cannot improve, so early stopping on them
ends runs that are still getting better, while validation loss keeps falling (and a one-class
model, ~0.6 nats on 70/30 data, cannot win on it). ``stain_augment`` (issue 13, measured later with the
other values fixed): test patients in another stain scored 0.64 +- 0.04 without it and 0.92 +- 0.08 with
it, the same stain 0.91 +- 0.07 and 0.95 +- 0.02 (hard 0.2-scale data, seeds 0-2; README)."""

RECIPES = {"default": DEFAULT, "report": REPORT}
DEFAULT_RECIPE = "default"


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return RECIPES[name]


def resolve(recipe: str, given: dict, epochs: int) -> tuple[dict, list[str]]:
    """Fill the recipe options that ``given`` leaves ``None`` from ``recipe``.

    Returns ``(values, overridden)``: ``values`` maps every name of
    :data:`RECIPE_OPTIONS` to its value (the unused one of each unit pair is
    ``None``); ``overridden`` lists the options taken from ``given`` rather
    than from the recipe. Raises ``ValueError`` when both options of a unit
    pair are given.
    """
    base = get_recipe(recipe)
    for evals_name, epochs_name in UNIT_PAIRS:
        if given.get(evals_name) is not None and given.get(epochs_name) is not None:
            raise ValueError(
                f"--{evals_name.replace('_', '-')} (evaluations) and --{epochs_name.replace('_', '-')} (epochs) "
                "set the same thing: give one of them"
            )
    values, overridden = {}, []
    for name in RECIPE_OPTIONS:
        if given.get(name) is not None:
            values[name] = given[name]
            overridden.append(name)
        else:
            values[name] = getattr(base, name)
    for pair in UNIT_PAIRS:
        chosen = [name for name in pair if given.get(name) is not None]
        if chosen:  # a unit given on the command line replaces the recipe's, whatever unit that was in
            for name in pair:
                if name not in chosen:
                    values[name] = None
    if given.get("min_epochs") is None:
        values["min_epochs"] = max(base.min_epochs, base.min_epochs_fraction * epochs)
    return values, overridden


def recipe_dict(name: str) -> dict:
    """A recipe as a plain dict (for ``--help`` texts and the README)."""
    return dataclasses.asdict(get_recipe(name))


def evaluation_points(steps_per_epoch: int, evals_per_epoch: int) -> list[int]:
    """Batch counts within an epoch after which to evaluate; always ends with the last batch.

    ``evals_per_epoch`` points spread evenly (fewer when the epoch has fewer batches).
    """
    e = max(1, min(evals_per_epoch, steps_per_epoch))
    return sorted({int(round(k * steps_per_epoch / e)) for k in range(1, e + 1)} - {0})


class TrainingSchedule:
    """One run's schedule: when to evaluate, the LR, when to stop, which model to keep.

    Built from the resolved recipe options and the number of batches per epoch.
    The training loop calls :meth:`update` once per validation pass with the
    monitored score; it returns whether that model is the best so far (ties go
    to the later pass); then :attr:`lr` is the learning rate for the next
    steps and :attr:`should_stop` says whether early stopping ends the run.

    Patience and LR decay run on the clock of their unit: the evaluation
    count, or epochs (``evaluations / evals_in_epoch``). ``min_epochs`` always
    counts epochs.
    """

    def __init__(
        self,
        *,
        lr: float,
        lr_decay: float,
        monitor: str,
        evals_per_epoch: int,
        steps_per_epoch: int,
        lr_decay_every: int | None = None,
        lr_decay_epochs: float | None = None,
        patience: int | None = None,
        patience_epochs: float | None = None,
        min_epochs: float = 0.0,
    ):
        if (lr_decay_every is None) == (lr_decay_epochs is None):
            raise ValueError("give exactly one of lr_decay_every (evaluations) and lr_decay_epochs (epochs)")
        if (patience is None) == (patience_epochs is None):
            raise ValueError("give exactly one of patience (evaluations) and patience_epochs (epochs)")
        self.monitor, self.mode = monitor, MONITORS[monitor]
        self.eval_points = evaluation_points(steps_per_epoch, evals_per_epoch)
        self.evals_in_epoch = len(self.eval_points)
        self.decay_in_epochs = lr_decay_every is None
        self.decay = StepDecay(lr, factor=lr_decay, every=lr_decay_epochs if self.decay_in_epochs else lr_decay_every)
        self.patience_in_epochs = patience is None
        min_at = min_epochs if self.patience_in_epochs else min_epochs * self.evals_in_epoch
        self.stopper = EarlyStopping(
            patience_epochs if self.patience_in_epochs else patience, mode=self.mode, min_at=min_at
        )
        self.best = BestScore(self.mode)
        self.evaluations = 0
        self.lr = float(lr)

    def epochs_at(self, evaluations: int) -> float:
        """Position in epochs of evaluation number ``evaluations`` (1-based over the run)."""
        return evaluations / self.evals_in_epoch

    def update(self, score: float) -> bool:
        """Record the monitored score of the next validation pass; returns whether it is the best model so far."""
        self.evaluations += 1
        epochs = self.epochs_at(self.evaluations)
        self.stopper.update(score, at=epochs if self.patience_in_epochs else self.evaluations)
        self.lr = self.decay(epochs if self.decay_in_epochs else self.evaluations)
        return self.best.update(score)

    @property
    def should_stop(self) -> bool:
        return self.stopper.should_stop

    def state_dict(self) -> dict:
        return {
            "evaluations": self.evaluations,
            "lr": self.lr,
            "early_stopping": self.stopper.state_dict(),
            "best": self.best.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.evaluations, self.lr = int(state["evaluations"]), float(state["lr"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.best.load_state_dict(state["best"])

"""``TrainConfig``: every option of ``breastcnn train``, and the one place its defaults live.

The CLI (``breastcnn train``, ``breastcnn finetune``) reads its defaults from here; the recipe options
(:data:`~breastcnn.training.recipes.RECIPE_OPTIONS`) default to ``None`` and come from the named recipe.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from breastcnn.data.images import DEFAULT_JOBS, PREPROCESS_MODES
from breastcnn.data.split import DEFAULT_SPLIT_DIR
from breastcnn.data.stain_options import DEFAULT_STAIN_NORM, check_stain_options
from breastcnn.data.tasks import DEFAULT_TASK, TASKS
from breastcnn.errors import UserInputError
from breastcnn.models.custom import ACTIVATIONS
from breastcnn.models.registry import list_models
from breastcnn.models.spec import DEFAULT_IMAGE_SIZE, DEFAULT_PREPROCESS
from breastcnn.training.recipes import DEFAULT_RECIPE, MONITORS, RECIPE_OPTIONS, RECIPES, TrainingSchedule
from breastcnn.training.recipes import resolve as resolve_recipe

NUMPY_ARCHS = tuple(list_models(framework="numpy"))
"""What ``breastcnn train`` builds (the registry knows each architecture's framework)."""
CLASS_WEIGHT_MODES = ("balanced", "none")


@dataclass
class TrainConfig:
    """Every option of ``breastcnn train`` (same names, underscores for dashes).

    The options of :data:`~breastcnn.training.recipes.RECIPE_OPTIONS` default to ``None``:
    :meth:`resolved` fills them from the recipe named by ``recipe`` (their
    defaults live there). ``patience``/``lr_decay_every`` count evaluations,
    ``patience_epochs``/``lr_decay_epochs``/``min_epochs`` count epochs.
    """

    split: str = str(DEFAULT_SPLIT_DIR)
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
    image_size: int = DEFAULT_IMAGE_SIZE
    preprocess: str = DEFAULT_PREPROCESS
    activation: str = "relu"
    augment: bool = True
    task: str = DEFAULT_TASK
    """``binary`` (benign/malignant) or ``subtype`` (the 8 BreakHis classes, :mod:`breastcnn.data.tasks`)."""
    stain_norm: str = DEFAULT_STAIN_NORM
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
            (
                self.arch.removesuffix("-finetuned") in NUMPY_ARCHS,
                "--arch",
                self.arch,
                f"must be one of {', '.join(NUMPY_ARCHS)} (train vgg16/resnet50/custom-keras with "
                "'breastcnn finetune --arch NAME')",
            ),
            (self.epochs >= 1, "--epochs", self.epochs, "must be >= 1"),
            (self.batch_size >= 1, "--batch-size", self.batch_size, "must be >= 1"),
            (math.isfinite(self.lr) and self.lr > 0, "--lr", self.lr, "must be > 0"),
            (math.isfinite(self.l2) and self.l2 >= 0, "--l2", self.l2, "must be >= 0"),
            (
                self.class_weights in CLASS_WEIGHT_MODES,
                "--class-weights",
                self.class_weights,
                f"must be one of {', '.join(CLASS_WEIGHT_MODES)}",
            ),
            (self.evals_per_epoch >= 1, "--evals-per-epoch", self.evals_per_epoch, "must be >= 1"),
            (optional(self.patience, lambda v: v >= 1), "--patience", self.patience, "must be >= 1 (evaluations)"),
            (
                optional(self.patience_epochs, lambda v: math.isfinite(v) and v > 0),
                "--patience-epochs",
                self.patience_epochs,
                "must be > 0 (epochs; fractions allowed)",
            ),
            (math.isfinite(self.min_epochs) and self.min_epochs >= 0, "--min-epochs", self.min_epochs, "must be >= 0"),
            (0 < self.lr_decay <= 1, "--lr-decay", self.lr_decay, "must be in (0, 1] (1 = constant LR)"),
            (
                optional(self.lr_decay_every, lambda v: v >= 1),
                "--lr-decay-every",
                self.lr_decay_every,
                "must be >= 1 (evaluations)",
            ),
            (
                optional(self.lr_decay_epochs, lambda v: math.isfinite(v) and v > 0),
                "--lr-decay-epochs",
                self.lr_decay_epochs,
                "must be > 0 (epochs; fractions allowed)",
            ),
            (self.monitor in MONITORS, "--monitor", self.monitor, f"must be one of {', '.join(MONITORS)}"),
            (8 <= self.image_size <= 2048, "--image-size", self.image_size, "must be between 8 and 2048"),
            (
                self.preprocess in PREPROCESS_MODES,
                "--preprocess",
                self.preprocess,
                f"must be one of {', '.join(PREPROCESS_MODES)}",
            ),
            (
                self.activation in ACTIVATIONS,
                "--activation",
                self.activation,
                f"must be one of {', '.join(ACTIVATIONS)}",
            ),
            (self.jobs >= 1 or self.jobs == -1, "--jobs", self.jobs, "must be >= 1 (or -1 for all cores)"),
            (
                self.threads is None or self.threads >= 1,
                "--threads",
                self.threads,
                "must be >= 1 (default: all available cores)",
            ),
            (self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be >= 1"),
            (self.seed >= 0, "--seed", self.seed, "must be >= 0"),
            (self.task in TASKS, "--task", self.task, f"must be one of {', '.join(TASKS)}"),
        ]
        for ok, option, value, why in checks:
            if not ok:
                raise UserInputError(f"{option} {why}, got {value!r}")
        check_stain_options(self.stain_norm, self.stain_target, self.stain_augment)
        return self

    def training_schedule(self, steps_per_epoch: int) -> TrainingSchedule:
        """The :class:`~breastcnn.training.recipes.TrainingSchedule` of this resolved config (both loops use it)."""
        return TrainingSchedule(
            lr=self.lr,
            lr_decay=self.lr_decay,
            monitor=self.monitor,
            evals_per_epoch=self.evals_per_epoch,
            steps_per_epoch=steps_per_epoch,
            lr_decay_every=self.lr_decay_every,
            lr_decay_epochs=self.lr_decay_epochs,
            patience=self.patience,
            patience_epochs=self.patience_epochs,
            min_epochs=self.min_epochs,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, options: dict, source: str | Path | None = None, **overrides) -> TrainConfig:
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


_OPTION_TYPES = {
    "str": (str,),
    "str | None": (str, type(None)),
    "int": (int,),
    "int | None": (int, type(None)),
    "float": (float, int),
    "float | None": (float, int, type(None)),
    "bool": (bool,),
    "bool | None": (bool, type(None)),
}
"""JSON types accepted for each TrainConfig field type (bool is never taken for a number)."""

"""`breastcnn train`: Train the NumPy CNN on a split."""

from __future__ import annotations

from pathlib import Path

import typer

from breastcnn.cli.common import info, jobs_option, print_json, stain_options, stderr, task_option
from breastcnn.cli.display import TrainingDisplay
from breastcnn.errors import UserInputError
from breastcnn.models.custom import ACTIVATIONS
from breastcnn.runs import read_run_config
from breastcnn.training.common import EXIT_DIVERGED, TrainingDiverged
from breastcnn.training.config import TrainConfig
from breastcnn.training.numpy_run import run_training
from breastcnn.training.recipes import MONITORS, RECIPE_OPTIONS, RECIPES, UNIT_PAIRS

DEFAULTS = TrainConfig()
"""The option defaults: they live in :class:`TrainConfig` (the recipe options default to None: the recipe's)."""


def _by_recipe(name: str, unit: str = "") -> str:
    """' Recipe default: default X, report Y.' for an option's help (the values live in breastcnn.training.recipes)."""
    values = []
    for recipe_name, recipe in RECIPES.items():
        value = getattr(recipe, name)
        if name == "min_epochs" and recipe.min_epochs_fraction:
            text = f"{recipe.min_epochs_fraction:.0%} of --epochs, at least {value:g}"
        elif value is None:
            text = "-"
        else:
            text = f"{value:g}{unit}" if isinstance(value, float) else f"{value}{unit}"
        values.append(f"{recipe_name} {text}")
    return f" [recipe: {', '.join(values)}]"


_STAIN = stain_options()

_RECIPE_HELP = (
    "Named set of lr, L2, batch size, evaluations per epoch, LR decay, patience, minimum epochs and monitor; "
    "each option given here overrides one value. 'default': tuned on hard synthetic data (see README); "
    "'report': the schedule this tool ran before recipes (20 evaluations/epoch, patience 10 evaluations, "
    "LR x0.8 every 5 evaluations, lr 0.01, L2 0.1, val_accuracy). Recorded in config.json."
)


def train(
    ctx: typer.Context,
    split: Path = typer.Option(
        Path(DEFAULTS.split), "--split", help="Split directory (a k-fold split trains one model per fold)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Run directory (default: runs/<arch>-<timestamp>, linked as runs/latest)."
    ),
    arch: str = typer.Option(
        DEFAULTS.arch,
        "--arch",
        help="Architecture (NumPy): custom (the report's) or custom-k4 (first conv 4x4/s4, sees every pixel).",
    ),
    recipe: str = typer.Option(DEFAULTS.recipe, "--recipe", help=_RECIPE_HELP),
    epochs: int = typer.Option(
        DEFAULTS.epochs, "--epochs", help="Epochs to train (fewer only when early stopping ends the run)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Images per optimizer step." + _by_recipe("batch_size")
    ),
    lr: float | None = typer.Option(None, "--lr", help="Initial learning rate (Adam)." + _by_recipe("lr")),
    l2: float | None = typer.Option(
        None,
        "--l2",
        help="L2 factor on conv/dense kernels, in the gradient (Keras L2 convention, l2*sum(W^2))." + _by_recipe("l2"),
    ),
    class_weights: str = typer.Option(
        DEFAULTS.class_weights, "--class-weights", help="balanced (weights n/(2*count) in the loss gradient) or none."
    ),
    evals_per_epoch: int | None = typer.Option(
        None,
        "--evals-per-epoch",
        help="Validation evaluations per epoch (each logged to history.csv)." + _by_recipe("evals_per_epoch"),
    ),
    patience: int | None = typer.Option(
        None,
        "--patience",
        help="Early stopping patience in EVALUATIONS (the old unit; scales with --evals-per-epoch "
        "and the data-set size): stop after this many evaluations without improvement of --monitor. "
        "Use --patience-epochs for a patience in epochs." + _by_recipe("patience"),
    ),
    patience_epochs: float | None = typer.Option(
        None,
        "--patience-epochs",
        help="Early stopping patience in EPOCHS (fractions allowed): stop once --monitor "
        "has not improved for this long." + _by_recipe("patience_epochs"),
    ),
    min_epochs: float | None = typer.Option(
        None,
        "--min-epochs",
        help="Early stopping never ends a run within this many epochs (fractions allowed; "
        "BatchNorm's moving statistics need about an epoch to settle)." + _by_recipe("min_epochs"),
    ),
    lr_decay: float | None = typer.Option(
        None,
        "--lr-decay",
        help="Multiply the LR by this factor every --lr-decay-epochs epochs (or --lr-decay-every "
        "evaluations), counted over the whole run (never reset per epoch); 1 = constant." + _by_recipe("lr_decay"),
    ),
    lr_decay_every: int | None = typer.Option(
        None,
        "--lr-decay-every",
        help="Evaluations between LR decays (the old unit; the report: 5)." + _by_recipe("lr_decay_every"),
    ),
    lr_decay_epochs: float | None = typer.Option(
        None, "--lr-decay-epochs", help="Epochs between LR decays (fractions allowed)." + _by_recipe("lr_decay_epochs")
    ),
    monitor: str | None = typer.Option(
        None,
        "--monitor",
        help=f"Metric that selects the best model (ties: the later evaluation) and drives early "
        f"stopping: {', '.join(MONITORS)} (val_loss is minimised; a one-class model scores 0.5 on "
        "val_balanced_accuracy and val_auc but the majority share on val_accuracy)." + _by_recipe("monitor"),
    ),
    image_size: int = typer.Option(DEFAULTS.image_size, "--image-size", help="Square input size in pixels."),
    preprocess: str = typer.Option(
        DEFAULTS.preprocess, "--preprocess", help="caffe (BGR minus ImageNet mean, like VGG16) or minmax (x/255)."
    ),
    activation: str = typer.Option(DEFAULTS.activation, "--activation", help=" or ".join(ACTIVATIONS) + "."),
    augment: bool = typer.Option(
        DEFAULTS.augment,
        "--augment/--no-augment",
        help="Random rotation/shift/shear/zoom/flips, fresh draws every epoch.",
    ),
    task: str = task_option(),
    stain_norm: str = _STAIN["stain_norm"],
    stain_target: Path | None = _STAIN["stain_target"],
    stain_augment: bool | None = _STAIN["stain_augment"],
    seed: int = typer.Option(
        DEFAULTS.seed, "--seed", help="Seed of every random draw (init, shuffling, augmentation)."
    ),
    jobs: int = jobs_option("decoding images into the cache (processes)"),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="Engine threads of the NumPy model (default: all available cores; results do not depend on it). With --resume, taken from this command.",
    ),
    resume: Path | None = typer.Option(
        None,
        "--resume",
        help="Continue the interrupted run in RUN_DIR from its last.npz (its config.json options are used).",
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="Replay RUN_DIR/config.json: its options are the defaults, options given here override them.",
    ),
    force: bool = typer.Option(DEFAULTS.force, "--force", help="Allow --out to be an existing non-empty directory."),
    json_output: bool = typer.Option(False, "--json", help="Print only a final JSON summary on stdout."),
) -> None:
    """Train the NumPy CNN on a split.

    Writes RUN_DIR/model.npz (best by --monitor on the validation subset),
    last.npz (resumable checkpoint, also written on Ctrl-C), history.csv,
    training.png, config.json and summary.json. A best model that predicts
    (almost) one class, or is no more accurate than the majority class on
    validation, is named in a warning on stderr and in the summary's
    "warnings". Exit codes: 0 done (completed or early stop), 1 the loss became
    NaN/inf (best model so far kept), 2 bad input, 130 interrupted (resume
    with --resume RUN_DIR).
    """
    options = {
        "split": str(split),
        "out": str(out) if out is not None else None,
        "arch": arch,
        "recipe": recipe,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "l2": l2,
        "class_weights": class_weights,
        "evals_per_epoch": evals_per_epoch,
        "patience": patience,
        "patience_epochs": patience_epochs,
        "min_epochs": min_epochs,
        "lr_decay": lr_decay,
        "lr_decay_every": lr_decay_every,
        "lr_decay_epochs": lr_decay_epochs,
        "monitor": monitor,
        "image_size": image_size,
        "preprocess": preprocess,
        "activation": activation,
        "augment": augment,
        "task": task,
        "stain_norm": stain_norm,
        "stain_target": str(stain_target) if stain_target is not None else None,
        "stain_augment": stain_augment,
        "seed": seed,
        "jobs": jobs,
        "threads": threads,
        "force": force,
    }
    if resume is not None and config is not None:
        raise UserInputError("--resume and --config cannot be combined (--resume already uses RUN_DIR/config.json)")
    if config is not None:
        options = _replay(config, options, {name for name in options if _given(ctx, name)})

    display = TrainingDisplay(quiet=json_output)
    try:
        if resume is not None:
            summary = run_training(TrainConfig(threads=threads), [display], resume=resume)
        else:
            summary = run_training(TrainConfig.from_dict(options), [display])
    except TrainingDiverged as exc:
        stderr().print(f"[red]error:[/red] {exc}", highlight=False)
        if json_output:
            print_json(exc.summary)
        raise typer.Exit(EXIT_DIVERGED) from None
    if json_output:
        print_json(summary)
    if summary.get("stopped") == "interrupted":
        stderr().print(
            f"[yellow]interrupted[/yellow]: checkpoint saved; continue with "
            f"breastcnn train --resume {summary['run_dir']}",
            highlight=False,
        )
        raise typer.Exit(130)


def _replay(config: Path, options: dict, explicit: set[str]) -> dict:
    """The options of a ``--config`` replay: the replayed run's values, except those typed on the command line.

    Typing ``--recipe`` takes that recipe's values for every recipe option not
    typed as well; typing one option of a unit pair (``--patience`` /
    ``--patience-epochs``, ``--lr-decay-every`` / ``--lr-decay-epochs``)
    drops the replayed other one.
    """
    replayed = dict(read_run_config(config)["options"])
    TrainConfig.check_types(replayed, source=config / "config.json" if config.is_dir() else config)
    replayed.setdefault("recipe", "report")  # a config.json from before recipes ran the report's schedule
    dropped = set(RECIPE_OPTIONS) if "recipe" in explicit else set()
    for pair in UNIT_PAIRS:
        if explicit & set(pair):
            dropped |= set(pair)
    merged = {
        **options,
        **{k: v for k, v in replayed.items() if k in options and k not in explicit and k not in dropped},
    }
    if "out" not in explicit:
        merged["out"] = None  # a replay writes a new run directory
    info(f"replaying {config} (options given on the command line override it)")
    return merged


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was typed on the command line (not a default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"

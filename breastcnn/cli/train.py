"""`breastcnn train`: Train the NumPy CNN on a split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from breastcnn.cli.common import info, jobs_option, print_json, stderr
from breastcnn.cli.display import TrainingDisplay
from breastcnn.errors import UserInputError
from breastcnn.train import (
    DEFAULT_L2,
    DEFAULT_LR_DECAY,
    EXIT_DIVERGED,
    TrainConfig,
    TrainingDiverged,
    run_training,
)

_L2_HELP = (
    f"L2 factor on conv/dense kernels, in the gradient (Keras L2 convention, l2*sum(W^2)). Default {DEFAULT_L2:g} "
    "(the report's value) by measurement on the synthetic 200X split: mean test accuracy 0.98 against 0.77-0.84 "
    "for 1e-3, 1e-4 and 0, which learn too slowly to beat early stopping (see README)."
)


def train(
    ctx: typer.Context,
    split: Path = typer.Option(Path("splits/200X"), "--split", help="Split directory (a k-fold split trains one model per fold)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/<arch>-<timestamp>, linked as runs/latest)."),
    arch: str = typer.Option("custom", "--arch", help="Architecture (NumPy): custom (the report's) or custom-k4 (first conv 4x4/s4, sees every pixel)."),
    epochs: int = typer.Option(5, "--epochs", help="Maximum number of epochs."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per optimizer step."),
    lr: float = typer.Option(0.01, "--lr", help="Initial learning rate (Adam)."),
    l2: float = typer.Option(DEFAULT_L2, "--l2", help=_L2_HELP),
    class_weights: str = typer.Option("balanced", "--class-weights", help="balanced (weights n/(2*count) in the loss gradient) or none."),
    evals_per_epoch: int = typer.Option(20, "--evals-per-epoch", help="Validation evaluations per epoch (each logged to history.csv)."),
    patience: int = typer.Option(10, "--patience", help="Stop the run after this many evaluations without improvement of --monitor."),
    min_epochs: int = typer.Option(1, "--min-epochs", help="Early stopping never ends a run before this many epochs (BatchNorm's moving statistics need about an epoch to settle; before that the validation scores are a constant predictor's)."),
    lr_decay: float = typer.Option(
        DEFAULT_LR_DECAY, "--lr-decay",
        help="Multiply the LR by this factor every --lr-decay-every evaluations, counted over the whole run "
             "(never reset per epoch); 1 = constant. 0.8 takes 0.01 to ~1.2e-4 over 5 epochs x 20 evaluations.",
    ),
    lr_decay_every: int = typer.Option(5, "--lr-decay-every", help="Evaluations between LR decays (the report: 5)."),
    monitor: str = typer.Option("val_accuracy", "--monitor", help="Metric that selects the best model and drives early stopping: val_accuracy, val_f1 or val_recall."),
    image_size: int = typer.Option(224, "--image-size", help="Square input size in pixels."),
    preprocess: str = typer.Option("caffe", "--preprocess", help="caffe (BGR minus ImageNet mean, like VGG16) or minmax (x/255)."),
    activation: str = typer.Option("relu", "--activation", help="relu or leaky_relu."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random rotation/shift/shear/zoom/flips, fresh draws every epoch."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw (init, shuffling, augmentation)."),
    jobs: int = jobs_option("decoding images into the cache (processes)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="Engine threads of the NumPy model (default: all available cores; results do not depend on it). With --resume, taken from this command."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run in RUN_DIR from its last.npz (its config.json options are used)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Replay RUN_DIR/config.json: its options are the defaults, options given here override them."),
    force: bool = typer.Option(False, "--force", help="Allow --out to be an existing non-empty directory."),
    json_output: bool = typer.Option(False, "--json", help="Print only a final JSON summary on stdout."),
) -> None:
    """Train the NumPy CNN on a split.

    Writes RUN_DIR/model.npz (best by --monitor on the validation subset),
    last.npz (resumable checkpoint, also written on Ctrl-C), history.csv,
    training.png, config.json and summary.json. Exit codes: 0 done (completed or
    early stop), 1 the loss became NaN/inf (best model so far kept), 2 bad
    input, 130 interrupted (resume with --resume RUN_DIR).
    """
    options = {
        "split": str(split), "out": str(out) if out is not None else None, "arch": arch, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "l2": l2, "class_weights": class_weights,
        "evals_per_epoch": evals_per_epoch, "patience": patience, "min_epochs": min_epochs, "lr_decay": lr_decay,
        "lr_decay_every": lr_decay_every, "monitor": monitor, "image_size": image_size,
        "preprocess": preprocess, "activation": activation, "augment": augment, "seed": seed, "jobs": jobs,
        "threads": threads, "force": force,
    }
    if resume is not None and config is not None:
        raise UserInputError("--resume and --config cannot be combined (--resume already uses RUN_DIR/config.json)")
    if config is not None:
        from breastcnn.runs import read_run_config

        replayed = read_run_config(config)["options"]
        TrainConfig.check_types(replayed, source=config / "config.json" if config.is_dir() else config)
        explicit = {name for name in options if _given(ctx, name)}
        options = {**options, **{k: v for k, v in replayed.items() if k in options and k not in explicit}}
        if "out" not in explicit:
            options["out"] = None  # a replay writes a new run directory
        info(f"replaying {config} (options given on the command line override it)")

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
        raise typer.Exit(EXIT_DIVERGED)
    if json_output:
        print_json(summary)
    if summary.get("stopped") == "interrupted":
        stderr().print(
            f"[yellow]interrupted[/yellow]: checkpoint saved; continue with "
            f"breastcnn train --resume {summary['run_dir']}",
            highlight=False,
        )
        raise typer.Exit(130)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was typed on the command line (not a default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"

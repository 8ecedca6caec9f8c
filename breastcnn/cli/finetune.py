"""`breastcnn finetune`: fine-tune VGG16/ResNet50/custom-keras, or continue training a saved NumPy model.

``--model vgg16|resnet50|custom-keras`` runs :func:`breastcnn.training.keras_loop.finetune_keras`
(TensorFlow, imported only on this path); ``--model RUN_DIR/model.npz`` runs
:func:`breastcnn.training.numpy_run.finetune_numpy` (NumPy only). Options whose defaults
differ between the paths default to None here and are resolved per path:
vgg16/resnet50 use the transfer-learning schedule, custom-keras and NumPy
models a training recipe (``--recipe``, default ``default``: the schedule of
``breastcnn train``, so that custom-keras and the NumPy engine train the same
network the same way).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from breastcnn.cli.common import jobs_option, print_json, stain_options, stderr, task_option
from breastcnn.cli.display import TrainingDisplay
from breastcnn.errors import UserInputError
from breastcnn.models import list_models, load_model
from breastcnn.models.keras_models import DEFAULT_TRAINABLE_LAYERS
from breastcnn.models.spec import DEFAULT_IMAGE_SIZE
from breastcnn.runs import resolve_model_path
from breastcnn.training.common import EXIT_DIVERGED, TrainingDiverged
from breastcnn.training.config import TrainConfig
from breastcnn.training.keras_loop import TRANSFER_DEFAULTS, TRANSFER_EPOCHS, default_weights, finetune_keras
from breastcnn.training.numpy_run import finetune_numpy
from breastcnn.training.recipes import DEFAULT_RECIPE, MONITORS

KERAS_MODELS = tuple(list_models(framework="keras"))

_STAIN = stain_options()

# Per-path defaults of the options that default to None on the command line
# (lr/batch size/patience/monitor of a recipe path come from the recipe).
KERAS_DEFAULTS = {
    "epochs": TRANSFER_EPOCHS,
    "batch_size": TRANSFER_DEFAULTS["batch_size"],
    "lr": TRANSFER_DEFAULTS["lr"],
    "image_size": DEFAULT_IMAGE_SIZE,
    "trainable_layers": DEFAULT_TRAINABLE_LAYERS,
}
CUSTOM_KERAS_DEFAULTS = {
    "epochs": TrainConfig.epochs,
    "image_size": DEFAULT_IMAGE_SIZE,
    "trainable_layers": DEFAULT_TRAINABLE_LAYERS,
}
NUMPY_DEFAULTS = {"epochs": TrainConfig.epochs, "batch_size": 32, "lr": 1e-3}
"""A saved NumPy model continues at a tenth of the default recipe's LR, in batches of 32."""
RECIPE_MODELS = ("custom-keras",)
"""Keras models trained with a recipe (the others keep the transfer-learning schedule)."""

EXIT_INTERRUPTED = 130


def finetune(
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help=f"{', '.join(KERAS_MODELS)} (Keras, needs the keras extra), or RUN_DIR/model.npz "
        "(continue training a saved NumPy model, e.g. a 200X model on a 400X split).",
    ),
    split: Path = typer.Option(Path(TrainConfig.split), "--split", help="Split directory (manifest.csv + split.json)."),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="Keras only: imagenet (default for vgg16/resnet50: the Keras cache $KERAS_HOME/models or "
        "~/.keras/models, else a download), none (random init; default for custom-keras), or PATH "
        "to a weights file.",
    ),
    trainable_layers: int | None = typer.Option(
        None,
        "--trainable-layers",
        help="Keras vgg16/resnet50: train the last N layers of the base (default 20, the report's). "
        "VGG16's base has only 19 layers, so 20 trains the whole network; the report's 7.08 M "
        "trainable parameters are --trainable-layers 4.",
    ),
    recipe: str | None = typer.Option(
        None,
        "--recipe",
        help="custom-keras and NumPy .npz models: the training recipe of 'breastcnn train' (default or report; "
        "default: default). vgg16/resnet50 use the transfer-learning schedule (no recipe).",
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", help="Maximum epochs (default: vgg16/resnet50 200, custom-keras and NumPy 5)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Batch size (default: vgg16/resnet50 64, NumPy 32, custom-keras the recipe's)."
    ),
    lr: float | None = typer.Option(
        None, "--lr", help="Adam learning rate (default: vgg16/resnet50 1e-4, NumPy 1e-3, custom-keras the recipe's)."
    ),
    patience: int | None = typer.Option(
        None,
        "--patience",
        help="Early stopping: validation passes without improvement (vgg16/resnet50: epochs, "
        "default 10; custom-keras and NumPy: evaluations, default: the recipe's patience).",
    ),
    patience_epochs: float | None = typer.Option(
        None,
        "--patience-epochs",
        help="custom-keras and NumPy: early-stopping patience in epochs (default: the recipe's).",
    ),
    l2: float | None = typer.Option(
        None, "--l2", help="custom-keras and NumPy: L2 factor on conv/dense kernels (default: the recipe's)."
    ),
    class_weights: str = typer.Option(TrainConfig.class_weights, "--class-weights", help="balanced or none."),
    image_size: int | None = typer.Option(
        None,
        "--image-size",
        help=f"Keras: input side (default {DEFAULT_IMAGE_SIZE}; custom-keras needs >= 51). NumPy: taken from the model.",
    ),
    monitor: str | None = typer.Option(
        None,
        "--monitor",
        help=f"Best-model metric: {', '.join(MONITORS)} "
        f"(default: vgg16/resnet50 {TRANSFER_DEFAULTS['monitor']}, custom-keras and NumPy the recipe's).",
    ),
    augment: bool = typer.Option(TrainConfig.augment, "--augment/--no-augment", help="Augment the training images."),
    task: str = task_option(),
    stain_norm: str = _STAIN["stain_norm"],
    stain_target: Path | None = _STAIN["stain_target"],
    stain_augment: bool | None = _STAIN["stain_augment"],
    out: Path | None = typer.Option(None, "--out", help="Run directory (default: a new runs/<model>-<timestamp>)."),
    seed: int = typer.Option(
        TrainConfig.seed, "--seed", help="Seeds Python, NumPy and TensorFlow (keras.utils.set_random_seed)."
    ),
    deterministic: bool = typer.Option(
        False, "--deterministic", help="Keras: also TensorFlow op determinism (slower; recorded in model.keras.json)."
    ),
    strategy: str = typer.Option(
        "default",
        "--strategy",
        help="Keras: default, or mirrored (tf.distribute.MirroredStrategy over all visible GPUs; CPU if none).",
    ),
    freeze: int | None = typer.Option(None, "--freeze", help="NumPy .npz only: freeze the first N layers (default 0)."),
    jobs: int = jobs_option("decoding images into the cache (processes)"),
    threads: int | None = typer.Option(
        None, "--threads", help="NumPy .npz only: engine threads (default: all available cores)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the run summary as one JSON document."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out directory."),
) -> None:
    """Fine-tune VGG16/ResNet50/custom-keras (Keras) or a saved NumPy model (.npz) on a split.

    Writes RUN_DIR/config.json, history.csv (same columns as `train`),
    training.png and the best model by --monitor (model.keras + model.keras.json,
    or model.npz).
    """
    opts = FinetuneOptions(
        model=model,
        split=split,
        weights=weights,
        trainable_layers=trainable_layers,
        recipe=recipe,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        patience_epochs=patience_epochs,
        l2=l2,
        class_weights=class_weights,
        image_size=image_size,
        monitor=monitor,
        augment=augment,
        out=out,
        seed=seed,
        deterministic=deterministic,
        strategy=strategy,
        freeze=freeze,
        jobs=jobs,
        threads=threads,
        force=force,
        task=task,
        stain_norm=stain_norm,
        stain_target=stain_target,
        stain_augment=stain_augment,
    )
    display = TrainingDisplay(quiet=json_output)
    try:
        if model in KERAS_MODELS:
            summary = _run_keras(opts, display)
        elif model.endswith(".npz") or Path(model).is_dir():
            summary = _run_numpy(opts, display)
        else:
            _unknown_model(model)
    except TrainingDiverged as exc:
        if json_output:
            print_json(exc.summary)
        stderr().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_DIVERGED) from None
    _report(summary, json_output)


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """The command's options as typed (None: the path's default)."""

    model: str
    split: Path
    weights: str | None
    trainable_layers: int | None
    recipe: str | None
    epochs: int | None
    batch_size: int | None
    lr: float | None
    patience: int | None
    patience_epochs: float | None
    l2: float | None
    class_weights: str
    image_size: int | None
    monitor: str | None
    augment: bool
    out: Path | None
    seed: int
    deterministic: bool
    strategy: str
    freeze: int | None
    jobs: int
    threads: int | None
    force: bool
    task: str
    stain_norm: str
    stain_target: Path | None
    stain_augment: bool | None

    def task_and_stain(self) -> dict:
        """``task``, ``stain_norm``, ``stain_target`` (a string or None) and ``stain_augment`` (None: the recipe's)."""
        return {
            "task": self.task,
            "stain_norm": self.stain_norm,
            "stain_target": None if self.stain_target is None else str(self.stain_target),
            "stain_augment": self.stain_augment,
        }

    def or_default(self, defaults: dict) -> dict:
        """``defaults`` with the options given on the command line in place of them."""
        return {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in defaults.items()}


def _unknown_model(model: str) -> None:
    hint = ""
    if model.endswith(".keras"):
        hint = " (fine-tuning a saved .keras model is not supported: start from vgg16/resnet50/custom-keras)"
    raise UserInputError(f"--model {model!r}: expected vgg16, resnet50, custom-keras or a NumPy model .npz{hint}")


def _refuse_options(opts: FinetuneOptions, arch: str) -> None:
    """Refuse the options that do not apply to Keras model ``arch``."""
    if opts.freeze is not None:
        raise UserInputError("--freeze applies to NumPy .npz models; for Keras models use --trainable-layers")
    if opts.threads is not None:
        raise UserInputError("--threads applies to NumPy .npz models; Keras models use TensorFlow's own thread pools")
    if arch in RECIPE_MODELS:
        return
    given = [
        flag
        for flag, value in (("--recipe", opts.recipe), ("--patience-epochs", opts.patience_epochs), ("--l2", opts.l2))
        if value is not None
    ]
    if given:
        raise UserInputError(
            f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to custom-keras and NumPy .npz models; "
            f"{arch} uses the transfer-learning schedule (--patience in epochs, ReduceLROnPlateau)"
        )


def _run_keras(opts: FinetuneOptions, display) -> dict:
    arch = opts.model
    _refuse_options(opts, arch)
    if arch in RECIPE_MODELS:
        resolved = opts.or_default(CUSTOM_KERAS_DEFAULTS)
        resolved.update(
            batch_size=opts.batch_size, lr=opts.lr, patience=opts.patience, monitor=opts.monitor
        )  # None: the recipe's
        recipe_options = {k: getattr(opts, k) for k in ("patience_epochs", "l2") if getattr(opts, k) is not None}
        recipe = opts.recipe or DEFAULT_RECIPE
    else:
        resolved = opts.or_default(KERAS_DEFAULTS)
        resolved.update(
            patience=opts.patience if opts.patience is not None else TRANSFER_DEFAULTS["patience"],
            monitor=opts.monitor or TRANSFER_DEFAULTS["monitor"],
        )
        recipe_options, recipe = None, None
    resolved["weights"] = opts.weights if opts.weights is not None else default_weights(arch)
    recorded = {
        "model": arch,
        "split": str(opts.split),
        "out": None if opts.out is None else str(opts.out),
        "class_weights": opts.class_weights,
        "augment": opts.augment,
        "seed": opts.seed,
        "deterministic": opts.deterministic,
        "strategy": opts.strategy,
        "jobs": opts.jobs,
        **resolved,
        **opts.task_and_stain(),
    }
    return finetune_keras(
        arch,
        opts.split,
        opts.out,
        weights=resolved["weights"],
        trainable_layers=resolved["trainable_layers"],
        epochs=resolved["epochs"],
        batch_size=resolved["batch_size"],
        lr=resolved["lr"],
        patience=resolved["patience"],
        class_weights=opts.class_weights,
        image_size=resolved["image_size"],
        monitor=resolved["monitor"],
        augment=opts.augment,
        seed=opts.seed,
        deterministic=opts.deterministic,
        strategy=opts.strategy,
        jobs=opts.jobs,
        force=opts.force,
        callback=display,
        options=recorded,
        recipe=recipe,
        recipe_options=recipe_options,
        **opts.task_and_stain(),
    )


def _run_numpy(opts: FinetuneOptions, display) -> dict:
    keras_only = {
        "--weights": opts.weights is not None,
        "--trainable-layers": opts.trainable_layers is not None,
        "--deterministic": opts.deterministic,
        "--strategy": opts.strategy != "default",
    }
    given = [name for name, used in keras_only.items() if used]
    if given:
        raise UserInputError(
            f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to Keras models "
            f"(vgg16/resnet50/custom-keras), not to --model {opts.model}"
        )
    model_path = resolve_model_path(opts.model)
    if model_path.suffix != ".npz":
        raise UserInputError(f"--model {opts.model}: {model_path} is not a NumPy .npz model")
    resolved = opts.or_default(NUMPY_DEFAULTS)
    config = TrainConfig(
        split=str(opts.split),
        out=None if opts.out is None else str(opts.out),
        recipe=opts.recipe or DEFAULT_RECIPE,
        epochs=resolved["epochs"],
        batch_size=resolved["batch_size"],
        lr=resolved["lr"],
        l2=opts.l2,
        patience=opts.patience,
        patience_epochs=opts.patience_epochs,
        class_weights=opts.class_weights,
        monitor=opts.monitor,
        augment=opts.augment,
        seed=opts.seed,
        jobs=opts.jobs,
        threads=opts.threads,
        force=opts.force,
        **opts.task_and_stain(),
    )
    model = load_model(model_path)  # read once: checked here, then trained
    size = model.meta.get("image_size")
    if opts.image_size is not None and size is not None and int(size) != opts.image_size:
        raise UserInputError(
            f"--image-size {opts.image_size}: {model_path} takes {size}x{size} images (leave --image-size out)"
        )
    return finetune_numpy(model_path, config, freeze=opts.freeze or 0, progress_callbacks=[display], model=model)


def _report(summary: dict, json_output: bool) -> None:
    """Like `train`: the summary on stdout with --json; the display has already told the rest on stderr."""
    if json_output:
        print_json(summary)
    if summary.get("stopped") == "interrupted":
        stderr().print(
            f"[yellow]interrupted[/yellow]: the best model so far is in {summary.get('run_dir')}", highlight=False
        )
        raise typer.Exit(EXIT_INTERRUPTED)

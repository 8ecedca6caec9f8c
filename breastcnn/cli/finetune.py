"""`breastcnn finetune`: fine-tune VGG16/ResNet50/custom-keras, or continue training a saved NumPy model.

``--model vgg16|resnet50|custom-keras`` runs :func:`breastcnn.models.keras_train.finetune_keras`
(TensorFlow, imported only on this path); ``--model RUN_DIR/model.npz`` runs
:func:`breastcnn.train.finetune_numpy` (NumPy only). Options whose defaults
differ between the two paths default to None here and are resolved per path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from breastcnn.cli.common import jobs_option, print_json, stderr
from breastcnn.errors import UserInputError

KERAS_MODELS = ("vgg16", "resnet50", "custom-keras")

# Per-path defaults of the options that default to None on the command line.
KERAS_DEFAULTS = {"epochs": 200, "batch_size": 64, "lr": 1e-4, "image_size": 224, "trainable_layers": 20}
NUMPY_DEFAULTS = {"epochs": 5, "batch_size": 32, "lr": 1e-3}

EXIT_INTERRUPTED = 130


def finetune(
    model: str = typer.Option(
        ..., "--model", "-m",
        help="vgg16, resnet50 or custom-keras (Keras, needs the keras extra), or RUN_DIR/model.npz "
        "(continue training a saved NumPy model, e.g. a 200X model on a 400X split).",
    ),
    split: Path = typer.Option(Path("splits/200X"), "--split", help="Split directory (manifest.csv + split.json)."),
    weights: Optional[str] = typer.Option(
        None, "--weights",
        help="Keras only: imagenet (default for vgg16/resnet50: the Keras cache $KERAS_HOME/models or "
        "~/.keras/models, else a download), none (random init; default for custom-keras), or PATH "
        "to a weights file.",
    ),
    trainable_layers: Optional[int] = typer.Option(
        None, "--trainable-layers",
        help="Keras vgg16/resnet50: train the last N layers of the base (default 20, the report's). "
        "VGG16's base has only 19 layers, so 20 trains the whole network; the report's 7.08 M "
        "trainable parameters are --trainable-layers 4.",
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum epochs (default: Keras 200, NumPy 5)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: Keras 64, NumPy 32)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default: Keras 1e-4, NumPy 1e-3)."),
    patience: int = typer.Option(
        10, "--patience", help="Early stopping: validation passes without improvement (Keras: epochs)."
    ),
    class_weights: str = typer.Option("balanced", "--class-weights", help="balanced or none."),
    image_size: Optional[int] = typer.Option(
        None, "--image-size",
        help="Keras: input side (default 224; custom-keras needs >= 51). NumPy: taken from the model.",
    ),
    monitor: str = typer.Option("val_accuracy", "--monitor", help="Best-model metric: val_accuracy, val_f1 or val_recall."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Augment the training images."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: a new runs/<model>-<timestamp>)."),
    seed: int = typer.Option(0, "--seed", help="Seeds Python, NumPy and TensorFlow (keras.utils.set_random_seed)."),
    deterministic: bool = typer.Option(
        False, "--deterministic", help="Keras: also TensorFlow op determinism (slower; recorded in model.keras.json)."
    ),
    strategy: str = typer.Option(
        "default", "--strategy",
        help="Keras: default, or mirrored (tf.distribute.MirroredStrategy over all visible GPUs; CPU if none).",
    ),
    freeze: Optional[int] = typer.Option(
        None, "--freeze", help="NumPy .npz only: freeze the first N layers (default 0)."
    ),
    jobs: int = jobs_option("decoding images into the cache (processes)"),
    threads: Optional[int] = typer.Option(
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
    opts = dict(locals())  # every option, by parameter name
    from breastcnn.cli.display import TrainingDisplay
    from breastcnn.train import EXIT_DIVERGED, TrainingDiverged

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
        raise typer.Exit(EXIT_DIVERGED)
    _report(summary, json_output)


def _unknown_model(model: str) -> None:
    hint = ""
    if model.endswith(".keras"):
        hint = " (fine-tuning a saved .keras model is not supported: start from vgg16/resnet50/custom-keras)"
    raise UserInputError(f"--model {model!r}: expected vgg16, resnet50, custom-keras or a NumPy model .npz{hint}")


def _run_keras(opts: dict, display) -> dict:
    if opts["freeze"] is not None:
        raise UserInputError("--freeze applies to NumPy .npz models; for Keras models use --trainable-layers")
    if opts["threads"] is not None:
        raise UserInputError("--threads applies to NumPy .npz models; Keras models use TensorFlow's own thread pools")
    from breastcnn.models.keras_models import require_keras

    require_keras()  # MissingDependencyError (exit 2) with the install command when TF is absent
    from breastcnn.models.keras_train import default_weights, finetune_keras

    resolved = {k: (opts[k] if opts[k] is not None else v) for k, v in KERAS_DEFAULTS.items()}
    arch = opts["model"]
    resolved["weights"] = opts["weights"] if opts["weights"] is not None else default_weights(arch)
    recorded = {
        "model": arch, "split": str(opts["split"]), "out": None if opts["out"] is None else str(opts["out"]),
        "class_weights": opts["class_weights"], "patience": opts["patience"],
        "monitor": opts["monitor"], "augment": opts["augment"], "seed": opts["seed"],
        "deterministic": opts["deterministic"], "strategy": opts["strategy"], "jobs": opts["jobs"], **resolved,
    }
    return finetune_keras(
        arch, opts["split"], opts["out"],
        weights=resolved["weights"], trainable_layers=resolved["trainable_layers"], epochs=resolved["epochs"],
        batch_size=resolved["batch_size"], lr=resolved["lr"], patience=opts["patience"],
        class_weights=opts["class_weights"], image_size=resolved["image_size"], monitor=opts["monitor"],
        augment=opts["augment"], seed=opts["seed"], deterministic=opts["deterministic"],
        strategy=opts["strategy"], jobs=opts["jobs"], force=opts["force"], callback=display, options=recorded,
    )


def _run_numpy(opts: dict, display) -> dict:
    keras_only = {
        "--weights": opts["weights"] is not None,
        "--trainable-layers": opts["trainable_layers"] is not None,
        "--deterministic": opts["deterministic"],
        "--strategy": opts["strategy"] != "default",
    }
    given = [name for name, used in keras_only.items() if used]
    if given:
        raise UserInputError(
            f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to Keras models "
            f"(vgg16/resnet50/custom-keras), not to --model {opts['model']}"
        )
    from breastcnn.runs import resolve_model_path
    from breastcnn.train import TrainConfig, finetune_numpy

    model_path = resolve_model_path(opts["model"])
    if model_path.suffix != ".npz":
        raise UserInputError(f"--model {opts['model']}: {model_path} is not a NumPy .npz model")
    resolved = {k: (opts[k] if opts[k] is not None else v) for k, v in NUMPY_DEFAULTS.items()}
    config = TrainConfig(
        split=str(opts["split"]), out=None if opts["out"] is None else str(opts["out"]),
        epochs=resolved["epochs"], batch_size=resolved["batch_size"], lr=resolved["lr"],
        patience=opts["patience"], class_weights=opts["class_weights"], monitor=opts["monitor"],
        augment=opts["augment"], seed=opts["seed"], jobs=opts["jobs"], threads=opts["threads"], force=opts["force"],
    )
    if opts["image_size"] is not None:
        from breastcnn.models import load_model

        size = load_model(model_path).meta.get("image_size")
        if size is not None and int(size) != opts["image_size"]:
            raise UserInputError(
                f"--image-size {opts['image_size']}: {model_path} takes {size}x{size} images (leave --image-size out)"
            )
    return finetune_numpy(model_path, config, freeze=opts["freeze"] or 0, progress_callbacks=[display])


def _report(summary: dict, json_output: bool) -> None:
    """Like `train`: the summary on stdout with --json; the display has already told the rest on stderr."""
    if json_output:
        print_json(summary)
    if summary.get("stopped") == "interrupted":
        stderr().print(
            f"[yellow]interrupted[/yellow]: the best model so far is in {summary.get('run_dir')}", highlight=False
        )
        raise typer.Exit(EXIT_INTERRUPTED)

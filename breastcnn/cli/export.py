"""`breastcnn export`: convert a model between NumPy (.npz) and Keras (.keras), or NumPy to ONNX (.onnx).

Weights are copied layer by layer (``breastcnn.models.convert``), and the
metadata (the model's spec: classes, preprocessing, image size; built by
``models.keras_models.keras_from_numpy`` / ``numpy_from_keras``) travels along, so the exported
model predicts the same probabilities (atol 1e-4) with the same preprocessing.
``--to numpy`` takes custom-keras models only: the NumPy engine runs the
report's custom architecture. ``--to onnx`` writes one ONNX file (BatchNorm
folded, opset and metadata inside; ``breastcnn.models.onnx_export``) that ONNX
Runtime runs with the same probabilities.
"""

from __future__ import annotations

from pathlib import Path

import typer

from breastcnn.cli.common import info, print_json, stdout
from breastcnn.errors import UserInputError
from breastcnn.fsutil import check_overwrite
from breastcnn.models import load_model, model_spec, save_model
from breastcnn.models.keras_models import keras_from_numpy, numpy_from_keras, require_keras, sidecar_path
from breastcnn.models.onnx_export import export_onnx, require_onnx
from breastcnn.runs import resolve_model_path

TARGETS = ("keras", "numpy", "onnx")


def export(
    model: Path = typer.Option(
        ..., "--model", "-m", help="Model to convert: RUN_DIR/model.npz, model.keras, or a run directory."
    ),
    to: str = typer.Option(
        ...,
        "--to",
        help="Target format: keras (.npz -> .keras), numpy (custom-keras .keras -> .npz) or onnx (.npz -> .onnx).",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Output file: .keras for --to keras (its metadata OUT.json, e.g. b.keras.json, is "
        "written beside it), .npz for --to numpy, .onnx for --to onnx.",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
) -> None:
    """Convert a model between NumPy (.npz) and Keras (.keras), or NumPy to ONNX; all predict the same probabilities."""
    if to not in TARGETS:
        raise UserInputError(f"--to must be one of {', '.join(TARGETS)}, received {to!r}")
    source = resolve_model_path(model)
    if to == "keras":
        result = _numpy_to_keras(source, out, force)
    elif to == "onnx":
        result = _numpy_to_onnx(source, out, force)
    else:
        result = _keras_to_numpy(source, out, force)
    if json_output:
        print_json(result)
    else:
        info(f"exported {result['from']} ({result['source_framework']}) -> {result['out']} ({to})")
        stdout().print(result["out"], highlight=False, soft_wrap=True)


def _numpy_to_keras(source: Path, out: Path, force: bool) -> dict:
    if source.suffix != ".npz":
        raise UserInputError(f"--model {source}: --to keras converts a NumPy .npz model")
    if out.suffix != ".keras":
        raise UserInputError(f"--out {out}: a Keras model file must end in .keras")
    check_overwrite(out, force)
    check_overwrite(sidecar_path(out), force)
    require_keras()
    classifier = keras_from_numpy(load_model(source), source=source)
    save_model(classifier, out)
    return {
        "from": str(source),
        "out": str(out),
        "sidecar": str(sidecar_path(out)),
        "to": "keras",
        "source_framework": "numpy",
        "arch": classifier.spec.arch,
        "params": classifier.count_params(),
    }


def _keras_to_numpy(source: Path, out: Path, force: bool) -> dict:
    if source.suffix != ".keras":
        raise UserInputError(f"--model {source}: --to numpy converts a Keras .keras model")
    if out.suffix != ".npz":
        raise UserInputError(f"--out {out}: a NumPy model file must end in .npz")
    check_overwrite(out, force)
    numpy_model = numpy_from_keras(load_model(source), source=source)
    save_model(numpy_model, out)
    return {
        "from": str(source),
        "out": str(out),
        "to": "numpy",
        "source_framework": "keras",
        "arch": model_spec(numpy_model).arch,
        "params": numpy_model.count_params(),
    }


def _numpy_to_onnx(source: Path, out: Path, force: bool) -> dict:
    if source.suffix != ".npz":
        raise UserInputError(f"--model {source}: --to onnx converts a NumPy .npz model")
    if out.suffix != ".onnx":
        raise UserInputError(f"--out {out}: an ONNX model file must end in .onnx")
    check_overwrite(out, force)
    require_onnx()
    numpy_model = load_model(source)
    written = export_onnx(numpy_model, out, source=source)
    return {
        "from": str(source),
        "out": str(out),
        "to": "onnx",
        "source_framework": "numpy",
        "arch": model_spec(numpy_model).arch,
        "params": numpy_model.count_params(),
        **written,
    }

"""`breastcnn export`: convert a model between NumPy (.npz) and Keras (.keras), or NumPy to ONNX (.onnx).

Weights are copied layer by layer (``breastcnn.models.convert``), and the
metadata (classes, preprocessing, image size) travels along, so the exported
model predicts the same probabilities (atol 1e-4) with the same preprocessing.
``--to numpy`` takes custom-keras models only: the NumPy engine runs the
report's custom architecture. ``--to onnx`` writes one ONNX file (BatchNorm
folded, opset and metadata inside; ``breastcnn.models.onnx_export``) that ONNX
Runtime runs with the same probabilities.
"""

from __future__ import annotations

from pathlib import Path

import typer

from breastcnn import CLASSES
from breastcnn.cli.common import info, print_json, stdout
from breastcnn.errors import UserInputError
from breastcnn.fsutil import check_overwrite

TARGETS = ("keras", "numpy", "onnx")
NUMPY_EXPORTABLE = ("custom-keras", "custom")
"""Keras architectures ``--to numpy`` accepts (a custom model exported to Keras is arch custom-keras)."""


def export(
    model: Path = typer.Option(..., "--model", "-m", help="Model to convert: RUN_DIR/model.npz, model.keras, or a run directory."),
    to: str = typer.Option(..., "--to", help="Target format: keras (.npz -> .keras), numpy (custom-keras .keras -> .npz) or onnx (.npz -> .onnx)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file: .keras for --to keras (its metadata OUT.json, e.g. b.keras.json, "
                                                   "is written beside it), .npz for --to numpy, .onnx for --to onnx."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
) -> None:
    """Convert a model between NumPy (.npz) and Keras (.keras), or NumPy to ONNX; all predict the same probabilities."""
    from breastcnn.runs import resolve_model_path

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
    from breastcnn.explain import choose_gradcam_layer
    from breastcnn.models.keras_models import KerasClassifier, library_versions, require_keras, sidecar_path

    if source.suffix != ".npz":
        raise UserInputError(f"--model {source}: --to keras converts a NumPy .npz model")
    if out.suffix != ".keras":
        raise UserInputError(f"--out {out}: a Keras model file must end in .keras")
    check_overwrite(out, force)
    check_overwrite(sidecar_path(out), force)
    require_keras()
    from breastcnn.models import load_model
    from breastcnn.models.convert import to_keras

    numpy_model = load_model(source)
    kmodel = to_keras(numpy_model)
    meta = dict(numpy_model.meta)
    meta.update({
        "arch": "custom-keras",  # the NumPy engine builds the custom architecture (and variants) only
        "source_arch": numpy_model.meta.get("arch"),
        "image_size": int(numpy_model.input_shape[0]),
        "exported_from": str(source),
        "gradcam_layer": choose_gradcam_layer(kmodel),  # the NumPy model's default: same map on both sides
        "versions": library_versions(),
    })
    meta.setdefault("preprocess", "caffe")
    meta.setdefault("classes", list(CLASSES))
    classifier = KerasClassifier(kmodel, meta)
    classifier.save(out)
    return {"from": str(source), "out": str(out), "sidecar": str(sidecar_path(out)), "to": "keras",
            "source_framework": "numpy", "arch": meta["arch"], "params": classifier.count_params()}


def _keras_to_numpy(source: Path, out: Path, force: bool) -> dict:
    if source.suffix != ".keras":
        raise UserInputError(f"--model {source}: --to numpy converts a Keras .keras model")
    if out.suffix != ".npz":
        raise UserInputError(f"--out {out}: a NumPy model file must end in .npz")
    check_overwrite(out, force)
    from breastcnn.models.convert import from_keras
    from breastcnn.models.keras_models import load_keras_model

    classifier = load_keras_model(source)
    arch = classifier.meta.get("arch")
    if arch not in NUMPY_EXPORTABLE:
        raise UserInputError(
            f"--model {source}: --to numpy exports custom-keras models only (the NumPy engine runs the "
            f"report's custom architecture), this one is {arch!r}"
        )
    keep = {k: v for k, v in classifier.meta.items()
            if k not in ("format", "framework", "model_file", "gradcam_layer", "versions")}
    keep.update({"arch": "custom", "exported_from": str(source)})
    numpy_model = from_keras(classifier.model, meta=keep)
    numpy_model.save(out)
    params = numpy_model.count_params()
    return {"from": str(source), "out": str(out), "to": "numpy", "source_framework": "keras",
            "arch": "custom", "params": params}


def _numpy_to_onnx(source: Path, out: Path, force: bool) -> dict:
    if source.suffix != ".npz":
        raise UserInputError(f"--model {source}: --to onnx converts a NumPy .npz model")
    if out.suffix != ".onnx":
        raise UserInputError(f"--out {out}: an ONNX model file must end in .onnx")
    check_overwrite(out, force)
    from breastcnn.models import load_model
    from breastcnn.models.onnx_export import export_onnx, require_onnx

    require_onnx()
    numpy_model = load_model(source)
    written = export_onnx(numpy_model, out, source=source)
    return {"from": str(source), "out": str(out), "to": "onnx", "source_framework": "numpy",
            "arch": numpy_model.meta.get("arch", "custom"), "params": numpy_model.count_params(), **written}

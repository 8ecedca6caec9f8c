"""`breastcnn featuremaps`: Plot feature maps and Grad-CAM for one image.

Writes into ``--out`` (default ``./featuremaps/<image name>/``, in the current
directory rather than next to the model, so a shared or read-only run
directory is never written to): ``input.png``, one ``NN_<conv layer>.png``
grid per conv layer, and with ``--gradcam`` ``gradcam.png``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from breastcnn import explain
from breastcnn.cli.common import info, print_json, print_table
from breastcnn.data.tasks import SUBTYPE_CLASSES
from breastcnn.errors import UserInputError
from breastcnn.fsutil import check_overwrite
from breastcnn.models import load_model
from breastcnn.runs import resolve_model_path

DEFAULT_OUT_ROOT = Path("featuremaps")


def featuremaps(
    image: Path = typer.Argument(..., metavar="IMAGE", help="The image (PNG/JPEG/TIFF) to look at."),
    model: Path | None = typer.Option(
        None, "--model", help="Model file or run directory (default: the model of ./runs/latest)."
    ),
    layers: list[str] | None = typer.Option(
        None, "--layers", help="Conv layers to plot (repeat or comma-separate; default: every conv layer)."
    ),
    gradcam: bool = typer.Option(False, "--gradcam", help="Also write the Grad-CAM overlay (gradcam.png)."),
    which_class: str = typer.Option(
        "predicted",
        "--class",
        help="Class Grad-CAM explains: predicted, or one of the model's classes (benign, "
        "malignant; a subtype model's subtypes, e.g. ductal_carcinoma).",
    ),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: ./featuremaps/<image name>/)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Plot every conv layer's feature maps (and Grad-CAM) for one image."""
    summary = run_featuremaps(
        image, model=model, layers=layers, gradcam=gradcam, which_class=which_class, out=out, force=force
    )
    if as_json:
        print_json(summary)
        return
    print_summary(summary)


def run_featuremaps(
    image: Path,
    model=None,
    layers=None,
    gradcam: bool = False,
    which_class: str = "predicted",
    out: Path | None = None,
    force: bool = False,
) -> dict:
    """Check the arguments, load the model, write the PNGs; returns :func:`explain.explain_image`'s summary."""
    image = Path(image)
    if not image.is_file():
        raise UserInputError(f"IMAGE {image}: no such file")
    known = (*explain.CLASS_CHOICES, *SUBTYPE_CLASSES)
    if which_class not in known:
        raise UserInputError(f"--class must be one of {', '.join(known)}, got {which_class!r}")
    names = [part.strip() for item in (layers or []) for part in item.split(",") if part.strip()] or None
    out_dir = Path(out) if out is not None else DEFAULT_OUT_ROOT / image.stem
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out {out_dir} exists and is not a directory")
    check_overwrite(out_dir, force)
    path = resolve_model_path(model)
    info(f"model: {path}")
    loaded = load_model(path)
    classes = loaded.spec.classes
    if which_class != "predicted" and which_class not in classes:  # before anything is written
        raise UserInputError(f"--class {which_class}: {path} predicts {', '.join(classes)} (or use predicted)")
    summary = explain.explain_image(loaded, image, out_dir, layers=names, with_gradcam=gradcam, which_class=which_class)
    summary["model_file"] = str(path)
    summary["out"] = str(out_dir)
    return summary


def print_summary(summary: dict) -> None:
    """The prediction and the files written, as a rich table on stdout."""
    probs = ", ".join(f"{c} {p:.3f}" for c, p in summary["probabilities"].items())
    table = Table(title=f"{summary['image']}: predicted {summary['predicted']} ({probs})", title_justify="left")
    table.add_column("plot")
    table.add_column("file")
    files = list(summary["files"])
    table.add_row("input", files[0])
    # files: the input, one per layer, then the Grad-CAM overlay when asked for (its own row below)
    for layer, file in zip(summary["layers"], files[1:], strict=False):
        table.add_row(f"feature maps {layer}", file)
    if summary.get("gradcam"):
        g = summary["gradcam"]
        table.add_row(f"Grad-CAM ({g['class']}, {g['layer']}, {g['shape'][0]}x{g['shape'][1]})", g["file"])
    print_table(table)

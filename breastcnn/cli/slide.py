"""`breastcnn slide`: classify the tissue tiles of whole-slide images."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from breastcnn.cli.common import make_progress, print_json, print_table, stderr, warn, warn_threads_ignored
from breastcnn.cluster import LocalExecutor, connect, scheduler_address
from breastcnn.errors import BreastCNNError, UserInputError
from breastcnn.models import load_model
from breastcnn.runs import resolve_model_path
from breastcnn.wsi.analysis import SlideSettings, analyse_slide, existing_outputs, output_dirs
from breastcnn.wsi.magnification import model_magnification
from breastcnn.wsi.tissue import require_skimage

_DEFAULTS = SlideSettings()


def slide(
    slides: list[Path] = typer.Argument(
        ..., help="Whole-slide files (.svs, .ndpi, .mrxs, ... via OpenSlide; pyramidal or plain TIFF; PNG/JPEG)."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="Model file (.npz/.keras/.onnx) or run directory (default: runs/latest)."
    ),
    mag: str | None = typer.Option(
        None,
        "--mag",
        help="The slide's level-0 magnification, BreakHis style "
        "(200X = 20x objective = 0.5 um/px); overrides the file's metadata.",
    ),
    mpp: float | None = typer.Option(
        None, "--mpp", help="The slide's level-0 microns per pixel; overrides the file's metadata."
    ),
    tile: int = typer.Option(_DEFAULTS.tile, "--tile", help="Tile side in pixels at the model's magnification."),
    stride: int | None = typer.Option(
        None,
        "--stride",
        help="Step between tiles in pixels at the model's magnification (default: --tile, no overlap).",
    ),
    tissue_threshold: float = typer.Option(
        _DEFAULTS.tissue_threshold,
        "--tissue-threshold",
        help="Least tissue fraction of a tile for it to be classified.",
    ),
    threshold: float = typer.Option(
        _DEFAULTS.threshold, "--threshold", help="Label a tile malignant when P(malignant) >= this."
    ),
    batch_size: int = typer.Option(_DEFAULTS.batch_size, "--batch-size", help="Tiles per model call."),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="Engine threads of a NumPy model (default: all "
        "available cores; Keras models use TensorFlow's own thread pools).",
    ),
    out: Path = typer.Option(Path("slides"), "--out", help="Output folder: one sub-folder per slide."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON array: one summary object per slide."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Overwrite tiles.csv/heatmap.png/summary.json of an earlier run (other files are left alone).",
    ),
    scheduler: str | None = typer.Option(
        None,
        "--scheduler",
        envvar="BREASTCNN_SCHEDULER",
        help="dask.distributed scheduler address (tcp://host:8786): "
        "classify the tiles on its workers (env BREASTCNN_SCHEDULER).",
    ),
) -> None:
    """Classify the tissue tiles of whole-slide images.

    Per slide, reads the pyramid level matching the model's magnification,
    finds tissue on a thumbnail (Otsu on saturation), classifies the tissue
    tiles in streamed batches and writes OUT/<slide>/tiles.csv
    (x,y,level,width,height,probability,label), heatmap.png and summary.json.
    A slide that cannot be read gets an error line naming it, the others are
    still processed, and the exit code is 1 at the end (2 for bad options or a
    missing model).
    """
    settings = SlideSettings(
        tile=tile,
        stride=stride,
        tissue_threshold=tissue_threshold,
        threshold=threshold,
        batch_size=batch_size,
        mpp=mpp,
        mag=mag,
        threads=threads,
    ).validated()
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a directory")
    require_skimage()
    model_path = resolve_model_path(model)
    classifier = load_model(model_path)
    warn_threads_ignored(classifier, threads)
    model_resolution = model_magnification(classifier, model_path)
    if model_resolution.assumed:
        warn(f"the model's magnification is {model_resolution.source}")
    folders = output_dirs([str(s) for s in slides], out)
    if not force:
        _refuse_existing(folders)

    address = scheduler_address(scheduler)
    summaries: list[dict] = []
    errors = 0
    with contextlib.ExitStack() as stack:
        executor = stack.enter_context(connect(address)) if address else LocalExecutor()
        progress = stack.enter_context(make_progress(json_output))
        for path, folder in zip(slides, folders, strict=True):
            task = progress.add_task(escape(path.name), total=None)

            def on_start(layout, task=task, path=path):
                progress.update(task, total=len(layout.tissue))
                if layout.resolution.assumed:
                    warn(f"{escape(str(path))}: resolution {layout.resolution.source}")

            try:
                summary = analyse_slide(
                    path,
                    classifier,
                    folder,
                    settings,
                    model_resolution,
                    executor=executor,
                    model_path=model_path,
                    on_start=on_start,
                    progress=lambda k, task=task: progress.advance(task, k),
                )
            except (BreastCNNError, ValueError, OSError) as exc:
                message = _error_message(path, exc)
                stderr().print(f"[red]error:[/red] {escape(message)}", highlight=False)
                summaries.append({"slide": str(path), "error": message})
                errors += 1
                continue
            summaries.append(summary)
    if json_output:
        print_json(summaries)
    else:
        _print_table([s for s in summaries if "error" not in s])
    if errors:
        stderr().print(f"[red]{errors} slide(s) could not be processed[/red]", highlight=False)
        raise typer.Exit(1)


def _refuse_existing(folders: list[Path]) -> None:
    """Without --force, an earlier run's outputs in any slide's folder are refused, naming the first."""
    for folder in folders:
        taken = existing_outputs(folder)
        if taken:
            raise UserInputError(f"{taken[0]} already exists; pass --force to overwrite it")


def _error_message(path: Path, exc: Exception) -> str:
    """One line naming the slide."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return message if str(path) in message else f"{path}: {message}"


def _print_table(summaries: list[dict]) -> None:
    table = Table(title=f"{len(summaries)} slide(s)")
    table.add_column("slide", overflow="fold")
    table.add_column("level", justify="right")
    table.add_column("tiles", justify="right")
    table.add_column("tissue tiles", justify="right")
    table.add_column("malignant", justify="right")
    table.add_column("max P", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("outputs", overflow="fold")
    for s in summaries:
        fraction = "-" if s["malignant_fraction"] is None else f"{s['malignant_fraction']:.1%}"
        top = "-" if s["max_probability"] is None else f"{s['max_probability']:.4f}"
        table.add_row(
            escape(Path(s["slide"]).name),
            str(s["level"]),
            str(s["tiles"]),
            str(s["tissue_tiles"]),
            fraction,
            top,
            f"{s['seconds']:.1f}",
            escape(s["out"]),
        )
    print_table(table)

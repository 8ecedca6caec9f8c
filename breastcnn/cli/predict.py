"""`breastcnn predict`: Classify images with a trained model."""

from __future__ import annotations

import contextlib
import csv
import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from breastcnn.cli.common import (
    jobs_option,
    make_progress,
    print_json,
    print_table,
    stderr,
    warn_threads_ignored,
)
from breastcnn.cluster import connect, predict_paths_distributed, scheduler_address
from breastcnn.errors import UserInputError
from breastcnn.inference import check_threads, collect_images, csv_cell, predict_paths
from breastcnn.models import load_model
from breastcnn.runs import resolve_model_path


def predict(
    images: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) or glob patterns."),
    model: Path | None = typer.Option(
        None, "--model", help="Model file (.npz/.keras) or run directory (default: runs/latest)."
    ),
    threshold: float = typer.Option(0.5, "--threshold", help="Label malignant when P(malignant) >= this."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON array of {path, label, probability}."),
    csv_output: bool = typer.Option(False, "--csv", help="Print CSV: path,label,probability."),
    jobs: int = jobs_option("decoding the images (threads)"),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per model call."),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="Engine threads of a NumPy model (default: all available cores; Keras models use "
        "TensorFlow's own thread pools).",
    ),
    scheduler: str | None = typer.Option(
        None,
        "--scheduler",
        envvar="BREASTCNN_SCHEDULER",
        help="dask.distributed scheduler address (tcp://host:8786): classify "
        "on its workers, --jobs ignored (env BREASTCNN_SCHEDULER).",
    ),
) -> None:
    """Classify images with a trained model.

    Prints path, label (benign/malignant) and the probability of malignant per
    image: a table by default, --json or --csv for scripts. Images stream in
    parallel batches, so thousands of files use bounded memory. A file that
    cannot be read gets an error line on stderr naming it, the others are
    still classified, and the exit code is 1 at the end (2 for bad options or
    a missing model).
    """
    _check_options(json_output, csv_output, threshold, batch_size, jobs, threads)
    model_path = resolve_model_path(model)
    classifier = load_model(model_path)
    warn_threads_ignored(classifier, threads)
    paths, problems = collect_images(images)
    errors = 0
    for problem in problems:
        _error_line(problem.error)
        errors += 1

    results = []
    writer = None
    if csv_output:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["path", "label", "probability"])
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(make_progress(json_output or csv_output))
        task = progress.add_task("classifying", total=len(paths))
        advance = lambda k: progress.advance(task, k)  # noqa: E731
        address = scheduler_address(scheduler)
        if address:  # the same batches on a dask cluster (breastcnn.cluster)
            executor = stack.enter_context(connect(address))
            stream = predict_paths_distributed(
                executor,
                classifier,
                model_path,
                paths,
                threshold=threshold,
                batch_size=batch_size,
                progress=advance,
                threads=threads,
            )
        else:
            stream = predict_paths(
                classifier,
                paths,
                threshold=threshold,
                batch_size=batch_size,
                jobs=jobs,
                progress=advance,
                threads=threads,
            )
        for result in stream:
            if result.error is not None:
                _error_line(result.error)
                errors += 1
            elif writer is not None:
                writer.writerow([csv_cell(result.path), result.label, f"{result.probability:.6f}"])
                sys.stdout.flush()
            else:
                results.append(result.as_dict())
    if json_output:
        print_json(results)
    elif not csv_output:
        _print_results(results, threshold)
    if errors:
        stderr().print(f"[red]{errors} input(s) could not be classified[/red]", highlight=False)
        raise typer.Exit(1)


def _check_options(
    json_output: bool, csv_output: bool, threshold: float, batch_size: int, jobs: int, threads: int | None
) -> None:
    if json_output and csv_output:
        raise UserInputError("--json and --csv are exclusive; pick one")
    if not 0.0 <= threshold <= 1.0:
        raise UserInputError(f"--threshold must be in [0, 1], got {threshold}")
    if batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {batch_size}")
    if jobs == 0 or jobs < -1:
        raise UserInputError(f"--jobs must be >= 1 (or -1 for all cores), got {jobs}")
    check_threads(threads)


def _print_results(results: list[dict], threshold: float) -> None:
    table = Table(title=f"{len(results)} image(s), threshold {threshold:g}")
    table.add_column("path", overflow="fold")
    table.add_column("label")
    table.add_column("P(malignant)", justify="right")
    for row in results:
        colour = "red" if row["label"] == "malignant" else "green"
        table.add_row(escape(row["path"]), f"[{colour}]{row['label']}[/{colour}]", f"{row['probability']:.4f}")
    print_table(table)


def _error_line(message: str) -> None:
    stderr().print(f"[red]error:[/red] {escape(message)}", highlight=False)

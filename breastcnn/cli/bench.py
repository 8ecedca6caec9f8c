"""`breastcnn bench`: Benchmark models: size, latency, throughput, train step, metrics.

A thin wrapper over :func:`breastcnn.bench.run_bench`: a rich table on stdout
by default, ``--markdown`` for READMEs, ``--json`` for scripts; ``--out DIR``
also writes ``bench.json`` and ``bench.md`` there.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from breastcnn.cli.common import info, print_json, print_table, stdout, warn


def bench(
    models: str = typer.Option("custom,vgg16,resnet50", "--models",
                               help="Comma-separated models: custom, vgg16, resnet50, custom-keras."),
    model_file: Optional[List[str]] = typer.Option(
        None, "--model-file", help="NAME=PATH: measure this trained model file instead of a fresh build (repeatable)."),
    split: Optional[Path] = typer.Option(
        None, "--split", help="Split directory: add the test metrics of models given with --model-file."),
    image_size: int = typer.Option(224, "--image-size", help="Input size of freshly built models."),
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="Comma-separated batch sizes for throughput."),
    repeats: int = typer.Option(50, "--repeats", help="Timed calls per measurement (after warm-up)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Pin BLAS/TensorFlow threads (default: all cores)."),
    train_steps: int = typer.Option(5, "--train-steps", help="Timed training steps (0 skips the train step)."),
    keras_train_batch: int = typer.Option(
        64, "--keras-train-batch", help="Batch size of the Keras train step (the report's 64 is slow on 2 cores)."),
    weights: str = typer.Option("none", "--weights", help="Keras models built fresh: none or imagenet."),
    max_seconds: float = typer.Option(10.0, "--max-seconds",
                                      help="Cap on the time spent timing one measurement (at least 3 calls)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON document."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a markdown table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write bench.json and bench.md into this directory."),
    force: bool = typer.Option(False, "--force", help="Overwrite bench.json/bench.md in --out."),
) -> None:
    """Measure params, size, latency, throughput, train step and end-to-end time of each model."""
    result = run_bench_command(models=models, model_file=model_file, split=split, image_size=image_size,
                               batch_sizes=batch_sizes, repeats=repeats, threads=threads, train_steps=train_steps,
                               keras_train_batch=keras_train_batch, weights=weights, max_seconds=max_seconds,
                               as_json=as_json, markdown=markdown, out=out, force=force)
    show(result, as_json=as_json, markdown=markdown)


def run_bench_command(models: str = "custom,vgg16,resnet50", model_file=None, split=None, image_size: int = 224,
                      batch_sizes: str = "1,32", repeats: int = 50, threads=None, train_steps: int = 5,
                      keras_train_batch: int = 64, weights: str = "none", max_seconds: float = 10.0,
                      as_json: bool = False, markdown: bool = False, out=None, force: bool = False) -> dict:
    """Parse and check the options, run the harness, write ``--out``; returns the result dict."""
    from breastcnn import bench as harness
    from breastcnn.errors import UserInputError
    from breastcnn.fsutil import atomic_write_json, atomic_write_text, check_overwrite
    from breastcnn.models import list_models

    if as_json and markdown:
        raise UserInputError("--json and --markdown are exclusive; pick one")
    names = harness.parse_model_names(models, list_models())
    files = harness.parse_model_files(model_file or [], names)
    if split is not None and not files:
        warn("--split given without --model-file: fresh models are untrained, so no test metrics")
    options = harness.BenchOptions(
        image_size=image_size, batch_sizes=harness.parse_int_list(batch_sizes, "--batch-sizes"), repeats=repeats,
        threads=threads, train_steps=train_steps, keras_train_batch_size=keras_train_batch,
        weights=str(weights).lower(), max_seconds=max_seconds,
    ).validate()
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UserInputError(f"--out {out} exists and is not a directory")
        for name in ("bench.json", "bench.md"):
            check_overwrite(out / name, force)
    result = harness.run_bench(names, files, options, split_dir=split, progress=info)
    threads_in_force = result["machine"].get("threads", {})
    info("threads: " + ", ".join(f"{k} {v}" for k, v in threads_in_force.items()))
    for entry in result["models"]:
        if entry.get("skipped"):
            warn(f"{entry['model']} skipped: {entry['skipped']}")
    if out is not None:
        atomic_write_json(out / "bench.json", result)
        atomic_write_text(out / "bench.md", harness.to_markdown(result))
        info(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return result


def show(result: dict, as_json: bool = False, markdown: bool = False) -> None:
    """Print ``result`` on stdout: JSON, markdown, or a rich table."""
    from breastcnn import bench as harness

    if as_json:
        print_json(result)
        return
    if markdown:
        stdout().out(harness.to_markdown(result), end="", highlight=False)
        return
    from rich.table import Table

    # Transposed (one column per model) so that it fits a terminal; --markdown has models as rows.
    headers, rows = harness.table_rows(result)
    notes = [f"Machine: {harness.machine_line(result)}. (xN) = ratio to the custom model, same run."]
    notes += result.get("notes", [])
    notes += [f"{e['model']}: {n}" for e in result["models"] for n in e.get("notes", [])]
    table = Table(title="breastcnn bench", caption="\n".join(notes), caption_justify="left", title_justify="left")
    table.add_column("")
    for row in rows:
        table.add_column(row[0], justify="right", overflow="fold")
    for i, header in enumerate(headers[1:], start=1):
        table.add_row(header, *[row[i] for row in rows])
    print_table(table)

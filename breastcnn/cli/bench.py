"""`breastcnn bench`: Benchmark models: size, latency, throughput, train step, metrics.

A thin wrapper over :func:`breastcnn.bench.run_bench`: a rich table on stdout
by default, ``--markdown`` for READMEs, ``--json`` for scripts; ``--out DIR``
also writes ``bench.json`` and ``bench.md`` there. The defaults
(:class:`breastcnn.bench.BenchOptions`) finish the three models in under two
minutes on two cores; ``--full`` takes the report's settings. When
``runs/latest`` holds a trained model of a requested architecture it is
measured (with its split's test metrics) instead of a fresh build, unless
``--fresh``. A progress bar per model (terminal only) shows the measurement
under way and an estimate of the time left.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import typer
from rich.table import Table

from breastcnn import bench as harness
from breastcnn.bench import DEFAULT_MODELS, FULL_SETTINGS, BenchOptions
from breastcnn.cli.common import info, make_progress, print_json, print_table, progress_enabled, stdout, warn
from breastcnn.data.split import fold_dirs
from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write_json, atomic_write_text, check_overwrite
from breastcnn.models import list_models
from breastcnn.runs import latest_run_dir, model_in_dir, read_run_config

_DEFAULTS = {f.name: f.default for f in fields(BenchOptions)}


def _default(name: str, fmt=str) -> str:
    """``"default X"`` (and ``"--full: Y"`` where --full changes it) for an option's help."""
    text = f"default {fmt(_DEFAULTS[name])}"
    if name in FULL_SETTINGS:
        text += f"; --full: {fmt(FULL_SETTINGS[name])}"
    return text


def _sizes(values) -> str:
    return ",".join(map(str, values))


def bench(
    models: str = typer.Option(
        ",".join(DEFAULT_MODELS), "--models", help=f"Comma-separated models: {', '.join(list_models())}."
    ),
    model_file: list[str] | None = typer.Option(
        None, "--model-file", help="NAME=PATH: measure this trained model file instead of a fresh build (repeatable)."
    ),
    split: Path | None = typer.Option(
        None,
        "--split",
        help="Split directory for the test metrics of trained models (default: the split of the "
        "runs/latest model in use).",
    ),
    fresh: bool = typer.Option(
        False, "--fresh", help="Ignore runs/latest: models not given with --model-file are freshly built (untrained)."
    ),
    full: bool = typer.Option(
        False,
        "--full",
        help="The report's settings: throughput at batch 1 and 32, Keras train step at batch 64, "
        "10 s per measurement (about 10 minutes on 2 cores); explicit options still win.",
    ),
    image_size: int | None = typer.Option(
        None,
        "--image-size",
        help=f"Input size of freshly built models ({_default('image_size')}; the size of the "
        "runs/latest model when one is used).",
    ),
    batch_sizes: str | None = typer.Option(
        None, "--batch-sizes", help=f"Comma-separated batch sizes for throughput ({_default('batch_sizes', _sizes)})."
    ),
    repeats: int | None = typer.Option(
        None, "--repeats", help=f"Most timed calls per measurement, after warm-up ({_default('repeats')})."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="Threads per model: NumPy engine threads (one BLAS thread each) or TensorFlow "
        "intra-op threads (default: all available cores).",
    ),
    train_steps: int | None = typer.Option(
        None, "--train-steps", help=f"Most timed training steps (0 skips the train step; {_default('train_steps')})."
    ),
    keras_train_batch: int | None = typer.Option(
        None,
        "--keras-train-batch",
        help=f"Batch size of the Keras train step ({_default('keras_train_batch_size')}, the report's fine-tuning "
        "batch; VGG16 takes ~46 s per step at 64 on 2 cores).",
    ),
    weights: str | None = typer.Option(
        None, "--weights", help=f"Keras models built fresh: none or imagenet ({_default('weights')})."
    ),
    max_seconds: float | None = typer.Option(
        None,
        "--max-seconds",
        help="Cap on each measurement (latency, throughput, end-to-end, metrics, train step), "
        f"warm-up included; at least one timed call ({_default('max_seconds', lambda v: f'{v:g}')}).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON document."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a markdown table."),
    out: Path | None = typer.Option(None, "--out", help="Also write bench.json and bench.md into this directory."),
    force: bool = typer.Option(False, "--force", help="Overwrite bench.json/bench.md in --out."),
) -> None:
    """Measure params, size, latency, throughput, train step and end-to-end time of each model.

    Defaults finish custom, vgg16 and resnet50 in under two minutes on two cores (each measurement
    capped by --max-seconds); --full gives the report's settings. A trained model in runs/latest is
    used for its architecture (with its split's test metrics) unless --fresh.
    """
    result = run_bench_command(
        models=models,
        model_file=model_file,
        split=split,
        fresh=fresh,
        full=full,
        image_size=image_size,
        batch_sizes=batch_sizes,
        repeats=repeats,
        threads=threads,
        train_steps=train_steps,
        keras_train_batch=keras_train_batch,
        weights=weights,
        max_seconds=max_seconds,
        as_json=as_json,
        markdown=markdown,
        out=out,
        force=force,
    )
    show(result, as_json=as_json, markdown=markdown)


def run_bench_command(
    models: str = ",".join(DEFAULT_MODELS),
    model_file=None,
    split=None,
    fresh: bool = False,
    full: bool = False,
    image_size: int | None = None,
    batch_sizes: str | None = None,
    repeats: int | None = None,
    threads=None,
    train_steps: int | None = None,
    keras_train_batch: int | None = None,
    weights: str | None = None,
    max_seconds: float | None = None,
    as_json: bool = False,
    markdown: bool = False,
    out=None,
    force: bool = False,
) -> dict:
    """Parse and check the options, run the harness, write ``--out``; returns the result dict.

    Options left at ``None`` take :class:`BenchOptions`' defaults (or :data:`FULL_SETTINGS` with ``full``).
    """
    if as_json and markdown:
        raise UserInputError("--json and --markdown are exclusive; pick one")
    names = harness.parse_model_names(models, list_models())
    files = harness.parse_model_files(model_file or [], names)
    sources: dict[str, str] = {}
    latest = None if fresh else _latest_trained(names, files)
    if latest is not None:
        name, path, latest_split, latest_size = latest
        files[name] = path
        sources[name] = "runs/latest"
        if split is None and latest_split is not None:
            split = latest_split
        if image_size is None and latest_size is not None:
            image_size = latest_size
        info(
            f"{name}: measuring the trained model of runs/latest ({path})"
            + (f" with the test subset of its split {latest_split}" if latest_split is not None else "")
            + (f"; fresh models built at its {latest_size}px" if latest_size else "")
            + " (--fresh: untrained builds only)"
        )
    if split is not None and not files:
        warn(
            "--split given without a trained model (runs/latest or --model-file): fresh models are untrained, "
            "so no test metrics"
        )
    given = {
        "image_size": image_size,
        "repeats": repeats,
        "threads": threads,
        "train_steps": train_steps,
        "keras_train_batch_size": keras_train_batch,
        "max_seconds": max_seconds,
        "weights": str(weights).lower() if weights is not None else None,
        "batch_sizes": harness.parse_int_list(batch_sizes, "--batch-sizes") if batch_sizes is not None else None,
    }
    given = {k: v for k, v in given.items() if v is not None}
    options = (BenchOptions.full(**given) if full else BenchOptions(**given)).validate()
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UserInputError(f"--out {out} exists and is not a directory")
        for name in ("bench.json", "bench.md"):
            check_overwrite(out / name, force)
    measurements = 3 + len(options.batch_sizes) + (1 if options.train_steps else 0)
    info(
        f"bench: {', '.join(names)}; each measurement stops after {options.max_seconds:g} s (up to about "
        f"{len(names) * measurements * options.max_seconds:.0f} s of timing in all, plus loading the models"
        + ("" if full else "; --full: the report's settings")
        + ")"
    )
    with _Bars(names, quiet=as_json) as bars:
        result = harness.run_bench(names, files, options, split_dir=split, progress=bars, sources=sources)
    threads_in_force = result["machine"].get("threads", {})
    info("threads: " + ", ".join(f"{k} {v}" for k, v in threads_in_force.items()) + f"; {result['seconds']:.0f} s")
    for entry in result["models"]:
        if entry.get("skipped"):
            warn(f"{entry['model']} skipped: {entry['skipped']}")
    if out is not None:
        atomic_write_json(out / "bench.json", result)
        atomic_write_text(out / "bench.md", harness.to_markdown(result))
        info(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return result


def _latest_trained(names: list[str], files: dict) -> tuple[str, Path, Path | None, int | None] | None:
    """``(name, model file, its split or None, its image size)`` when ``runs/latest`` holds a trained
    model of a requested architecture not given with --model-file; ``None`` otherwise."""
    run_dir = latest_run_dir()
    model = model_in_dir(run_dir) if run_dir is not None else None
    if model is None:
        return None
    try:
        options = read_run_config(run_dir)["options"]
    except UserInputError as exc:
        warn(f"runs/latest ignored: {exc}")
        return None
    arch = str(options.get("arch") or options.get("model") or "").removesuffix("-finetuned")
    if arch not in names or arch in files:
        return None
    split = Path(options["split"]) if options.get("split") else None
    if split is not None and (not (split / "manifest.csv").is_file() or fold_dirs(split)):
        warn(f"runs/latest: its split {split} is not a single split directory here: no test metrics")
        split = None
    size = options.get("image_size")
    # the run directory itself, not runs/latest: bench.json must still name the right file after the next train
    return arch, model.resolve(), split, int(size) if isinstance(size, int) else None


class _Bars(harness.Progress):
    """One rich progress bar per model (stderr, terminal only): the measurement under way and the time left.

    A model's bar counts its measurements; inside one, the fraction done is the larger of calls/max
    calls and seconds/budget (whichever stops it first), so the estimate follows the --max-seconds cap.
    Off a terminal (or with --json) each step is one line on stderr instead (none with --json).
    """

    def __init__(self, names: list[str], quiet: bool = False):
        self.enabled = progress_enabled(quiet)
        self.quiet = quiet
        self.names = names
        self.progress = make_progress(quiet)
        self.tasks: dict = {}
        self.started: dict = {}  # model -> measurements started
        self.current = None  # (model, max calls, budget seconds)

    def __enter__(self) -> _Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def _task(self, model: str):
        if model not in self.tasks:
            self.tasks[model] = self.progress.add_task(model, total=None)
        return self.tasks[model]

    def message(self, text: str) -> None:
        model = text.split(":", 1)[0]
        if self.enabled and model in self.names:
            self.progress.update(self._task(model), description=text)
        elif not self.quiet:
            self.progress.console.print(text, highlight=False)

    def plan(self, model: str, measurements: int) -> None:
        if self.enabled:
            self.progress.update(self._task(model), total=measurements)

    def measurement(self, model: str, what: str, max_calls: int, budget_s: float) -> None:
        done = self.started.get(model, 0)
        self.started[model] = done + 1
        self.current = (model, max(max_calls, 1), budget_s)
        if self.enabled:
            self.progress.update(self._task(model), description=f"{model}: {what}", completed=done)
        elif not self.quiet:
            info(f"{model}: {what}")

    def tick(self, calls: int, spent_s: float) -> None:
        if not self.enabled or self.current is None:
            return
        model, max_calls, budget = self.current
        fraction = min(1.0, max(calls / max_calls, spent_s / budget if budget > 0 else 1.0))
        self.progress.update(self.tasks[model], completed=self.started[model] - 1 + fraction)

    def model_done(self, model: str) -> None:
        if self.enabled:
            done = max(self.started.get(model, 0), 1)
            self.progress.update(self._task(model), description=f"{model}: done", total=done, completed=done)
        self.current = None


def show(result: dict, as_json: bool = False, markdown: bool = False) -> None:
    """Print ``result`` on stdout: JSON, markdown, or a rich table."""
    if as_json:
        print_json(result)
        return
    if markdown:
        stdout().out(harness.to_markdown(result), end="", highlight=False)
        return
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

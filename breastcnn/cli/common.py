"""Shared CLI plumbing: consoles, JSON output, progress bars, "not ready" exits.

Conventions (clig.dev): data goes to stdout, messages and progress to stderr;
``--json`` prints exactly one JSON document on stdout and nothing else there;
progress bars are drawn only when stderr is a terminal.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from breastcnn.data.images import DEFAULT_JOBS
from breastcnn.models.classifier import capabilities

T = TypeVar("T")


class _Console(Console):
    """A rich Console whose broken pipe is handled like any other write to a closed stdout."""

    def on_broken_pipe(self) -> None:
        # rich's default exits 1 on its own; cli.app.handle_errors ends quietly with 141 instead.
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def stdout() -> Console:
    """Console for data (tables, CSV, JSON). Created per call so CliRunner captures it."""
    return _Console(file=sys.stdout, soft_wrap=True)


def print_table(table) -> None:
    """Print a rich table on stdout. On a terminal it fits the window; elsewhere (a pipe, a
    file) it is as wide as its content, so that no cell is cut to ``…`` at 80 columns."""
    console = stdout()
    if not console.is_terminal:
        natural = console.measure(table, options=console.options.update_width(1_000_000)).maximum
        console = _Console(file=sys.stdout, soft_wrap=True, width=max(console.width, natural))
    console.print(table)


def stderr() -> Console:
    """Console for messages, warnings and progress."""
    return _Console(file=sys.stderr, soft_wrap=True)


def info(message: str) -> None:
    """A status message on stderr."""
    stderr().print(message, highlight=False)


def warn(message: str) -> None:
    """A warning on stderr, in yellow."""
    stderr().print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def print_json(obj: Any) -> None:
    """Print ``obj`` as one JSON document on stdout (plain, no colours)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(obj: Any):
    """Make NumPy scalars/arrays and paths JSON-serialisable."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def jobs_option(work: str):
    """The ``--jobs/-j`` option of every command, with the one default (:data:`DEFAULT_JOBS`)."""
    return typer.Option(
        DEFAULT_JOBS,
        "--jobs",
        "-j",
        help=f"Parallel workers for {work} (-1 = all cores, the default of every command).",
    )


def task_option():
    """``--task`` of ``train``/``finetune`` (default: :data:`breastcnn.data.tasks.DEFAULT_TASK`)."""
    from breastcnn.data.tasks import DEFAULT_TASK, SUBTYPE_CLASSES

    return typer.Option(
        DEFAULT_TASK,
        "--task",
        help="binary (benign vs malignant) or subtype (the 8 BreakHis "
        f"classes: {', '.join(SUBTYPE_CLASSES)}; needs a BreakHis-layout split).",
    )


def stain_options() -> dict:
    """``--stain-norm``, ``--stain-target`` and ``--stain-augment`` of ``train``/``finetune`` (defaults from
    :mod:`breastcnn.data.stain_options`), by parameter name."""
    from breastcnn.data.stain_options import DEFAULT_STAIN_NORM

    return {
        "stain_norm": typer.Option(
            DEFAULT_STAIN_NORM,
            "--stain-norm",
            help="Stain normalisation of every image: none, macenko or reinhard. "
            "The fitted target is stored in the model file, and evaluate, predict, bench, featuremaps and slide "
            "apply it; normalised images are cached. An image with too little tissue is left as is (counted in a "
            "warning).",
        ),
        "stain_target": typer.Option(
            None,
            "--stain-target",
            help="Image whose stains are the normalisation target (default: fitted on the training subset).",
        ),
        "stain_augment": typer.Option(
            None,
            "--stain-augment/--no-stain-augment",
            show_default=False,
            help="HED colour jitter (Tellez et "
            "al. 2018) on top of --augment: stain variation between labs and scanners. Default: the recipe's "
            "(default: on, report: off); vgg16/resnet50: off.",
        ),
    }


def stdout_is_closed() -> bool:
    """Whether stdout is a pipe (or socket) whose reader went away (``... | head -2``).

    Told apart from other broken pipes by polling stdout for an error; ``True``
    when that cannot be checked (stdout without a file descriptor)."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
    except (AttributeError, OSError, ValueError):
        return True
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def silence_stdout() -> None:
    """Point stdout's file descriptor at /dev/null, so that flushing what is still buffered
    (at exit, by the interpreter) cannot raise ``BrokenPipeError`` again (the Python docs' recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass  # no file descriptor (a test runner's buffer): nothing will be flushed to a pipe
    finally:
        os.close(devnull)


def progress_enabled(quiet: bool = False) -> bool:
    """Draw progress bars only on an interactive stderr and never with ``--json``."""
    if quiet or os.environ.get("BREASTCNN_NO_PROGRESS"):
        return False
    return sys.stderr.isatty()


def make_progress(quiet: bool = False, *extra_columns) -> Progress:
    """A rich Progress on stderr; disabled (draws nothing) when not a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra_columns,
        console=stderr(),
        disable=not progress_enabled(quiet),
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None, quiet: bool = False) -> Iterator[T]:
    """Iterate with a progress bar on stderr (silent when not a terminal)."""
    with make_progress(quiet) as progress:
        task = progress.add_task(description, total=total if total is not None else _len(items))
        for item in items:
            yield item
            progress.advance(task)


def _len(items) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None


def not_ready(command: str, issue: int) -> None:
    """Exit 2 with a clear message: this command is not implemented yet."""
    stderr().print(
        f"[red]error:[/red] 'breastcnn {command}' is not implemented yet (tracked in issue #{issue})",
        highlight=False,
    )
    raise typer.Exit(2)


def warn_threads_ignored(model, threads: int | None) -> None:
    """Say so when ``--threads`` was given for a model that does not run on the NumPy engine."""
    if threads is not None and not capabilities(model).engine_threads:
        warn("--threads sets the NumPy engine's threads; this Keras model uses TensorFlow's own thread pools")

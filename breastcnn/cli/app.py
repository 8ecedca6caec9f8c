"""The ``breastcnn`` Typer application: composes the per-command modules.

Expected failures (``BreastCNNError``, ``ValueError``, ``OSError``) become one
red line on stderr and exit code 2; ``--debug`` (or ``BREASTCNN_DEBUG=1``)
shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import functools
from typing import Callable

import typer
from rich.markup import escape

from breastcnn import __version__
from breastcnn.cli import (
    bench,
    demo,
    evaluate,
    export,
    featuremaps,
    finetune,
    predict,
    slide,
    split,
    synth,
    train,
)
from breastcnn.cli.common import stderr
from breastcnn.errors import BreastCNNError

_EXPECTED_ERRORS = (BreastCNNError, ValueError, OSError)


def _debug_enabled() -> bool:
    return os.environ.get("BREASTCNN_DEBUG", "") not in ("", "0")


def handle_errors(command: Callable) -> Callable:
    """Wrap a command: expected exceptions become one line + exit 2, bugs exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            stderr().print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130)
        except _EXPECTED_ERRORS as exc:
            if _debug_enabled():
                raise
            stderr().print(f"[red]error:[/red] {escape(_one_line(exc))}", highlight=False)
            raise typer.Exit(2)
        except Exception as exc:  # a bug: still one line, the traceback behind --debug
            if _debug_enabled():
                raise
            stderr().print(
                f"[red]internal error:[/red] {type(exc).__name__}: {escape(_one_line(exc))} "
                "(run with --debug for the traceback)",
                highlight=False,
            )
            raise typer.Exit(1)

    return wrapper


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return " ".join(text.split())


app = typer.Typer(
    name="breastcnn",
    help="Breast cancer histopathology (BreakHis) classification: a NumPy CNN vs VGG16/ResNet50.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        print(f"breastcnn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Breast cancer histopathology classification with a from-scratch NumPy CNN."""
    if debug:
        os.environ["BREASTCNN_DEBUG"] = "1"


app.command("synth")(handle_errors(synth.synth))
app.command("split")(handle_errors(split.split))
app.command("train")(handle_errors(train.train))
app.command("finetune")(handle_errors(finetune.finetune))
app.command("evaluate")(handle_errors(evaluate.evaluate))
app.command("predict")(handle_errors(predict.predict))
app.command("slide")(handle_errors(slide.slide))
app.command("bench")(handle_errors(bench.bench))
app.command("featuremaps")(handle_errors(featuremaps.featuremaps))
app.command("export")(handle_errors(export.export))
app.command("demo")(handle_errors(demo.demo))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="breastcnn")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

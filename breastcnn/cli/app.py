"""The ``breastcnn`` Typer application: composes the per-command modules.

Expected failures (``BreastCNNError``, ``ValueError``, ``OSError``) become one
red line on stderr and exit code 2 (bugs: exit 1); ``--debug`` (or
``BREASTCNN_DEBUG=1``) prints the traceback before that line, same exit code.
A closed stdout (``breastcnn predict ... --csv | head -2``) ends quietly with
exit code 141, as a command killed by SIGPIPE would.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
import warnings
from collections.abc import Callable

import typer
from rich.markup import escape

from breastcnn import __version__
from breastcnn.cli import (
    bench,
    compare,
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
from breastcnn.cli.common import silence_stdout, stderr, stdout_is_closed, warn
from breastcnn.errors import BreastCNNError, BreastCNNWarning

_EXPECTED_ERRORS = (BreastCNNError, ValueError, OSError)
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what a shell reports for ``cat`` when its reader went away."""


def _debug_enabled() -> bool:
    return os.environ.get("BREASTCNN_DEBUG", "") not in ("", "0")


def handle_errors(command: Callable) -> Callable:
    """Wrap a command: expected exceptions become one line + exit 2, bugs exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", BreastCNNWarning)
                warnings.showwarning = _show_warning
                return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            stderr().print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None
        except _EXPECTED_ERRORS as exc:
            if isinstance(exc, BrokenPipeError) and stdout_is_closed():
                silence_stdout()
                raise typer.Exit(EXIT_BROKEN_PIPE) from None
            _show_traceback_if_debug(exc)
            stderr().print(f"[red]error:[/red] {escape(_one_line(exc))}", highlight=False)
            raise typer.Exit(2) from None
        except Exception as exc:  # a bug: still one line, the traceback behind --debug
            _show_traceback_if_debug(exc)
            stderr().print(
                f"[red]internal error:[/red] {type(exc).__name__}: {escape(_one_line(exc))}"
                + ("" if _debug_enabled() else " (run with --debug for the traceback)"),
                highlight=False,
            )
            raise typer.Exit(1) from None

    return wrapper


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings (:class:`BreastCNNWarning`) as one yellow line; others as Python prints them."""
    if issubclass(category, BreastCNNWarning):
        warn(escape(" ".join(str(message).split())))
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def _show_traceback_if_debug(exc: BaseException) -> None:
    """With ``--debug``: the full traceback on stderr (the exit code stays what it would be without)."""
    if _debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.flush()


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
app.command("compare")(handle_errors(compare.compare))
app.command("featuremaps")(handle_errors(featuremaps.featuremaps))
app.command("export")(handle_errors(export.export))
app.command("demo")(handle_errors(demo.demo))


def main() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="breastcnn")
    except SystemExit:
        # Flush now: a reader that went away must not make the interpreter's own
        # flush at exit print "Exception ignored ... BrokenPipeError".
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            silence_stdout()
            raise SystemExit(EXIT_BROKEN_PIPE) from None
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`breastcnn demo`: Run the whole tool on generated sample data.

synth -> split -> train -> evaluate -> bench -> featuremaps (with Grad-CAM),
each step being the real ``breastcnn`` command run in this process (its table
is printed as usual), inside a fresh ``--out`` directory (default
``./breastcnn-demo``). Nothing outside ``--out`` is written (no ``runs/latest``).

The data is SYNTHETIC sample data (drawn imitations of H&E tissue), not
medical data: the scores say nothing about cancer diagnosis.

Sizes are picked to fit the time budget on two CPU cores: the full demo
(under 3 minutes) trains on 301 images at 160 px (Grad-CAM on the 19x19 map of its second conv block)
and benches VGG16/ResNet50 (random weights, ``--weights none``) at the same
size; ``--quick`` (under a minute) uses 86 images at 96 px, 6 epochs of
batch 16 and no train-step timing. Training uses the default recipe; the
quick demo's 68 training images need the smaller batch to give BatchNorm's
moving statistics enough steps (~30) to settle: with 2 epochs of batch 32 (6
steps) the saved model answered malignant for every image (seeds 0-2).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import typer
from rich.table import Table

from breastcnn.cli.common import info, print_table, stderr, stdout
from breastcnn.data.split import load_split
from breastcnn.errors import UserInputError
from breastcnn.fsutil import check_overwrite

CommandRunner = Callable[[list[str]], "int | None"]
"""Runs one ``breastcnn`` command line (arguments after ``breastcnn``) in this process; returns its exit code."""

SYNTHETIC_NOTE = (
    "SYNTHETIC sample data (computer-drawn imitations of H&E tissue), NOT medical data: "
    "the scores below say nothing about cancer diagnosis."
)


@dataclass(frozen=True)
class DemoSizes:
    """Knobs that set the demo's run time."""

    scale: float  # synth: fraction of the real BreakHis counts (>= 1 image per patient)
    image_size: int  # every model: the custom one is trained at it, VGG16/ResNet50 built at it
    epochs: int
    batch_size: int
    repeats: int
    batch_sizes: str
    max_seconds: float
    train_steps: int
    keras_train_batch: int


FULL = DemoSizes(
    scale=0.15,
    image_size=160,
    epochs=5,
    batch_size=32,
    repeats=20,
    batch_sizes="1,8",
    max_seconds=2.0,
    train_steps=1,
    keras_train_batch=4,
)
QUICK = DemoSizes(
    scale=0.04,
    image_size=96,
    epochs=6,
    batch_size=16,
    repeats=5,
    batch_sizes="1,8",
    max_seconds=1.0,
    train_steps=0,
    keras_train_batch=4,
)


def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("breastcnn-demo"), "--out", help="Fresh directory for everything the demo writes."),
    quick: bool = typer.Option(False, "--quick", help="Smaller data and images: under a minute on 2 cores."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample data, the split and the training."),
    force: bool = typer.Option(False, "--force", help="Run in a non-empty --out (its demo outputs are replaced)."),
) -> None:
    """Run the whole tool on generated SYNTHETIC sample data (not medical data).

    synth -> split -> train -> evaluate -> bench -> featuremaps + Grad-CAM, in
    --out (default ./breastcnn-demo). Under 3 minutes on 2 cores; --quick under 1.
    """
    # the steps run through the command group this command belongs to (no import of cli/app: no cycle)
    run_demo(out, command_runner(ctx.find_root().command), quick=quick, force=force, seed=seed)


def command_runner(group: click.Command) -> CommandRunner:
    """A :data:`CommandRunner` over the ``breastcnn`` click group (``typer.main.get_command(app)``)."""
    return lambda args: group.main(args=args, prog_name="breastcnn", standalone_mode=False)


def run_demo(out: Path, run_command: CommandRunner, quick: bool = False, force: bool = False, seed: int = 0) -> dict:
    """Run every step with ``run_command``; returns ``{"out", "seconds", "steps": {name: seconds}, "files": {...}}``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a directory")
    check_overwrite(out, force)
    out.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if quick else FULL
    keras_models, keras_note = _keras_available()
    data, split_dir, run_dir = out / "BreaKHis_v1", out / "splits" / "200X", out / "runs" / "custom"
    bench_dir, maps_dir = out / "bench", out / "featuremaps"
    model_file = run_dir / "model.npz"
    forced = ["--force"] if force else []

    console = stdout()
    console.print(
        f"[bold]breastcnn demo[/bold] in {out} ({'quick' if quick else 'full'}): {SYNTHETIC_NOTE}", highlight=False
    )
    started = time.perf_counter()
    steps: dict[str, float] = {}

    def step(name: str, args: list[str], where: str) -> None:
        console.rule(f"[bold]{len(steps) + 1}. breastcnn {' '.join(args)}", align="left")
        t0 = time.perf_counter()
        _invoke(run_command, args, name)
        steps[name] = round(time.perf_counter() - t0, 1)
        console.print(f"[dim]{name}: {steps[name]:.1f} s; files: {where}[/dim]", highlight=False)

    step(
        "synth",
        ["synth", "--out", str(out), "--scale", str(sizes.scale), "--mags", "200", "--seed", str(seed), *forced],
        f"{data}",
    )
    step(
        "split",
        ["split", "--data", str(data), "--mag", "200X", "--out", str(split_dir), "--seed", str(seed), *forced],
        f"{split_dir}",
    )
    step(
        "train",
        [
            "train",
            "--split",
            str(split_dir),
            "--out",
            str(run_dir),
            "--epochs",
            str(sizes.epochs),
            "--image-size",
            str(sizes.image_size),
            "--batch-size",
            str(sizes.batch_size),
            "--seed",
            str(seed),
            *forced,
        ],
        f"{run_dir} (model.npz, history.csv, training.png)",
    )
    step(
        "evaluate",
        ["evaluate", "--model", str(model_file), "--split", str(split_dir)],
        f"{run_dir} (metrics.json, predictions.csv, roc.png, confusion.png)",
    )
    if keras_note:
        console.print(f"[yellow]note:[/yellow] {keras_note}", highlight=False)
    # The trained custom model; VGG16/ResNet50 fresh (random weights) at the same image size.
    step(
        "bench",
        [
            "bench",
            "--models",
            ",".join(["custom", *keras_models]),
            "--fresh",
            "--model-file",
            f"custom={model_file}",
            "--split",
            str(split_dir),
            "--image-size",
            str(sizes.image_size),
            "--batch-sizes",
            sizes.batch_sizes,
            "--repeats",
            str(sizes.repeats),
            "--max-seconds",
            str(sizes.max_seconds),
            "--train-steps",
            str(sizes.train_steps),
            "--keras-train-batch",
            str(sizes.keras_train_batch),
            "--weights",
            "none",
            "--out",
            str(bench_dir),
            *forced,
        ],
        f"{bench_dir} (bench.json, bench.md)",
    )
    image = _pick_image(split_dir)
    step(
        "featuremaps",
        ["featuremaps", "--model", str(model_file), str(image), "--gradcam", "--out", str(maps_dir), *forced],
        f"{maps_dir} (input.png, one grid per conv layer, gradcam.png)",
    )

    seconds = round(time.perf_counter() - started, 1)
    files = {
        "data": data,
        "split": split_dir,
        "model": model_file,
        "evaluation": run_dir / "metrics.json",
        "bench": bench_dir / "bench.md",
        "feature maps": maps_dir,
        "Grad-CAM": maps_dir / "gradcam.png",
    }
    _print_summary(files, steps, seconds)
    return {"out": str(out), "seconds": seconds, "steps": steps, "files": {k: str(v) for k, v in files.items()}}


def _invoke(run_command: CommandRunner, args: list[str], name: str) -> None:
    """Run one ``breastcnn`` command in this process; a non-zero exit stops the demo with that code."""
    code = run_command(args)
    if code not in (None, 0):
        stderr().print(f"[red]demo stopped:[/red] step '{name}' exited with code {code}", highlight=False)
        raise typer.Exit(code)


def _keras_available() -> tuple[list[str], str | None]:
    """``(["vgg16", "resnet50"], None)`` with TensorFlow, else ``([], why they are skipped)``."""
    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
        return [], (
            "TensorFlow is not installed: VGG16/ResNet50 are left out of the bench "
            "(pip install 'breastcnn[keras]' to include them)"
        )
    return ["vgg16", "resnet50"], None


def _pick_image(split_dir: Path) -> Path:
    """A malignant test image of the split (any test image if none), for the feature maps."""
    split = load_split(split_dir)
    rows = split.subset("test") or split.rows
    chosen = next((r for r in rows if r.label == "malignant"), rows[0])
    return split.root / chosen.path


def _print_summary(files: dict, steps: dict, seconds: float) -> None:
    table = Table(title=f"demo done in {seconds:.1f} s ({SYNTHETIC_NOTE})", title_justify="left")
    table.add_column("output")
    table.add_column("where")
    for name, path in files.items():
        table.add_row(name, str(path))
    table.add_row("step times", ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()))
    print_table(table)
    info("next: open the Grad-CAM picture, or run the same commands on the real BreaKHis data (see README)")

"""`breastcnn compare`: every model on every patient-wise fold, with confidence intervals, tests and cost.

A thin wrapper over :func:`breastcnn.comparison.run_compare`: progress lines on
stderr, a table on stdout by default, ``--json`` for the ``compare.json``
document only, ``--markdown`` for ``compare.md``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from breastcnn.cli.common import info, jobs_option, print_json, print_table, stain_options, stdout, task_option
from breastcnn.comparison import DEFAULT_MODELS, CompareOptions, markdown, run_compare
from breastcnn.errors import UserInputError

_DEFAULTS = CompareOptions()
_STAIN = stain_options()


def compare(
    data: Path | None = typer.Option(
        None,
        "--data",
        help="BreakHis tree: make a patient-wise k-fold split of it into OUT/kfold (the 'split --folds' protocol).",
    ),
    split: Path | None = typer.Option(None, "--split", help="An existing k-fold split directory (fold1..K)."),
    mag: str = typer.Option(_DEFAULTS.mag, "--mag", help="Magnification of the split made from --data."),
    models: str = typer.Option(
        ",".join(DEFAULT_MODELS), "--models", help="Comma-separated: custom, custom-k4, vgg16, resnet50, custom-keras."
    ),
    folds: int | None = typer.Option(
        None,
        "--folds",
        help=f"Folds of the split made from --data (default {CompareOptions.DEFAULT_FOLDS}; with --split: its folds).",
    ),
    epochs: int | None = typer.Option(
        None,
        "--epochs",
        help="Maximum epochs for every model (default: each "
        "model's own: NumPy and custom-keras 5, vgg16/resnet50 200, early stopping).",
    ),
    image_size: int = typer.Option(_DEFAULTS.image_size, "--image-size", help="Input size of every model."),
    trainable_layers: int = typer.Option(
        _DEFAULTS.trainable_layers,
        "--trainable-layers",
        help="vgg16/resnet50: trainable base layers; 0 = linear probe (frozen backbone features cached once per "
        "image, only the head trains, no augmentation).",
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="vgg16/resnet50 weights: imagenet (default), none or PATH."
    ),
    task: str = task_option(),
    stain_norm: str = _STAIN["stain_norm"],
    stain_target: Path | None = _STAIN["stain_target"],
    stain_augment: bool | None = _STAIN["stain_augment"],
    seed: int = typer.Option(_DEFAULTS.seed, "--seed", help="Seed of the split, training and bootstrap."),
    out: Path = typer.Option(
        Path(_DEFAULTS.out),
        "--out",
        help="Output folder (cells, compare.json, compare.md, pareto.png, folds.png); a rerun resumes it.",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print only the compare.json document."),
    markdown_output: bool = typer.Option(False, "--markdown", help="Print compare.md (paper-ready tables)."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Recompute everything this command wrote in --out (never touches other files; feature caches are kept).",
    ),
    resamples: int = typer.Option(_DEFAULTS.n_resamples, "--resamples", help="Bootstrap resamples."),
    jobs: int = jobs_option("decoding images (threads)"),
    scheduler: str | None = typer.Option(
        None,
        "--scheduler",
        envvar="BREASTCNN_SCHEDULER",
        help="dask.distributed scheduler address: one cell per worker task "
        "(--out must be on a path the workers share; env BREASTCNN_SCHEDULER).",
    ),
) -> None:
    """Compare models over patient-wise folds: accuracy with 95% CIs, paired tests, and cost.

    Trains every model on every fold (same split, validation, image cache and
    evaluation), stores each fold x model cell as it finishes (a rerun skips
    finished cells), then writes compare.json, compare.md, pareto.png and
    folds.png. CIs come from a bootstrap over patients; p-values from a paired
    patient bootstrap of the accuracy difference (Holm-corrected). With --task
    subtype every model predicts the 8 subtypes; the statistics are those of the
    benign/malignant outcome derived from them, and each fold adds
    subtype_accuracy, balanced_accuracy and macro_f1.
    """
    if json_output and markdown_output:
        raise UserInputError("--json and --markdown are exclusive; pick one")
    options = CompareOptions(
        data=None if data is None else str(data),
        split=None if split is None else str(split),
        mag=mag,
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
        folds=folds,
        epochs=epochs,
        image_size=image_size,
        trainable_layers=trainable_layers,
        weights=weights,
        seed=seed,
        task=task,
        stain_norm=stain_norm,
        stain_target=None if stain_target is None else str(stain_target),
        stain_augment=stain_augment,
        out=str(out),
        force=force,
        n_resamples=resamples,
        jobs=jobs,
        scheduler=scheduler,
    )
    document = run_compare(options, message=lambda text: info(escape(text)))
    if json_output:
        print_json(document)
    elif markdown_output:
        stdout().print(markdown(document), markup=False, highlight=False, end="")
    else:
        _print_tables(document)
        info(f"wrote {out / 'compare.json'}, compare.md, pareto.png, folds.png")


def _ci(entry: dict, metric: str) -> str:
    mean, std, (low, high) = entry["mean"][metric], entry["std"][metric], entry["ci95"][metric]
    if mean is None:
        return "n/a"
    text = f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")
    return text + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")


def _print_tables(document: dict) -> None:
    table = Table(title=f"{document['protocol']['folds']} patient-wise folds: mean ± std [95% CI]")
    for column in (
        "model",
        "accuracy",
        "patient accuracy",
        "ROC AUC",
        "params",
        "size KB",
        "latency ms",
        "train s/fold",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    for m in document["models"]:
        table.add_row(
            m["model"],
            _ci(m, "accuracy"),
            _ci(m, "patient_accuracy"),
            _ci(m, "roc_auc"),
            f"{m['params_total']:,}",
            f"{m['size_kb']:,.0f}",
            f"{m['latency_ms_p50']:.2f}",
            f"{m['train_seconds']:,.1f}",
        )
    print_table(table)
    pairs = Table(title="accuracy A − B (paired patient bootstrap, Holm-corrected)")
    for column in ("A", "B", "A − B", "95% CI", "p", "verdict"):
        pairs.add_column(column)
    for p in document["pairwise"]:
        low, high = p["ci95"]
        verdict = "significant" if p["significant"] else "not significant"
        pairs.add_row(
            p["a"],
            p["b"],
            f"{p['accuracy_diff']:+.3f}",
            "n/a" if low is None else f"[{low:+.3f}, {high:+.3f}]",
            f"{p['p_value']:.3g}",
            verdict,
        )
    print_table(pairs)

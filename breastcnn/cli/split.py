"""`breastcnn split`: Split BreakHis into train/val/test by patient (default) or image."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from breastcnn import CLASSES
from breastcnn.cli.common import info, jobs_option, make_progress, print_json, print_table, warn
from breastcnn.data.breakhis import mags_label, parse_mags
from breastcnn.data.split import DEFAULT_STRATIFY, SUBSETS, create_split


def default_data_root() -> Path:
    """``$BREAKHIS_DIR`` when set, else ``./BreaKHis_v1``."""
    env = os.environ.get("BREAKHIS_DIR")
    return Path(env) if env else Path("BreaKHis_v1")


def split(
    mag: str = typer.Option(
        ...,
        "--mag",
        help="Magnification(s) to keep: 40X, 100X, 200X, 400X, a comma list (40X,200X), or all. "
        "With several, a patient's images at all of them go to the same subset.",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Data root (BreaKHis_v1, or a folder with benign/ and malignant/). "
        "Default: $BREAKHIS_DIR, else ./BreaKHis_v1.",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Split directory to write. Default: ./splits/<mag> (splits/200X, splits/all, splits/40X+200X).",
    ),
    by: str = typer.Option(
        "patient",
        "--by",
        help="patient: no patient in two subsets (default); image: the report's "
        "per-class image split, which leaks patients between train and test.",
    ),
    ratios: str | None = typer.Option(
        None, "--ratios", help="train,val,test fractions (default 0.8,0.1,0.1; with --folds 0.7,0.3 train,test)."
    ),
    folds: int = typer.Option(
        0,
        "--folds",
        help="K repetitions of a patient-wise 70/30 train/test split (Spanhol et al.), written to OUT/fold1..foldK.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the random assignment."),
    materialize: str = typer.Option(
        "none", "--materialize", help="Also place the images in OUT/<split>/<label>/: copy, link (symlink) or none."
    ),
    group: str = typer.Option(
        "patient",
        "--group",
        help="What counts as one patient with --by patient: the slide folder (patient) "
        "or its accession number (accession, stricter: slide ids sharing an accession stay together).",
    ),
    stratify: str = typer.Option(
        DEFAULT_STRATIFY,
        "--stratify",
        help="What --by patient balances: subtype (every subset gets patients of "
        "each subtype that has enough, image ratios met per class) or class (per class only: the splits of "
        "breastcnn 0.1.0, same seed, same manifest).",
    ),
    strict: bool = typer.Option(False, "--strict", help="Fail on unreadable images instead of leaving them out."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing split directory."),
    jobs: int = jobs_option("the decode check of every image (processes)"),
    as_json: bool = typer.Option(False, "--json", help="Print only the split summary as JSON on stdout."),
) -> None:
    """Split BreakHis into train/val/test by patient (default) or image.

    Writes OUT/manifest.csv (path,label,subtype,patient,magnification,split) and
    OUT/split.json. Every image is decoded once: unreadable files are reported and
    left out; other files (Thumbs.db, text) are ignored. The data tree is only read.
    """
    mags = parse_mags(mag)
    root = data if data is not None else default_data_root()
    jobs = jobs if jobs > 0 else max(1, os.cpu_count() or 1)
    with make_progress(quiet=as_json) as progress:
        task = progress.add_task("checking images", total=None)
        result = create_split(
            root,
            mag=mag,
            out=out,
            by=by,
            ratios=ratios,
            folds=folds,
            seed=seed,
            materialize=materialize,
            strict=strict,
            force=force,
            group=group,
            stratify=stratify,
            jobs=jobs,
            progress=lambda n: progress.advance(task, n),
            on_scanned=lambda n: progress.update(task, total=n),
        )
    for message in result["warnings"]:
        warn(message)
    if as_json:
        print_json(result)
        return
    if folds:
        for fold in result["fold_infos"]:
            _print_table(fold, f"{result['out']}/{fold['dir']}")
    else:
        _print_table(result, result["out"])
    kind = "image-wise (patients leak between subsets)" if result["leaks_patients"] else f"by {result['by']}"
    info(f"split {mags_label(mags)} {kind}, seed {seed} -> {result['out']}")


def _print_table(summary: dict, where: str) -> None:
    """Subset x class table of images and patients; then by subtype and by magnification where there are several."""
    subsets = [subset for subset in SUBSETS if subset in summary["images"]]
    table = Table(title=f"{where}: images (patients)")
    table.add_column("subset")
    for c in CLASSES:
        table.add_column(c, justify="right")
    table.add_column("total", justify="right")
    for subset in subsets:
        imgs, pats = summary["images"][subset], summary["patients"][subset]
        cells = [f"{imgs[c]} ({pats[c]})" if pats["total"] else str(imgs[c]) for c in CLASSES + ("total",)]
        table.add_row(subset, *cells)
    print_table(table)
    by_subtype = summary.get("images_by_subtype") or {}
    if any(by_subtype.get(subset) for subset in subsets):
        table = Table(title=f"{where}: images (patients) by subtype")
        table.add_column("subtype")
        for subset in subsets:
            table.add_column(subset, justify="right")
        for subtype in by_subtype[subsets[0]]:
            table.add_row(
                subtype, *(f"{by_subtype[s][subtype]} ({summary['patients_by_subtype'][s][subtype]})" for s in subsets)
            )
        print_table(table)
    by_mag = summary.get("images_by_magnification") or {}
    if len(by_mag.get(subsets[0], {}) if subsets else {}) > 1:
        table = Table(title=f"{where}: images by magnification")
        table.add_column("magnification")
        for subset in subsets:
            table.add_column(subset, justify="right")
        for m in by_mag[subsets[0]]:
            table.add_row(m, *(str(by_mag[s][m]) for s in subsets))
        print_table(table)

"""`breastcnn split`: Split BreakHis into train/val/test by patient (default) or image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from breastcnn import CLASSES
from breastcnn.cli.common import info, jobs_option, make_progress, print_json, print_table, warn
from breastcnn.data.breakhis import parse_mag
from breastcnn.data.split import SUBSETS, create_split


def default_data_root() -> Path:
    """``$BREAKHIS_DIR`` when set, else ``./BreaKHis_v1``."""
    env = os.environ.get("BREAKHIS_DIR")
    return Path(env) if env else Path("BreaKHis_v1")


def split(
    mag: str = typer.Option(..., "--mag", help="Magnification to keep: 40X, 100X, 200X, 400X, or all."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Data root (BreaKHis_v1, or a folder with benign/ and malignant/). "
        "Default: $BREAKHIS_DIR, else ./BreaKHis_v1."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Split directory to write. Default: ./splits/<mag>."),
    by: str = typer.Option(
        "patient", "--by", help="patient: no patient in two subsets (default); image: the report's "
        "per-class image split, which leaks patients between train and test."
    ),
    ratios: Optional[str] = typer.Option(
        None, "--ratios", help="train,val,test fractions (default 0.8,0.1,0.1; with --folds 0.7,0.3 train,test)."
    ),
    folds: int = typer.Option(
        0, "--folds", help="K repetitions of a patient-wise 70/30 train/test split (Spanhol et al.), "
        "written to OUT/fold1..foldK."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the random assignment."),
    materialize: str = typer.Option(
        "none", "--materialize", help="Also place the images in OUT/<split>/<label>/: copy, link (symlink) or none."
    ),
    group: str = typer.Option(
        "patient", "--group", help="What counts as one patient with --by patient: the slide folder (patient) "
        "or its accession number (accession, stricter: slide ids sharing an accession stay together)."
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
    mag_norm = parse_mag(mag)
    root = data if data is not None else default_data_root()
    jobs = jobs if jobs > 0 else max(1, os.cpu_count() or 1)
    with make_progress(quiet=as_json) as progress:
        task = progress.add_task("checking images", total=None)
        result = create_split(
            root, mag=mag, out=out, by=by, ratios=ratios, folds=folds, seed=seed, materialize=materialize,
            strict=strict, force=force, group=group, jobs=jobs,
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
    info(f"split {mag_norm or 'all'} {kind}, seed {seed} -> {result['out']}")


def _print_table(summary: dict, where: str) -> None:
    """Subset x class table of images and patients."""
    table = Table(title=f"{where}: images (patients)")
    table.add_column("subset")
    for c in CLASSES:
        table.add_column(c, justify="right")
    table.add_column("total", justify="right")
    for subset in SUBSETS:
        if subset not in summary["images"]:
            continue
        imgs, pats = summary["images"][subset], summary["patients"][subset]
        cells = [f"{imgs[c]} ({pats[c]})" if pats["total"] else str(imgs[c]) for c in CLASSES + ("total",)]
        table.add_row(subset, *cells)
    print_table(table)

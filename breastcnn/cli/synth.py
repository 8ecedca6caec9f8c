"""`breastcnn synth`: Write synthetic sample data in the BreakHis layout (not medical data)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from breastcnn.cli.common import info, jobs_option, make_progress, print_json, print_table
from breastcnn.data import synth as synth_lib
from breastcnn.data.breakhis import MAGNIFICATIONS


def synth(
    out: Path = typer.Option(Path("."), "--out", help="Folder to write BreaKHis_v1/ into."),
    scale: float = typer.Option(
        synth_lib.DEFAULT_SCALE,
        "--scale",
        help="Fraction of the real BreakHis image counts per subtype and magnification, in (0, 1]; "
        "1.0 gives the real counts (200X: 623 benign, 1390 malignant). Every patient keeps at least "
        "one image per magnification.",
    ),
    mags: str = typer.Option(
        ",".join(m[:-1] for m in synth_lib.DEFAULT_MAGS),
        "--mags",
        help="Comma-separated magnifications to generate (40,100,200,400) or 'all'.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same images."),
    difficulty: str = typer.Option(
        synth_lib.DEFAULT_DIFFICULTY,
        "--difficulty",
        help="easy: colour and nuclear density give the class away (a colour model separates them). "
        "hard: both classes share the same stain, colour, nuclear area and white-space statistics; only "
        "nuclear morphology and tissue architecture differ, and each of the 8 subtypes has its own look.",
    ),
    stain: str = typer.Option(
        synth_lib.DEFAULT_STAIN_PROFILE,
        "--stain-profile",
        help="H&E stain the tree is painted with: default, or shifted (another lab: paler, bluer "
        "haematoxylin, stronger orange-red eosin). The same seed gives the same tissue, patients and "
        "file names under every profile, so a split with the same seed partitions both trees alike.",
    ),
    jobs: int = jobs_option("drawing the images (processes)"),
    force: bool = typer.Option(False, "--force", help="Replace an existing synthetic BreaKHis_v1 tree."),
    as_json: bool = typer.Option(False, "--json", help="Print only a JSON summary on stdout."),
) -> None:
    """Write SYNTHETIC sample data in the BreakHis layout: NOT medical data.

    The images are computer-drawn imitations of H&E-stained tissue (pink stroma,
    purple nuclei) for trying the tool without the real data set; results on them
    say nothing about cancer diagnosis. Writes OUT/BreaKHis_v1/ with the real
    folder layout and file names, 8 subtypes, 82 patients and a README.txt.
    The default (--scale 0.1 --mags 200: 202 images) takes a few seconds; then
    run 'breastcnn split --mag 200X' and 'breastcnn train' in the same folder.
    """
    synth_lib.check_difficulty(difficulty)
    synth_lib.stain_profile(stain)
    mag_list = synth_lib.parse_mags(mags)
    specs = synth_lib.plan(scale, mag_list)
    jobs = jobs if jobs > 0 else max(1, os.cpu_count() or 1)
    command = (
        f"breastcnn synth --scale {scale} --mags {mags} --seed {seed} --difficulty {difficulty} --stain-profile {stain}"
    )
    with make_progress(quiet=as_json) as progress:
        task = progress.add_task("drawing images", total=len(specs))
        summary = synth_lib.generate(
            out,
            scale=scale,
            mags=mag_list,
            seed=seed,
            jobs=jobs,
            force=force,
            progress=lambda n: progress.advance(task, n),
            command=command,
            difficulty=difficulty,
            stain=stain,
        )
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"synthetic sample data (NOT medical data, {difficulty}, {stain} stain) in {summary['root']}")
    table.add_column("magnification")
    table.add_column("benign", justify="right")
    table.add_column("malignant", justify="right")
    for mag, counts in summary["images"].items():
        table.add_row(mag, str(counts["benign"]), str(counts["malignant"]))
    print_table(table)
    info(
        f"{summary['n_images']} images of {summary['n_patients']} synthetic patients in {summary['seconds']:.1f} s; "
        f"next: breastcnn split --data {summary['root']} --mag "
        f"{'all' if mag_list == MAGNIFICATIONS else ','.join(mag_list)}"
    )

"""Train/val/test splits: patient-wise (default), image-wise (the report's), k-fold.

A split directory holds ``manifest.csv`` (columns exactly
``path,label,subtype,patient,magnification,split``; ``path`` relative to the
data root) and ``split.json`` (data root, options, seed, counts, the manifest
hash). A k-fold split directory holds ``fold1/ .. foldK/``, each a split
directory of its own, and a top-level ``split.json`` with ``"kind": "kfold"``.

Everything is deterministic for a seed: the same data and seed give a
byte-identical manifest (rows sorted by path, ``\\n`` line ends).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from breastcnn import CLASSES, __version__
from breastcnn.data.breakhis import Record, accession, parse_mag, scan, verify_images
from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write_json, atomic_write_text, check_overwrite

MANIFEST_COLUMNS = ("path", "label", "subtype", "patient", "magnification", "split")
SUBSETS = ("train", "val", "test")
DEFAULT_SPLIT_DIR = Path("splits/200X")
"""Where ``train``, ``finetune``, ``evaluate`` and ``bench`` look by default."""
DEFAULT_RATIOS = (0.8, 0.1, 0.1)
DEFAULT_FOLD_RATIOS = (0.7, 0.0, 0.3)
"""Spanhol et al. 2016: repeated 70/30 train/test splits by patient."""
FORMAT_VERSION = 1
_FOLD_RE = re.compile(r"^fold(\d+)$")


@dataclass(frozen=True)
class Row(Record):
    """One manifest row: a :class:`Record` plus its subset (``train``/``val``/``test``)."""

    split: str

    @property
    def record(self) -> Record:
        return Record(self.path, self.label, self.subtype, self.patient, self.magnification)


@dataclass
class Split:
    """A loaded split directory.

    ``dir`` the split directory; ``root`` the absolute data root (image paths
    are ``root / row.path``); ``rows`` in manifest order; ``hash`` the SHA-256
    of ``manifest.csv``; ``info`` the parsed ``split.json``.
    """

    dir: Path
    root: Path
    rows: list[Row]
    hash: str
    info: dict = field(default_factory=dict)

    def subset(self, name: str) -> list[Row]:
        """Rows of subset ``name`` (``train``, ``val`` or ``test``), in manifest order."""
        if name not in SUBSETS:
            raise UserInputError(f"subset must be one of {', '.join(SUBSETS)}, got {name!r}")
        return [r for r in self.rows if r.split == name]

    def labels(self, name: str) -> np.ndarray:
        """Integer labels ``(N,)`` int64 of subset ``name``."""
        return np.array([r.y for r in self.subset(name)], dtype=np.int64)

    def patients(self, name: str) -> list[str]:
        """Patient id of each row of subset ``name`` (for patient-level metrics)."""
        return [r.patient or r.path for r in self.subset(name)]


# --------------------------------------------------------------------------- assigning subsets


def parse_ratios(text: str | Sequence[float], option: str = "--ratios") -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> (train, val, test); two values mean (train, test) without val."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise UserInputError(f"{option} must be comma-separated numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(values) == 2:
        values = [values[0], 0.0, values[1]]
    if len(values) != 3 or any(not np.isfinite(v) or v < 0 for v in values):
        raise UserInputError(f"{option} must be 2 or 3 non-negative numbers (train,val,test), got {text!r}")
    if abs(sum(values) - 1.0) > 1e-6 or values[0] <= 0 or values[2] <= 0:
        raise UserInputError(f"{option} must sum to 1 with train > 0 and test > 0, got {text!r}")
    return (values[0], values[1], values[2])


def _group_key(record: Record, group: str) -> str:
    if not record.patient:
        return record.path  # no patient information: each image is its own group
    return accession(record.patient) if group == "accession" else record.patient


def split_by_patient(
    records: Sequence[Record],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    group: str = "patient",
    trials: int = 256,
) -> list[Row]:
    """Patient-disjoint split, stratified by class, image ratios met as closely as whole patients allow.

    For each class the patients (``group="accession"``: accession numbers) are
    assigned greedily, in a random order, to the subset furthest below its
    target image count; of ``trials`` random orders the one closest to the
    targets wins (and every subset with a ratio above 0 gets at least one
    patient of each class when there are enough patients). Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    assignment: dict[tuple[str, str], str] = {}
    for label in CLASSES:
        sizes = Counter(_group_key(r, group) for r in records if r.label == label)
        if not sizes:
            continue
        names = sorted(sizes)
        counts = np.array([sizes[n] for n in names], dtype=np.float64)
        best = _best_assignment(counts, np.asarray(ratios, dtype=np.float64), rng, trials)
        assignment.update({(label, n): SUBSETS[s] for n, s in zip(names, best)})
    # a patient with images in both classes (never in BreakHis) stays with its first class's subset
    first: dict[str, str] = {}
    rows = []
    for r in sorted(records):
        key = _group_key(r, group)
        subset = first.setdefault(key, assignment[(r.label, key)])
        rows.append(Row(r.path, r.label, r.subtype, r.patient, r.magnification, subset))
    return rows


def _best_assignment(counts: np.ndarray, ratios: np.ndarray, rng: np.random.Generator, trials: int) -> np.ndarray:
    """Subset index per group minimising the distance of image counts to ``ratios * total``."""
    total = counts.sum()
    targets = ratios * total
    wanted = np.flatnonzero(ratios > 0)
    need_all = len(counts) >= len(wanted)
    best, best_score = None, np.inf
    for _ in range(trials):
        order = rng.permutation(len(counts))
        filled = np.zeros(len(ratios))
        members = np.zeros(len(ratios), dtype=np.int64)
        choice = np.empty(len(counts), dtype=np.int64)
        for i in order:
            deficit = np.where(ratios > 0, (targets - filled) / np.maximum(targets, 1e-9), -np.inf)
            # a subset still empty comes first, so that val/test see every class
            if need_all and (members[wanted] == 0).any():
                deficit = np.where((members == 0) & (ratios > 0), deficit + 1e6, deficit)
            s = int(np.argmax(deficit))
            choice[i] = s
            filled[s] += counts[i]
            members[s] += 1
        score = np.abs(filled - targets).sum() + (1e9 if need_all and (members[wanted] == 0).any() else 0)
        if score < best_score:
            best, best_score = choice.copy(), score
    return best


def split_by_image(records: Sequence[Record], ratios: Sequence[float] = DEFAULT_RATIOS, seed: int = 0) -> list[Row]:
    """The report's protocol: per class, shuffle the images and cut at the ratios (leaks patients)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in CLASSES:
        items = sorted(r for r in records if r.label == label)
        order = rng.permutation(len(items))
        bounds = np.rint(np.cumsum(ratios) * len(items)).astype(int)
        for rank, i in enumerate(order):
            subset = SUBSETS[min(int(np.searchsorted(bounds, rank, side="right")), len(SUBSETS) - 1)]
            r = items[i]
            rows.append(Row(r.path, r.label, r.subtype, r.patient, r.magnification, subset))
    return sorted(rows, key=lambda row: row.path)


# --------------------------------------------------------------------------- manifest I/O


def manifest_text(rows: Iterable[Row]) -> str:
    """The manifest as CSV text: header, rows sorted by path, ``\\n`` line ends."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for r in sorted(rows, key=lambda row: row.path):
        writer.writerow([r.path, r.label, r.subtype, r.patient, r.magnification, r.split])
    return buffer.getvalue()


def manifest_hash(text: str | bytes) -> str:
    """SHA-256 hex digest of the manifest bytes."""
    return hashlib.sha256(text.encode("utf-8") if isinstance(text, str) else text).hexdigest()


def summarize(rows: Sequence[Row]) -> dict:
    """``{"images": {subset: {class: n, "total": n}}, "patients": {...}}`` for subsets present."""
    images: dict = {}
    patients: dict = {}
    for subset in SUBSETS:
        part = [r for r in rows if r.split == subset]
        if not part:
            continue
        images[subset] = {c: sum(r.label == c for r in part) for c in CLASSES}
        images[subset]["total"] = len(part)
        patients[subset] = {c: len({r.patient for r in part if r.label == c and r.patient}) for c in CLASSES}
        patients[subset]["total"] = len({r.patient for r in part if r.patient})
    return {"images": images, "patients": patients}


def load_split(split_dir: str | os.PathLike = DEFAULT_SPLIT_DIR) -> Split:
    """Read ``manifest.csv`` and ``split.json`` of ``split_dir`` (a plain split or one fold)."""
    split_dir = Path(split_dir)
    manifest = split_dir / "manifest.csv"
    info_path = split_dir / "split.json"
    if not manifest.is_file():
        folds = fold_dirs(split_dir)
        if folds:
            raise UserInputError(
                f"{split_dir} is a {len(folds)}-fold split; pass one fold, e.g. {folds[0]}"
            )
        raise UserInputError(
            f"no split found at {split_dir} (missing manifest.csv); run 'breastcnn split --mag 200X' first"
        )
    import json

    data = manifest.read_bytes()
    try:
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    except ValueError as exc:
        raise UserInputError(f"{info_path}: not valid JSON ({exc})") from None
    reader = csv.reader(io.StringIO(data.decode("utf-8")))
    header = next(reader, None)
    if tuple(header or ()) != MANIFEST_COLUMNS:
        raise UserInputError(f"{manifest}: header must be {','.join(MANIFEST_COLUMNS)}, got {header}")
    rows = []
    for lineno, fields in enumerate(reader, start=2):
        if len(fields) != len(MANIFEST_COLUMNS):
            raise UserInputError(f"{manifest}:{lineno}: expected {len(MANIFEST_COLUMNS)} fields, got {len(fields)}")
        row = Row(*fields)
        if row.label not in CLASSES or row.split not in SUBSETS:
            raise UserInputError(f"{manifest}:{lineno}: bad label {row.label!r} or split {row.split!r}")
        rows.append(row)
    root = info.get("data_root")
    if not root:
        raise UserInputError(f"{info_path}: missing 'data_root'")
    root_path = Path(root)
    if not root_path.is_absolute():
        root_path = (split_dir / root_path).resolve()
    return Split(dir=split_dir, root=root_path, rows=rows, hash=manifest_hash(data), info=info)


def fold_dirs(split_dir: str | os.PathLike) -> list[Path]:
    """``[split_dir/fold1, ..., split_dir/foldK]`` of a k-fold split; empty otherwise."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        return []
    folds = [p for p in split_dir.iterdir() if _FOLD_RE.match(p.name) and (p / "manifest.csv").is_file()]
    return sorted(folds, key=lambda p: int(_FOLD_RE.match(p.name).group(1)))


# --------------------------------------------------------------------------- writing a split directory


def _clear_previous(out: Path) -> None:
    """Remove what an earlier ``breastcnn split`` wrote in ``out`` (only our own files)."""
    for name in ("manifest.csv", "split.json"):
        (out / name).unlink(missing_ok=True)
    for child in list(out.iterdir()) if out.is_dir() else []:
        if child.is_dir() and (child.name in SUBSETS or child.name == "cache" or _FOLD_RE.match(child.name)):
            shutil.rmtree(child)


def _materialize(out: Path, root: Path, rows: Sequence[Row], how: str) -> None:
    """Copy or symlink every image to ``out/<split>/<label>/<file name>``."""
    taken: set[str] = set()
    for r in rows:
        name = Path(r.path).name
        target = out / r.split / r.label / name
        if str(target) in taken:  # same file name twice (folder-per-class subfolders)
            target = out / r.split / r.label / r.path.replace("/", "__")
        taken.add(str(target))
        target.parent.mkdir(parents=True, exist_ok=True)
        source = root / r.path
        if how == "copy":
            shutil.copy2(source, target)
        else:
            os.symlink(source, target)


def _write_one(out: Path, root: Path, rows: list[Row], info: dict, materialize: str) -> dict:
    """Write ``manifest.csv``, ``split.json`` (and materialized files) into ``out``; returns the info."""
    text = manifest_text(rows)
    info = dict(info)
    info.update(summarize(rows))
    info["n_images"] = len(rows)
    info["n_patients"] = len({r.patient for r in rows if r.patient})
    info["manifest_hash"] = manifest_hash(text)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "manifest.csv", text)
    if materialize != "none":
        _materialize(out, root, rows, materialize)
    atomic_write_json(out / "split.json", info)
    return info


def create_split(
    data: str | os.PathLike,
    mag: str = "200X",
    out: str | os.PathLike | None = None,
    by: str = "patient",
    ratios: Sequence[float] | None = None,
    folds: int = 0,
    seed: int = 0,
    materialize: str = "none",
    strict: bool = False,
    force: bool = False,
    group: str = "patient",
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
    on_scanned: Callable[[int], None] | None = None,
) -> dict:
    """Scan ``data``, split it and write the split directory ``out`` (default ``splits/<mag>``).

    Returns the ``split.json`` content (for k-fold: the top-level one, with a
    ``"folds"`` list of per-fold infos) plus ``"out"`` and ``"warnings"``.
    ``on_scanned(n)`` is called with the number of candidates before decoding
    starts (to size a progress bar). Raises ``UserInputError`` for bad options,
    missing data, unreadable images with ``strict``, or an existing split without ``force``.
    """
    mag_norm = parse_mag(mag)
    if by not in ("patient", "image"):
        raise UserInputError(f"--by must be 'patient' or 'image', got {by!r}")
    if materialize not in ("copy", "link", "none"):
        raise UserInputError(f"--materialize must be copy, link or none, got {materialize!r}")
    if group not in ("patient", "accession"):
        raise UserInputError(f"--group must be 'patient' or 'accession', got {group!r}")
    if folds < 0 or folds == 1 or folds > 100:
        raise UserInputError(f"--folds must be 0 (no folds) or between 2 and 100, got {folds}")
    ratios = parse_ratios(ratios) if ratios is not None else (DEFAULT_FOLD_RATIOS if folds else DEFAULT_RATIOS)
    out = Path(out) if out is not None else Path("splits") / (mag_norm or "all")

    # Walk the tree (cheap) and refuse a bad --out before decoding every image (the expensive part).
    listing = scan(data, mag_norm, verify=False)
    root = listing.root
    out_abs = out.resolve()
    scanned = root / "histology_slides" if listing.layout == "breakhis" else root
    if out_abs == root or scanned in out_abs.parents or out_abs == scanned:
        raise UserInputError(f"--out {out} is inside the data tree {root}; the source tree is never modified")
    check_overwrite(out, force)
    if on_scanned is not None:
        on_scanned(len(listing.records))
    result = verify_images(listing, jobs, progress)
    warnings = list(result.warnings)
    if result.unreadable and strict:
        raise UserInputError(
            f"{len(result.unreadable)} unreadable image(s) under {result.root} (--strict), first: {result.unreadable[0]}"
        )
    if not result.records:
        raise UserInputError(f"no readable images for --mag {mag} under {result.root}")

    effective_by = by
    if result.layout == "folders" and by == "patient":
        effective_by = "image"
        warnings.append("folder-per-class tree has no patient information: split by image")
    if effective_by == "image" and result.layout == "breakhis":
        warnings.append("--by image puts images of the same patient in train and test (patient leakage); "
                        "scores will be optimistic")
    base_info = {
        "format": FORMAT_VERSION,
        "created_by": f"breastcnn {__version__}",
        "data_root": str(root),
        "layout": result.layout,
        "magnification": mag_norm or "all",
        "by": effective_by,
        "group": group if effective_by == "patient" else None,
        "ratios": list(ratios),
        "seed": seed,
        "materialize": materialize,
        "leaks_patients": effective_by == "image" and result.layout == "breakhis",
        "unreadable": result.unreadable,
        "ignored_files": result.ignored,
    }

    def assign(fold_seed: int) -> list[Row]:
        if effective_by == "patient":
            return split_by_patient(result.records, ratios, fold_seed, group)
        return split_by_image(result.records, ratios, fold_seed)

    if force:
        _clear_previous(out)
    if not folds:
        info = _write_one(out, root, assign(seed), {**base_info, "kind": "split"}, materialize)
        return {**info, "out": str(out), "warnings": warnings}

    fold_seeds = np.random.SeedSequence(seed).generate_state(folds)
    fold_infos = []
    for k in range(folds):
        fold_info = {**base_info, "kind": "fold", "fold": k + 1, "folds": folds, "fold_seed": int(fold_seeds[k])}
        info = _write_one(out / f"fold{k + 1}", root, assign(int(fold_seeds[k])), fold_info, materialize)
        fold_infos.append({**info, "dir": f"fold{k + 1}"})
    top = {**base_info, "kind": "kfold", "folds": folds, "fold_dirs": [f"fold{k + 1}" for k in range(folds)]}
    atomic_write_json(out / "split.json", top)
    return {**top, "fold_infos": fold_infos, "out": str(out), "warnings": warnings}

"""Train/val/test splits: patient-wise (default), image-wise (the report's), k-fold.

A split directory holds ``manifest.csv`` (columns exactly
``path,label,subtype,patient,magnification,split``; ``path`` relative to the
data root) and ``split.json`` (data root, options, seed, counts, the manifest
hash). A split may cover several magnifications (``--mag all``, ``--mag
40X,200X``): a patient's images at every one of them go to the same subset.
A k-fold split directory holds ``fold1/ .. foldK/``, each a split directory of
its own, and a top-level ``split.json`` with ``"kind": "kfold"``.

Everything is deterministic for a seed: the same data and seed give a
byte-identical manifest (rows sorted by path, ``\\n`` line ends).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from breastcnn import CLASSES, __version__
from breastcnn.data.breakhis import (
    MAGNIFICATIONS,
    Record,
    ScanResult,
    accession,
    check_outside_data,
    image_tree,
    locate_data,
    mags_label,
    parse_mags,
    scan,
    verify_images,
)
from breastcnn.data.images import owned_cache_files
from breastcnn.data.tasks import DEFAULT_TASK, SUBTYPE_CLASSES, label_indices
from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write_json, atomic_write_text, check_overwrite, locked_directory, remove_recorded

MANIFEST_COLUMNS = ("path", "label", "subtype", "patient", "magnification", "split")
SUBSETS = ("train", "val", "test")
DEFAULT_SPLIT_DIR = Path("splits/200X")
"""Where ``train``, ``finetune``, ``evaluate`` and ``bench`` look by default."""
DEFAULT_RATIOS = (0.8, 0.1, 0.1)
DEFAULT_FOLD_RATIOS = (0.7, 0.0, 0.3)
"""Spanhol et al. 2016: repeated 70/30 train/test splits by patient."""
STRATIFY = ("subtype", "class")
"""What a patient-wise split balances: ``subtype`` (each subset gets patients of every subtype where
there are enough, image ratios met per class) or ``class`` (per class only: the splits of 0.1.0)."""
DEFAULT_STRATIFY = "subtype"
SUBTYPE_WEIGHT = 0.1
"""With ``stratify="subtype"``: weight of the subtypes' image ratios beside the class's in the distance a
patient-wise split minimises (measured: see docs/internals.md)."""
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

    def labels(self, name: str, task: str = DEFAULT_TASK) -> np.ndarray:
        """Integer labels ``(N,)`` int64 of subset ``name`` for ``task`` (see :mod:`breastcnn.data.tasks`):
        ``binary`` 0 benign / 1 malignant, ``subtype`` 0..7 in ``SUBTYPE_CLASSES`` order."""
        return label_indices(self.subset(name), task, where=str(Path(self.dir) / "manifest.csv"))

    def magnifications(self, name: str) -> list[str]:
        """Magnification of each row of subset ``name`` (``"200X"``; ``""`` when unknown), for per-magnification metrics."""
        return [r.magnification for r in self.subset(name)]

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
    stratify: str = DEFAULT_STRATIFY,
) -> list[Row]:
    """Patient-disjoint split, stratified by class (and subtype), image ratios met as closely as whole patients allow.

    For each class the patients (``group="accession"``: accession numbers) are
    assigned greedily, in a random order, to the subset furthest below its
    target image count; of ``trials`` random orders the one closest to the
    targets wins. Every subset with a ratio above 0 gets at least one patient
    of each class when there are enough patients, and with ``stratify="subtype"``
    one of each subtype that has at least as many patients as there are such
    subsets (a rarer subtype gives train a patient first). A patient's images at
    every magnification count together, so they all land in one subset.
    ``stratify="class"`` gives the splits of breastcnn 0.1.0. Deterministic for a seed.
    """
    if stratify not in STRATIFY:
        raise UserInputError(f"--stratify must be one of {', '.join(STRATIFY)}, got {stratify!r}")
    rng = np.random.default_rng(seed)
    assignment: dict[tuple[str, str], str] = {}
    for label in CLASSES:
        members = [r for r in records if r.label == label]
        sizes = Counter(_group_key(r, group) for r in members)
        if not sizes:
            continue
        names = sorted(sizes)
        counts = np.array([sizes[n] for n in names], dtype=np.float64)
        strata = _subtype_strata(members, names, group) if stratify == "subtype" else None
        best = _best_assignment(counts, np.asarray(ratios, dtype=np.float64), rng, trials, strata)
        assignment.update({(label, n): SUBSETS[s] for n, s in zip(names, best, strict=True)})
    # a patient with images in both classes (never in BreakHis) stays with its first class's subset
    first: dict[str, str] = {}
    rows = []
    for r in sorted(records):
        key = _group_key(r, group)
        subset = first.setdefault(key, assignment[(r.label, key)])
        rows.append(Row(r.path, r.label, r.subtype, r.patient, r.magnification, subset))
    return rows


def _subtype_strata(records: Sequence[Record], names: Sequence[str], group: str) -> np.ndarray:
    """Stratum index ``(G,)`` of each group in ``names``: its subtype (the most frequent one of its images)."""
    subtypes: dict[str, Counter] = {}
    for r in records:
        subtypes.setdefault(_group_key(r, group), Counter())[r.subtype] += 1
    majority = [min(subtypes[n].items(), key=lambda kv: (-kv[1], kv[0]))[0] for n in names]
    kinds = sorted(set(majority))
    return np.array([kinds.index(m) for m in majority], dtype=np.int64)


@dataclass
class _Coverage:
    """The coverage rules of :func:`_best_assignment`: which subsets and strata must get a group.

    ``wanted``: subsets with a ratio above 0; ``need_all``: at least as many
    groups as wanted subsets; ``reach`` ``(strata,)``: subsets each stratum
    must reach; ``small``: strata too small for every wanted subset (train first).
    """

    ratios: np.ndarray
    wanted: np.ndarray
    need_all: bool
    reach: np.ndarray | None
    small: np.ndarray | None
    total: float

    def __post_init__(self) -> None:
        # plain-Python copies for the greedy pass
        self.ratio_list = self.ratios.tolist()
        self.target_list = [r * float(self.total) for r in self.ratio_list]
        self.wanted_list = self.wanted.tolist()
        self.reach_list = self.reach.tolist() if self.reach is not None else None
        self.small_list = self.small.tolist() if self.small is not None else None

    def broken(self, members: np.ndarray, seen: np.ndarray | None) -> int:
        """How many coverage rules an assignment breaks (``members`` groups per subset,
        ``seen`` ``(strata, subsets)`` groups of each stratum per subset)."""
        count = int(self.need_all and (members[self.wanted] == 0).any())
        if seen is not None:
            covered = (seen[:, self.wanted] > 0).sum(axis=1)
            count += int(np.maximum(self.reach - covered, 0).sum() + (self.small & (seen[:, 0] == 0)).sum())
        return count

    def greedy(self, order: np.ndarray, counts: np.ndarray, strata: np.ndarray | None, n_strata: int) -> tuple:
        """One greedy pass over the groups in ``order``: each goes to the subset where it is most wanted
        (:meth:`deficit`). Returns ``(choice (G,), filled (S,) images, members (S,) groups, seen (K, S) or None)``.

        Plain Python floats on purpose: the vectors have one entry per subset (3), where NumPy's
        per-call overhead cost ~10x; the arithmetic is the same IEEE double arithmetic, ties go
        to the first subset like ``np.argmax``, so a seed gives the same split as before.
        """
        n_subsets = len(self.ratios)
        filled = [0.0] * n_subsets
        members = [0] * n_subsets
        seen = [[0] * n_subsets for _ in range(n_strata)] if strata is not None else None
        choice = np.empty(len(counts), dtype=np.int64)
        count_of, stratum_of = counts.tolist(), (strata.tolist() if strata is not None else None)
        for i in order.tolist():
            k = stratum_of[i] if stratum_of is not None else None
            scores = self.deficit(filled, members, seen, k)
            s = scores.index(max(scores))
            choice[i] = s
            filled[s] += count_of[i]
            members[s] += 1
            if seen is not None:
                seen[k][s] += 1
        seen_array = np.array(seen, dtype=np.int64).reshape(n_strata, n_subsets) if seen is not None else None
        return choice, np.array(filled), np.array(members, dtype=np.int64), seen_array

    def deficit(self, filled: list, members: list, seen: list | None, k: int | None) -> list:
        """Per subset, how much the next group (of stratum ``k``) is wanted there (a list; the greedy pass
        takes the first max). Subsets with ratio 0 are never wanted."""
        ratios = self.ratio_list
        deficit = [
            (t - f) / max(t, 1e-9) if r > 0 else -math.inf
            for t, f, r in zip(self.target_list, filled, ratios, strict=True)
        ]
        # a subset still empty comes first, so that val/test see every class
        if self.need_all and any(members[w] == 0 for w in self.wanted_list):
            deficit = [d + 1e6 if m == 0 and r > 0 else d for d, m, r in zip(deficit, members, ratios, strict=True)]
        if k is None:
            return deficit
        lacking = [c == 0 and r > 0 for c, r in zip(seen[k], ratios, strict=True)]
        # ... and every subtype, where it has the patients
        if len(self.wanted_list) - sum(lacking) < self.reach_list[k]:
            deficit = [d + 1e6 if lack else d for d, lack in zip(deficit, lacking, strict=True)]
            if self.small_list[k] and lacking[0]:
                deficit[0] += 1e7  # too few for every subset: train sees it first
        return deficit


def _best_assignment(
    counts: np.ndarray, ratios: np.ndarray, rng: np.random.Generator, trials: int, strata: np.ndarray | None = None
) -> np.ndarray:
    """Subset index per group ``(G,)`` minimising the distance of image counts to ``ratios * total``
    (with ``strata``: plus :data:`SUBTYPE_WEIGHT` times that of each stratum's, see :func:`_distance`).

    ``counts`` ``(G,)`` images per group; ``strata`` ``(G,)`` int stratum (subtype) per group, or None.
    Coverage rules, kept by the greedy pass and checked in the score (a trial that
    breaks one loses to any that keeps them): every subset with a ratio above 0
    ("wanted") gets a group when there are at least as many groups as wanted
    subsets; with ``strata``, each stratum reaches min(its groups, wanted subsets)
    of them, train first when the stratum is smaller than that. The coverage
    rules pin whichever groups come first in a trial's order, so with ``strata``
    the best trial is then improved by :func:`_polish` (moves and swaps of groups).
    """
    total = counts.sum()
    targets = ratios * total
    wanted = np.flatnonzero(ratios > 0)
    need_all = len(counts) >= len(wanted)
    n_strata = 0 if strata is None else int(strata.max()) + 1
    reach = np.minimum(np.bincount(strata, minlength=n_strata), len(wanted)) if strata is not None else None
    small = reach < len(wanted) if strata is not None else None

    rules = _Coverage(ratios, wanted, need_all, reach, small, total)
    broken = rules.broken

    best, best_score = None, np.inf
    for _ in range(trials):
        order = rng.permutation(len(counts))
        choice, filled, members, seen = rules.greedy(order, counts, strata, n_strata)
        score = np.abs(filled - targets).sum() + 1e9 * broken(members, seen)
        if strata is not None:
            score += SUBTYPE_WEIGHT * np.abs(_stratum_gaps(choice, counts, strata, ratios)).sum()
        if score < best_score:
            best, best_score = choice.copy(), score
    if strata is None:
        return best  # the per-class search of 0.1.0, unchanged: same seed, same split
    n_subsets = len(ratios)

    def broken_of(choice: np.ndarray) -> int:
        seen = np.bincount(strata * n_subsets + choice, minlength=n_strata * n_subsets).reshape(n_strata, n_subsets)
        return broken(np.bincount(choice, minlength=n_subsets), seen)

    return _polish(best, counts, ratios, strata, broken_of)


def _stratum_gaps(choice: np.ndarray, counts: np.ndarray, strata: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """``(K, S)`` images of each stratum in each subset minus ``ratios`` times the stratum's images."""
    n_strata, n_subsets = int(strata.max()) + 1, len(ratios)
    filled = np.bincount(strata * n_subsets + choice, weights=counts, minlength=n_strata * n_subsets)
    totals = np.bincount(strata, weights=counts, minlength=n_strata)
    return filled.reshape(n_strata, n_subsets) - totals[:, None] * ratios[None, :]


def _distance(
    choice: np.ndarray,
    counts: np.ndarray,
    ratios: np.ndarray,
    strata: np.ndarray,
    norm: Callable[[np.ndarray], np.ndarray] = np.abs,
) -> float:
    """What :func:`_polish` minimises: ``norm`` of the class gaps (images in each subset minus its ratio of
    the images) summed, plus :data:`SUBTYPE_WEIGHT` times that of every stratum's gaps."""
    gap = np.bincount(choice, weights=counts, minlength=len(ratios)) - ratios * counts.sum()
    return float(norm(gap).sum() + SUBTYPE_WEIGHT * norm(_stratum_gaps(choice, counts, strata, ratios)).sum())


def _step_changes(
    choice: np.ndarray,
    counts: np.ndarray,
    ratios: np.ndarray,
    strata: np.ndarray,
    norm: Callable[[np.ndarray], np.ndarray] = np.abs,
) -> tuple[np.ndarray, np.ndarray]:
    """The change of :func:`_distance` for every single step from ``choice``, without recomputing it.

    ``move`` ``(G, S)``: group ``i`` to subset ``s``; ``swap`` ``(G, G)``: groups ``i`` and ``j``
    trade subsets (``i < j`` in different subsets). Steps that are no step are ``inf``.
    """
    n_groups, n_subsets = len(counts), len(ratios)
    a, k = choice, strata
    gap = np.bincount(a, weights=counts, minlength=n_subsets) - ratios * counts.sum()  # (S,) over (+), under (-)
    sgap = _stratum_gaps(a, counts, strata, ratios)  # (K, S)
    c_i, c_j = counts[:, None], counts[None, :]
    trade = c_j - c_i  # (G, G): what i's subset gains when i and j swap

    def change(g, add):
        return norm(g + add) - norm(g)

    move = change(gap[a], -counts)[:, None] + change(gap[None, :], c_i)
    move += SUBTYPE_WEIGHT * (change(sgap[k, a], -counts)[:, None] + change(sgap[k], c_i))
    move[np.arange(n_groups), a] = np.inf
    move[:, ratios <= 0] = np.inf
    swap = change(gap[a][:, None], trade) + change(gap[a][None, :], -trade)
    own_i, own_j = sgap[k, a][:, None], sgap[k, a][None, :]  # i's stratum at a[i], j's at a[j]
    i_at_j, j_at_i = sgap[k[:, None], a[None, :]], sgap[k[None, :], a[:, None]]
    swap += SUBTYPE_WEIGHT * np.where(
        k[:, None] == k[None, :],
        change(own_i, trade) + change(i_at_j, -trade),
        change(own_i, -c_i) + change(i_at_j, c_i) + change(own_j, -c_j) + change(j_at_i, c_j),
    )
    swap[np.tri(n_groups, dtype=bool) | (a[:, None] == a[None, :])] = np.inf
    return move, swap


def _polish(
    choice: np.ndarray,
    counts: np.ndarray,
    ratios: np.ndarray,
    strata: np.ndarray,
    broken_of: Callable[[np.ndarray], int],
) -> np.ndarray:
    """Hill climbing from an assignment ``choice`` ``(G,)`` of groups with ``counts`` ``(G,)`` and
    ``strata`` ``(G,)`` to subsets with ``ratios`` ``(S,)``.

    Applies the move of one group to another wanted subset, or the swap of two
    groups in different subsets, that lowers :func:`_distance` most (ties: the
    same sums of squares, so that an unavoidable excess is shared between
    subsets) without breaking more coverage rules (``broken_of``), until none
    lowers it. Deterministic; every step strictly improves, so it ends.
    """
    choice = choice.copy()
    n_moves = len(counts) * len(ratios)
    while True:
        first, second = (
            np.concatenate([d.ravel() for d in _step_changes(choice, counts, ratios, strata, norm)])
            for norm in (np.abs, np.square)
        )
        first = np.where(np.abs(first) <= 1e-9, 0.0, first)  # equal distances: the tie-break decides
        better = (first < 0) | ((first == 0) & (second < -1e-9))
        before = broken_of(choice)
        for flat in np.lexsort((second, first))[: int(better.sum())]:
            trial = choice.copy()
            if flat < n_moves:
                i, s = divmod(int(flat), len(ratios))
                trial[i] = s
            else:
                i, j = divmod(int(flat) - n_moves, len(counts))
                trial[i], trial[j] = choice[j], choice[i]
            if broken_of(trial) <= before:
                choice = trial
                break
        else:
            return choice


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
    """Counts per subset (only subsets present), each ``{subset: {name: n}}``.

    ``images``/``patients`` by class (plus ``total``); ``images_by_subtype``/
    ``patients_by_subtype`` by subtype (every subtype of the split, 0 where a subset
    has none; empty without subtypes); ``images_by_magnification`` by magnification.
    """
    subtypes = sorted({r.subtype for r in rows if r.subtype}, key=_subtype_order)
    mags = [m for m in MAGNIFICATIONS if any(r.magnification == m for r in rows)]
    out: dict = {
        key: {} for key in ("images", "patients", "images_by_subtype", "patients_by_subtype", "images_by_magnification")
    }
    for subset in SUBSETS:
        part = [r for r in rows if r.split == subset]
        if not part:
            continue
        out["images"][subset] = {c: sum(r.label == c for r in part) for c in CLASSES}
        out["images"][subset]["total"] = len(part)
        out["patients"][subset] = {c: len({r.patient for r in part if r.label == c and r.patient}) for c in CLASSES}
        out["patients"][subset]["total"] = len({r.patient for r in part if r.patient})
        out["images_by_subtype"][subset] = {t: sum(r.subtype == t for r in part) for t in subtypes}
        out["patients_by_subtype"][subset] = {
            t: len({r.patient for r in part if r.subtype == t and r.patient}) for t in subtypes
        }
        out["images_by_magnification"][subset] = {m: sum(r.magnification == m for r in part) for m in mags}
    return out


def _subtype_order(name: str) -> tuple[int, str]:
    """Known subtypes in label order (benign first), any other name after them alphabetically."""
    return (SUBTYPE_CLASSES.index(name), "") if name in SUBTYPE_CLASSES else (len(SUBTYPE_CLASSES), name)


def load_split(split_dir: str | os.PathLike = DEFAULT_SPLIT_DIR) -> Split:
    """Read ``manifest.csv`` and ``split.json`` of ``split_dir`` (a plain split or one fold)."""
    split_dir = Path(split_dir)
    manifest = split_dir / "manifest.csv"
    info_path = split_dir / "split.json"
    if not manifest.is_file():
        folds = fold_dirs(split_dir)
        if folds:
            raise UserInputError(f"{split_dir} is a {len(folds)}-fold split; pass one fold, e.g. {folds[0]}")
        raise UserInputError(
            f"no split found at {split_dir} (missing manifest.csv); run 'breastcnn split --mag 200X' first"
        )
    data = manifest.read_bytes()
    try:
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    except ValueError as exc:
        raise UserInputError(f"{info_path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise UserInputError(
            f"{info_path}: expected a JSON object, got {type(info).__name__}; re-run 'breastcnn split'"
        )
    rows = _parse_rows(manifest, data)
    root = info.get("data_root")
    if not root or not isinstance(root, str):
        raise UserInputError(f"{info_path}: missing 'data_root'")
    root_path = Path(root)
    if not root_path.is_absolute():
        root_path = (split_dir / root_path).resolve()
    return Split(dir=split_dir, root=root_path, rows=rows, hash=manifest_hash(data), info=info)


def _read_rows(manifest: Path) -> list[Row]:
    """The rows of a manifest file (see :func:`_parse_rows`)."""
    return _parse_rows(manifest, manifest.read_bytes())


def _parse_rows(manifest: Path, data: bytes) -> list[Row]:
    """Manifest rows from its bytes; anything else is a UserInputError naming the file (and line).

    Every ``path`` must stay inside the data root: relative, without ``..``.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(
            f"{manifest}: not a text CSV file (byte {exc.start} is not UTF-8); re-run 'breastcnn split'"
        ) from None
    reader = csv.reader(io.StringIO(text))
    rows = []
    try:
        header = next(reader, None)
        if tuple(header or ()) != MANIFEST_COLUMNS:
            raise UserInputError(f"{manifest}: header must be {','.join(MANIFEST_COLUMNS)}, got {header}")
        for lineno, fields in enumerate(reader, start=2):
            if len(fields) != len(MANIFEST_COLUMNS):
                raise UserInputError(f"{manifest}:{lineno}: expected {len(MANIFEST_COLUMNS)} fields, got {len(fields)}")
            row = Row(*fields)
            if row.label not in CLASSES or row.split not in SUBSETS:
                raise UserInputError(f"{manifest}:{lineno}: bad label {row.label!r} or split {row.split!r}")
            if not _safe_relative(row.path):
                raise UserInputError(
                    f"{manifest}:{lineno}: path {row.path!r} is outside the data root (absolute or "
                    "with '..'); manifest paths are relative to the data root"
                )
            rows.append(row)
    except csv.Error as exc:
        raise UserInputError(f"{manifest}:{reader.line_num}: not a valid CSV line ({exc})") from None
    return rows


def fold_dirs(split_dir: str | os.PathLike) -> list[Path]:
    """``[split_dir/fold1, ..., split_dir/foldK]`` of a k-fold split; empty otherwise."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        return []
    folds = [p for p in split_dir.iterdir() if _FOLD_RE.match(p.name) and (p / "manifest.csv").is_file()]
    return sorted(folds, key=lambda p: int(_FOLD_RE.match(p.name).group(1)))


def split_identity(split_dir: str | os.PathLike) -> tuple[str, Path]:
    """``(hash, data root)`` of a split directory, as a run records and checks it.

    A plain split (or one fold): its manifest hash. A k-fold split: the SHA-256
    of its folds' manifest hashes, in fold order, so a change in any fold shows.
    """
    folds = fold_dirs(split_dir)
    if not folds:
        split = load_split(split_dir)
        return split.hash, split.root
    splits = [load_split(f) for f in folds]
    return manifest_hash("\n".join(s.hash for s in splits)), splits[0].root


# --------------------------------------------------------------------------- writing a split directory


def _safe_relative(path) -> bool:
    """A recorded path may only name something inside its split directory."""
    if not isinstance(path, str) or not path or "\\" in path:
        return False
    pure = PurePosixPath(path)
    return not pure.is_absolute() and ".." not in pure.parts and pure.parts[:1] != (".",)


def _recorded_by(split_dir: Path) -> tuple[set[str], Path | None]:
    """Files (relative to ``split_dir``) that the split written there recorded as its own, and its data root.

    ``split.json`` lists them under ``files``; a split written before that list
    existed is recognised by ``created_by`` and its files are reconstructed
    (manifest, split.json, materialised copies named as :func:`_materialize_plan` names them).
    """
    try:
        info = json.loads((split_dir / "split.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set(), None
    if not isinstance(info, dict) or not str(info.get("created_by", "")).startswith("breastcnn"):
        return set(), None
    root = Path(info["data_root"]) if isinstance(info.get("data_root"), str) else None
    listed = info.get("files")
    if isinstance(listed, list):
        return {"split.json"} | {p for p in listed if _safe_relative(p)}, root
    files = {"split.json"}
    if (split_dir / "manifest.csv").is_file():
        files.add("manifest.csv")
        if info.get("materialize") in ("copy", "link"):
            with contextlib.suppress(UserInputError, OSError, ValueError):
                files.update(_materialize_plan(_read_rows(split_dir / "manifest.csv")).values())
    return files, root


def recorded_split_files(out: Path) -> tuple[set[str], list[Path]]:
    """What earlier splits wrote in ``out`` (relative POSIX paths) and the data roots they read.

    The split in ``out`` and every ``foldN/`` split, each by its own ``split.json``,
    plus the image caches ``train`` wrote into their ``cache/`` folders (recognised
    by the caches' own metadata). Nothing else in ``out`` is ours.
    """
    owned: set[str] = set()
    roots: list[Path] = []
    bases = [out] + sorted(p for p in out.iterdir() if _FOLD_RE.match(p.name) and p.is_dir() and not p.is_symlink())
    for base in bases:
        prefix = base.relative_to(out)
        files, root = _recorded_by(base)
        owned.update((prefix / f).as_posix() for f in files)
        owned.update((prefix / f).as_posix() for f in owned_cache_files(base))
        if root is not None:
            roots.append(root)
    return owned, roots


def _materialize_plan(rows: Sequence[Row]) -> dict[Row, str]:
    """Where ``--materialize`` puts each image: ``<split>/<label>/<file name>`` relative to the split dir."""
    plan: dict[Row, str] = {}
    taken: set[str] = set()
    for r in rows:
        target = f"{r.split}/{r.label}/{Path(r.path).name}"
        if target in taken:  # same file name twice (folder-per-class subfolders)
            target = f"{r.split}/{r.label}/{r.path.replace('/', '__')}"
        taken.add(target)
        plan[r] = target
    return plan


def _materialize(out: Path, root: Path, plan: dict[Row, str], how: str) -> None:
    """Copy or symlink every image to its planned place in ``out``."""
    for r, rel in plan.items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        source = root / r.path
        if how == "copy":
            shutil.copy2(source, target)
        else:
            os.symlink(source, target)


def _files_of(rows: Sequence[Row], materialize: str) -> tuple[list[str], dict[Row, str]]:
    """The files a split directory of ``rows`` consists of (relative) and the materialisation plan."""
    plan = _materialize_plan(rows) if materialize != "none" else {}
    return ["manifest.csv", "split.json", *plan.values()], plan


def _write_one(out: Path, root: Path, rows: list[Row], info: dict, materialize: str) -> dict:
    """Write ``manifest.csv``, ``split.json`` (listing every file of the split) and the materialised images."""
    text = manifest_text(rows)
    files, plan = _files_of(rows, materialize)
    info = dict(info)
    info.update(summarize(rows))
    info["n_images"] = len(rows)
    info["n_patients"] = len({r.patient for r in rows if r.patient})
    info["manifest_hash"] = manifest_hash(text)
    info["files"] = files
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "manifest.csv", text)
    # split.json before the copies: whatever a failure leaves behind is recorded, so --force can remove it
    atomic_write_json(out / "split.json", info)
    if plan:
        _materialize(out, root, plan, materialize)
    return info


def create_split(
    data: str | os.PathLike,
    mag: str | Sequence[str] = "200X",
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
    stratify: str = DEFAULT_STRATIFY,
) -> dict:
    """Scan ``data``, split it and write the split directory ``out`` (default ``splits/<mag>``).

    ``mag``: one magnification (``"200X"``), several (``"40X,200X"`` or a list)
    or ``"all"``; the default ``out`` is named by :func:`~breastcnn.data.breakhis.mags_label`
    (``splits/200X``, ``splits/all``, ``splits/40X+200X``). ``stratify`` (with
    ``by="patient"``): see :func:`split_by_patient`.

    Returns the ``split.json`` content (for k-fold: the top-level one, with a
    ``"folds"`` list of per-fold infos) plus ``"out"`` and ``"warnings"``.
    ``on_scanned(n)`` is called with the number of candidates before decoding
    starts (to size a progress bar). Raises ``UserInputError`` for bad options,
    missing data, unreadable images with ``strict``, an existing split without
    ``force``, an ``out`` inside (or containing) the data, or a file in ``out``
    that a previous split did not write. ``out`` is locked while it is written.

    ``force`` replaces only what earlier splits recorded in their ``split.json``
    (and the image caches next to them); any other file in ``out`` is kept.
    """
    mags = parse_mags(mag)
    request = SplitRequest(
        mags=mags,
        out=Path(out) if out is not None else Path("splits") / mags_label(mags),
        by=by,
        ratios=parse_ratios(ratios) if ratios is not None else (DEFAULT_FOLD_RATIOS if folds else DEFAULT_RATIOS),
        folds=folds,
        seed=seed,
        materialize=materialize,
        strict=strict,
        force=force,
        group=group,
        stratify=stratify,
        jobs=jobs,
    ).checked()
    out = request.out
    data_root, _ = locate_data(data)  # cheap: where the images are, none opened yet
    check_outside_data(out, data_root, "--out", containing=(data_root, data))
    check_overwrite(out, force)
    with locked_directory(out, "split directory"):
        return _create_locked(data, request, progress, on_scanned)


@dataclass(frozen=True)
class SplitRequest:
    """The options of one :func:`create_split` call, checked once (:meth:`checked`)."""

    mags: tuple[str, ...]
    out: Path
    by: str
    ratios: tuple[float, ...]
    folds: int
    seed: int
    materialize: str
    strict: bool
    force: bool
    group: str
    stratify: str
    jobs: int

    def checked(self) -> SplitRequest:
        """``self``, or a UserInputError naming the option and the value received."""
        checks = [
            (self.by in ("patient", "image"), f"--by must be 'patient' or 'image', got {self.by!r}"),
            (
                self.materialize in ("copy", "link", "none"),
                f"--materialize must be copy, link or none, got {self.materialize!r}",
            ),
            (self.group in ("patient", "accession"), f"--group must be 'patient' or 'accession', got {self.group!r}"),
            (self.stratify in STRATIFY, f"--stratify must be one of {', '.join(STRATIFY)}, got {self.stratify!r}"),
            (
                self.folds == 0 or 2 <= self.folds <= 100,
                f"--folds must be 0 (no folds) or between 2 and 100, got {self.folds}",
            ),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserInputError(message)
        return self


def _effective_by(result, by: str, mags: tuple[str, ...], warnings: list[str]) -> str:
    """How the scanned images will be split (a folder-per-class tree has no patients), with the warnings
    that go with it (one class only; a selected magnification missing; patient leakage) appended to
    ``warnings``."""
    labels = sorted({r.label for r in result.records})
    if len(labels) < len(CLASSES):
        warnings.append(
            f"only {labels[0]} images were found under {result.root}: a classifier needs both "
            f"{' and '.join(CLASSES)} images ('breastcnn train' refuses this split)"
        )
    found_mags = found_magnifications(result.records)
    if result.layout == "breakhis" and len(found_mags) < len(mags):
        missing = [m for m in mags if m not in found_mags]
        warnings.append(
            f"no {', '.join(missing)} images under {result.root}: the split covers only {', '.join(found_mags)}"
        )
    effective_by = by
    if result.layout == "folders" and by == "patient":
        effective_by = "image"
        warnings.append("folder-per-class tree has no patient information: split by image")
    if effective_by == "image" and result.layout == "breakhis":
        warnings.append(
            "--by image puts images of the same patient in train and test (patient leakage); scores will be optimistic"
        )
    return effective_by


def found_magnifications(records) -> list[str]:
    """The magnifications present in ``records``, in :data:`MAGNIFICATIONS` order."""
    present = {r.magnification for r in records}
    return [m for m in MAGNIFICATIONS if m in present]


def _create_locked(
    data, request: SplitRequest, progress: Callable[[int], None] | None, on_scanned: Callable[[int], None] | None
) -> dict:
    """:func:`create_split` once ``out`` is checked and locked: walk, decode-check, assign, write."""
    result, warnings = _scan_checked(data, request, progress, on_scanned)
    effective_by = _effective_by(result, request.by, request.mags, warnings)
    base_info = _base_info(result, request, effective_by)
    parts, fold_seeds = _assign_parts(result.records, request, effective_by)
    out, folds, materialize = request.out, request.folds, request.materialize
    planned = ["split.json"] if folds else []
    for name, rows in parts.items():
        planned += [f"{name}/{f}" if name else f for f in _files_of(rows, materialize)[0]]
    _clear_for(out, planned, request.force, result.root)

    if not folds:
        info = _write_one(out, result.root, parts[""], {**base_info, "kind": "split"}, materialize)
        return {**_public(info), "out": str(out), "warnings": warnings}
    fold_infos = []
    for k, (name, rows) in enumerate(parts.items()):
        fold_info = {**base_info, "kind": "fold", "fold": k + 1, "folds": folds, "fold_seed": fold_seeds[k]}
        info = _write_one(out / name, result.root, rows, fold_info, materialize)
        fold_infos.append({**_public(info), "dir": name})
    top = {**base_info, "kind": "kfold", "folds": folds, "fold_dirs": list(parts), "files": planned}
    atomic_write_json(out / "split.json", top)
    return {**_public(top), "fold_infos": fold_infos, "out": str(out), "warnings": warnings}


def _scan_checked(data, request: SplitRequest, progress, on_scanned) -> tuple[ScanResult, list[str]]:
    """The readable images of ``data`` at the request's magnifications and the scan's warnings."""
    listing = scan(data, request.mags, verify=False)  # the cheap walk: the count before decoding every image
    if on_scanned is not None:
        on_scanned(len(listing.records))
    result = verify_images(listing, request.jobs, progress)
    if result.unreadable and request.strict:
        raise UserInputError(
            f"{len(result.unreadable)} unreadable image(s) under {result.root} (--strict), "
            f"first: {result.unreadable[0]}"
        )
    if not result.records:
        raise UserInputError(f"no readable images for --mag {mags_label(request.mags)} under {result.root}")
    return result, list(result.warnings)


def _base_info(result: ScanResult, request: SplitRequest, effective_by: str) -> dict:
    """The ``split.json`` fields every split (and fold) of this request shares."""
    return {
        "format": FORMAT_VERSION,
        "created_by": f"breastcnn {__version__}",
        "data_root": str(result.root),
        "layout": result.layout,
        "magnification": mags_label(request.mags),
        "magnifications": found_magnifications(result.records),
        "by": effective_by,
        "group": request.group if effective_by == "patient" else None,
        "stratify": request.stratify if effective_by == "patient" else None,
        "ratios": list(request.ratios),
        "seed": request.seed,
        "materialize": request.materialize,
        "leaks_patients": effective_by == "image" and result.layout == "breakhis",
        "unreadable": result.unreadable,
        "ignored_files": result.ignored,
    }


def _assign_parts(records, request: SplitRequest, effective_by: str) -> tuple[dict[str, list[Row]], list[int]]:
    """``({"": rows} or {"fold1": rows, ...}, the folds' seeds)``: each fold draws its own seed from ``seed``."""

    def assign(seed: int) -> list[Row]:
        if effective_by == "patient":
            return split_by_patient(records, request.ratios, seed, request.group, stratify=request.stratify)
        return split_by_image(records, request.ratios, seed)

    if not request.folds:
        return {"": assign(request.seed)}, []
    fold_seeds = [int(s) for s in np.random.SeedSequence(request.seed).generate_state(request.folds)]
    return {f"fold{k + 1}": assign(fold_seeds[k]) for k in range(request.folds)}, fold_seeds


def _clear_for(out: Path, planned: list[str], force: bool, root: Path) -> None:
    """Refuse a file where the split writes (``planned``) that no earlier split recorded; with ``force``,
    delete what earlier splits recorded (never inside the data they read, nor ``root``)."""
    owned, previous_roots = recorded_split_files(out) if force else (set(), [])
    foreign = sorted(p for p in planned if ((out / p).exists() or (out / p).is_symlink()) and p not in owned)
    if foreign:
        raise UserInputError(
            f"{out / foreign[0]} exists and was not written by 'breastcnn split' (not recorded in a split.json "
            f"there){f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''}; "
            "move it away or choose another --out"
        )
    if force:
        remove_recorded(out, owned, [image_tree(Path(p)).resolve() for p in (root, *previous_roots)])


def _public(info: dict) -> dict:
    """``split.json`` content without its file list (kept out of ``--json`` summaries)."""
    return {k: v for k, v in info.items() if k != "files"}

"""Parse a BreakHis tree (or a plain folder-per-class tree) into records.

BreakHis layout (see ``docs/internals.md`` and the dataset reference)::

    BreaKHis_v1/histology_slides/breast/{benign,malignant}/SOB/<subtype>/<slide>/<mag>X/<file>.png
    e.g. .../benign/SOB/adenosis/SOB_B_A_14-22549AB/200X/SOB_B_A-14-22549AB-200-001.png

Class, subtype, patient (the slide folder) and magnification are read from the
path. A plain tree ``ROOT/benign/*.png``, ``ROOT/malignant/*.png`` is also
accepted; it has no patient information, so each image is its own "patient"
(``patient`` = ``""``) and such trees can only be split by image.

Every candidate image is decoded once (in parallel) so that unreadable files
are reported up front instead of crashing a training run an hour later. Files
that are not images by extension (``Thumbs.db``, ``.DS_Store``, text) are
ignored silently; the source tree is only ever read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from breastcnn import CLASSES
from breastcnn.data.images import open_rgb
from breastcnn.errors import UserInputError

BREAKHIS_URL = "https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/"
"""Where to get the real data set."""

MAGNIFICATIONS = ("40X", "100X", "200X", "400X")
"""The four BreakHis magnifications, in increasing order."""

SUBTYPES: dict[str, tuple[str, str]] = {
    # tumour code -> (class, subtype folder name)
    "A": ("benign", "adenosis"),
    "F": ("benign", "fibroadenoma"),
    "PT": ("benign", "phyllodes_tumor"),
    "TA": ("benign", "tubular_adenoma"),
    "DC": ("malignant", "ductal_carcinoma"),
    "LC": ("malignant", "lobular_carcinoma"),
    "MC": ("malignant", "mucinous_carcinoma"),
    "PC": ("malignant", "papillary_carcinoma"),
}
"""Tumour codes used in BreakHis slide and file names."""

SUBTYPE_CODES = {name: code for code, (_, name) in SUBTYPES.items()}

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
"""Extensions (compared in lower case) treated as image candidates; everything else is ignored."""

# SOB_B_A-14-22549AB-200-001.png -> class B, tumour A, slide 14-22549AB, mag 200, seq 001
FILE_NAME_RE = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<tumour>[A-Z]+)-(?P<slide>\d+-[0-9A-Z]+)-(?P<mag>\d+)-(?P<seq>\d+)\.[A-Za-z]+$"
)
# SOB_B_A_14-22549AB -> class B, tumour A, slide 14-22549AB
SLIDE_DIR_RE = re.compile(r"^SOB_(?P<cls>[BM])_(?P<tumour>[A-Z]+)_(?P<slide>\d+-[0-9A-Z]+)$")


@dataclass(frozen=True, order=True)
class Record:
    """One image of the data set.

    ``path`` is relative to the data root with POSIX separators; ``label`` is
    ``"benign"`` or ``"malignant"``; ``subtype`` the subtype folder name (``""``
    in folder-per-class trees); ``patient`` the slide folder name (``""`` when
    unknown); ``magnification`` e.g. ``"200X"`` (``""`` when unknown).
    """

    path: str
    label: str
    subtype: str
    patient: str
    magnification: str

    @property
    def y(self) -> int:
        """Integer label: 0 = benign, 1 = malignant."""
        return CLASSES.index(self.label)


@dataclass
class ScanResult:
    """What :func:`scan` found: kept ``records`` (sorted by path), ``warnings`` (one line each).

    ``layout`` is ``"breakhis"`` or ``"folders"``; ``root`` the absolute data
    root that record paths are relative to; ``ignored`` counts non-image files
    skipped; ``unreadable`` lists the relative paths of images that failed to decode.
    """

    records: list[Record]
    warnings: list[str] = field(default_factory=list)
    layout: str = "breakhis"
    root: Path | None = None
    ignored: int = 0
    unreadable: list[str] = field(default_factory=list)


def accession(patient: str) -> str:
    """The accession number of a slide id, for a stricter patient grouping.

    A few BreakHis slide ids share an accession number across folders
    (``SOB_B_A_14-22549AB`` and ``SOB_B_A_14-22549G``); grouping by
    ``accession`` keeps them together: ``"SOB_B_A_14-22549AB"`` -> ``"14-22549"``.
    """
    match = SLIDE_DIR_RE.match(patient)
    slide = match.group("slide") if match else patient
    return re.sub(r"[A-Z]+$", "", slide)


def parse_mag(mag: str, allow_all: bool = True) -> str | None:
    """Normalise a magnification option: ``"200"``, ``"200x"``, ``"200X"`` -> ``"200X"``; ``"all"`` -> None."""
    text = str(mag).strip().upper()
    if allow_all and text == "ALL":
        return None
    if not text.endswith("X"):
        text += "X"
    if text not in MAGNIFICATIONS:
        valid = ", ".join(MAGNIFICATIONS) + (", all" if allow_all else "")
        raise UserInputError(f"--mag: unknown magnification {mag!r}; valid values: {valid}")
    return text


def parse_mags(mags: str | Sequence[str], option: str = "--mag") -> tuple[str, ...]:
    """A selection of magnifications, in increasing order: ``"all"`` -> all four;
    ``"200,40x"``, ``"40X+200X"`` (as :func:`mags_label` names it) or ``["40X", "200X"]``
    -> ``("40X", "200X")``; ``"200X"`` -> ``("200X",)``."""
    items = [str(m).strip() for m in (re.split(r"[,+]", mags) if isinstance(mags, str) else mags)]
    if len(items) == 1 and items[0].lower() == "all":
        return MAGNIFICATIONS
    chosen = set()
    for item in items:
        text = item.upper()
        text = text if text.endswith("X") else text + "X"
        if text not in MAGNIFICATIONS:
            within = f" in {','.join(items)!r}" if len(items) > 1 else ""
            raise UserInputError(
                f"{option}: unknown magnification {item!r}{within}; valid values: "
                "40X, 100X, 200X, 400X (or 40, 100, 200, 400), comma-separated, or all"
            )
        chosen.add(text)
    if not chosen:
        raise UserInputError(f"{option} must name at least one magnification, e.g. 200X")
    return tuple(m for m in MAGNIFICATIONS if m in chosen)


def mags_label(mags: Sequence[str]) -> str:
    """How a selection of magnifications is named in folder names and ``split.json``:
    ``"200X"``, ``"all"`` (all four), ``"40X+200X"``."""
    mags = parse_mags(list(mags))
    return "all" if mags == MAGNIFICATIONS else "+".join(mags)


def is_image_name(name: str) -> bool:
    """True for visible files whose extension marks an image (case-insensitive)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_breakhis_root(root: Path) -> tuple[Path, str] | None:
    """Locate the data under ``root``: ``(data_root, layout)`` or None.

    Accepts the ``BreaKHis_v1`` folder itself, its parent, the ``breast`` folder,
    or a folder-per-class tree (``root/benign``, ``root/malignant`` holding images).
    Record paths are relative to the returned data root.
    """
    for candidate in (root, root / "BreaKHis_v1"):
        if (candidate / "histology_slides" / "breast").is_dir():
            return candidate, "breakhis"
    if any((root / cls / "SOB").is_dir() for cls in CLASSES):  # the "breast" folder itself
        return root, "breakhis"
    if all((root / cls).is_dir() for cls in CLASSES):
        return root, "folders"
    return None


def locate_data(root: str | os.PathLike) -> tuple[Path, str]:
    """``(absolute data root, layout)`` of the data under ``root`` (no image is opened); UserInputError if none."""
    root = Path(root).expanduser()
    found = find_breakhis_root(root) if root.is_dir() else None
    if found is None:
        raise UserInputError(missing_data_message(root))
    return found[0].resolve(), found[1]


def image_tree(data_root: Path) -> Path:
    """The folder of a data root that holds the images: ``histology_slides`` of BreaKHis_v1, else the root."""
    slides = Path(data_root) / "histology_slides"
    return slides if slides.is_dir() else Path(data_root)


def check_outside_data(
    out: str | os.PathLike, data_root: str | os.PathLike, option: str = "--out", containing: tuple = ()
) -> None:
    """Refuse an output location inside the data (the source data is only ever read).

    ``out`` may not be the data root, its image tree or anything inside that tree
    (a later ``split`` would take our PNGs for images). Paths in ``containing``
    (the data root, the ``--data`` given) may not lie inside ``out`` either: that
    guards commands that may delete their own earlier outputs (``split --force``).
    """
    out_abs = Path(out).expanduser().resolve()
    root = Path(data_root).resolve()
    tree = image_tree(root).resolve()
    if out_abs in (root, tree) or tree in out_abs.parents:
        raise UserInputError(f"{option} {out} is inside the data tree {root}; the source data is never written to")
    for data in containing:
        data_abs = Path(data).expanduser().resolve()
        if data_abs == out_abs or out_abs in data_abs.parents:
            raise UserInputError(f"{option} {out} contains the data {data}; choose a directory outside the data")


def missing_data_message(root: Path) -> str:
    """One line: where we looked, how to get BreakHis, and that `breastcnn synth` makes sample data."""
    return (
        f"no BreakHis data found at {root} (looked for BreaKHis_v1/histology_slides/breast or "
        f"benign/ and malignant/ folders; set --data or $BREAKHIS_DIR); download BreakHis from "
        f"{BREAKHIS_URL} or run 'breastcnn synth' to make synthetic sample data"
    )


def _breakhis_candidates(data_root: Path, mags: Sequence[str]) -> tuple[list[Record], int, list[str]]:
    """Walk the BreakHis tree: image records at ``mags`` (not yet decode-checked), ignored count, warnings."""
    breast = data_root / "histology_slides" / "breast" if (data_root / "histology_slides").is_dir() else data_root
    records: list[Record] = []
    warnings: list[str] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(breast):
        dirnames.sort()
        for name in sorted(filenames):
            if not is_image_name(name):
                ignored += 1
                continue
            full = Path(dirpath) / name
            rel_breast = full.relative_to(breast).parts
            rel = full.relative_to(data_root).as_posix()
            # {benign,malignant}/SOB/<subtype>/<slide>/<mag>/<file>
            if len(rel_breast) != 6 or rel_breast[0] not in CLASSES:
                warnings.append(
                    f"{rel}: not in the BreakHis layout <class>/SOB/<subtype>/<slide>/<mag>/<file>; skipped"
                )
                continue
            label, _, subtype, slide, mag_dir, _ = rel_breast
            magnification = mag_dir.upper()
            match = FILE_NAME_RE.match(name)
            if magnification not in MAGNIFICATIONS and match:
                magnification = f"{match.group('mag')}X"
            if magnification not in MAGNIFICATIONS:
                warnings.append(f"{rel}: unknown magnification folder {mag_dir!r}; skipped")
                continue
            if magnification not in mags:
                continue
            records.append(Record(rel, label, subtype, slide, magnification))
    return records, ignored, warnings


def _folder_candidates(data_root: Path) -> tuple[list[Record], int, list[str]]:
    """Images under ``root/<class>/`` (any depth): records without patient or magnification."""
    records: list[Record] = []
    ignored = 0
    for label in CLASSES:
        for dirpath, dirnames, filenames in os.walk(data_root / label):
            dirnames.sort()
            for name in sorted(filenames):
                if not is_image_name(name):
                    ignored += 1
                    continue
                rel = (Path(dirpath) / name).relative_to(data_root).as_posix()
                records.append(Record(rel, label, "", "", ""))
    return records, ignored, []


def check_decodes(path: str | os.PathLike) -> str | None:
    """Decode ``path`` fully; None when fine, else a short reason."""
    try:
        open_rgb(path)
    except Exception as exc:  # any decoder failure makes the file unusable
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def _check_chunk(paths: Sequence[str]) -> list[str | None]:
    return [check_decodes(p) for p in paths]


def scan(
    root: str | os.PathLike,
    mag: str | Sequence[str] | None = "200X",
    verify: bool = True,
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
) -> ScanResult:
    """Find the images of a BreakHis (or folder-per-class) tree.

    ``mag``: ``"200X"`` (or ``"200"``), several (``"40X,200X"`` or a list, see
    :func:`parse_mags`), or None / ``"all"`` for every magnification (ignored
    for folder-per-class trees). With ``verify`` every
    candidate is decoded (``jobs`` processes, ``progress(n)`` after each chunk);
    unreadable ones are left out and listed in ``warnings`` and ``unreadable``.
    Raises ``UserInputError`` when ``root`` holds no recognisable data.
    """
    mags = MAGNIFICATIONS if mag is None else parse_mags(mag)
    data_root, layout = locate_data(root)
    if layout == "breakhis":
        candidates, ignored, warnings = _breakhis_candidates(data_root, mags)
    else:
        candidates, ignored, warnings = _folder_candidates(data_root)
    candidates.sort()
    listing = ScanResult(candidates, warnings, layout, data_root, ignored, [])
    return verify_images(listing, jobs, progress) if verify else listing


def verify_images(listing: ScanResult, jobs: int = 1, progress: Callable[[int], None] | None = None) -> ScanResult:
    """Decode every record of an unverified :func:`scan` result (the expensive part: ``jobs``
    processes, ``progress(n)`` after each chunk); unreadable images are left out with a warning."""
    warnings, unreadable, kept = list(listing.warnings), list(listing.unreadable), []
    if listing.records:
        reasons = _map_chunks(_check_chunk, [str(listing.root / r.path) for r in listing.records], jobs, progress)
        for record, reason in zip(listing.records, reasons, strict=True):
            if reason is None:
                kept.append(record)
            else:
                unreadable.append(record.path)
                warnings.append(f"{record.path}: unreadable image ({reason}); left out")
    return ScanResult(kept, warnings, listing.layout, listing.root, listing.ignored, unreadable)


def _map_chunks(fn, items: list, jobs: int, progress, chunk: int = 64) -> list:
    """Apply ``fn`` (list -> list) to chunks of ``items`` with joblib; results in order."""
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    out: list = []
    if jobs == 1 or len(chunks) == 1:
        for part in chunks:
            out.extend(fn(part))
            if progress:
                progress(len(part))
        return out
    from joblib import Parallel, delayed

    results = Parallel(n_jobs=jobs, return_as="generator")(delayed(fn)(part) for part in chunks)
    for part, result in zip(chunks, results, strict=True):
        out.extend(result)
        if progress:
            progress(len(part))
    return out

"""Classification tasks and their label vocabularies: ``binary`` (benign/malignant) and ``subtype`` (8 classes).

Both tasks read the same manifest: ``binary`` its ``label`` column, ``subtype``
its ``subtype`` column. Class order is fixed (label ``i`` is ``classes[i]``),
benign subtypes first, in the order of :data:`breastcnn.data.breakhis.SUBTYPES`::

    from breastcnn.data.tasks import TASK_CLASSES, label_indices, binary_probabilities
    y = label_indices(split.subset("test"), "subtype")      # int64 (N,), 0..7
    p2 = binary_probabilities(p8)                             # (N, 8) -> (N, 2) benign/malignant
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from breastcnn import CLASSES
from breastcnn.errors import UserInputError

if TYPE_CHECKING:  # an annotation only: breakhis -> images -> tasks would import breakhis half-initialised
    pass

TASKS = ("binary", "subtype")
"""What a model predicts: ``binary`` = benign vs malignant, ``subtype`` = the 8 BreakHis tumour types."""
DEFAULT_TASK = "binary"

SUBTYPE_CLASSES = (
    "adenosis",
    "fibroadenoma",
    "phyllodes_tumor",
    "tubular_adenoma",
    "ductal_carcinoma",
    "lobular_carcinoma",
    "mucinous_carcinoma",
    "papillary_carcinoma",
)
"""The 8 subtype class names in label order (0..3 benign, 4..7 malignant); the manifest's ``subtype`` values."""

TASK_CLASSES: dict[str, tuple[str, ...]] = {"binary": CLASSES, "subtype": SUBTYPE_CLASSES}
"""Class names of each task, in label order."""

SUBTYPE_TO_CLASS: dict[str, str] = {
    **{name: "benign" for name in SUBTYPE_CLASSES[:4]},
    **{name: "malignant" for name in SUBTYPE_CLASSES[4:]},
}
"""Subtype name -> its binary class name (``"benign"`` / ``"malignant"``)."""

SUBTYPE_BINARY = np.array([CLASSES.index(SUBTYPE_TO_CLASS[name]) for name in SUBTYPE_CLASSES], dtype=np.int64)
"""``(8,)`` int64: the binary label of each subtype label (``SUBTYPE_BINARY[y_subtype] = y_binary``)."""


def check_task(task: str, option: str = "--task") -> str:
    """``task`` if it is one of :data:`TASKS`, else a UserInputError naming ``option`` and the valid values."""
    if task not in TASKS:
        raise UserInputError(f"{option} must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def label_indices(records: Iterable, task: str = DEFAULT_TASK, where: str = "manifest") -> np.ndarray:
    """Integer labels ``(N,)`` int64 of ``records`` for ``task``, in record order.

    ``records``: manifest rows or scan records (anything with ``path``, ``label``
    and ``subtype``; this vocabulary module imports no data module, so that the
    image cache can use it without an import cycle).

    ``binary``: 0 benign, 1 malignant (the ``label`` column). ``subtype``: the
    index of the ``subtype`` column in :data:`SUBTYPE_CLASSES`; a record whose
    subtype is missing (folder-per-class trees) or unknown is a UserInputError
    naming ``where`` and the image.
    """
    check_task(task)
    records = list(records)
    if task == "binary":
        return np.array([CLASSES.index(r.label) for r in records], dtype=np.int64)
    index = {name: i for i, name in enumerate(SUBTYPE_CLASSES)}
    y = np.empty(len(records), dtype=np.int64)
    for i, r in enumerate(records):
        if r.subtype not in index:
            what = "has no subtype (a folder-per-class tree?)" if not r.subtype else f"has subtype {r.subtype!r}"
            raise UserInputError(
                f"{where}: {r.path} {what}; the subtype task needs one of "
                f"{', '.join(SUBTYPE_CLASSES)} (a BreakHis-layout split)"
            )
        if SUBTYPE_TO_CLASS[r.subtype] != r.label:
            raise UserInputError(
                f"{where}: {r.path} is {r.label} but its subtype {r.subtype} is "
                f"{SUBTYPE_TO_CLASS[r.subtype]}; re-run 'breastcnn split'"
            )
        y[i] = index[r.subtype]
    return y


def subtype_to_binary(y_subtype: np.ndarray) -> np.ndarray:
    """Subtype labels ``(N,)`` (0..7) -> binary labels ``(N,)`` int64 (0 benign, 1 malignant)."""
    y_subtype = np.asarray(y_subtype)
    if y_subtype.size and (y_subtype.min() < 0 or y_subtype.max() >= len(SUBTYPE_CLASSES)):
        raise ValueError(
            f"subtype labels must be in 0..{len(SUBTYPE_CLASSES) - 1}, "
            f"got values from {y_subtype.min()} to {y_subtype.max()}"
        )
    return SUBTYPE_BINARY[y_subtype]


def binary_probabilities(p_subtype: np.ndarray) -> np.ndarray:
    """Subtype probabilities ``(N, 8)`` -> benign/malignant probabilities ``(N, 2)`` (sums of each class's subtypes)."""
    p_subtype = np.asarray(p_subtype)
    if p_subtype.ndim != 2 or p_subtype.shape[1] != len(SUBTYPE_CLASSES):
        raise ValueError(f"subtype probabilities must have shape (N, {len(SUBTYPE_CLASSES)}), got {p_subtype.shape}")
    return np.stack([p_subtype[:, SUBTYPE_BINARY == c].sum(axis=1) for c in range(len(CLASSES))], axis=1)

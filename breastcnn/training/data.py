"""The images a run trains and validates on: uint8 training images, preprocessed validation images."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from breastcnn.data.images import cache_paths, load_subset, preprocess
from breastcnn.data.split import Split, split_by_patient
from breastcnn.errors import UserInputError

VAL_CARVE_FRACTION = 0.125
"""Share of training images (whole patients, per class) held out for validation when a split has no val subset."""


@dataclass
class TrainData:
    x_train: np.ndarray  # uint8 (N, S, S, 3)
    y_train: np.ndarray  # int64 (N,)
    x_val: np.ndarray  # float32 (M, S, S, 3), preprocessed once
    y_val: np.ndarray  # int64 (M,)


def carve_validation(split: Split, seed: int = 0) -> Split:
    """A copy of ``split`` whose train subset gives whole patients (about 12.5%, per class) to ``val``.

    Used for splits without a validation subset (the 70/30 Spanhol k-fold
    protocol), so that model selection and early stopping never see test.
    The copy has its own hash (its image cache is separate); test is untouched.
    """
    train_rows = split.subset("train")
    carved = split_by_patient([r.record for r in train_rows], (1 - VAL_CARVE_FRACTION, VAL_CARVE_FRACTION, 0.0), seed)
    rows = carved + [r for r in split.rows if r.split != "train"]
    digest = hashlib.sha256(f"{split.hash}:carve-val:{VAL_CARVE_FRACTION}:{seed}".encode()).hexdigest()
    return Split(
        dir=split.dir,
        root=split.root,
        rows=rows,
        hash=digest,
        info={**split.info, "validation": f"carved from train (seed {seed})"},
    )


def load_train_data(
    split: Split, image_size: int, preprocess_mode: str, jobs: int, on_message, task: str = "binary", normaliser=None
) -> TrainData:
    """Train and val images of ``split`` at ``image_size`` (cached; stain-normalised by ``normaliser`` when
    given), labels of ``task``; ``on_message`` announces a cache build."""
    arrays = {}
    for subset in ("train", "val"):
        x_path = cache_paths(split, subset, image_size, normaliser)[0]
        if not x_path.is_file():
            stain = f", {normaliser.method} stain normalisation" if normaliser is not None else ""
            on_message(
                f"building the {subset} image cache at {image_size}px ({len(split.subset(subset))} images, "
                f"--jobs {jobs}{stain}) -> {x_path.parent}"
            )
        arrays[subset] = load_subset(split, subset, image_size, jobs=jobs, task=task, normaliser=normaliser)
    x_train, y_train = arrays["train"]
    x_val, y_val = arrays["val"]
    if len(y_train) == 0:
        raise UserInputError(f"--split {split.dir}: the train subset is empty")
    if len(y_val) == 0:
        raise UserInputError(
            f"--split {split.dir}: the val subset is empty; training scores on validation (never on test), "
            "so re-run 'breastcnn split' with a validation ratio"
        )
    return TrainData(x_train, y_train, preprocess(x_val, preprocess_mode), y_val)

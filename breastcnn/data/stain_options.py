"""The stain options of ``train`` and ``finetune``: ``--stain-norm``, ``--stain-target``, ``--stain-augment``.

(``--stain-augment``'s default is a recipe value: :data:`breastcnn.training.recipes.DEFAULT` turns it on.)

:func:`check_stain_options` checks them (one error naming the option);
:func:`training_stain` fits the normalisation target (on ``--stain-target``,
else on the training subset's images) and gives what training needs: the
fitted normaliser (for the image cache), the HED jitter (for the augmenter)
and the model's ``stain`` metadata (:func:`breastcnn.data.stain.stain_meta`),
which ``evaluate``/``predict``/``bench``/``featuremaps``/``slide`` read back
through ``ModelSpec.normaliser``::

    stain = training_stain(split, 224, norm="macenko", target=None, augment=True, jobs=1)
    x, y = load_subset(split, "train", 224, normaliser=stain.normaliser)
    augmenter = Augmenter(stain_jitter=stain.jitter)
    model.meta["stain"] = stain.meta
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from breastcnn.data.stain import STAIN_METHODS, HEDJitter, fit_normaliser, stain_meta
from breastcnn.errors import UserInputError

DEFAULT_STAIN_NORM = "none"
"""``--stain-norm`` default: images as they are."""

TRAIN_TARGET = "training subset"
"""What a model's ``stain.target`` says when the target was fitted on the training images."""


@dataclass(frozen=True)
class TrainingStain:
    """What training needs of the stain options: ``normaliser`` (fitted, or None), ``jitter`` (or None),
    ``meta`` (the model's ``stain`` entry, None when both are off)."""

    normaliser: object | None
    jitter: HEDJitter | None
    meta: dict | None


def check_stain_options(norm: str, target: str | None, augment: bool) -> None:
    """Raise UserInputError naming ``--stain-norm`` / ``--stain-target`` for a bad value or combination."""
    if norm not in STAIN_METHODS:
        raise UserInputError(f"--stain-norm must be one of {', '.join(STAIN_METHODS)}, got {norm!r}")
    if target is not None:
        if norm == "none":
            raise UserInputError(f"--stain-target {target}: needs --stain-norm macenko or reinhard")
        if not Path(target).is_file():
            raise UserInputError(f"--stain-target {target}: no such image file")
    if not isinstance(augment, bool):
        raise UserInputError(f"--stain-augment must be true or false, got {augment!r}")


def training_stain(
    split,
    image_size: int,
    norm: str = DEFAULT_STAIN_NORM,
    target: str | None = None,
    augment: bool = False,
    jobs: int = 1,
) -> TrainingStain:
    """Fit the stain target of a training run and describe the stain settings (see the module docstring).

    The target is fitted on the ``target`` image (whole, at its own resolution) or, without one, on the
    training subset's images at ``image_size`` (pixels pooled, at most 2 million, a regular stride:
    deterministic). Raises UserInputError naming the option when the target holds too little tissue.
    """
    check_stain_options(norm, target, augment)
    jitter = HEDJitter() if augment else None
    if norm == "none":
        return TrainingStain(None, jitter, stain_meta(None, None, jitter))
    if target is not None:
        from breastcnn.data.images import open_rgb

        try:
            images = np.asarray(open_rgb(target), dtype=np.uint8)
        except UserInputError:
            raise
        except Exception as exc:  # any decoder failure names the file
            raise UserInputError(f"--stain-target {target}: cannot read this image ({exc})") from None
        where = f"--stain-target {target}"
    else:
        from breastcnn.data.images import load_subset

        images, _ = load_subset(split, "train", image_size, jobs=jobs)
        where = f"--stain-norm {norm} (target fitted on the training subset of {split.dir})"
    try:
        normaliser = fit_normaliser(norm, images)
    except UserInputError as exc:
        raise UserInputError(f"{where}: {exc}") from None
    return TrainingStain(normaliser, jitter, stain_meta(normaliser, str(target) if target else TRAIN_TARGET, jitter))


__all__ = ["DEFAULT_STAIN_NORM", "TRAIN_TARGET", "TrainingStain", "check_stain_options", "training_stain"]

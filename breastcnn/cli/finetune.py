"""`breastcnn finetune`: Fine-tune VGG16/ResNet50/custom-keras or a saved NumPy model."""

from __future__ import annotations

from breastcnn.cli.common import not_ready


def finetune() -> None:
    """Fine-tune VGG16/ResNet50/custom-keras or a saved NumPy model."""
    not_ready("finetune", 5)

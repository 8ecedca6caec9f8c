"""`breastcnn predict`: Classify images with a trained model."""

from __future__ import annotations

from breastcnn.cli.common import not_ready


def predict() -> None:
    """Classify images with a trained model."""
    not_ready("predict", 4)

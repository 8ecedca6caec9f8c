"""`breastcnn train`: Train the NumPy CNN on a split."""

from __future__ import annotations

from breastcnn.cli.common import not_ready


def train() -> None:
    """Train the NumPy CNN on a split."""
    not_ready("train", 4)

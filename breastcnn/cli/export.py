"""`breastcnn export`: Convert a model between NumPy (.npz) and Keras (.keras)."""

from __future__ import annotations

from breastcnn.cli.common import not_ready


def export() -> None:
    """Convert a model between NumPy (.npz) and Keras (.keras)."""
    not_ready("export", 5)

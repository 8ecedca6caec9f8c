"""`breastcnn evaluate`: Evaluate a model on a split's test subset."""

from __future__ import annotations

from breastcnn.cli.common import not_ready


def evaluate() -> None:
    """Evaluate a model on a split's test subset."""
    not_ready("evaluate", 4)

"""`breastcnn split`: Split BreakHis into train/val/test by patient (default) or image."""

from __future__ import annotations

from breastcnn.cli.common import not_ready


def split() -> None:
    """Split BreakHis into train/val/test by patient (default) or image."""
    not_ready("split", 3)

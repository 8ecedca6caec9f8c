"""`breastcnn synth`: Write synthetic sample data in the BreakHis layout."""

from __future__ import annotations

from breastcnn.cli.common import not_ready


def synth() -> None:
    """Write synthetic sample data in the BreakHis layout."""
    not_ready("synth", 3)

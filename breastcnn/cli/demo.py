"""`breastcnn demo`: Run the whole tool on generated sample data."""

from __future__ import annotations

from breastcnn.cli.common import not_ready


def demo() -> None:
    """Run the whole tool on generated sample data."""
    not_ready("demo", 6)

"""`breastcnn featuremaps`: Plot feature maps and Grad-CAM for one image."""

from __future__ import annotations

from breastcnn.cli.common import not_ready


def featuremaps() -> None:
    """Plot feature maps and Grad-CAM for one image."""
    not_ready("featuremaps", 6)

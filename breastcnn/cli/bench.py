"""`breastcnn bench`: Benchmark models: size, latency, throughput, train step, metrics."""

from __future__ import annotations

from breastcnn.cli.common import not_ready


def bench() -> None:
    """Benchmark models: size, latency, throughput, train step, metrics."""
    not_ready("bench", 6)

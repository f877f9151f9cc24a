"""The one percentile every figure of the demo and the benchmark is reported with."""

from __future__ import annotations

import statistics


def percentile(values: list[float], q: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else (values[0] if values else 0.0)
    )

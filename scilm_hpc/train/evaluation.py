"""Which dev metric value is better (the evaluation itself is ``evaluate.inference``)."""

from __future__ import annotations

import math

LOWER_IS_BETTER = ("loss", "perplexity", "mae", "rmse")


def is_better(value: float | None, best: float | None, metric: str) -> bool:
    """Whether ``value`` of ``metric`` improves on ``best`` (None: nothing yet)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if metric.endswith(LOWER_IS_BETTER) else value > best

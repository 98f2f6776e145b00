"""Statistics of the load tools: one percentile for every figure they print."""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["percentile"]


def percentile(xs: Iterable[float], p: float) -> float:
    """The p-quantile (0..1, nearest rank) of the values (sorted here); 0.0 when there are none."""
    s = sorted(xs)
    if not s:
        return 0.0
    return float(s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))])

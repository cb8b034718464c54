"""Percentiles of a distribution (times to credentials): one definition for the demo, simulate and bench/burst.py."""

from __future__ import annotations

import math
from collections.abc import Iterable


def nearest_rank(values: Iterable[float], fraction: float) -> float | None:
    """The smallest value with at least `fraction` of the values at or below it; None if
    there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]

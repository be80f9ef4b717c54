"""Duration percentiles, one definition for every table the project prints (the demo's summary
and ``otel-stepspan stats``), so the same steps give the same figures everywhere. Pure."""

from __future__ import annotations

import math
from typing import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of already sorted values by linear interpolation between closest
    ranks (NumPy's default, Hyndman & Fan type 7): p50 of 1..100 is 50.5, p99 is 99.01.
    NaN when there are no values."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)

"""Reading engine values without ever waking the GPU.

A count read from an engine object must be a plain Python int, a NumPy integer or a CPU mirror.
Anything that may be a (GPU) tensor is refused rather than converted: ``int()``, ``.item()`` and
``.tolist()`` on a CUDA tensor synchronise the device, which would stall the engine's overlap of
CPU scheduling and GPU work.
"""

from __future__ import annotations

from typing import Any, Optional


def as_count(value: Any) -> Optional[int]:
    """A non-negative Python int, or None when the value is missing, negative or not a plain int."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "__index__"):
        number = value.__index__()
        return number if number >= 0 else None
    return None


def are_counts(values: Any, at_least: int = 0) -> bool:
    """Whether every entry of a list or tuple is a plain Python int of ``at_least`` or more,
    checked by C loops rather than a Python one, for lists read on the engine thread every step.
    Exactly ``int``: a bool is no count, and a NumPy number or an int subclass gives False, left
    to a look at each entry (:func:`as_count`)."""
    return not values or (set(map(type, values)) == {int} and min(values) >= at_least)


def _is_cpu_tensor(value: Any) -> bool:
    device = getattr(value, "device", None)
    return getattr(device, "type", None) == "cpu" and callable(getattr(value, "tolist", None))


def cpu_int_list(value: Any) -> Optional[list[int]]:
    """The entries of a CPU mirror (list, tuple, NumPy array or CPU tensor) as ints, or None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        items = value
    elif _is_cpu_tensor(value) or type(value).__module__ == "numpy":
        if getattr(value, "ndim", 1) != 1:
            return None
        items = value.tolist()
    else:
        return None
    if type(items) is list and are_counts(items):
        return items  # the usual case (this runs on the engine thread for every extend-shaped step)
    numbers = []
    for item in items:
        number = as_count(item)
        if number is None:
            return None
        numbers.append(number)
    return numbers

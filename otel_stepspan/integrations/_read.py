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
    if type(items) is list and items:
        # The usual case, a list of Python ints, checked by two C loops rather than a Python one
        # (this runs on the engine thread for every extend-shaped step): a sum that is an int
        # means every entry is one (a float, a NumPy number, a string or None would change its
        # type or raise), a minimum of 0 or more that none is negative; a bool is no count.
        try:
            if type(sum(items)) is int and min(items) >= 0 and bool not in map(type, items):
                return items
        except TypeError:
            pass
    numbers = []
    for item in items:
        number = as_count(item)
        if number is None:
            return None
        numbers.append(number)
    return numbers

"""The NVTX sink (``OTEL_STEPSPAN_NVTX=1``): the step label as an NVTX range, so Nsight Systems
shows the same steps as the profiler trace and Jaeger.

NVTX ranges cost a push and a pop when no tool is attached. torch's bindings are used when
torch has them (CUDA builds); otherwise the sink reports once that it is unavailable and stays off.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

logger = logging.getLogger("otel_stepspan")

_push: Optional[Callable[[str], object]] = None
_pop: Optional[Callable[[], object]] = None
_resolved = False


def available() -> bool:
    """Bind torch's NVTX functions on first use; False (and one log line) when there are none."""
    global _push, _pop, _resolved
    if not _resolved:
        _resolved = True
        try:
            from torch.cuda import nvtx

            nvtx.range_push("otel_stepspan")
            nvtx.range_pop()
            _push, _pop = nvtx.range_push, nvtx.range_pop
        except Exception as exc:  # CPU-only torch, or no NVTX library
            logger.warning("otel_stepspan: OTEL_STEPSPAN_NVTX=1 but NVTX is unavailable here (%s); no NVTX ranges", exc)
    return _push is not None


def push(label: str) -> None:
    _push(label)  # type: ignore[misc]


def pop() -> None:
    _pop()  # type: ignore[misc]

"""The torch profiler sink: the step label as a ``record_function`` range.

torch is never imported here: the profiler can only be running in a process that has imported
torch already, so until ``torch`` is in ``sys.modules`` the check is a constant ``False`` and a
process without torch pays nothing for it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional


def _not_imported() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return _bind(torch)()


def _bind(torch: Any) -> Callable[[], bool]:
    global profiler_enabled, _record_function, torch_profiler_globals
    profiler_enabled = torch.autograd._profiler_enabled
    _record_function = torch.profiler.record_function
    flags = vars(torch.autograd.profiler)
    torch_profiler_globals = flags if isinstance(flags.get("_is_profiler_enabled"), bool) else None
    return profiler_enabled


#: True while a torch profiler (``torch.profiler.profile`` or the autograd profiler) records.
profiler_enabled: Callable[[], bool] = _not_imported
_record_function: Any = None
#: ``torch.autograd.profiler``'s globals once torch is bound, where they hold the flag
#: ``_is_profiler_enabled``: torch's profilers started from Python (``torch.profiler.profile``,
#: the autograd profiler, ``emit_nvtx``) set it on start and clear it on stop, "for fast python
#: checks". The compiled step call (otel_stepspan/_stepcall.c) reads the flag, a dict read, where
#: ``profiler_enabled()`` is a pybind11 call that costs microseconds with cold caches.
torch_profiler_globals: Optional[dict] = None


def enter_range(label: str) -> Any:
    """Open a profiler range named ``label``; hand the result to :func:`exit_range`."""
    scope = _record_function(label)
    scope.__enter__()
    return scope


def exit_range(scope: Any) -> None:
    scope.__exit__(None, None, None)

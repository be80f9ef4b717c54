"""The torch profiler sink: the step label as a ``record_function`` range.

torch is never imported here: the profiler can only be running in a process that has imported
torch already, so until ``torch`` is in ``sys.modules`` the check is a constant ``False`` and a
process without torch pays nothing for it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


def _not_imported() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return _bind(torch)()


def _bind(torch: Any) -> Callable[[], bool]:
    global profiler_enabled, _record_function
    profiler_enabled = torch.autograd._profiler_enabled
    _record_function = torch.profiler.record_function
    return profiler_enabled


#: True while a torch profiler (``torch.profiler.profile`` or the autograd profiler) records.
profiler_enabled: Callable[[], bool] = _not_imported
_record_function: Any = None


def enter_range(label: str) -> Any:
    """Open a profiler range named ``label``; hand the result to :func:`exit_range`."""
    scope = _record_function(label)
    scope.__enter__()
    return scope


def exit_range(scope: Any) -> None:
    scope.__exit__(None, None, None)

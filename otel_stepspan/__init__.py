"""otel_stepspan: every forward step of an inference engine, labelled in the torch profiler and
in OpenTelemetry.

This module only hands names on. The pure core (``StepInfo``) is imported at once; the step span
and its sinks (which import OpenTelemetry) load on first use, so ``import otel_stepspan`` stays
cheap for tools such as the CLI that only read spans.
"""

from typing import TYPE_CHECKING, Any

from .step import UNKNOWN, RequestLink, StepInfo, engine_attributes
from .version import __version__

if TYPE_CHECKING:
    from .runtime import flush, stats
    from .span import step_span, traced_forward

_LAZY = {
    "flush": "runtime",
    "stats": "runtime",
    "step_span": "span",
    "traced_forward": "span",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'otel_stepspan' has no attribute {name!r}")


__all__ = [
    "RequestLink",
    "StepInfo",
    "UNKNOWN",
    "__version__",
    "engine_attributes",
    "flush",
    "stats",
    "step_span",
    "traced_forward",
]

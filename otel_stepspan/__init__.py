"""otel_stepspan: every forward step of an inference engine, labelled in the torch profiler and
in OpenTelemetry. This module only hands names on."""

from .runtime import flush, stats
from .span import step_span, traced_forward
from .step import UNKNOWN, StepInfo, engine_attributes
from .version import __version__

__all__ = [
    "StepInfo",
    "UNKNOWN",
    "__version__",
    "engine_attributes",
    "flush",
    "stats",
    "step_span",
    "traced_forward",
]

"""The public step span for any engine: a context manager and a decorator.

Usage::

    with step_span(describe, batch):          # describe(batch) -> StepInfo, called only if a sink is on
        logits = model(batch)

    @traced_forward(describe)
    def forward(self, batch, *args, **kwargs): ...

Both accept the batch and a describer instead of a ready StepInfo so that a process nobody is
watching never pays for describing the batch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, TypeVar, Union

from opentelemetry import trace as _trace_api

from . import runtime
from .sinks import profiler as _profiler
from .step import AttributeValue, StepInfo

Describe = Callable[[Any], StepInfo]
F = TypeVar("F", bound=Callable[..., Any])

_NO_BATCH = object()
_EMPTY: Mapping[str, AttributeValue] = {}


class _NullScope:
    """The shared do-nothing context returned while every sink is off."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        return None


_NULL_SCOPE = _NullScope()


def _identity(info: StepInfo) -> StepInfo:
    return info


def _describe_now(what: Union[StepInfo, Describe, Callable[[], StepInfo]], batch: Any) -> StepInfo:
    if isinstance(what, StepInfo):
        return what
    if batch is _NO_BATCH:
        return what()  # type: ignore[call-arg]
    return what(batch)  # type: ignore[call-arg]


class _StepScope:
    __slots__ = ("what", "batch", "attributes", "opened")

    def __init__(self, what: Any, batch: Any, attributes: Mapping[str, AttributeValue]) -> None:
        self.what = what
        self.batch = batch
        self.attributes = attributes
        self.opened: Optional[runtime._Open] = None

    def __enter__(self) -> None:
        self.opened = runtime.begin(_describe_now, _identity, self.attributes, (self.what, self.batch))
        return None

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> None:
        if self.opened is not None:
            runtime.end(self.opened, exc)
            self.opened = None
        return None


def step_span(
    what: Union[StepInfo, Describe, Callable[[], StepInfo]],
    batch: Any = _NO_BATCH,
    *,
    attributes: Optional[Mapping[str, AttributeValue]] = None,
):
    """A context manager that labels one forward step in the profiler and in OpenTelemetry.

    ``what`` is a :class:`StepInfo`, a zero-argument callable returning one, or a describer
    called as ``what(batch)``. It is evaluated only when a sink is on. Exceptions raised inside
    the block mark the span ERROR and propagate unchanged.
    """
    # runtime.sinks_off(), inlined: this is the whole cost of a step while nobody is looking.
    if not _profiler.profiler_enabled() and _trace_api._TRACER_PROVIDER is None and not runtime._state.wanted:
        return _NULL_SCOPE
    return _StepScope(what, batch, attributes or _EMPTY)


def traced_forward(
    describe: Describe, *, attributes: Optional[Mapping[str, AttributeValue]] = None
) -> Callable[[F], F]:
    """Decorate a method shaped ``forward(self, batch, *args, **kwargs)`` with a step span;
    ``describe(batch)`` is called only while a sink is on."""
    static = dict(attributes or {})

    def capture(self: Any, batch: Any) -> StepInfo:
        return describe(batch)

    def decorate(forward: F) -> F:
        return runtime.wrap_method(forward, capture, _identity, lambda self: static)  # type: ignore[return-value]

    return decorate


def flush(timeout_s: float = 10.0, *, end_timelines: bool = False) -> bool:
    """Export every step span still pending (and, with ``end_timelines``, the roots of the open
    timeline windows); see :func:`otel_stepspan.runtime.flush`."""
    return runtime.flush(timeout_s, end_timelines=end_timelines)

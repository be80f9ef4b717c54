"""Engine timelines: a window of consecutive steps gathered under one root span.

A step span with no parent of its own would be the root of a one-span trace, and a trace view in
Jaeger would show one bar. Instead, consecutive parentless steps of one engine process share a
*timeline* trace: a root span covering a window of them, the steps as its children, so one trace
view shows the step structure (sequence, gaps, what came before a slow step) as the Chrome trace
does. A window closes after ``max_steps`` steps or ``max_seconds`` after it opened, whichever
comes first, so a trace stays readable and is exported on time even when the engine goes idle.
The root carries the window's counts by mode.

Pure: which window a step goes to, and the window's counts. The sinks make the spans: the
exporter process encodes them itself, the in-process sink makes them through the engine's
provider.

Variables (read by :mod:`otel_stepspan.settings`): ``OTEL_STEPSPAN_TIMELINE`` (``on``, the
default; ``off``: one trace per step), ``OTEL_STEPSPAN_TIMELINE_STEPS`` (500),
``OTEL_STEPSPAN_TIMELINE_SECONDS`` (10).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .ids import random_bits

ROOT_NAME = "timeline"
DEFAULT_STEPS = 500
DEFAULT_SECONDS = 10.0


@dataclass
class Window:
    """One timeline window: its ids, its extent and what ran in it."""

    trace_id: int
    span_id: int
    start_ns: int
    end_ns: int
    sampled: bool
    static_id: Any = None
    steps: int = 0
    tokens: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)
    #: Anything a sink keeps with the window (the in-process sink: the root span it started).
    handle: Any = None

    def attributes(self) -> dict[str, Any]:
        """The root span's attributes: ``timeline.steps``, ``timeline.tokens`` and
        ``timeline.steps.<mode>`` for each mode that ran in the window."""
        attributes: dict[str, Any] = {"timeline.steps": self.steps, "timeline.tokens": self.tokens}
        for mode, count in sorted(self.by_mode.items()):
            attributes[f"timeline.steps.{mode}"] = count
        return attributes


@dataclass(frozen=True)
class TimelineSettings:
    enabled: bool = True
    max_steps: int = DEFAULT_STEPS
    max_seconds: float = DEFAULT_SECONDS


class Timeline:
    """The open window of one engine process, and the rule for closing it. Not thread-safe: a
    sink calls it from one thread at a time."""

    def __init__(
        self,
        settings: TimelineSettings,
        sample: Callable[[int], bool] = lambda trace_id: True,
        random_bits: Callable[[int], int] = random_bits,
    ) -> None:
        self.max_steps = settings.max_steps
        self.max_ns = int(settings.max_seconds * 1e9)
        self._sample = sample
        self._random_bits = random_bits
        self.current: Optional[Window] = None

    def place(self, start_ns: int, end_ns: int, mode: str, num_tokens: Optional[int], static_id: Any = None) -> tuple[
        Window, Optional[Window]
    ]:
        """The window a parentless step belongs to, and the window this step closed (or None)."""
        closed = None
        window = self.current
        if window is not None and (window.steps >= self.max_steps or start_ns - window.start_ns >= self.max_ns):
            closed, window = window, None
        if window is None:
            trace_id = self._random_bits(128)
            window = Window(trace_id, self._random_bits(64), start_ns, end_ns, self._sample(trace_id), static_id)
            self.current = window
        window.steps += 1
        window.end_ns = max(window.end_ns, end_ns)
        window.by_mode[mode] = window.by_mode.get(mode, 0) + 1
        if isinstance(num_tokens, int) and num_tokens > 0:
            window.tokens += num_tokens
        return window, closed

    def close_due(self, now_ns: int) -> Optional[Window]:
        """The open window, closed, once its time is up (the engine may have gone idle)."""
        window = self.current
        if window is not None and now_ns - window.start_ns >= self.max_ns:
            self.current = None
            return window
        return None

    def close(self) -> Optional[Window]:
        """The open window, closed now (the engine is gone)."""
        window, self.current = self.current, None
        return window

"""What ``search`` and ``stats`` select: modes, batch sizes, durations, services, a time window.

The same filter is sent to Jaeger (where the API can apply it) and always applied again here,
because Jaeger matches whole traces, and some releases ignore part of the query (Jaeger 2.13's
HTTP API ignores ``query.attributes``; see tests/data/jaeger_v3/README.txt).
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Iterable, Optional, Sequence

from ..otlp_json import StepSpan

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # micro sign
    "μs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|μs|ms|s|m|h)\s*$")


def parse_duration(text: str) -> int:
    """Nanoseconds in ``5ms``, ``250us``, ``1.5s``, ``2m``, ``1h`` (a unit is required)."""
    match = _DURATION.match(text or "")
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration; write a number and a unit: 250us, 5ms, 1.5s, 2m, 1h"
        )
    try:
        value = Decimal(match.group(1)) * _UNITS_NS[match.group(2)]
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"{text!r} is not a duration") from None
    return int(value)


def duration_arg(text: str) -> int:
    """argparse ``type=`` for durations: a clear message instead of a traceback."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def go_duration(ns: int) -> str:
    """A duration as Go's ``time.ParseDuration`` (and so Jaeger) reads it, exactly."""
    return f"{ns}ns"


def split_list(values: Optional[Sequence[str]], *, lower: bool = True) -> tuple[str, ...]:
    """``--mode decode --mode prefill,mixed`` -> ('decode', 'prefill', 'mixed'): repeated flags
    and comma lists alike, first occurrence kept (lower-cased unless ``lower=False``)."""
    seen: list[str] = []
    for value in values or ():
        for part in value.split(","):
            part = part.strip().lower() if lower else part.strip()
            if part and part not in seen:
                seen.append(part)
    return tuple(seen)


@dataclass(frozen=True)
class StepFilter:
    modes: tuple[str, ...] = ()
    min_bs: Optional[int] = None
    max_bs: Optional[int] = None
    min_duration_ns: Optional[int] = None
    max_duration_ns: Optional[int] = None
    services: tuple[str, ...] = ()
    start_min_ns: Optional[int] = None
    start_max_ns: Optional[int] = None
    request: Optional[str] = None  # a trace id or request id the step must link to

    def matches(self, step: StepSpan) -> bool:
        if self.modes and step.mode not in self.modes:
            return False
        if self.min_bs is not None or self.max_bs is not None:
            bs = step.batch_size
            if bs is None:  # unknown batch size: cannot satisfy a batch-size filter
                return False
            if self.min_bs is not None and bs < self.min_bs:
                return False
            if self.max_bs is not None and bs > self.max_bs:
                return False
        if self.min_duration_ns is not None and step.duration_ns < self.min_duration_ns:
            return False
        if self.max_duration_ns is not None and step.duration_ns > self.max_duration_ns:
            return False
        if self.services and step.service not in self.services:
            return False
        if self.start_min_ns is not None and step.start_ns < self.start_min_ns:
            return False
        if self.start_max_ns is not None and step.start_ns > self.start_max_ns:
            return False
        if self.request is not None:
            from .request import link_to

            return link_to(step, self.request) is not None
        return True

    def apply(self, steps: Iterable[StepSpan]) -> list[StepSpan]:
        """Matching steps, each once (a span can come back in several answers), by start time."""
        unique: dict[tuple[str, str], StepSpan] = {}
        for step in steps:
            if self.matches(step):
                unique.setdefault((step.trace_id, step.span_id), step)
        return sorted(unique.values(), key=lambda s: (s.start_ns, s.span_id))


DEFAULT_SINCE_NS = 3_600_000_000_000  # --since default for Jaeger: 1h


def filter_from_args(args: argparse.Namespace) -> StepFilter:
    """The filter the flags ask for.

    The time window is ``--since`` back from now; for Jaeger it defaults to 1h, for a spans
    file there is none unless ``--since`` is given (a file is usually read after the run).
    """
    start_min = start_max = None
    since = args.since
    if since is None and not getattr(args, "file", None):
        since = DEFAULT_SINCE_NS
    if since is not None:
        now_ns = time.time_ns()
        start_min = now_ns - since
        start_max = now_ns
    return StepFilter(
        modes=split_list(getattr(args, "mode", None)),
        min_bs=getattr(args, "min_bs", None),
        max_bs=getattr(args, "max_bs", None),
        min_duration_ns=getattr(args, "min_duration", None),
        max_duration_ns=getattr(args, "max_duration", None),
        request=getattr(args, "request", None),
        services=split_list(args.service, lower=False),
        start_min_ns=start_min,
        start_max_ns=start_max,
    )

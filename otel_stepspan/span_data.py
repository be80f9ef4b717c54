"""Step records into span data: what each span the project makes is called, carries and hangs under.

Two places make spans: the exporter process encodes them as OTLP itself
(:mod:`otel_stepspan.exporter.spans`), and the in-process sink makes them through the engine's
tracer provider (:mod:`otel_stepspan.sinks.otel`). They differ only in how a span gets its ids
and its sampling decision (drawn by the exporter; the provider's id generator and sampler in
process) and in how it is written. Everything users see is decided here, once, for both
(docs/spans.md): a step span's name, attributes, request links under the link limit (the rest
counted), error event and status, and whether its parent is its own or its process's timeline
window; the timeline roots' attributes; the request reports.

Pure: imports neither OpenTelemetry nor torch, and runs where the spans are made, never on the
engine's thread. Not thread-safe: each sink calls :class:`StepSpans` under a lock of its own.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

from .request_tally import RequestLedger, RequestSettings, RequestTally, sampled
from .step import AttributeValue, SpanValue, make_step, request_attributes, step_scalars
from .timeline import Timeline, TimelineSettings, Window

#: Step shapes whose name and counts are kept; cleared when full (steps repeat a few shapes).
_SHAPE_CACHE_SIZE = 8192


def exception_event(exc: BaseException) -> dict[str, str]:
    """The ``exception`` event's attributes, made at once (on the engine thread, where the
    exception is) so that the traceback's frames, and the tensors they hold, are not kept alive
    until the span is made. Never raises."""
    try:
        return {
            "exception.type": type(exc).__qualname__,
            "exception.message": str(exc),
            "exception.stacktrace": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        }
    except Exception:  # an exception whose str() or traceback fails
        return {"exception.type": type(exc).__qualname__, "exception.message": "?"}


def error_description(event: Mapping[str, str]) -> str:
    """The ERROR status's description of a step whose forward raised: ``Type: message``."""
    return f"{event.get('exception.type', '')}: {event.get('exception.message', '')}"


class StepRecord(NamedTuple):
    """What the engine thread leaves of one step, field by field as the exporter pipe's ``STEP``
    message carries it (:mod:`otel_stepspan.exporter.wire`): the exporter hands its plain tuples
    on as they are, the in-process sink makes one of these from its queue."""

    kind: int
    start_ns: int
    end_ns: int
    mode: str
    batch_size: Optional[int]
    extend_tokens: Optional[int]
    decode_seqs: Optional[int]
    prefill_seqs: Optional[int]
    num_tokens: Optional[int]
    pass_id: Optional[int]
    #: Names the runner's static attributes (``engine.*``) in the sink's own terms.
    static_id: Any
    #: None when the step has no parent span of its own (its timeline window is its parent).
    parent: Any
    #: The :func:`exception_event` of a forward that raised, else None.
    error: Optional[Mapping[str, str]]
    extra: Optional[Mapping[str, Any]]
    #: :class:`otel_stepspan.step.RequestLink` fields; None when the engine traces no requests.
    links: Optional[Sequence[Sequence[Any]]]
    queued_requests: Optional[int]
    kv_tokens: Optional[int]


class StepSpan(NamedTuple):
    """One step span as data. The attributes come in parts, so that a sink that encodes them can
    keep what repeats (a shape's counts, a runner's statics, a request's link) encoded once;
    :meth:`StepSpans.attributes` joins them for a sink that wants one mapping."""

    name: str
    #: (mode, batch size, extend tokens, decode seqs, prefill seqs, tokens): steps of one shape
    #: share their name and ``counts``.
    shape: tuple
    #: The ``forward.*`` counts and label of the shape.
    counts: Mapping[str, AttributeValue]
    #: ``forward.pass_id``, ``scheduler.queued_requests``, ``scheduler.kv_tokens``, when known.
    scalars: Mapping[str, int]
    #: The request links carried, at most the link limit; None when the engine traces no requests.
    links: Optional[Sequence[Sequence[Any]]]
    #: Every request the step computed, linked or over the limit: each is counted in its report.
    requests: Optional[Sequence[Sequence[Any]]]
    #: Requests over the link limit, not linked.
    links_dropped: int
    #: ``forward.recomputes``: the step's requests (linked or over the limit) doing prompt work
    #: after having decoded, by the request ledger's history; None when the engine traces no
    #: requests or the ledger is off (request reports off).
    recomputes: Optional[int]
    static_id: Any
    extra: Optional[Mapping[str, Any]]
    #: The exception event's attributes: the span is ERROR (:func:`error_description`).
    error: Optional[Mapping[str, str]]
    start_ns: int
    end_ns: int
    #: The timeline window whose root is the parent; None when the step has a parent of its own
    #: or timelines are off (then it is a trace of its own).
    window: Optional[Window]
    #: The window this step closed: its root is to be ended.
    closed: Optional[Window]


#: ``StepSpan(...)`` without the generated ``__new__`` that checks its arguments in Python: half
#: the cost of making one, paid once per step in the exporter process.
_new_step_span = tuple.__new__


class ReportSpan(NamedTuple):
    """A request's ``request.steps`` span as data: a child of the request's own (remote) span,
    linked to each window root (or lone step) that holds its steps."""

    trace_id: int
    parent_span_id: int
    trace_flags: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    places: tuple[tuple[int, int], ...]
    places_dropped: int


class Closed(NamedTuple):
    """What closing time leaves: the window closed (its root to be ended) and the reports due."""

    window: Optional[Window]
    reports: list[ReportSpan]


class StepSpans:
    """Turns the step records of one engine process into span data, keeping its timeline window
    and its request ledger."""

    def __init__(
        self,
        pid: int,
        *,
        name_by_mode: bool,
        link_limit: int,
        timeline: TimelineSettings,
        requests: RequestSettings,
        sample_window: Callable[[int], bool] = lambda trace_id: True,
    ) -> None:
        self.pid = pid
        self.pid_attributes = {"process.pid": pid}
        self.name_by_mode = name_by_mode
        self.link_limit = max(link_limit, 0)
        self._timeline = Timeline(timeline, sample=sample_window) if timeline.enabled else None
        self._ledger = RequestLedger(requests) if requests.enabled else None
        self._shapes: dict[tuple, tuple[str, dict[str, AttributeValue]]] = {}

    def step(self, record: Sequence[Any]) -> StepSpan:
        """The span data of one step (a :class:`StepRecord`, or a plain tuple laid out as one).
        A parentless step is placed in the timeline, which may close the window before it."""
        (
            _, start_ns, end_ns, mode, bs, ext, dec, pre, ntok, pass_id, static_id, parent, error, extra,
            links, queued, kv_tokens,
        ) = record
        shape = (mode, bs, ext, dec, pre, ntok)
        named = self._shapes.get(shape)
        if named is None:
            named = self._name_and_counts(shape)
        carried, dropped, recomputes = None, 0, None
        if links is not None:
            carried = links[: self.link_limit]
            dropped = len(links) - len(carried)
            if self._ledger is not None:
                # A decode or verify step links no prompt work, so recomputes nothing: no look at
                # its links, a whole batch of them, on the usual step.
                recomputes = 0 if mode == "decode" or mode == "verify" else self._ledger.recomputing(links)
        window = closed = None
        if parent is None and self._timeline is not None:
            window, closed = self._timeline.place(start_ns, end_ns, mode, ntok, static_id)
        return _new_step_span(StepSpan, (
            named[0], shape, named[1], step_scalars(pass_id, queued, kv_tokens), carried, links, dropped, recomputes,
            static_id, extra, error, start_ns, end_ns, window, closed,
        ))

    def _name_and_counts(self, shape: tuple) -> tuple[str, dict[str, AttributeValue]]:
        info = make_step(*shape, None)
        counts = info.attributes()
        named = (info.mode_label if self.name_by_mode else info.label, counts)
        if len(self._shapes) >= _SHAPE_CACHE_SIZE:
            self._shapes.clear()
        self._shapes[shape] = named
        return named

    def attributes(self, step: StepSpan, static: Mapping[str, AttributeValue]) -> dict[str, SpanValue]:
        """All of a step span's attributes in one mapping, in the order the parts are encoded:
        counts, scalars, the request links' counts and arrays, the runner's ``static`` ones,
        extra (GPU timing), ``process.pid`` (right in forked workers too)."""
        attributes: dict[str, Any] = dict(step.counts)
        attributes.update(step.scalars)
        if step.links is not None:
            attributes.update(request_attributes(step.links, step.links_dropped, step.recomputes))
        attributes.update(static)
        if step.extra:
            attributes.update(step.extra)
        attributes.update(self.pid_attributes)
        return attributes

    def root_attributes(self, static: Mapping[str, AttributeValue]) -> dict[str, AttributeValue]:
        """A timeline root's attributes but its window's counts: the ``engine.*`` of its first
        step and ``process.pid``. The counts (:meth:`Window.attributes`) come when it closes."""
        attributes = dict(static)
        attributes.update(self.pid_attributes)
        return attributes

    def count_requests(
        self, step: StepSpan, sampled: bool, trace_id: int, span_id: int, root_span_id: Optional[int]
    ) -> list[ReportSpan]:
        """Count the step for each request it computed. It can be found at its window's root
        (``root_span_id``), or at the step itself (``span_id``) outside a window; nowhere when it
        was not sampled. Returns the reports of requests evicted to stay under the ledger's
        bound."""
        if self._ledger is None or not step.requests:
            return []
        place = None
        if sampled:
            place = (trace_id, root_span_id if step.window is not None else span_id)
        return self._reports(self._ledger.add(step.start_ns, step.end_ns, step.requests, place), "evicted")

    def close_due(self, now_ns: int) -> Closed:
        """The window whose time is up, if any, and the reports of the requests no step has
        computed for the idle time."""
        window = self._timeline.close_due(now_ns) if self._timeline is not None else None
        reports = self._reports(self._ledger.due(now_ns), "idle") if self._ledger is not None else []
        return Closed(window, reports)

    def close_all(self) -> Closed:
        """The open window and the report of every request still open (the engine's steps have
        ended)."""
        window = self._timeline.close() if self._timeline is not None else None
        reports = self._reports(self._ledger.close(), "end") if self._ledger is not None else []
        return Closed(window, reports)

    def _reports(self, tallies: list[RequestTally], reason: str) -> list[ReportSpan]:
        """The ``request.steps`` span of each request whose trace was sampled (only those have a
        trace to join); ``reason`` says why it is made now."""
        reports = []
        for tally in sampled(tallies):
            attributes = tally.attributes(reason)
            attributes.update(self.pid_attributes)
            reports.append(ReportSpan(
                tally.trace_id, tally.span_id, tally.trace_flags, tally.start_ns, tally.end_ns, attributes,
                tuple(tally.places), tally.places_dropped,
            ))
        return reports

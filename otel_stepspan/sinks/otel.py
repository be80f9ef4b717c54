"""The OpenTelemetry sink: step spans created off the engine's thread.

A plain SDK span costs tens of microseconds of Python per step (ids, sampler, attribute
validation, processors). The engine's scheduler loop cannot pay that, so the engine thread only
records what the span needs (a cheap capture of the batch, the parent context, two timestamps)
into a bounded queue; a background thread turns each record into a real span through the
configured tracer provider, with the recorded start and end times and parent. Samplers and span
processors see every span exactly as if it had been created inline.

When the queue is full the step is not traced, the drop is counted, and one log line per interval
says how many were dropped: tracing never blocks the engine.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Mapping, Optional

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation import _SPAN_KEY

from ..exporter.wire import STEP
from ..ids import getrandbits
from ..request_tally import SPAN_NAME as REQUEST_SPAN_NAME
from ..request_tally import RequestSettings
from ..span_data import ReportSpan, StepSpan, StepSpans, error_description, exception_event
from ..step import DEFAULT_LINK_LIMIT, AttributeValue, StepInfo, link_attributes, unknown_step
from ..timeline import ROOT_NAME, TimelineSettings, Window
from .otel_provider import health as export_health
from ..version import __version__

logger = logging.getLogger("otel_stepspan")

Finish = Callable[[Any], StepInfo]

_POLL_S = 0.05
_DROP_REPORT_INTERVAL_S = 10.0


# Waiting for room in a batch processor's queue: 2 ms at a time, at most 1 s per span (a
# processor whose worker is stuck must not hold the step queue for ever).
_ROOM_SLEEP_S = 0.002
_ROOM_WAITS = 500
# Spans made between two looks at the processors' room when none bounds it.
_ROOM_UNBOUNDED = 256


def _export_queues(provider: Any) -> list:
    """(processor, queue, limit) for each SDK BatchSpanProcessor of ``provider``. The SDK has no
    public way to ask a processor for room, so its bounded deque is read; absent, nothing is."""
    found = []
    active = getattr(provider, "_active_span_processor", None)
    for processor in getattr(active, "_span_processors", ()):
        batch = getattr(processor, "_batch_processor", None)
        queue = getattr(batch, "_queue", None)
        if isinstance(queue, deque) and queue.maxlen and isinstance(getattr(batch, "_shutdown", None), bool):
            found.append((batch, queue, queue.maxlen - 1))
    return found


def _has_parent(context: Any) -> bool:
    """Whether a step's context holds a valid span to be its parent. Read straight from the
    context (``trace.get_current_span`` costs several calls on every step); an empty context, the
    usual case with no span around the forward, has none."""
    if not context:
        return False
    span = context.get(_SPAN_KEY)
    return span is not None and span.get_span_context().is_valid


def _entropy_id_generator() -> Any:
    """The SDK's random id generator, drawing from :mod:`otel_stepspan.ids` instead of the
    global ``random``."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class EntropyIdGenerator(RandomIdGenerator):
        # random_bits inlined: a Python frame less per span, once per step.
        def generate_span_id(self) -> int:
            return getrandbits(64) or 1

        def generate_trace_id(self) -> int:
            return getrandbits(128) or 1

    return EntropyIdGenerator()


class DeferredSpanSink:
    """Turns step records into spans on a background thread."""

    def __init__(
        self,
        provider: trace.TracerProvider,
        *,
        name_by: str = "label",
        max_pending: int = 65536,
        timeline: Optional[TimelineSettings] = None,
        link_limit: int = DEFAULT_LINK_LIMIT,
        requests: Optional[RequestSettings] = None,
    ) -> None:
        self.provider = provider
        self._span_settings = dict(
            name_by_mode=name_by == "mode",
            link_limit=link_limit,
            timeline=timeline if timeline is not None else TimelineSettings(),
            requests=requests if requests is not None else RequestSettings(),
        )
        self._pid = os.getpid()
        self._spans = StepSpans(self._pid, **self._span_settings)
        # Guards the span data's timeline and request ledger: the span thread feeds both, while
        # a flush or exit on another thread closes them.
        self._timeline_lock = threading.Lock()
        self.tracer = provider.get_tracer("otel_stepspan", __version__)
        if hasattr(self.tracer, "id_generator"):
            # The SDK's default ids come from the global ``random``, which engines seed (vLLM:
            # 0 by default): every engine with the same seed would repeat our ids.
            self.tracer.id_generator = _entropy_id_generator()
        self.max_pending = max_pending
        self.dropped_total = 0
        self.emitted_total = 0
        self.failed_total = 0
        self._queue: deque = deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._busy = False
        self._started = False
        self._dropped_reported = 0
        _, self._failed_reported, self._queue_full_reported = export_health.snapshot()
        self._last_report = time.monotonic()
        self._start_lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    # -- engine thread -------------------------------------------------------------------------

    def submit(
        self,
        finish: Finish,
        captured: Any,
        static_attributes: Mapping[str, AttributeValue],
        parent: Any,
        start_ns: int,
        end_ns: int,
        error: Optional[BaseException],
        extra: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Queue one finished step. O(1), never blocks, never raises."""
        queue = self._queue
        if len(queue) >= self.max_pending:
            self.dropped_total += 1
            return
        event = exception_event(error) if error is not None else None
        queue.append((finish, captured, static_attributes, parent, start_ns, end_ns, event, extra))
        if not self._started:
            try:
                self._start()
            except Exception:  # no thread can be started (interpreter shutting down)
                self.failed_total += 1

    # -- background thread ---------------------------------------------------------------------

    def _start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            thread = threading.Thread(target=self._run, name="otel_stepspan-spans", daemon=True)
            thread.start()
            self._started = True

    def _root_context(self, window: Window, static: Mapping[str, AttributeValue], start_ns: int) -> Any:
        """The context of a timeline window's root span: started through the provider when the
        window opens (so its sampler decides for the whole window), ended when it closes."""
        if window.handle is None:
            root = self.tracer.start_span(
                ROOT_NAME, context=Context(), kind=SpanKind.INTERNAL, attributes=self._spans.root_attributes(static),
                start_time=start_ns,
            )
            window.handle = (root, trace.set_span_in_context(root))
        return window.handle[1]

    @staticmethod
    def _end_root(window: Window) -> None:
        if window.handle is None:
            return
        root = window.handle[0]
        if root.is_recording():
            root.set_attributes(window.attributes())
        root.end(end_time=window.end_ns)

    def close_timeline(self, due_only: bool = False) -> None:
        """End the open window's root, and report the traced requests: when the window's time
        is up and the requests idle (``due_only``), or all of them now (exit)."""
        with self._timeline_lock:
            closed = self._spans.close_due(time.time_ns()) if due_only else self._spans.close_all()
            if closed.window is not None:
                self._end_root(closed.window)
            self._report(closed.reports)

    def _report(self, reports: list[ReportSpan]) -> None:
        """Each request's ``request.steps`` span, in the request's own trace."""
        for report in reports:
            try:
                parent = trace.set_span_in_context(trace.NonRecordingSpan(trace.SpanContext(
                    report.trace_id, report.parent_span_id, True, trace.TraceFlags(report.trace_flags & 0xFF)
                )))
                links = [
                    trace.Link(trace.SpanContext(trace_id, span_id, False, trace.TraceFlags(trace.TraceFlags.SAMPLED)))
                    for trace_id, span_id in report.places
                ]
                span = self.tracer.start_span(
                    REQUEST_SPAN_NAME, context=parent, kind=SpanKind.INTERNAL, attributes=report.attributes,
                    links=links, start_time=report.start_ns,
                )
                span.end(end_time=report.end_ns)
            except Exception:
                self.failed_total += 1

    def _after_fork_in_child(self) -> None:
        # The parent's thread does not exist in the child and the parent exports its own
        # pending spans: the child starts empty and starts its own thread on its first step.
        self._pid = os.getpid()
        self._queue = deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._start_lock = threading.Lock()
        self._busy = False
        self._started = False
        self.dropped_total = self.emitted_total = self.failed_total = 0
        self._dropped_reported = 0
        self._timeline_lock = threading.Lock()
        self._spans = StepSpans(self._pid, **self._span_settings)

    def pending(self) -> int:
        """Steps queued here, not yet made into spans."""
        return len(self._queue)

    def _run(self) -> None:
        while True:
            self._wake.wait(_POLL_S)
            self._wake.clear()
            self._drain()
            self.close_timeline(due_only=True)
            self._report_drops()

    def _drain(self) -> None:
        queue = self._queue
        export_queues = _export_queues(self.provider)
        with self._idle:
            self._busy = True
        try:
            while queue:
                for _ in range(self._room(export_queues)):
                    try:
                        item = queue.popleft()
                    except IndexError:
                        break
                    self._emit(item)
        finally:
            with self._idle:
                self._busy = False
                self._idle.notify_all()

    @staticmethod
    def _room(export_queues: list) -> int:
        """How many spans every batch processor can take now, at least one. Never outrun a batch
        processor: a span made while its queue is full is dropped there, unseen by stats().
        Waiting keeps the step in our deeper queue, where a drop is counted, and spends no CPU on
        a span nobody will export. Asked once per run of spans, not per span."""
        room = _ROOM_UNBOUNDED
        for batch, export_queue, limit in export_queues:
            waits = 0
            while len(export_queue) >= limit and not batch._shutdown and waits < _ROOM_WAITS:
                time.sleep(_ROOM_SLEEP_S)
                waits += 1
            room = min(room, limit - len(export_queue))
        return max(room, 1)

    def _emit(self, item: tuple) -> None:
        finish, captured, static_attributes, parent, start_ns, end_ns, event, extra = item
        try:
            try:
                info = captured if isinstance(captured, StepInfo) else finish(captured)
            except Exception:
                info = unknown_step()
            own_parent = parent if _has_parent(parent) else None
            # Laid out as a StepRecord; a plain tuple costs half as much to make, once per step.
            record = (
                STEP, start_ns, end_ns, info.mode, info.batch_size, info.extend_tokens, info.decode_seqs,
                info.prefill_seqs, info.num_tokens, info.pass_id, static_attributes, own_parent, event, extra,
                info.links, info.queued_requests, info.kv_tokens,
            )
            with self._timeline_lock:
                step = self._spans.step(record)
                if step.closed is not None:
                    self._end_root(step.closed)
                if step.window is not None:
                    parent = self._root_context(step.window, static_attributes, start_ns)
            # By position, in the API's order (name, context, kind, attributes, links,
            # start_time, record_exception, set_status_on_exception): keywords cost the SDK's
            # call more, once per step.
            span = self.tracer.start_span(
                step.name, parent, SpanKind.INTERNAL, self._spans.attributes(step, static_attributes),
                None if step.links is None else self._links(step), start_ns, False, False,
            )
            if step.error is not None and span.is_recording():
                span.add_event("exception", step.error, timestamp=end_ns)
                span.set_status(Status(StatusCode.ERROR, error_description(step.error)))
            span.end(end_ns)
            self.emitted_total += 1
            if step.requests:
                self._count_requests(span, step)
        except Exception:
            self.failed_total += 1
            if self.failed_total == 1:
                logger.exception("otel_stepspan: could not create a step span; further failures are counted")

    @staticmethod
    def _links(step: StepSpan) -> Optional[list]:
        """The step's request links, each in the request's (remote) trace context."""
        if step.links is None:
            return None
        return [
            trace.Link(
                trace.SpanContext(link[1], link[2], True, trace.TraceFlags(link[3] & 0xFF)),
                link_attributes(link[0], link[4], link[5]),
            )
            for link in step.links
        ]

    def _count_requests(self, span: Any, step: StepSpan) -> None:
        """Count the step for each request it computed, where the provider's sampler and ids put
        it: at its window's root (its parent), or at the step itself."""
        context = span.get_span_context()
        parent = getattr(span, "parent", None)
        with self._timeline_lock:
            evicted = self._spans.count_requests(
                step, bool(context.trace_flags.sampled), context.trace_id, context.span_id,
                parent.span_id if parent is not None else None,
            )
            self._report(evicted)

    def _report_drops(self) -> None:
        now = time.monotonic()
        if now - self._last_report < _DROP_REPORT_INTERVAL_S:
            return
        self._last_report = now
        self.report_drops()

    def report_drops(self) -> int:
        """Log, in one line, the spans lost since the last report: steps dropped here because the
        queue was full, and (for providers this package built) spans the export queue dropped or
        the exporter failed to send. Returns how many there were."""
        _, failed_total, queue_full_total = export_health.snapshot()
        dropped = self.dropped_total - self._dropped_reported
        queue_full = queue_full_total - self._queue_full_reported
        failed = failed_total - self._failed_reported
        lost = dropped + queue_full + failed
        if lost:
            self._dropped_reported = self.dropped_total
            self._queue_full_reported = queue_full_total
            self._failed_reported = failed_total
            logger.warning(
                "otel_stepspan: lost %d step spans since the last report: %d dropped before export "
                "(step queue of %d full), %d dropped by the full export queue, %d failed to export "
                "(is the collector up?); totals %d / %d / %d",
                lost,
                dropped,
                self.max_pending,
                queue_full,
                failed,
                self.dropped_total,
                queue_full_total,
                failed_total,
            )
        return lost

    # -- flushing ------------------------------------------------------------------------------

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued step has become a span (not necessarily exported yet)."""
        if not self._started:
            if not self._queue:
                return True
            self._start()
        deadline = time.monotonic() + timeout_s
        while True:
            with self._idle:
                if not self._queue and not self._busy:
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._wake.set()
            with self._idle:
                self._idle.wait(min(remaining, _POLL_S))

    def flush(self, timeout_s: float) -> bool:
        """Drain the queue into spans, then ask the provider to export everything pending."""
        deadline = time.monotonic() + timeout_s
        drained = self.drain(timeout_s)
        self.report_drops()
        remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
        force_flush = getattr(self.provider, "force_flush", None)
        exported = True
        if force_flush is not None:
            try:
                exported = bool(force_flush(remaining_ms))
            except TypeError:
                exported = bool(force_flush())
        return drained and exported

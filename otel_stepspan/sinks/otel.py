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
import traceback
from collections import deque
from typing import Any, Callable, Mapping, Optional

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation import _SPAN_KEY

from ..ids import random_bits
from ..request_tally import SPAN_NAME as REQUEST_SPAN_NAME
from ..request_tally import RequestLedger, RequestSettings, RequestTally, sampled
from ..step import DEFAULT_LINK_LIMIT, AttributeValue, StepInfo, unknown_step
from ..timeline import ROOT_NAME, Timeline, TimelineSettings, Window
from .otel_provider import health as export_health
from ..version import __version__

logger = logging.getLogger("otel_stepspan")

Finish = Callable[[Any], StepInfo]

_POLL_S = 0.05
_DROP_REPORT_INTERVAL_S = 10.0


def exception_event(exc: BaseException) -> dict[str, str]:
    """The exception event's attributes, made at once so the traceback's frames (and the tensors
    they hold) are not kept alive until the span is made. Never raises."""
    try:
        return {
            "exception.type": type(exc).__qualname__,
            "exception.message": str(exc),
            "exception.stacktrace": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        }
    except Exception:  # an exception whose str() or traceback fails
        return {"exception.type": type(exc).__qualname__, "exception.message": "?"}


# Waiting for room in a batch processor's queue: 2 ms at a time, at most 1 s per span (a
# processor whose worker is stuck must not hold the step queue for ever).
_ROOM_SLEEP_S = 0.002
_ROOM_WAITS = 500


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
        def generate_span_id(self) -> int:
            return random_bits(64)

        def generate_trace_id(self) -> int:
            return random_bits(128)

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
        self.link_limit = link_limit
        self.timeline_settings = timeline if timeline is not None else TimelineSettings()
        self._timeline: Optional[Timeline] = None
        self.request_settings = requests if requests is not None else RequestSettings()
        self._ledger = RequestLedger(self.request_settings) if self.request_settings.enabled else None
        # Guards the timeline and the request ledger: the span thread feeds both, while a flush
        # or exit on another thread closes them.
        self._timeline_lock = threading.Lock()
        self.tracer = provider.get_tracer("otel_stepspan", __version__)
        if hasattr(self.tracer, "id_generator"):
            # The SDK's default ids come from the global ``random``, which engines seed (vLLM:
            # 0 by default): every engine with the same seed would repeat our ids.
            self.tracer.id_generator = _entropy_id_generator()
        self.name_by = name_by
        self.max_pending = max_pending
        self.dropped_total = 0
        self.emitted_total = 0
        self.failed_total = 0
        self._pid = os.getpid()
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

    def _timeline_parent(self, info: StepInfo, start_ns: int, end_ns: int, static: Mapping[str, Any]) -> Any:
        """The context of the timeline window a parentless step belongs to: the window's root
        span, started through the provider when the window opens (so its sampler decides for the
        whole window) and ended when it closes."""
        with self._timeline_lock:
            if self._timeline is None:
                self._timeline = Timeline(self.timeline_settings)
            window, closed = self._timeline.place(start_ns, end_ns, info.mode, info.num_tokens)
            if closed is not None:
                self._end_root(closed)
            if window.handle is None:
                attributes = dict(static)
                attributes["process.pid"] = self._pid
                root = self.tracer.start_span(
                    ROOT_NAME, context=Context(), kind=SpanKind.INTERNAL, attributes=attributes, start_time=start_ns
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
            now_ns = time.time_ns()
            if self._timeline is not None:
                window = self._timeline.close_due(now_ns) if due_only else self._timeline.close()
                if window is not None:
                    self._end_root(window)
            if self._ledger is not None:
                self._report(self._ledger.due(now_ns) if due_only else self._ledger.close(), "idle" if due_only else "end")

    def _report(self, tallies: list[RequestTally], reason: str) -> None:
        """The ``request.steps`` span of each request (:mod:`otel_stepspan.request_tally`), in
        the request's own trace, a child of its span; linked to the windows (or steps) that
        computed it."""
        for tally in sampled(tallies):
            try:
                parent = trace.set_span_in_context(trace.NonRecordingSpan(trace.SpanContext(
                    tally.trace_id, tally.span_id, True, trace.TraceFlags(tally.trace_flags & 0xFF)
                )))
                attributes = tally.attributes(reason)
                attributes["process.pid"] = self._pid
                links = [
                    trace.Link(trace.SpanContext(trace_id, span_id, False, trace.TraceFlags(trace.TraceFlags.SAMPLED)))
                    for trace_id, span_id in tally.places
                ]
                span = self.tracer.start_span(
                    REQUEST_SPAN_NAME, context=parent, kind=SpanKind.INTERNAL, attributes=attributes, links=links,
                    start_time=tally.start_ns,
                )
                span.end(end_time=tally.end_ns)
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
        self._timeline = None
        self._ledger = RequestLedger(self.request_settings) if self.request_settings.enabled else None

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
                # Never outrun a batch processor: a span made while its queue is full is dropped
                # there, unseen by stats(). Waiting keeps the step in our deeper queue, where a
                # drop is counted, and spends no CPU on a span nobody will export.
                for batch, export_queue, limit in export_queues:
                    waits = 0
                    while len(export_queue) >= limit and not batch._shutdown and waits < _ROOM_WAITS:
                        time.sleep(_ROOM_SLEEP_S)
                        waits += 1
                try:
                    item = queue.popleft()
                except IndexError:
                    break
                self._emit(item)
        finally:
            with self._idle:
                self._busy = False
                self._idle.notify_all()

    def _emit(self, item: tuple) -> None:
        finish, captured, static_attributes, parent, start_ns, end_ns, event, extra = item
        try:
            try:
                info = captured if isinstance(captured, StepInfo) else finish(captured)
            except Exception:
                info = unknown_step()
            attributes = info.attributes()
            attributes.update(static_attributes)
            if extra:
                attributes.update(extra)
            # Right in forked workers too, where a resource built before the fork is not.
            attributes["process.pid"] = self._pid
            name = attributes["forward.label"] if self.name_by == "label" else info.mode_label
            links = None
            if info.links is not None:
                kept, counts = info.links_within(self.link_limit)
                attributes.update(counts)
                links = [
                    trace.Link(
                        trace.SpanContext(link.trace_id, link.span_id, True, trace.TraceFlags(link.trace_flags & 0xFF)),
                        link.attributes(),
                    )
                    for link in kept
                ]
            in_window = self.timeline_settings.enabled and not _has_parent(parent)
            if in_window:
                parent = self._timeline_parent(info, start_ns, end_ns, static_attributes)
            span = self.tracer.start_span(
                name,
                context=parent,
                kind=SpanKind.INTERNAL,
                attributes=attributes,
                links=links,
                start_time=start_ns,
                record_exception=False,
                set_status_on_exception=False,
            )
            if event is not None and span.is_recording():
                span.add_event("exception", event, timestamp=end_ns)
                span.set_status(Status(StatusCode.ERROR, f"{event['exception.type']}: {event['exception.message']}"))
            span.end(end_time=end_ns)
            self.emitted_total += 1
            if self._ledger is not None and info.links:
                self._count_requests(span, in_window, start_ns, end_ns, info.links)
        except Exception:
            self.failed_total += 1
            if self.failed_total == 1:
                logger.exception("otel_stepspan: could not create a step span; further failures are counted")

    def _count_requests(self, span: Any, in_window: bool, start_ns: int, end_ns: int, links: Any) -> None:
        """Count the step for each request it computed; it can be found at its window's root,
        or at the step itself outside a window (nowhere when the sampler dropped it)."""
        context = span.get_span_context()
        place = None
        if context.trace_flags.sampled:
            parent = getattr(span, "parent", None)
            place = (context.trace_id, parent.span_id if in_window and parent is not None else context.span_id)
        with self._timeline_lock:
            evicted = self._ledger.add(start_ns, end_ns, links, place)  # type: ignore[union-attr]
            self._report(evicted, "evicted")

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

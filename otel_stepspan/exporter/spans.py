"""Step records into encoded OTLP spans: ids, sampling and the bytes.

What each span is (name, attributes, links, status, parent) comes from the project's one
builder, :class:`otel_stepspan.span_data.StepSpans`, which the in-process sink uses too; here the
span data gets its ids and sampling decision and is encoded, with every part that repeats (a
step shape's counts, a runner's statics, a request's link) encoded once. ``process.pid`` is the
engine process's (not this one's). Sampling follows ``OTEL_TRACES_SAMPLER``/``_ARG`` through the
SDK's own samplers; with the default (``parentbased_always_on``) no sampler call is needed.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Iterator, Mapping, Optional, Sequence

from ..ids import random_bits
from ..request_tally import SPAN_NAME as REQUEST_SPAN_NAME
from ..settings import RESOURCE_VARIABLE, link_limit, read_request_settings, read_timeline_settings
from ..span_data import Closed, ReportSpan, StepSpan, StepSpans, error_description
from ..step import REQUEST_ARRAYS, link_attributes, link_counts, request_array_items
from ..timeline import ROOT_NAME, Window
from ..version import __version__
from . import encode


class RootSpan(bytes):
    """An encoded span that is not a step (a timeline root): queued and exported like a step
    span, but not counted as one."""


class RequestSpan(RootSpan):
    """An encoded request report (:mod:`otel_stepspan.request_tally`): not a step either."""


_SAMPLED = 0x01
#: Links kept encoded (a request's link changes only with its work or tokens): about the
#: requests of a few large batches; cleared when full.
_LINK_CACHE_SIZE = 16384
#: Step shapes kept encoded; cleared when full (steps repeat a few shapes).
_SHAPE_CACHE_SIZE = 8192
_DEFAULT_SAMPLERS = ("", "parentbased_always_on", "always_on")


def _resource(environ: Mapping[str, str], engine_pid: int) -> bytes:
    """The resource of the provider the engine set up, when the spans stand in for its own
    (:mod:`otel_stepspan.sinks.provider_export` passes it); else the SDK's resource from this
    process's variables, which are the engine's (``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES``, the SDK's own attributes). With the engine's pid either way."""
    given = environ.get(RESOURCE_VARIABLE, "").strip()
    if given:
        attributes = json.loads(given)
        attributes.setdefault("process.pid", engine_pid)
        return encode.resource(attributes)
    from opentelemetry.sdk.resources import Resource

    return encode.resource(dict(Resource.create({"process.pid": engine_pid}).attributes))


class SpanBuilder:
    """Thread-safe: the reading thread builds step spans while the exporting thread closes the
    timeline windows that are due."""

    def __init__(self, environ: Mapping[str, str], engine_pid: int) -> None:
        self.resource = _resource(environ, engine_pid)
        self.scope = encode.scope("otel_stepspan", __version__)
        self._statics: dict[int, bytes] = {}
        self._shapes: dict[tuple, tuple[bytes, bytes]] = {}
        self.not_sampled = 0
        sampler_name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
        self._sampler = None if sampler_name in _DEFAULT_SAMPLERS else self._sdk_sampler()
        self.problems: list[str] = []
        self.link_limit = link_limit(environ, self.problems)
        self._spans = StepSpans(
            engine_pid,
            name_by_mode=environ.get("OTEL_STEPSPAN_SPAN_NAME", "label").strip().lower() == "mode",
            link_limit=self.link_limit,
            timeline=read_timeline_settings(environ, self.problems),
            requests=read_request_settings(environ, self.problems, self.link_limit),
            sample_window=lambda trace_id: self._sample(trace_id, None, ROOT_NAME) != 0,
        )
        self._pid_attribute = encode.span_attributes(self._spans.pid_attributes)
        self._root_name = encode.name_field(ROOT_NAME)
        self._request_name = encode.name_field(REQUEST_SPAN_NAME)
        self._link_cache: dict[tuple, tuple[bytes, bytes, bytes, bytes]] = {}
        self._link_counts: dict[tuple[int, int, Optional[int]], bytes] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _sdk_sampler() -> Any:
        """The sampler an SDK tracer provider would build from ``OTEL_TRACES_SAMPLER``/``_ARG``."""
        from opentelemetry.sdk.trace import TracerProvider

        return TracerProvider().sampler

    def add_static(self, static_id: int, attributes: Mapping[str, Any]) -> None:
        self._statics[static_id] = encode.span_attributes(attributes)

    def build(self, record: tuple) -> list[bytes]:
        """The encoded spans of one ``wire.STEP`` record (layout in :mod:`.wire`): the step span
        (none when the sampler drops it), after the root of the timeline window it closed and the
        reports of requests evicted from the ledger."""
        with self._lock:
            return list(self._build(record))

    def close_due(self, now_ns: int) -> list[bytes]:
        """The root of the timeline window whose time is up, if any, and the reports of the
        requests no step has computed for a while."""
        with self._lock:
            return self._closed(self._spans.close_due(now_ns))

    def close_all(self) -> list[bytes]:
        """The root of the open timeline window and the report of every request still open (the
        engine is gone, or done stepping)."""
        with self._lock:
            return self._closed(self._spans.close_all())

    def _closed(self, closed: Closed) -> list[bytes]:
        spans: list[bytes] = [self._root(closed.window)] if closed.window is not None and closed.window.sampled else []
        return spans + self._reports(closed.reports)

    def _shape(self, step: StepSpan) -> tuple[bytes, bytes]:
        """(encoded name, encoded counts) of a step shape seen for the first time."""
        hit = (encode.name_field(step.name), encode.span_attributes(step.counts))
        if len(self._shapes) >= _SHAPE_CACHE_SIZE:
            self._shapes.clear()
        self._shapes[step.shape] = hit
        return hit

    def _request_links(
        self, carried: Sequence[tuple], dropped: int, recomputes: Optional[int]
    ) -> tuple[bytes, bytes]:
        """(the step's encoded ``forward.request_*`` attributes, its encoded links and dropped
        count), as :func:`otel_stepspan.step.request_attributes` defines them, encoded from parts
        kept per link. A request is linked the same way step after step while it decodes, so each
        link is encoded once, not once per step."""
        cache = self._link_cache
        parts = [cache.get(link) or self._link_parts(link) for link in carried]
        encoded_links = b"".join([part[0] for part in parts])
        if dropped:
            encoded_links += encode.dropped_links(dropped)
        counts_key = (len(carried), dropped, recomputes)
        attributes = self._link_counts.get(counts_key) or self._encode_link_counts(counts_key)
        if parts:
            for index, key in enumerate(REQUEST_ARRAYS, 1):
                attributes += encode.span_array_attribute(key, [part[index] for part in parts])
        return attributes, encoded_links

    def _encode_link_counts(self, counts_key: tuple[int, int, Optional[int]]) -> bytes:
        """``forward.request_links`` (and ``_dropped``, ``forward.recomputes``) encoded, once per
        set of counts: steps repeat a few batch sizes, and recomputes are rare."""
        carried, dropped, recomputes = counts_key
        encoded = encode.span_attributes(link_counts(carried, carried + dropped, recomputes))
        if len(self._link_counts) >= _SHAPE_CACHE_SIZE:
            self._link_counts.clear()
        self._link_counts[counts_key] = encoded
        return encoded

    def _link_parts(self, link: tuple) -> tuple[bytes, bytes, bytes, bytes]:
        """One link, encoded, and its elements of the three request arrays."""
        request_id, trace_id, span_id, flags, work, tokens = link
        ids, works, counts = request_array_items(link)
        parts = (
            encode.link(trace_id, span_id, (flags & 0xFF) | encode.FLAG_HAS_IS_REMOTE | encode.FLAG_IS_REMOTE,
                        link_attributes(request_id, work, tokens)),
            encode.array_item(ids),
            encode.array_item(works),
            encode.array_item(counts),
        )
        if len(self._link_cache) >= _LINK_CACHE_SIZE:
            self._link_cache.clear()
        self._link_cache[link] = parts
        return parts

    def _reports(self, reports: list[ReportSpan]) -> list[bytes]:
        spans: list[bytes] = []
        for report in reports:
            links = b"".join(
                encode.link(trace_id, span_id, encode.FLAG_HAS_IS_REMOTE | _SAMPLED, {})
                for trace_id, span_id in report.places
            )
            if report.places_dropped:
                links += encode.dropped_links(report.places_dropped)
            spans.append(RequestSpan(encode.span(
                report.trace_id, random_bits(64), report.parent_span_id, self._request_name, report.start_ns,
                report.end_ns, encode.span_attributes(report.attributes),
                encode.FLAG_HAS_IS_REMOTE | encode.FLAG_IS_REMOTE | _SAMPLED, links,
            )))
        return spans

    def _root(self, window: Window) -> RootSpan:
        attributes = encode.span_attributes(window.attributes()) + self._statics.get(window.static_id, b"")
        return RootSpan(encode.span(
            window.trace_id, window.span_id, None, self._root_name, window.start_ns, window.end_ns,
            attributes + self._pid_attribute, encode.FLAG_HAS_IS_REMOTE | _SAMPLED,
        ))

    def _build(self, record: tuple) -> Iterator[bytes]:
        step = self._spans.step(record)
        # One unpacking rather than a field read at each use: this runs once per step.
        (
            name_text, shape, _, scalars, carried, requests, dropped, recomputes, static_id, extra, error, start_ns,
            end_ns, window, closed,
        ) = step
        if closed is not None and closed.sampled:
            yield self._root(closed)
        name, attributes = self._shapes.get(shape) or self._shape(step)
        if scalars:
            attributes += encode.span_attributes(scalars)
        encoded_links = b""
        if carried is not None:
            request_attributes, encoded_links = self._request_links(carried, dropped, recomputes)
            attributes += request_attributes
        static = self._statics.get(static_id)
        if static:
            attributes += static
        if extra:
            attributes += encode.span_attributes(extra)
        attributes += self._pid_attribute
        parent = record[11]
        if parent is not None:
            trace_id, parent_span_id, trace_flags, is_remote = parent
            flags = encode.FLAG_HAS_IS_REMOTE | (encode.FLAG_IS_REMOTE if is_remote else 0)
            if self._sampler is not None:
                trace_flags = self._sample(trace_id, parent, name_text)
            else:
                trace_flags &= _SAMPLED  # parent-based: the parent's decision
        elif window is not None:
            trace_id, parent_span_id = window.trace_id, window.span_id
            trace_flags = _SAMPLED if window.sampled else 0  # the window's root decided
            flags = encode.FLAG_HAS_IS_REMOTE
        else:
            trace_id, parent_span_id = random_bits(128), None
            trace_flags = self._sample(trace_id, None, name_text) if self._sampler is not None else _SAMPLED
            flags = encode.FLAG_HAS_IS_REMOTE
        span_id = random_bits(64)
        if requests:
            evicted = self._spans.count_requests(step, bool(trace_flags & _SAMPLED), trace_id, span_id, parent_span_id)
            if evicted:
                yield from self._reports(evicted)
        if not trace_flags & _SAMPLED:
            self.not_sampled += 1
            return
        tail = encoded_links
        if error is not None:
            tail = encode.event("exception", end_ns, error) + tail
            tail += encode.error_status(error_description(error))
        yield encode.span(
            trace_id, span_id, parent_span_id, name, start_ns, end_ns, attributes, flags | _SAMPLED, tail,
        )

    def _sample(self, trace_id: int, parent: Optional[tuple], name: str) -> int:
        if self._sampler is None:
            return _SAMPLED
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

        context = None
        if parent is not None:
            span_context = SpanContext(parent[0], parent[1], bool(parent[3]), TraceFlags(parent[2]))
            context = trace.set_span_in_context(NonRecordingSpan(span_context))
        result = self._sampler.should_sample(context, trace_id, name, SpanKind.INTERNAL)
        return _SAMPLED if result.decision.is_sampled() else 0


"""Step records into encoded OTLP spans: names, ids, parent, sampling, attributes.

The attributes are those of docs/spans.md, made from the step's counts by the pure core
(:class:`otel_stepspan.step.StepInfo`), plus the runner's static ones and ``process.pid`` of the
engine process (not this one). Sampling follows ``OTEL_TRACES_SAMPLER``/``_ARG`` through the
SDK's own samplers; with the default (``parentbased_always_on``) no sampler call is needed.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator, Mapping, Optional

from ..ids import random_bits
from ..request_tally import SPAN_NAME as REQUEST_SPAN_NAME
from ..request_tally import RequestLedger, RequestTally, sampled
from ..step import REQUEST_ARRAYS, UNKNOWN, link_attributes, link_counts, make_step
from ..settings import link_limit, read_request_settings, read_timeline_settings
from ..timeline import ROOT_NAME, Timeline, Window
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
_DEFAULT_SAMPLERS = ("", "parentbased_always_on", "always_on")


def _resource(engine_pid: int) -> bytes:
    """The SDK's resource from this process's variables, which are the engine's
    (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, the SDK's own attributes), with the
    engine's pid."""
    from opentelemetry.sdk.resources import Resource

    return encode.resource(dict(Resource.create({"process.pid": engine_pid}).attributes))


class SpanBuilder:
    """Thread-safe: the reading thread builds step spans while the exporting thread closes the
    timeline windows that are due."""

    def __init__(self, environ: Mapping[str, str], engine_pid: int) -> None:
        self.name_by_mode = environ.get("OTEL_STEPSPAN_SPAN_NAME", "label").strip().lower() == "mode"
        self.resource = _resource(engine_pid)
        self.scope = encode.scope("otel_stepspan", __version__)
        self._pid_attribute = encode.span_attributes({"process.pid": engine_pid})
        self._statics: dict[int, bytes] = {}
        self._shapes: dict[tuple, tuple[bytes, bytes]] = {}
        self.not_sampled = 0
        sampler_name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
        self._sampler = None if sampler_name in _DEFAULT_SAMPLERS else self._sdk_sampler()
        self.problems: list[str] = []
        timeline_settings = read_timeline_settings(environ, self.problems)
        self._timeline = (
            Timeline(timeline_settings, sample=lambda trace_id: self._sample(trace_id, None, ROOT_NAME) != 0)
            if timeline_settings.enabled
            else None
        )
        self._root_name = encode.name_field(ROOT_NAME)
        self.link_limit = link_limit(environ, self.problems)
        request_settings = read_request_settings(environ, self.problems, self.link_limit)
        self._ledger = RequestLedger(request_settings) if request_settings.enabled else None
        self._request_name = encode.name_field(REQUEST_SPAN_NAME)
        self._link_cache: dict[tuple, tuple[bytes, bytes, bytes, bytes]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _sdk_sampler() -> Any:
        """The sampler an SDK tracer provider would build from ``OTEL_TRACES_SAMPLER``/``_ARG``."""
        from opentelemetry.sdk.trace import TracerProvider

        return TracerProvider().sampler

    def add_static(self, static_id: int, attributes: Mapping[str, Any]) -> None:
        self._statics[static_id] = encode.span_attributes(attributes)

    def _shape(self, mode: str, bs: Any, ext: Any, dec: Any, pre: Any, ntok: Any) -> tuple[str, bytes, bytes]:
        """(name, encoded name, encoded forward.* attributes but the pass id) for one step shape.
        Steps repeat a few shapes (decode at each batch size), so each is encoded once."""
        key = (mode, bs, ext, dec, pre, ntok)
        hit = self._shapes.get(key)
        if hit is None:
            info = make_step(mode, bs, ext, dec, pre, ntok, None)
            attributes = info.attributes()
            name = info.mode_label if self.name_by_mode else attributes["forward.label"]
            hit = (name, encode.name_field(name), encode.span_attributes(attributes))
            if len(self._shapes) >= 8192:
                self._shapes.clear()
            self._shapes[key] = hit
        return hit

    def build(self, record: tuple) -> list[bytes]:
        """The encoded spans of one ``wire.STEP`` record (layout in :mod:`.wire`): the step span
        (none when the sampler drops it), after the root of the timeline window it closed."""
        with self._lock:
            return list(self._build(record))

    def close_due(self, now_ns: int) -> list[bytes]:
        """The root of the timeline window whose time is up, if any, and the reports of the
        requests no step has computed for a while."""
        with self._lock:
            window = self._timeline.close_due(now_ns) if self._timeline is not None else None
            spans: list[bytes] = [self._root(window)] if window is not None and window.sampled else []
            if self._ledger is not None:
                spans += self._reports(self._ledger.due(now_ns), "idle")
            return spans

    def close_all(self) -> list[bytes]:
        """The root of the open timeline window and the report of every request still open (the
        engine is gone, or done stepping)."""
        with self._lock:
            window = self._timeline.close() if self._timeline is not None else None
            spans: list[bytes] = [self._root(window)] if window is not None and window.sampled else []
            if self._ledger is not None:
                spans += self._reports(self._ledger.close(), "end")
            return spans

    def _request_links(self, links: Optional[list]) -> tuple[bytes, bytes]:
        """(the step's encoded ``forward.request_*`` attributes, its encoded links and dropped
        count): what :func:`otel_stepspan.step.links_within` gives the in-process sink, encoded
        from parts kept per link. A request is linked the same way step after step while it
        decodes, so each link is encoded once, not once per step."""
        if links is None:
            return b"", b""
        kept = links[: max(self.link_limit, 0)]
        cache = self._link_cache
        parts = [cache.get(link) or self._link_parts(link) for link in kept]
        encoded_links = b"".join([part[0] for part in parts])
        if len(links) > len(kept):
            encoded_links += encode.dropped_links(len(links) - len(kept))
        attributes = encode.span_attributes(link_counts(len(kept), len(links)))
        if parts:
            for index, key in enumerate(REQUEST_ARRAYS, 1):
                attributes += encode.span_array_attribute(key, [part[index] for part in parts])
        return attributes, encoded_links

    def _link_parts(self, link: tuple) -> tuple[bytes, bytes, bytes, bytes]:
        """One link, encoded, and its elements of the three request arrays."""
        request_id, trace_id, span_id, flags, work, tokens = link
        parts = (
            encode.link(trace_id, span_id, (flags & 0xFF) | encode.FLAG_HAS_IS_REMOTE | encode.FLAG_IS_REMOTE,
                        link_attributes(request_id, work, tokens)),
            encode.array_item(str(request_id)),
            encode.array_item(str(work)),
            encode.array_item(tokens if type(tokens) is int else UNKNOWN),
        )
        if len(self._link_cache) >= _LINK_CACHE_SIZE:
            self._link_cache.clear()
        self._link_cache[link] = parts
        return parts

    def _reports(self, tallies: list[RequestTally], reason: str) -> list[bytes]:
        """The ``request.steps`` span of each request, in the request's own trace, a child of
        its span; linked to the windows (or steps) that computed it."""
        spans: list[bytes] = []
        for tally in sampled(tallies):
            links = b"".join(
                encode.link(trace_id, span_id, encode.FLAG_HAS_IS_REMOTE | _SAMPLED, {})
                for trace_id, span_id in tally.places
            )
            if tally.places_dropped:
                links += encode.dropped_links(tally.places_dropped)
            spans.append(RequestSpan(encode.span(
                tally.trace_id, random_bits(64), tally.span_id, self._request_name, tally.start_ns, tally.end_ns,
                encode.span_attributes(tally.attributes(reason)) + self._pid_attribute,
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
        (
            _, start_ns, end_ns, mode, bs, ext, dec, pre, ntok, pass_id, static_id, parent, exception, extra,
            links, queued, kv_tokens,
        ) = record
        text_name, name, shape_attributes = self._shape(mode, bs, ext, dec, pre, ntok)
        attributes = shape_attributes
        link_attributes_, encoded_links = self._request_links(links)
        attributes += link_attributes_
        per_step: dict[str, Any] = {}
        if pass_id is not None and pass_id >= 0:
            per_step["forward.pass_id"] = pass_id
        if queued is not None and queued >= 0:
            per_step["scheduler.queued_requests"] = queued
        if kv_tokens is not None and kv_tokens >= 0:
            per_step["scheduler.kv_tokens"] = kv_tokens
        if per_step:
            attributes += encode.span_attributes(per_step)
        static = self._statics.get(static_id)
        if static:
            attributes += static
        if extra:
            attributes += encode.span_attributes(extra)
        attributes += self._pid_attribute
        if parent is not None:
            trace_id, parent_span_id, trace_flags, is_remote = parent
            flags = encode.FLAG_HAS_IS_REMOTE | (encode.FLAG_IS_REMOTE if is_remote else 0)
            if self._sampler is not None:
                trace_flags = self._sample(trace_id, parent, text_name)
            else:
                trace_flags &= _SAMPLED  # parent-based: the parent's decision
        elif self._timeline is not None:
            window, closed = self._timeline.place(start_ns, end_ns, mode, ntok, static_id)
            if closed is not None and closed.sampled:
                yield self._root(closed)
            trace_id, parent_span_id = window.trace_id, window.span_id
            trace_flags = _SAMPLED if window.sampled else 0  # the window's root decided
            flags = encode.FLAG_HAS_IS_REMOTE
        else:
            trace_id, parent_span_id = random_bits(128), None
            trace_flags = self._sample(trace_id, None, text_name) if self._sampler is not None else _SAMPLED
            flags = encode.FLAG_HAS_IS_REMOTE
        span_id = random_bits(64)
        if self._ledger is not None and links:
            place = None
            if trace_flags & _SAMPLED:
                place = (trace_id, parent_span_id if self._timeline is not None and parent is None else span_id)
            yield from self._reports(self._ledger.add(start_ns, end_ns, links, place), "evicted")
        if not trace_flags & _SAMPLED:
            self.not_sampled += 1
            return
        tail = encoded_links
        if exception is not None:
            tail = encode.event("exception", end_ns, exception) + tail
            tail += encode.error_status(
                f"{exception.get('exception.type', '')}: {exception.get('exception.message', '')}"
            )
        yield encode.span(
            trace_id, span_id, parent_span_id, name, start_ns, end_ns, attributes,
            flags | _SAMPLED, tail,
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


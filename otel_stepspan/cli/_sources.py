"""Where ``search``, ``stats`` and ``request`` read spans from: a Jaeger query API, or a local
OTLP/JSON file."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ..otlp_json import StepSpan, iter_spans, iter_step_spans
from ..request_tally import SPAN_NAME as REQUEST_SPAN_NAME
from ._filters import DEFAULT_SINCE_NS, StepFilter, go_duration
from .jaeger import JaegerClient, JaegerError, is_jaeger_own
from .request import RequestStep, is_trace_id, request_root, request_steps


class SourceError(Exception):
    """The steps could not be read; the message is for the user (exit status 2)."""


def load_steps(args: argparse.Namespace, step_filter: StepFilter, *, search_depth: int) -> list[StepSpan]:
    """Every step the filter selects, once each, in start-time order."""
    if args.file:
        return step_filter.apply(_read_file(Path(args.file)))
    return step_filter.apply(_ask_jaeger(args, step_filter, search_depth))


def load_request(
    args: argparse.Namespace, key: str, step_filter: StepFilter, *, search_depth: int, timeline_s: float
) -> tuple[list[RequestStep], Optional[StepSpan]]:
    """The steps of request ``key`` (a trace id or a request id) and, when it can be found, the
    root span of the request's own trace.

    From Jaeger: with a trace id, the request's trace is fetched first. When it holds the
    request's report (a ``request.steps`` span), the step traces it links to are read, and only
    those. Otherwise its root span bounds the time to search (widened by ``timeline_s``, since a
    step's timeline trace starts before the step). With a request id, or when the engine does not
    export its request spans to this Jaeger, the ``--since`` window is searched; the steps' links
    then name the request's trace.
    Every step trace of the window is read and the steps linking to the request kept.
    """
    if args.file:
        spans = _read_file(Path(args.file), steps_only=False)
        steps = request_steps(step_filter.apply(s for s in spans if "forward.mode" in s.attributes), key)
        trace_id = key.lower() if is_trace_id(key) else (steps[0].request_trace_id if steps else "")
        return steps, request_root(spans, trace_id) if trace_id else None
    client = JaegerClient(args.jaeger, timeout_s=args.timeout)

    def root_of(trace_id: str) -> Optional[StepSpan]:
        return request_root(list(iter_spans(client.get_trace(trace_id))), trace_id)

    try:
        request_trace: list[StepSpan] = []
        if is_trace_id(key):
            request_trace = list(iter_spans(client.get_trace(key.lower())))
            linked = _linked_step_traces(request_trace)
            if linked:
                _verbose(args, f"the request's report links to {len(linked)} step traces: reading those")
                spans = [span for trace_id in linked for span in iter_spans(client.get_trace(trace_id))]
                steps = request_steps(step_filter.apply(s for s in spans if "forward.mode" in s.attributes), key)
                if steps:
                    return steps, request_root(request_trace, key.lower())
        root = request_root(request_trace, key.lower()) if is_trace_id(key) else None
        window = step_filter
        if root is not None:
            margin = int((timeline_s + 1.0) * 1e9)
            window = replace(step_filter, start_min_ns=root.start_ns - margin, start_max_ns=root.end_ns + 1_000_000_000)
            _verbose(args, "found the request's own trace: searching the steps around it")
        steps = request_steps(window.apply(_ask_jaeger(args, window, search_depth, client=client, modes=False)), key)
        if root is None and steps:
            root = root_of(steps[0].request_trace_id)
    except JaegerError as exc:
        raise SourceError(str(exc)) from None
    finally:
        for url in client.requested:
            _verbose(args, f"GET {url}")
    return steps, root


def _linked_step_traces(request_trace: list[StepSpan]) -> list[str]:
    """The traces holding a request's steps, from its ``request.steps`` spans' links (each to a
    timeline window, or a step outside one), in order; none when there is no report yet or a
    report could not link every place (then the steps are searched for)."""
    reports = [span for span in request_trace if span.name == REQUEST_SPAN_NAME]
    if not reports or any(span.attributes.get("request.links_dropped") for span in reports):
        return []
    return list(dict.fromkeys(link.trace_id for span in reports for link in span.links))


def load_timelines(
    args: argparse.Namespace, trace_id: Optional[str], step_filter: StepFilter, *, search_depth: int
) -> list[StepSpan]:
    """Every span of one trace (``trace_id``), or of the traces in the window, timeline roots
    included."""
    if args.file:
        spans = _read_file(Path(args.file), steps_only=False)
        return [s for s in spans if s.trace_id == trace_id] if trace_id else spans
    client = JaegerClient(args.jaeger, timeout_s=args.timeout)
    try:
        if trace_id:
            return list(iter_spans(client.get_trace(trace_id)))
        return _ask_jaeger(args, step_filter, search_depth, client=client, modes=False, steps_only=False)
    except JaegerError as exc:
        raise SourceError(str(exc)) from None
    finally:
        for url in client.requested:
            _verbose(args, f"GET {url}")


def _read_file(path: Path, steps_only: bool = True) -> list[StepSpan]:
    try:
        with open(path, encoding="utf-8") as handle:
            return list(iter_step_spans(handle) if steps_only else iter_spans(handle))
    except FileNotFoundError:
        raise SourceError(f"no such spans file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise SourceError(f"{path} is not OTLP/JSON lines: {exc}") from None


def _ask_jaeger(
    args: argparse.Namespace,
    step_filter: StepFilter,
    search_depth: int,
    *,
    client: Optional[JaegerClient] = None,
    modes: bool = True,
    steps_only: bool = True,
) -> list[StepSpan]:
    """The step spans (every span, with ``steps_only`` False) Jaeger returns for the filter's
    services and window (one query per mode unless ``modes`` is False), not yet filtered here."""
    own_client = client is None
    client = client or JaegerClient(args.jaeger, timeout_s=args.timeout)
    try:
        services = list(step_filter.services)
        if not services:
            services = [name for name in client.services() if not is_jaeger_own(name)]
            _verbose(args, f"services in Jaeger (its own left out): {', '.join(services) or 'none'}")
        now_ns = time.time_ns()
        start_min = step_filter.start_min_ns if step_filter.start_min_ns is not None else now_ns - DEFAULT_SINCE_NS
        start_max = step_filter.start_max_ns if step_filter.start_max_ns is not None else now_ns
        # One query per mode: the attribute filter holds one value per key. Jaeger releases that
        # ignore query.attributes return every mode; the filter sorts them out afterwards.
        asked_modes: list[Optional[str]] = (list(step_filter.modes) if modes else []) or [None]
        steps: list[StepSpan] = []
        for service in services:
            for mode in asked_modes:
                documents = client.find_traces(
                    service,
                    start_min,
                    start_max,
                    search_depth=search_depth,
                    attributes={"forward.mode": mode} if mode else None,
                    duration_min=_duration(step_filter.min_duration_ns),
                    duration_max=_duration(step_filter.max_duration_ns),
                )
                steps.extend(iter_step_spans(documents) if steps_only else iter_spans(documents))
    except JaegerError as exc:
        raise SourceError(str(exc)) from None
    except ValueError as exc:
        raise SourceError(f"Jaeger at {client.base_url} answered something that is not OTLP/JSON: {exc}") from None
    finally:
        if own_client:
            for url in client.requested:
                _verbose(args, f"GET {url}")
    return steps


def _duration(ns: Optional[int]) -> Optional[str]:
    return go_duration(ns) if ns is not None else None


def _verbose(args: argparse.Namespace, message: str) -> None:
    if getattr(args, "verbose", False):
        print(f"otel-stepspan: {message}", file=sys.stderr)

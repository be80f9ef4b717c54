"""The one span builder: what a step record becomes, and that both sinks make the same of it.

The exporter process encodes span data itself; the in-process sink makes it through a tracer
provider. Fed the same steps, both must give the same spans: names, attributes, links, status,
events, timeline parents and request reports. Only ids (drawn by each) may differ.
"""

from __future__ import annotations

import os
import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_stepspan.exporter import encode, wire
from otel_stepspan.exporter.spans import SpanBuilder
from otel_stepspan.request_tally import RequestSettings
from otel_stepspan.sinks.otel import DeferredSpanSink
from otel_stepspan.span_data import StepRecord, StepSpans, error_description, exception_event
from otel_stepspan.step import StepInfo, make_step
from otel_stepspan.timeline import TimelineSettings

GIVEN_PARENT = (0x1234, 0x5678, 1, True)
STATIC = {"engine.name": "sglang", "engine.tp_rank": 0}
LINKS = [("r-1", 0xA01, 0xB01, 1, "prefill", 12), ("r-2", 0xA02, 0xB02, 1, "decode", 1),
         ("r-3", 0xA03, 0xB03, 1, "decode", None)]


def _spans(link_limit: int = 128, **timeline: int) -> StepSpans:
    return StepSpans(
        7, name_by_mode=False, link_limit=link_limit, timeline=TimelineSettings(**timeline),
        requests=RequestSettings(max_places=link_limit),
    )


def _record(start_ns: int, mode: str = "decode", links=None, parent=None, error=None) -> StepRecord:
    return StepRecord(wire.STEP, start_ns, start_ns + 500, mode, 4, 0, 4, 0, 4, 3, "static", parent, error,
                      None, links, None, None)


def test_a_step_is_named_counted_and_linked_under_the_limit():
    spans = _spans(link_limit=2)
    step = spans.step(_record(1_000, "mixed", links=LINKS))
    assert step.name == "step[mixed bs=4 ext=0 dec=4]"
    assert [link[0] for link in step.links] == ["r-1", "r-2"] and step.links_dropped == 1
    attributes = spans.attributes(step, STATIC)
    assert attributes["forward.request_links"] == 2 and attributes["forward.request_links_dropped"] == 1
    assert attributes["forward.request_ids"] == ("r-1", "r-2")
    assert attributes["forward.pass_id"] == 3 and attributes["engine.name"] == "sglang"
    assert attributes["process.pid"] == 7


def test_a_request_over_the_link_limit_is_still_counted_in_its_report():
    spans = _spans(link_limit=1)
    step = spans.step(_record(1_000, links=LINKS))
    assert spans.count_requests(step, True, 0xAB, 0xCD, step.window.span_id) == []
    reports = {report.attributes["request.id"]: report for report in spans.close_all().reports}
    assert set(reports) == {"r-1", "r-2", "r-3"}
    assert reports["r-3"].attributes["request.steps"] == 1
    assert reports["r-3"].places == ((0xAB, step.window.span_id),)


def test_a_step_with_a_parent_of_its_own_stays_out_of_the_timeline_and_a_full_window_closes():
    spans = _spans(max_steps=2)
    first, second = spans.step(_record(1_000)), spans.step(_record(2_000))
    own = spans.step(_record(3_000, parent=GIVEN_PARENT))
    third = spans.step(_record(4_000))
    assert first.window is second.window and own.window is None and own.closed is None
    assert third.closed is first.window and third.window is not first.window


def test_an_error_is_the_exception_event_and_its_description():
    try:
        raise ValueError("bad")
    except ValueError as exc:
        event = exception_event(exc)
    step = _spans().step(_record(1_000, error=event))
    assert step.error["exception.type"] == "ValueError" and "raise ValueError" in step.error["exception.stacktrace"]
    assert error_description(step.error) == "ValueError: bad"


def _recomputes(spans: StepSpans, links) -> object:
    """One step's ``forward.recomputes`` (None: absent), counted into the ledger as the sinks do
    once the span is made."""
    step = spans.step(_record(1_000, "prefill", links=links))
    if step.requests:
        spans.count_requests(step, True, 0xAB, 0xCD, None)
    return spans.attributes(step, STATIC).get("forward.recomputes")


def _as(request: str, work: str, tokens: int) -> tuple:
    """A link to one of LINKS' requests, doing ``work``."""
    link = next(link for link in LINKS if link[0] == request)
    return (*link[:4], work, tokens)


def test_a_step_counts_the_requests_it_recomputes_after_they_decoded():
    spans = _spans()
    assert _recomputes(spans, [_as("r-1", "prefill", 64)]) == 0  # a first prompt chunk
    assert _recomputes(spans, [_as("r-1", "prefill", 64), _as("r-2", "prefill", 32)]) == 0  # its next chunk
    assert _recomputes(spans, [_as("r-1", "decode", 1), _as("r-2", "prefill", 32)]) == 0
    # preempted after decoding: r-1's prompt and output computed again, next to r-2's decode
    assert _recomputes(spans, [_as("r-1", "prefill", 129), _as("r-2", "decode", 1)]) == 1
    assert _recomputes(spans, [_as("r-1", "prefill", 7), _as("r-2", "prefill", 33)]) == 2  # both, r-1 in 2 chunks
    assert _recomputes(spans, [_as("r-1", "decode", 1), _as("r-3", "prefill", 12)]) == 0  # r-3: new
    assert _recomputes(spans, [_as("r-3", "verify", 4)]) == 0  # r-3 decodes speculatively
    assert _recomputes(spans, [_as("r-3", "prefill", 16)]) == 1  # and is preempted
    assert _recomputes(spans, []) == 0  # the engine traces requests; this step computed none of them
    assert _recomputes(spans, None) is None  # the engine traces no requests
    reports = {report.attributes["request.id"]: report.attributes for report in spans.close_all().reports}
    assert [reports[r]["request.recomputes"] for r in ("r-1", "r-2", "r-3")] == [2, 1, 1]


def test_a_recompute_over_the_link_limit_is_counted():
    spans = _spans(link_limit=1)
    _recomputes(spans, [_as("r-1", "decode", 1), _as("r-2", "decode", 1)])
    assert _recomputes(spans, [_as("r-1", "decode", 1), _as("r-2", "prefill", 40)]) == 1


def test_without_request_reports_no_history_is_kept_and_the_count_is_absent():
    spans = StepSpans(7, name_by_mode=False, link_limit=128, timeline=TimelineSettings(),
                      requests=RequestSettings(enabled=False))
    _recomputes(spans, [_as("r-1", "decode", 1)])
    assert _recomputes(spans, [_as("r-1", "prefill", 40)]) is None


def test_a_request_forgotten_after_its_idle_time_reads_as_a_new_prompt():
    """The ledger reports a request no step computed for its idle time and forgets it: a
    preemption longer than that is not counted (docs/spans.md)."""
    spans = StepSpans(7, name_by_mode=False, link_limit=128, timeline=TimelineSettings(),
                      requests=RequestSettings(idle_seconds=0.001))
    _recomputes(spans, [_as("r-1", "decode", 1)])
    assert [report.attributes["request.id"] for report in spans.close_due(10**9).reports] == ["r-1"]
    assert _recomputes(spans, [_as("r-1", "prefill", 40)]) == 0


# -- both sinks, the same steps ----------------------------------------------------------------


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(item) for item in any_value.array_value.values)
    return getattr(any_value, kind)


def _attributes(key_values) -> dict:
    return {kv.key: _value(kv.value) for kv in key_values}


def _normalized(request: ExportTraceServiceRequest) -> list[tuple]:
    """Every span without its random ids: a span's ids become its name and start, so that
    parents and links (to timeline roots, to steps) compare by what they point at."""
    spans = [span for resource in request.resource_spans for scope in resource.scope_spans for span in scope.spans]
    role = {(span.trace_id, span.span_id): f"{span.name} at {span.start_time_unix_nano}" for span in spans}

    def where(trace_id: bytes, span_id: bytes):
        if not span_id:
            return None
        return role.get((trace_id, span_id), (trace_id.hex(), span_id.hex()))

    made = []
    for span in spans:
        links = [(where(link.trace_id, link.span_id), _attributes(link.attributes)) for link in span.links]
        events = [(event.name, event.time_unix_nano, _attributes(event.attributes)) for event in span.events]
        made.append((
            span.name, span.kind, span.start_time_unix_nano, span.end_time_unix_nano,
            where(span.trace_id, span.parent_span_id), sorted(_attributes(span.attributes).items()),
            sorted(links, key=repr), events, span.status.code, span.status.message,
        ))
    return sorted(made, key=repr)


def test_the_exporter_and_the_in_process_sink_make_the_same_spans_of_the_same_steps():
    try:
        raise RuntimeError("the forward failed")
    except RuntimeError as exc:
        error = exc
    extra = {"forward.gpu_time_ms": 1.5}
    steps = [  # (info, parent, error, extra)
        (StepInfo("mixed", 8, 256, 4, 4, 260, 17, links=tuple(LINKS), queued_requests=3, kv_tokens=4096), None,
         None, extra),
        (StepInfo("decode", 2, 0, 2, 0, 2, 18, links=tuple(LINKS[:2])), GIVEN_PARENT, error, None),
        (make_step("prefill", 2, None, 0, 2, None, None), None, None, None),
        (StepInfo("idle", 0), None, None, None),
        # r-2 decoded in the first two steps: preempted, and its prompt computed again
        (StepInfo("prefill", 1, 50, 0, 1, 50, 19, links=(("r-2", 0xA02, 0xB02, 1, "prefill", 50),)), None, None,
         None),
    ]
    environ = {"OTEL_SPAN_LINK_COUNT_LIMIT": "2", "OTEL_STEPSPAN_TIMELINE_STEPS": "2"}
    now = time.time_ns()  # the in-process sink's thread closes what is idle by the clock

    builder = SpanBuilder(environ, engine_pid=os.getpid())
    builder.add_static(0, STATIC)
    encoded = []
    for index, (info, parent, exc, more) in enumerate(steps):
        encoded += builder.build((
            wire.STEP, now + 1_000 * index, now + 1_000 * index + 500, info.mode, info.batch_size, info.extend_tokens,
            info.decode_seqs, info.prefill_seqs, info.num_tokens, info.pass_id, 0, parent,
            exception_event(exc) if exc is not None else None, more,
            None if info.links is None else list(info.links), info.queued_requests, info.kv_tokens,
        ))
    encoded += builder.close_all()
    from_exporter = ExportTraceServiceRequest()
    from_exporter.ParseFromString(encode.export_request(builder.resource, builder.scope, encoded))

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    sink = DeferredSpanSink(
        provider, timeline=TimelineSettings(max_steps=2), link_limit=2, requests=RequestSettings(max_places=2)
    )
    for index, (info, parent, exc, more) in enumerate(steps):
        context = None
        if parent is not None:
            span_context = trace.SpanContext(parent[0], parent[1], parent[3], trace.TraceFlags(parent[2]))
            context = trace.set_span_in_context(trace.NonRecordingSpan(span_context))
        start_ns = now + 1_000 * index
        sink.submit(lambda captured: captured, info, STATIC, context, start_ns, start_ns + 500, exc, more)
    assert sink.drain(10.0)
    sink.close_timeline()
    assert sink.failed_total == 0
    from_sink = encode_spans(memory.get_finished_spans())
    provider.shutdown()

    made = _normalized(from_exporter)
    assert [span[0] for span in made].count("timeline") == 2 and [span[0] for span in made].count("request.steps") == 3
    recomputes = {span[0]: dict(span[5]).get("forward.recomputes") for span in made if span[0].startswith("step[")}
    assert recomputes == {"step[mixed bs=8 ext=256 dec=4]": 0, "step[decode bs=2]": 0, "step[prefill bs=1 toks=50]": 1,
                          "step[prefill bs=2 toks=?]": None, "step[idle]": None}  # the last two link nothing
    assert made == _normalized(from_sink)

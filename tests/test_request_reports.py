"""A traced request's own trace gains a ``request.steps`` span that says what its steps did and
links to where they are; a step carries its requests' ids, work and tokens as arrays, so a store
that drops link attributes (Jaeger) still reports a request as a file does."""

from __future__ import annotations

import json

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_stepspan import StepInfo, runtime, step_span
from otel_stepspan.cli.request import request_steps
from otel_stepspan.exporter import encode, wire
from otel_stepspan.exporter.spans import RequestSpan, SpanBuilder
from otel_stepspan.otlp_json import iter_spans, spans_to_otlp_json
from otel_stepspan.request_tally import MAX_OPEN, RequestLedger, RequestSettings
from otel_stepspan.step import RequestLink

MS = 1_000_000


def _link(request: str, work: str = "decode", tokens: int = 1, flags: int = 1) -> tuple:
    number = int(request.split("-")[1])
    return (request, 0xA00 + number, 0xB00 + number, flags, work, tokens)


# -- the ledger ---------------------------------------------------------------------------------


def test_the_ledger_counts_each_requests_work_tokens_recomputes_and_places():
    ledger = RequestLedger(RequestSettings(idle_seconds=1.0))
    ledger.add(0, 2 * MS, [_link("r-1", "prefill", 100), _link("r-2", "prefill", 50)], (1, 10))
    ledger.add(3 * MS, 4 * MS, [_link("r-1"), _link("r-2")], (1, 10))
    ledger.add(5 * MS, 7 * MS, [_link("r-1", "prefill", 101)], (2, 20))  # preempted, recomputed
    ledger.add(8 * MS, 9 * MS, [_link("r-1")], None)  # not sampled: counted, found nowhere
    [first, second] = sorted(ledger.close(), key=lambda t: t.request_id)
    assert (first.trace_id, first.span_id, first.start_ns, first.end_ns) == (0xA01, 0xB01, 0, 9 * MS)
    attributes = first.attributes("end")
    assert attributes == {
        "request.id": "r-1", "request.steps": 4, "request.tokens": 203, "request.recomputes": 1,
        "request.in_steps_ms": 6.0, "request.between_steps_ms": 3.0, "request.links": 2, "request.reported": "end",
        "request.decode_steps": 2, "request.decode_tokens": 2, "request.prefill_steps": 2,
        "request.prefill_tokens": 201,
    }
    assert list(first.places) == [(1, 10), (2, 20)]
    assert second.attributes("end")["request.tokens"] == 51 and list(second.places) == [(1, 10)]
    assert len(ledger) == 0


def test_prompt_work_after_speculative_decoding_is_a_recompute_too():
    """A request that only ever generated tokens through verify steps (speculative decoding)
    and is preempted: its prompt again is a recompute, on the step and in its report."""
    ledger = RequestLedger(RequestSettings())
    ledger.add(0, MS, [_link("r-1", "prefill", 100)], None)
    ledger.add(MS, 2 * MS, [_link("r-1", "verify", 4)], None)
    assert ledger.recomputing([_link("r-1", "prefill", 104)]) == 1
    ledger.add(3 * MS, 4 * MS, [_link("r-1", "prefill", 104)], None)
    [tally] = ledger.close()
    assert tally.attributes("end")["request.recomputes"] == 1


def test_a_request_no_step_computed_for_the_idle_time_is_due_and_only_then():
    ledger = RequestLedger(RequestSettings(idle_seconds=2.0))
    ledger.add(0, 1 * MS, [_link("r-1"), _link("r-2")], (1, 1))
    ledger.add(1000 * MS, 1001 * MS, [_link("r-2")], (1, 1))
    assert ledger.due(1 * MS + 1999 * MS) == []
    assert [t.request_id for t in ledger.due(1 * MS + 2000 * MS)] == ["r-1"]
    assert [t.request_id for t in ledger.due(1001 * MS + 2000 * MS)] == ["r-2"]


def test_a_work_the_engine_left_empty_is_counted_as_unknown_step_after_step():
    ledger = RequestLedger(RequestSettings())
    for i in range(3):
        ledger.add(i * MS, i * MS + 1, [("r-1", 1, 1, 1, "", 2)], None)
    [tally] = ledger.close()
    attributes = tally.attributes("end")
    assert (attributes["request.unknown_steps"], attributes["request.unknown_tokens"]) == (3, 6)
    assert attributes["request.steps"] == 3


def test_links_to_places_are_bounded_and_the_rest_counted():
    ledger = RequestLedger(RequestSettings(max_places=2))
    for place in range(5):
        ledger.add(place * MS, place * MS + 1, [_link("r-1")], (place, place))
    [tally] = ledger.close()
    assert list(tally.places) == [(0, 0), (1, 1)]
    attributes = tally.attributes("end")
    assert attributes["request.links"] == 2 and attributes["request.links_dropped"] == 3


def test_past_the_open_bound_the_idlest_request_is_reported_early():
    ledger = RequestLedger(RequestSettings())
    for i in range(MAX_OPEN):
        ledger.add(i, i + 1, [(f"r-{i}", 1, 1, 1, "decode", 1)], None)
    [evicted] = ledger.add(10**9, 10**9 + 1, [("r-new", 1, 1, 1, "decode", 1)], None)
    assert evicted.request_id == "r-0" and len(ledger) == MAX_OPEN


# -- the exporter process ------------------------------------------------------------------------


def _decoded(builder: SpanBuilder, spans: list) -> list[dict]:
    parsed = ExportTraceServiceRequest()
    parsed.ParseFromString(encode.export_request(builder.resource, builder.scope, spans))
    return MessageToDict(parsed)["resourceSpans"][0]["scopeSpans"][0]["spans"]


def _step(i: int, links, parent=None) -> tuple:
    return (wire.STEP, i * MS, i * MS + MS // 2, "decode", len(links), 0, len(links), 0, len(links), i, 0, parent,
            None, None, links, None, None)


def _hex(value: str) -> str:
    import base64

    return base64.b64decode(value).hex()


def test_the_exporter_reports_each_request_in_its_own_trace_linked_to_its_windows():
    builder = SpanBuilder({"OTEL_STEPSPAN_TIMELINE_STEPS": "2"}, engine_pid=9)
    built: list = []
    built += builder.build(_step(1, [_link("r-1", "prefill", 30)]))
    built += builder.build(_step(2, [_link("r-1"), _link("r-2", "prefill", 7)]))
    built += builder.build(_step(3, [_link("r-1")]))  # a second window
    built += builder.build(_step(4, [_link("r-3", flags=0)]))  # a request trace that was not sampled
    built += builder.close_all()
    assert sum(type(span) is RequestSpan for span in built) == 2
    spans = _decoded(builder, built)
    roots = [s for s in spans if s["name"] == "timeline"]
    reports = {s["attributes"][0]["value"]["stringValue"]: s for s in spans if s["name"] == "request.steps"}
    assert set(reports) == {"r-1", "r-2"}
    first = reports["r-1"]
    assert (_hex(first["traceId"]), _hex(first["parentSpanId"])) == (f"{0xA01:032x}", f"{0xB01:016x}")
    assert (int(first["startTimeUnixNano"]), int(first["endTimeUnixNano"])) == (1 * MS, 3 * MS + MS // 2)
    assert [(_hex(l["traceId"]), _hex(l["spanId"])) for l in first["links"]] == [
        (_hex(r["traceId"]), _hex(r["spanId"])) for r in roots
    ]
    attributes = {kv["key"]: kv["value"] for kv in first["attributes"]}
    assert attributes["request.steps"] == {"intValue": "3"}
    assert attributes["request.prefill_tokens"] == {"intValue": "30"}
    assert attributes["request.decode_steps"] == {"intValue": "2"}
    assert attributes["process.pid"] == {"intValue": "9"}
    assert [(_hex(l["spanId"])) for l in reports["r-2"]["links"]] == [_hex(roots[0]["spanId"])]


def test_a_step_with_a_parent_of_its_own_is_linked_itself():
    builder = SpanBuilder({}, engine_pid=1)
    built = list(builder.build(_step(1, [_link("r-1")], parent=(0xAB, 0xCD, 1, False)))) + builder.close_all()
    spans = _decoded(builder, built)
    [step] = [s for s in spans if s["name"].startswith("step[")]
    [report] = [s for s in spans if s["name"] == "request.steps"]
    assert [(l["traceId"], l["spanId"]) for l in report["links"]] == [(step["traceId"], step["spanId"])]


def test_request_reports_can_be_turned_off():
    builder = SpanBuilder({"OTEL_STEPSPAN_REQUEST_SPANS": "off"}, engine_pid=1)
    built = list(builder.build(_step(1, [_link("r-1")]))) + builder.close_all()
    assert sorted(s["name"] for s in _decoded(builder, built)) == ["step[decode bs=1]", "timeline"]
    assert not any(type(span) is RequestSpan for span in built)


# -- the in-process sink --------------------------------------------------------------------------


def test_the_in_process_sink_reports_requests_through_the_provider(memory_spans):
    links = (RequestLink("r-1", 0xA01, 0xB01, 1, "prefill", 12), RequestLink("r-2", 0xA02, 0xB02, 1, "decode", 1))
    with step_span(StepInfo("mixed", 2, 12, 1, 1, 13, links=links)):
        pass
    with step_span(StepInfo("decode", 1, 0, 1, 0, 1, links=(RequestLink("r-1", 0xA01, 0xB01, 1, "decode", 1),))):
        pass
    runtime.flush(5.0, end_timelines=True)
    spans = memory_spans.all_spans()
    [root] = [s for s in spans if s.name == "timeline"]
    reports = {s.attributes["request.id"]: s for s in spans if s.name == "request.steps"}
    assert set(reports) == {"r-1", "r-2"}
    first = reports["r-1"]
    assert (first.context.trace_id, first.parent.span_id, first.parent.is_remote) == (0xA01, 0xB01, True)
    assert [(l.context.trace_id, l.context.span_id) for l in first.links] == [
        (root.context.trace_id, root.context.span_id)
    ]
    assert first.attributes["request.steps"] == 2 and first.attributes["request.tokens"] == 13
    assert first.attributes["request.prefill_steps"] == 1 and first.attributes["request.decode_steps"] == 1
    [step] = [s for s in spans if s.name.startswith("step[mixed")]
    assert step.attributes["forward.request_ids"] == ("r-1", "r-2")
    assert step.attributes["forward.request_work"] == ("prefill", "decode")
    assert step.attributes["forward.request_tokens"] == (12, 1)


# -- reading back what a store kept -------------------------------------------------------------


def test_a_request_reads_the_same_when_the_store_dropped_link_attributes(memory_spans):
    links = (RequestLink("r-1", 0xA01, 0xB01, 1, "prefill", 12), RequestLink("r-2", 0xA02, 0xB02, 1, "decode", 1))
    with step_span(StepInfo("mixed", 2, 12, 1, 1, 13, links=links)):
        pass
    runtime.flush(5.0, end_timelines=True)
    document = spans_to_otlp_json(memory_spans.all_spans())
    as_jaeger_keeps_it = json.loads(json.dumps(document))
    for resource_spans in as_jaeger_keeps_it["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for link in span.get("links", ()):  # ids kept, attributes replaced
                    link["attributes"] = [{"key": "opentracing.ref_type", "value": {"stringValue": "follows_from"}}]
                for attribute in span.get("attributes", ()):  # Jaeger keeps an array as JSON text
                    if "arrayValue" in attribute["value"]:
                        values = [int(v["intValue"]) if "intValue" in v else v["stringValue"]
                                  for v in attribute["value"]["arrayValue"]["values"]]
                        attribute["value"] = {"stringValue": json.dumps(values, separators=(",", ":"))}
    for key in ("r-2", f"{0xA02:032x}"):
        from_file = request_steps(iter_spans(document), key)
        from_store = request_steps(iter_spans(as_jaeger_keeps_it), key)
        assert [(r.work, r.tokens, r.request_id) for r in from_store] == [("decode", 1, "r-2")]
        def seen(steps):
            return [(r.step.span_id, r.step.attributes, r.work, r.tokens, r.request_id, r.request_trace_id)
                    for r in steps]

        assert seen(from_store) == seen(from_file)
    # arrays that do not match the links' count restore nothing rather than guess
    for resource_spans in as_jaeger_keeps_it["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                if span.get("links"):
                    span["links"] = span["links"][:1]
    assert request_steps(iter_spans(as_jaeger_keeps_it), "r-1") == []

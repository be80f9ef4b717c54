"""OTLP/JSON writer, file exporter and reader (otel_stepspan.otlp_json).

Spans come from a real SDK TracerProvider (a local one; the global provider is never set). The
writer is checked against protobuf itself: its JSON, with ids turned back into base64 as
protobuf's JSON mapping wants, must parse into exactly the request the OTLP exporters encode.
"""

from __future__ import annotations

import base64
import json
import threading

import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from otel_stepspan.otlp_json import (
    OtlpJsonFileExporter,
    SpanLink,
    StepSpan,
    iter_step_spans,
    normalize_id,
    otlp_json_to_request,
    spans_to_otlp_json,
)

STEP_ATTRS = {
    "forward.mode": "decode",
    "forward.batch_size": 3,
    "forward.extend_tokens": 0,
    "forward.decode_seqs": 3,
    "forward.prefill_seqs": 0,
    "forward.num_tokens": 3,
    "forward.label": "step[decode bs=3]",
}


def _provider(service: str = "engine-a"):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def sdk_spans():
    """A parent, a step child with every attribute type, an event and a link, an ERROR span
    from a second scope, and a span from a second resource."""
    provider, exporter = _provider("engine-a")
    tracer = provider.get_tracer("otel_stepspan", "0.1.0")
    other_scope = provider.get_tracer("other.scope", "9.9")
    with tracer.start_as_current_span("request", kind=SpanKind.SERVER) as parent:
        link = Link(parent.get_span_context(), {"link.n": 1})
        with tracer.start_as_current_span(
            "step[decode bs=3]",
            attributes={**STEP_ATTRS, "x.double": 1.5, "x.bool": True, "x.ints": [1, 2], "x.strs": ["a", "b"]},
            links=[link],
        ) as step:
            step.add_event("note", {"k": "v", "n": 7})
    with other_scope.start_as_current_span("failing") as failing:
        failing.set_status(Status(StatusCode.ERROR, "boom"))
    provider_b, exporter_b = _provider("engine-b")
    with provider_b.get_tracer("otel_stepspan", "0.1.0").start_as_current_span(
        "step[prefill bs=2 toks=64]", attributes={**STEP_ATTRS, "forward.mode": "prefill", "forward.batch_size": 2}
    ):
        pass
    spans = list(exporter.get_finished_spans()) + list(exporter_b.get_finished_spans())
    provider.shutdown()
    provider_b.shutdown()
    return spans


def _hex_ids_to_base64(document):
    """What protobuf's JSON parser expects for bytes fields, done independently of the module."""
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for holder in [span] + span.get("links", []):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if holder.get(key):
                            holder[key] = base64.b64encode(bytes.fromhex(holder[key])).decode()
    return document


def _spans_by_name(document):
    found = {}
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                found[span["name"]] = (resource_spans, scope_spans, span)
    return found


def test_round_trip_through_protobuf_equals_the_otlp_encoding(sdk_spans):
    document = json.loads(json.dumps(spans_to_otlp_json(sdk_spans)))
    parsed = json_format.ParseDict(_hex_ids_to_base64(document), ExportTraceServiceRequest())
    assert parsed == encode_spans(sdk_spans)
    assert len(parsed.resource_spans) == 2
    # and the module's own inverse agrees
    assert otlp_json_to_request(spans_to_otlp_json(sdk_spans)) == encode_spans(sdk_spans)


def test_json_spelling_follows_the_otlp_json_rules(sdk_spans):
    document = spans_to_otlp_json(sdk_spans)
    by_name = _spans_by_name(document)
    sdk = {s.name: s for s in sdk_spans}

    resource_spans, scope_spans, step = by_name["step[decode bs=3]"]
    sdk_step = sdk["step[decode bs=3]"]
    # ids: lowercase hex of the right length, not base64
    assert step["traceId"] == format(sdk_step.context.trace_id, "032x")
    assert step["spanId"] == format(sdk_step.context.span_id, "016x")
    assert step["parentSpanId"] == format(sdk_step.parent.span_id, "016x")
    assert step["links"][0]["spanId"] == format(sdk_step.links[0].context.span_id, "016x")
    # int64/fixed64 as decimal strings, enums as integers, camelCase keys
    assert step["startTimeUnixNano"] == str(sdk_step.start_time)
    assert step["endTimeUnixNano"] == str(sdk_step.end_time)
    assert step["kind"] == 1
    assert by_name["request"][2]["kind"] == 2
    attrs = {kv["key"]: kv["value"] for kv in step["attributes"]}
    assert attrs["forward.mode"] == {"stringValue": "decode"}
    assert attrs["forward.batch_size"] == {"intValue": "3"}
    assert attrs["x.double"] == {"doubleValue": 1.5}
    assert attrs["x.bool"] == {"boolValue": True}
    assert attrs["x.ints"] == {"arrayValue": {"values": [{"intValue": "1"}, {"intValue": "2"}]}}
    assert step["events"][0]["name"] == "note"
    assert step["events"][0]["timeUnixNano"] == str(sdk_step.events[0].timestamp)
    assert scope_spans["scope"] == {"name": "otel_stepspan", "version": "0.1.0"}
    resource = {kv["key"]: kv["value"] for kv in resource_spans["resource"]["attributes"]}
    assert resource["service.name"] == {"stringValue": "engine-a"}

    _, other_scope, failing = by_name["failing"]
    assert other_scope["scope"]["name"] == "other.scope"
    assert failing["status"] == {"code": 2, "message": "boom"}
    assert "parentSpanId" not in by_name["request"][2]


def test_file_exporter_writes_one_line_per_batch(sdk_spans, tmp_path):
    path = tmp_path / "nested" / "dir" / "spans.jsonl"
    exporter = OtlpJsonFileExporter(path)
    assert exporter.export(sdk_spans[:2]) is SpanExportResult.SUCCESS
    assert exporter.export(sdk_spans[2:]) is SpanExportResult.SUCCESS
    assert exporter.export([]) is SpanExportResult.SUCCESS  # nothing to write: no line
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert sum(len(ss["spans"]) for rs in first["resourceSpans"] for ss in rs["scopeSpans"]) == 2
    assert otlp_json_to_request(first) == encode_spans(sdk_spans[:2])
    assert otlp_json_to_request(json.loads(lines[1])) == encode_spans(sdk_spans[2:])
    exporter.shutdown()
    assert exporter.export(sdk_spans) is SpanExportResult.FAILURE
    assert len(path.read_text().splitlines()) == 2


def test_file_exporter_is_thread_safe_and_flushes_each_batch(sdk_spans, tmp_path):
    path = tmp_path / "spans.jsonl"
    exporter = OtlpJsonFileExporter(path)
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        for _ in range(25):
            assert exporter.export(sdk_spans) is SpanExportResult.SUCCESS

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # no shutdown yet: every batch must already be on disk, whole
    lines = path.read_text().splitlines()
    assert len(lines) == 200
    assert all(otlp_json_to_request(json.loads(line)) == encode_spans(sdk_spans) for line in lines[:5])
    assert all(json.loads(line)["resourceSpans"] for line in lines)
    exporter.shutdown()


def test_file_exporter_output_reads_back_as_steps(sdk_spans, tmp_path):
    path = tmp_path / "spans.jsonl"
    exporter = OtlpJsonFileExporter(path)
    provider, _ = _provider("svc")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("otel_stepspan").start_as_current_span("step[decode bs=3]", attributes=STEP_ATTRS):
        pass
    with provider.get_tracer("otel_stepspan").start_as_current_span("not a step"):
        pass
    provider.shutdown()
    steps = list(iter_step_spans(path))
    assert [s.name for s in steps] == ["step[decode bs=3]"]
    assert steps[0].service == "svc"
    assert steps[0].batch_size == 3 and steps[0].mode == "decode"


def test_reader_returns_only_steps_with_types_and_services(sdk_spans):
    steps = sorted(iter_step_spans(spans_to_otlp_json(sdk_spans)), key=lambda s: s.name)
    assert [s.name for s in steps] == ["step[decode bs=3]", "step[prefill bs=2 toks=64]"]
    decode, prefill = steps
    sdk_step = next(s for s in sdk_spans if s.name == "step[decode bs=3]")
    assert decode == StepSpan(
        trace_id=format(sdk_step.context.trace_id, "032x"),
        span_id=format(sdk_step.context.span_id, "016x"),
        name="step[decode bs=3]",
        service="engine-a",
        start_ns=sdk_step.start_time,
        end_ns=sdk_step.end_time,
        duration_ns=sdk_step.end_time - sdk_step.start_time,
        attributes={**STEP_ATTRS, "x.double": 1.5, "x.bool": True, "x.ints": (1, 2), "x.strs": ("a", "b")},
        parent_span_id=format(sdk_step.parent.span_id, "016x"),
        links=(
            SpanLink(
                format(sdk_step.links[0].context.trace_id, "032x"),
                format(sdk_step.links[0].context.span_id, "016x"),
                {"link.n": 1},
            ),
        ),
    )
    assert isinstance(decode.attributes["forward.batch_size"], int)
    assert prefill.service == "engine-b" and prefill.mode == "prefill" and prefill.batch_size == 2


def _doc(trace_id, span_id, start, end, batch_size):
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "s"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "otel_stepspan"},
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": span_id,
                                "name": "step[decode bs=5]",
                                "startTimeUnixNano": start,
                                "endTimeUnixNano": end,
                                "attributes": [
                                    {"key": "forward.mode", "value": {"stringValue": "decode"}},
                                    {"key": "forward.batch_size", "value": {"intValue": batch_size}},
                                ],
                            }
                        ],
                    }
                ],
            }
        ]
    }


TRACE_HEX = "0af7651916cd43dd8448eb211c80319c"
SPAN_HEX = "b7ad6b7169203331"


@pytest.mark.parametrize("as_string", [True, False])
@pytest.mark.parametrize(
    "trace_id,span_id",
    [
        (TRACE_HEX, SPAN_HEX),
        (TRACE_HEX.upper(), SPAN_HEX.upper()),
        (base64.b64encode(bytes.fromhex(TRACE_HEX)).decode(), base64.b64encode(bytes.fromhex(SPAN_HEX)).decode()),
        (base64.urlsafe_b64encode(bytes.fromhex(TRACE_HEX)).decode().rstrip("="),
         base64.urlsafe_b64encode(bytes.fromhex(SPAN_HEX)).decode().rstrip("=")),
    ],
    ids=["hex", "HEX", "base64", "base64url-unpadded"],
)
def test_reader_accepts_string_or_number_ints_and_hex_or_base64_ids(as_string, trace_id, span_id):
    start, end = 1795504818132689906, 1795504818137733471
    encode = str if as_string else (lambda n: n)
    (step,) = iter_step_spans(_doc(trace_id, span_id, encode(start), encode(end), encode(5)))
    assert step.trace_id == TRACE_HEX
    assert step.span_id == SPAN_HEX
    assert (step.start_ns, step.end_ns, step.duration_ns) == (start, end, end - start)
    assert step.attributes["forward.batch_size"] == 5 and step.batch_size == 5


def test_reader_accepts_jaeger_wrapping_json_lines_text_and_bytes():
    doc = _doc(TRACE_HEX, SPAN_HEX, "10", "25", "5")
    wrapped = {"result": doc}
    lines = json.dumps(doc) + "\n\n" + json.dumps(wrapped) + "\n"
    assert len(list(iter_step_spans(wrapped))) == 1
    assert len(list(iter_step_spans(lines))) == 2
    assert len(list(iter_step_spans(lines.encode()))) == 2
    assert len(list(iter_step_spans(lines.splitlines()))) == 2
    assert len(list(iter_step_spans([doc, wrapped]))) == 2
    with pytest.raises(ValueError, match="line 2"):
        list(iter_step_spans(json.dumps(doc) + "\n{not json\n"))


def test_reader_reads_the_recorded_jaeger_answer():
    """A real Jaeger v2.13 /api/v3/traces body (tests/data/jaeger_v3) reads as six steps."""
    from pathlib import Path

    recording = json.loads((Path(__file__).parent / "data" / "jaeger_v3" / "v3_traces_by_service.json").read_text())
    steps = {s.name: s for s in iter_step_spans(recording["body"])}
    assert len(steps) == 6
    mixed = steps["step[mixed bs=3 ext=100 dec=2]"]
    assert mixed.mode == "mixed" and mixed.batch_size == 3 and mixed.num_tokens == 102
    assert mixed.service == "otel-stepspan-recording"
    assert len(mixed.trace_id) == 32 and len(mixed.span_id) == 16
    assert mixed.duration_ns == mixed.end_ns - mixed.start_ns == 15168421


def test_normalize_id():
    assert normalize_id(TRACE_HEX.upper()) == TRACE_HEX
    assert normalize_id(base64.b64encode(bytes.fromhex(SPAN_HEX)).decode()) == SPAN_HEX
    assert normalize_id("") == ""
    assert normalize_id(None) == ""

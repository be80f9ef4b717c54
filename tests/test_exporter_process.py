"""The exporter process: what it sends is OTLP as the SDK would send it, and what reached its pipe
is delivered after the engine is gone, however it went (SIGKILL, its whole process tree killed)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from otel_stepspan.exporter import encode, wire
from otel_stepspan.exporter.process import MAX_REQUEST_BYTES, take_batch
from otel_stepspan.exporter.spans import SpanBuilder
from otel_stepspan.sinks.otel_process import exporter_environment
from otel_stepspan.testing.otlp_receiver import OtlpReceiver
from otel_stepspan.testing.processes import exporter_pids, read_until
from otel_stepspan.version import __version__

PROGRAMS = Path(__file__).parent / "programs"


def _only_span(request: bytes) -> tuple[dict, dict]:
    parsed = ExportTraceServiceRequest()
    parsed.ParseFromString(request)
    document = MessageToDict(parsed)
    resource_spans = document["resourceSpans"][0]
    return resource_spans, resource_spans["scopeSpans"][0]["spans"][0]


def test_a_step_span_encodes_as_the_sdk_encodes_the_same_span(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "encode-test")
    builder = SpanBuilder({}, engine_pid=4321)
    builder.add_static(0, {"engine.name": "sglang", "engine.tp_rank": 1})
    parent = (0x1234, 0x5678, 1, True)
    exception = {"exception.type": "ValueError", "exception.message": "bad", "exception.stacktrace": "tb"}
    links = [("req-1", 0xA1, 0xB1, 1, "prefill", 256), ("req-2", 0xA2, 0xB2, 1, "decode", 1)]
    record = (
        wire.STEP, 1_000, 2_500, "mixed", 8, 256, 4, 4, 260, 17, 0, parent, exception,
        {"forward.gpu_time_ms": 1.5}, links, 3, 4096,
    )
    [encoded] = list(builder.build(record))
    ours_resource, ours = _only_span(encode.export_request(builder.resource, builder.scope, [encoded]))

    attributes = {
        "forward.mode": "mixed", "forward.batch_size": 8, "forward.extend_tokens": 256,
        "forward.decode_seqs": 4, "forward.prefill_seqs": 4, "forward.num_tokens": 260,
        "forward.label": "step[mixed bs=8 ext=256 dec=4]", "forward.pass_id": 17,
        "forward.request_links": 2, "forward.recomputes": 0, "scheduler.queued_requests": 3,
        "scheduler.kv_tokens": 4096,
        "forward.request_ids": ("req-1", "req-2"), "forward.request_work": ("prefill", "decode"),
        "forward.request_tokens": (256, 1),
        "engine.name": "sglang", "engine.tp_rank": 1, "forward.gpu_time_ms": 1.5, "process.pid": 4321,
    }
    sdk_span = ReadableSpan(
        name="step[mixed bs=8 ext=256 dec=4]",
        context=SpanContext(0x1234, 0x9999, False, TraceFlags(1)),
        parent=SpanContext(0x1234, 0x5678, True, TraceFlags(1)),
        resource=Resource.create({"process.pid": 4321}),
        attributes=attributes,
        events=(Event("exception", exception, timestamp=2_500),),
        links=tuple(
            Link(SpanContext(trace_id, span_id, True, TraceFlags(flags)),
                 {"request.id": rid, "forward.request.work": work, "forward.request.tokens": tokens})
            for rid, trace_id, span_id, flags, work, tokens in links
        ),
        kind=SpanKind.INTERNAL,
        status=Status(StatusCode.ERROR, "ValueError: bad"),
        start_time=1_000,
        end_time=2_500,
        instrumentation_scope=InstrumentationScope("otel_stepspan", __version__),
    )
    sdk_resource, sdk = _only_span(encode_spans([sdk_span]).SerializeToString())
    assert len(ours.pop("spanId")) == len(sdk.pop("spanId"))  # ours is random
    # trace.proto: the low 8 bits of Span.flags SHOULD be the W3C trace flags; the SDK sets only
    # the is-remote bits. Ours carries both.
    assert ours.pop("flags") == sdk.pop("flags") | 0x01 == 0x301
    for ours_link, sdk_link in zip(ours["links"], sdk["links"]):
        assert ours_link.pop("flags") == sdk_link.pop("flags") | 0x01 == 0x301
    # Attribute order is not part of the data model: compare them as maps.
    assert {kv["key"]: kv["value"] for kv in ours.pop("attributes")} == {
        kv["key"]: kv["value"] for kv in sdk.pop("attributes")
    }
    assert ours == sdk
    assert ours_resource["resource"] == sdk_resource["resource"]
    assert ours_resource["scopeSpans"][0]["scope"] == sdk_resource["scopeSpans"][0]["scope"]
    assert {kv["key"]: kv["value"] for kv in ours_resource["resource"]["attributes"]}["service.name"] == {
        "stringValue": "encode-test"
    }


def _decoded(builder: SpanBuilder, spans: list) -> list[dict]:
    parsed = ExportTraceServiceRequest()
    parsed.ParseFromString(encode.export_request(builder.resource, builder.scope, spans))
    return MessageToDict(parsed)["resourceSpans"][0]["scopeSpans"][0]["spans"]


def _step(i: int, mode: str = "decode", parent=None, links=None) -> tuple:
    return (
        wire.STEP, 1_000_000 * i, 1_000_000 * i + 500_000, mode, 4, 0, 4, 0, 4, i, 0, parent, None, None,
        links, None, None,
    )


def test_links_beyond_the_limit_are_counted_not_carried():
    builder = SpanBuilder({"OTEL_SPAN_LINK_COUNT_LIMIT": "2"}, engine_pid=1)
    links = [(f"req-{i}", 0x100 + i, 0x200 + i, 1, "decode", 1) for i in range(5)]
    [step] = [s for s in _decoded(builder, builder.build(_step(1, links=links))) if s["name"] != "timeline"]
    assert [
        {kv["key"]: kv["value"] for kv in link["attributes"]}["request.id"]["stringValue"] for link in step["links"]
    ] == ["req-0", "req-1"]
    assert step["droppedLinksCount"] == 3
    attributes = {kv["key"]: kv["value"] for kv in step["attributes"]}
    assert attributes["forward.request_links"] == {"intValue": "2"}
    assert attributes["forward.request_links_dropped"] == {"intValue": "3"}


def test_a_whole_batch_is_linked_by_default():
    builder = SpanBuilder({}, engine_pid=1)
    links = [(f"req-{i}", 0x100 + i, 0x200 + i, 1, "decode", 1) for i in range(300)]
    [step] = [s for s in _decoded(builder, builder.build(_step(1, links=links))) if s["name"] != "timeline"]
    assert len(step["links"]) == 300 and "droppedLinksCount" not in step
    attributes = {kv["key"]: kv["value"] for kv in step["attributes"]}
    assert attributes["forward.request_links"] == {"intValue": "300"}
    assert "forward.request_links_dropped" not in attributes


def test_an_export_request_stays_under_the_collectors_message_limit():
    """Steps linking whole batches weigh tens of KB: an export of 512 of them must be split."""
    queue = deque([b"x" * 40_000] * 200 + [b"y" * (MAX_REQUEST_BYTES + 1)] + [b"z" * 10] * 3)
    batches = []
    while queue:
        batches.append(take_batch(queue, 512))
    assert [len(batch) for batch in batches] == [78, 78, 44, 1, 3]
    assert all(sum(map(len, batch)) <= MAX_REQUEST_BYTES for batch in batches if len(batch) > 1)
    assert sum(batches, []) == [b"x" * 40_000] * 200 + [b"y" * (MAX_REQUEST_BYTES + 1)] + [b"z" * 10] * 3


def test_a_step_without_request_tracing_has_no_link_attributes():
    builder = SpanBuilder({}, engine_pid=1)
    [step] = _decoded(builder, builder.build(_step(1)))
    assert "links" not in step
    assert not {kv["key"] for kv in step["attributes"]} & {"forward.request_links", "forward.request_links_dropped"}


def test_parentless_steps_share_a_timeline_window_whose_root_counts_them():
    builder = SpanBuilder({"OTEL_STEPSPAN_TIMELINE_STEPS": "3"}, engine_pid=7)
    builder.add_static(0, {"engine.name": "sglang", "engine.tp_rank": 0})
    built = []
    for i in range(1, 5):  # the 4th step closes the first window (3 steps)
        built += builder.build(_step(i, "prefill" if i == 1 else "decode"))
    built += builder.close_all()  # the engine is gone: the second window closes too
    spans = _decoded(builder, built)
    roots = [s for s in spans if s["name"] == "timeline"]
    steps = [s for s in spans if s["name"] != "timeline"]
    assert len(roots) == 2 and len(steps) == 4
    first, second = roots
    assert [s["traceId"] for s in steps] == [first["traceId"]] * 3 + [second["traceId"]]
    assert [s["parentSpanId"] for s in steps] == [first["spanId"]] * 3 + [second["spanId"]]
    assert "parentSpanId" not in first
    assert (int(first["startTimeUnixNano"]), int(first["endTimeUnixNano"])) == (1_000_000, 3_500_000)
    attributes = {kv["key"]: kv["value"] for kv in first["attributes"]}
    assert attributes["timeline.steps"] == {"intValue": "3"}
    assert attributes["timeline.steps.prefill"] == {"intValue": "1"}
    assert attributes["timeline.steps.decode"] == {"intValue": "2"}
    assert attributes["timeline.tokens"] == {"intValue": "12"}
    assert attributes["engine.name"] == {"stringValue": "sglang"}
    assert attributes["process.pid"] == {"intValue": "7"}


def test_a_window_closes_on_time_when_the_engine_goes_idle():
    builder = SpanBuilder({"OTEL_STEPSPAN_TIMELINE_SECONDS": "2"}, engine_pid=1)
    builder.build(_step(1))
    assert builder.close_due(1_000_000 + 1_999_000_000) == []
    [root] = _decoded(builder, builder.close_due(1_000_000 + 2_000_000_000))
    assert root["name"] == "timeline"
    assert builder.close_all() == []  # nothing open any more


def test_a_step_with_a_parent_of_its_own_keeps_it_and_stays_out_of_the_timeline():
    builder = SpanBuilder({}, engine_pid=1)
    [step] = _decoded(builder, builder.build(_step(1, parent=(0xAB, 0xCD, 1, False))))
    assert builder.close_all() == []
    assert base64.b64decode(step["traceId"]) == bytes.fromhex("00" * 15 + "ab")
    assert base64.b64decode(step["parentSpanId"]) == bytes.fromhex("00" * 7 + "cd")


def test_with_timelines_off_every_step_is_a_trace_of_its_own_and_unknown_counts_stay_minus_one():
    builder = SpanBuilder({"OTEL_STEPSPAN_SPAN_NAME": "mode", "OTEL_STEPSPAN_TIMELINE": "off"}, engine_pid=1)
    record = (wire.STEP, 10, 20, "prefill", 2, None, 0, 2, None, None, 9, None, None, None, None, None, None)
    spans = [_only_span(encode.export_request(builder.resource, builder.scope, list(builder.build(record))))[1]
             for _ in range(2)]
    assert spans[0]["traceId"] != spans[1]["traceId"]
    assert "parentSpanId" not in spans[0]
    assert spans[0]["name"] == "step[prefill]"
    attributes = {kv["key"]: kv["value"] for kv in spans[0]["attributes"]}
    assert attributes["forward.extend_tokens"] == {"intValue": "-1"}
    assert attributes["forward.label"] == {"stringValue": "step[prefill bs=2 toks=?]"}
    assert "forward.pass_id" not in attributes


def test_a_parent_that_is_not_sampled_drops_the_step_under_the_default_sampler():
    builder = SpanBuilder({}, engine_pid=1)
    record = (wire.STEP, 10, 20, "decode", 1, 0, 1, 0, 1, None, 0, (5, 6, 0, True), None, None, None, None, None)
    assert list(builder.build(record)) == []
    assert builder.not_sampled == 1


def test_the_exporter_runs_without_any_sitecustomize_but_can_import_us(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("")
    plain = tmp_path / "plain"
    plain.mkdir()
    env = exporter_environment({"PYTHONPATH": os.pathsep.join([str(site), str(plain)]), "OTEL_X": "1"})
    entries = env["PYTHONPATH"].split(os.pathsep)
    assert str(site) not in entries and str(plain) in entries
    assert (Path(entries[0]) / "otel_stepspan" / "__init__.py").is_file()
    assert env["OTEL_X"] == "1"


# -- delivery when the engine goes ---------------------------------------------------------------


def _env(endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid``, read from /proc as psutil (and so sglang's kill_process_tree)
    finds them: by parent pid, recursively."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if os.path.exists(f"/proc/{pid}")]
        time.sleep(0.1)
    return alive


@pytest.mark.parametrize("how,after_s", [("sigkill", 1.0), ("kill_process_tree", 1.0), ("sigkill", 0.0)])
def test_every_step_of_an_engine_killed_after_its_last_step_is_delivered(how, after_s):
    """Killed a second after its last step, or at once: every step is in the ring the moment its
    forward returns, and the exporter drains the ring once the engine is gone."""
    with OtlpReceiver("grpc") as receiver:
        program = subprocess.Popen(
            [sys.executable, str(PROGRAMS / "paced_steps.py"), "0", "200", "--forever", "--stop-after", "600"],
            # A schedule delay longer than the test: only the engine's death makes it export.
            env=_env(receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="600000"),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            read_until(program, "done 600")
            if after_s:
                time.sleep(after_s)
            else:
                program.kill()
            exporters = exporter_pids(program.pid)
            assert len(exporters) == 1
            assert exporters[0] not in _children(program.pid)  # detached from the engine's tree
            if how == "kill_process_tree":  # as sglang's Engine.shutdown() does
                for pid in _children(program.pid):
                    os.kill(pid, signal.SIGKILL)
            program.kill()
            program.wait(10)
            spans = receiver.wait_for_steps(600, timeout_s=30)
        finally:
            if program.poll() is None:
                program.kill()
        assert sorted(s.attributes["forward.batch_size"] for s in spans) == list(range(1, 601))
        assert _wait_gone(exporters, 15) == []  # delivered, the exporter left by itself


def test_a_sigkill_mid_run_loses_no_step_whose_forward_had_returned():
    with OtlpReceiver("grpc") as receiver:
        program = subprocess.Popen(
            [sys.executable, str(PROGRAMS / "paced_steps.py"), "0", "200", "--forever", "--report-every", "20"],
            env=_env(receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="600000"),
            stdout=subprocess.PIPE,
            text=True,
        )
        seen: list[tuple[float, int]] = []
        try:
            started = time.monotonic()
            while time.monotonic() - started < 4.0:
                line = program.stdout.readline()
                if line.startswith("steps "):
                    seen.append((time.monotonic(), int(line.split()[1])))
            program.kill()
            program.wait(10)
        finally:
            if program.poll() is None:
                program.kill()
        returned = seen[-1][1]  # printed after that many forwards had returned
        deadline = time.monotonic() + 30
        while receiver.step_count < returned and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # anything else in flight
        indices = sorted(s.attributes["forward.batch_size"] for s in receiver.steps())
    assert indices == list(range(1, len(indices) + 1))  # a prefix of the run, each step once
    assert len(indices) >= returned


def test_a_long_outage_with_steps_arriving_all_along_is_ridden_out_and_counted():
    """Steps keep arriving while the Collector is unreachable: the exporter backs off (new spans
    must not turn its retries into a busy loop, nor overflow its back-off), keeps what fits in
    its queue, counts the rest, and finally reports every span it could not deliver."""
    env = _env("http://127.0.0.1:9", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="8", OTEL_BSP_MAX_QUEUE_SIZE="64",
               OTEL_BSP_SCHEDULE_DELAY="10", OTEL_STEPSPAN_EXPORTER_LINGER="1")
    result = subprocess.run(
        [sys.executable, str(PROGRAMS / "paced_steps.py"), "4", "500"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "exporter process is gone" not in result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    final = [line for line in result.stderr.splitlines() if "otel_stepspan: lost" in line][-1]
    totals = [int(n) for n in final.rsplit("totals", 1)[1].split("/")]
    assert sum(totals) == summary["steps"] >= 1500
    assert summary["exporter_cpu_ns"] < 3e9  # backing off, not spinning: well under the run's 4 s


def test_retries_back_off_while_new_spans_keep_arriving(monkeypatch):
    """Unit level: a Collector that is down, spans arriving every few milliseconds. Each arrival
    must not cut the back-off short (that made a busy loop of retries, whose back-off exponent
    then overflowed and killed the exporter)."""
    import threading

    from otel_stepspan.exporter import process
    from otel_stepspan.exporter.transport import Sent

    read_fd, write_fd = os.pipe()
    status_read, status_write = os.pipe()
    exporter = process.Exporter(read_fd, status_write, os.getpid(), {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4",
        "OTEL_BSP_SCHEDULE_DELAY": "1", "OTEL_STEPSPAN_EXPORTER_LINGER": "1",
    })
    attempts = []

    class Down:
        endpoint = "http://127.0.0.1:9"

        def send(self, request: bytes) -> Sent:
            attempts.append(time.monotonic())
            return Sent(False, True, "UNAVAILABLE: down")

        def close(self) -> None:
            pass

    exporter.sender = Down()
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            exporter._enqueue([b"x"] * 4)
            time.sleep(0.003)

    feeder = threading.Thread(target=feed)
    feeder.start()
    runner = threading.Thread(target=exporter.export_until_done)
    runner.start()
    time.sleep(2.0)
    stop.set()
    feeder.join()
    with exporter.cond:
        exporter.input_done = True
        exporter.cond.notify_all()
    runner.join(30)
    for fd in (read_fd, write_fd, status_read, status_write):
        os.close(fd)
    assert not runner.is_alive()
    in_the_first_two_seconds = [t for t in attempts if t - attempts[0] < 2.0]
    # 0.1, 0.2, 0.4, 0.8 s (+-20%) fit in two seconds: about 5 attempts, never hundreds.
    assert 3 <= len(in_the_first_two_seconds) <= 8, len(in_the_first_two_seconds)
    assert exporter.failed > 0 and exporter.queue_full > 0


def test_a_step_the_pipe_cannot_carry_is_counted_as_failed_and_said_once(caplog):
    """An attribute value marshal cannot carry (an engine's own object in ``extra``) costs those
    steps, counted, with one log line: never an exception into the engine."""
    from otel_stepspan import StepInfo
    from otel_stepspan.sinks.otel_process import ExporterProcessSink

    sink = ExporterProcessSink()
    sink._start = lambda: None  # no exporter process: the frame is what is checked
    sink._started = True
    read_fd, write_fd = os.pipe()
    sink._fd = write_fd
    try:
        now = time.time_ns()
        for i in range(3):  # 2 ms apart: each one written at once
            end = now + 2_000_000 * i
            sink.submit(None, StepInfo("decode", 1, 0, 1, 0, 1), {}, None, end - 1000, end, None, {"x": object()})
        assert sink.failed_total == 3 and sink.emitted_total == 0
        assert sum("could not hand step spans" in r.getMessage() for r in caplog.records) == 1
    finally:
        # The sink stays registered for os.fork: with the number of a closed pipe it would close
        # whatever a later test's forked child holds under that number.
        sink._fd = None
        os.close(read_fd)
        os.close(write_fd)


def _exporter_for_messages() -> Any:
    from otel_stepspan.exporter import process

    read_fd, status_write = os.pipe()
    exporter = process.Exporter(read_fd, status_write, os.getpid(), {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_STEPSPAN_TIMELINE": "off",
    })
    os.close(read_fd)
    os.close(status_write)
    return exporter


def _attributes(exporter, index: int) -> dict:
    spans = _decoded(exporter.builder, list(exporter.queue))
    return {kv["key"]: next(iter(kv["value"].values())) for kv in spans[index]["attributes"]}


def test_a_step_described_in_the_exporter_is_the_step_described_in_the_engine():
    """sglang's steps cross as the plain fields its capture read; the exporter describes them
    with the same finish, and the span is the one the engine thread would have made."""
    from sglang_fakes import mixed_batch

    from otel_stepspan.integrations import sglang

    exporter = _exporter_for_messages()
    batch = mixed_batch([100, 156], 6)
    captured = sglang.capture(batch, pass_id=7)
    exporter._handle([
        (wire.STATIC, 0, {"engine.name": "sglang"}),
        (wire.FINISHER, 0, sglang.finish.in_exporter),
        (wire.CAPTURED, 10, 20, 0, 0, None, None, None, tuple(captured)),
        wire.step_message(sglang.finish(captured), 10, 20, 0, None, None, None),
    ])
    across, here = _decoded(exporter.builder, list(exporter.queue))
    assert across["name"] == here["name"] == "step[mixed bs=8 ext=256 dec=6]"
    assert across["attributes"] == here["attributes"]


def test_a_step_the_exporter_cannot_describe_is_labelled_unknown_and_said_once(capfd):
    exporter = _exporter_for_messages()
    exporter._handle([
        (wire.FINISHER, 0, "otel_stepspan.integrations.sglang:no_such_function"),
        (wire.FINISHER, 1, "os:system"),  # not ours: never imported
        (wire.FINISHER, 2, "otel_stepspan.integrations.sglang:finish_fields"),
        (wire.CAPTURED, 10, 20, 0, None, None, None, None, ("decode", 4)),
        (wire.CAPTURED, 30, 40, 1, None, None, None, None, ("decode", 4)),
        (wire.CAPTURED, 50, 60, 2, None, None, None, None, ("decode", 4)),  # fields it cannot read
        (wire.CAPTURED, 70, 80, 2, None, None, None, None, ("decode", 4)),
    ])
    names = [span["name"] for span in _decoded(exporter.builder, list(exporter.queue))]
    assert names == ["step[unknown bs=?]"] * 4
    err = capfd.readouterr().err
    assert err.count("cannot describe steps with") == 2 and err.count("could not describe a step") == 1

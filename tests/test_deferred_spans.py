"""Spans made off the engine thread keep the engine's timing, parent and thread structure."""

from __future__ import annotations

import threading
import time

from opentelemetry import trace

import otel_stepspan
from otel_stepspan import StepInfo, runtime, stats, step_span
from otel_stepspan.step import RequestLink


def test_deferred_spans_keep_start_end_and_parent(memory_spans):
    tracer = memory_spans.provider.get_tracer("engine")
    windows = []
    with tracer.start_as_current_span("request") as parent:
        for bs in (1, 2, 3):
            before = time.time_ns()
            with step_span(StepInfo("decode", bs, 0, bs, 0, bs)):
                time.sleep(0.02)
            windows.append((before, time.time_ns()))
    steps = [s for s in memory_spans.spans() if s.name.startswith("step[")]
    assert [s.name for s in steps] == ["step[decode bs=1]", "step[decode bs=2]", "step[decode bs=3]"]
    for span, (before, after) in zip(steps, windows):
        assert before <= span.start_time <= span.end_time <= after
        assert span.end_time - span.start_time >= 20_000_000
        assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
        assert span.context.trace_id == parent.get_span_context().trace_id


def test_with_timelines_off_steps_without_a_parent_are_roots(memory_spans, monkeypatch):
    monkeypatch.setenv("OTEL_STEPSPAN_TIMELINE", "off")
    runtime.refresh_settings()
    with step_span(StepInfo("idle", 0)):
        pass
    (span,) = memory_spans.spans()
    assert span.parent is None


def test_steps_without_a_parent_share_a_timeline_root_made_through_the_provider(memory_spans, monkeypatch):
    monkeypatch.setenv("OTEL_STEPSPAN_TIMELINE_STEPS", "4")
    runtime.refresh_settings()
    for bs in range(1, 7):  # 6 steps: a window of 4 and one of 2
        with step_span(StepInfo.from_counts(prefill_seqs=0, extend_tokens=0, decode_seqs=bs)):
            pass
    with step_span(StepInfo("idle", 0)):
        pass
    assert len(memory_spans.timelines()) == 1  # the second window is still open
    runtime._flush_at_exit()  # the process leaves: open windows close
    roots, steps = memory_spans.timelines(), memory_spans.spans()
    assert len(memory_spans.all_spans()) == len(roots) + len(steps)
    assert len(roots) == 2 and len(steps) == 7
    for root, members in ((roots[0], steps[:4]), (roots[1], steps[4:])):
        assert root.parent is None
        assert {(s.context.trace_id, s.parent.span_id) for s in members} == {
            (root.context.trace_id, root.context.span_id)
        }
        assert root.start_time == members[0].start_time and root.end_time == members[-1].end_time
    assert roots[0].attributes["timeline.steps"] == roots[0].attributes["timeline.steps.decode"] == 4
    assert roots[1].attributes["timeline.steps"] == 3
    assert roots[1].attributes["timeline.steps.idle"] == 1
    assert roots[0].attributes["timeline.tokens"] == 1 + 2 + 3 + 4


def test_steps_from_several_threads_are_well_formed_and_parented(memory_spans):
    tracer = memory_spans.provider.get_tracer("engine")
    parents: dict[int, int] = {}

    def scheduler(index: int) -> None:
        with tracer.start_as_current_span(f"scheduler-{index}") as parent:
            parents[index] = parent.get_span_context().span_id
            for step in range(50):
                with step_span(StepInfo("decode", 1000 * index + step)):
                    pass

    threads = [threading.Thread(target=scheduler, args=(i,)) for i in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    steps = [s for s in memory_spans.spans() if s.name.startswith("step[")]
    assert len(steps) == 200
    for span in steps:
        index = span.attributes["forward.batch_size"] // 1000
        assert span.parent.span_id == parents[index]
        assert span.end_time >= span.start_time
    assert len({s.context.span_id for s in steps}) == 200
    assert stats()["dropped"] == 0


def test_a_full_queue_drops_and_counts_instead_of_blocking(memory_spans, monkeypatch, caplog):
    monkeypatch.setenv("OTEL_STEPSPAN_MAX_PENDING", "10")
    from otel_stepspan import runtime

    runtime.refresh_settings()
    sink_lock = threading.Lock()
    from otel_stepspan.sinks import otel as otel_sink

    original_emit = otel_sink.DeferredSpanSink._emit

    def slow_emit(self, item):
        with sink_lock:
            return original_emit(self, item)

    monkeypatch.setattr(otel_sink.DeferredSpanSink, "_emit", slow_emit)
    with sink_lock:  # the span thread is stuck: a blocking queue would deadlock here
        for bs in range(1, 101):
            with step_span(StepInfo("decode", bs)):
                pass
    counters = stats()
    assert counters["dropped"] >= 89  # at most 10 queued (+1 being emitted)
    with caplog.at_level("WARNING", logger="otel_stepspan"):
        spans = memory_spans.spans()
    assert len(spans) + counters["dropped"] == 100
    assert any("dropped" in record.getMessage() for record in caplog.records)
    assert trace.get_tracer_provider() is memory_spans.provider


def test_a_batch_processor_with_a_small_queue_gets_every_span_and_drops_none(monkeypatch):
    """The span thread never outruns the provider's batch processor: a span made while that
    queue is full would be dropped there, unseen by stats()."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class SlowExporter(SpanExporter):
        def __init__(self) -> None:
            self.names: list[str] = []

        def export(self, spans):
            time.sleep(0.002)  # 4 spans per 2 ms: far slower than the span thread makes them
            self.names.extend(span.name for span in spans)
            return SpanExportResult.SUCCESS

    exporter = SlowExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=8, max_export_batch_size=4,
                                                   schedule_delay_millis=1))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    monkeypatch.setenv("OTEL_STEPSPAN_TIMELINE", "off")
    runtime.refresh_settings()
    for bs in range(1, 201):
        with step_span(StepInfo("decode", bs, 0, bs, 0, bs)):
            pass
    assert otel_stepspan.flush(30.0)
    provider.force_flush()
    assert sorted(exporter.names) == sorted(f"step[decode bs={bs}]" for bs in range(1, 201))
    assert stats()["dropped"] == 0
    provider.shutdown()


def test_suppress_instrumentation_silences_step_spans(memory_spans):
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    with suppress_instrumentation():
        with step_span(StepInfo("decode", 1)):
            pass
    with step_span(StepInfo("decode", 2)):
        pass
    assert [s.name for s in memory_spans.spans()] == ["step[decode bs=2]"]


def test_request_links_and_scheduler_context_reach_the_span_through_the_provider(memory_spans, monkeypatch):
    monkeypatch.setenv("OTEL_SPAN_LINK_COUNT_LIMIT", "2")
    runtime.refresh_settings()
    links = tuple(RequestLink(f"req-{i}", 0x100 + i, 0x200 + i, 1, "decode", 1) for i in range(3))
    with step_span(StepInfo("decode", 3, 0, 3, 0, 3, links=links, queued_requests=5, kv_tokens=640)):
        pass
    (span,) = memory_spans.spans()
    assert [(link.context.trace_id, link.context.span_id, link.context.is_remote) for link in span.links] == [
        (0x100, 0x200, True),
        (0x101, 0x201, True),
    ]
    assert dict(span.links[1].attributes) == {
        "request.id": "req-1",
        "forward.request.work": "decode",
        "forward.request.tokens": 1,
    }
    assert span.attributes["forward.request_links"] == 2
    assert span.attributes["forward.request_links_dropped"] == 1
    assert span.attributes["scheduler.queued_requests"] == 5
    assert span.attributes["scheduler.kv_tokens"] == 640


def test_a_providers_own_link_limit_bounds_the_links_and_the_counts(memory_spans):
    """Through a provider with the SDK's default limit (128 links), a step of 200 decodes
    carries 128 links and says so; the SDK would otherwise drop 72 while the count said 200."""
    runtime.refresh_settings()
    links = tuple(RequestLink(f"req-{i}", 0x100 + i, 0x200 + i, 1, "decode", 1) for i in range(200))
    with step_span(StepInfo("decode", 200, 0, 200, 0, 200, links=links)):
        pass
    (span,) = memory_spans.spans()
    assert [link.attributes["request.id"] for link in span.links] == [f"req-{i}" for i in range(128)]
    assert span.attributes["forward.request_links"] == 128
    assert span.attributes["forward.request_links_dropped"] == 72


def test_a_provider_built_from_the_variables_links_the_whole_batch(monkeypatch):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_stepspan.sinks.otel_provider import build_provider

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    provider = build_provider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    runtime.refresh_settings()
    links = tuple(RequestLink(f"req-{i}", 0x100 + i, 0x200 + i, 1, "decode", 1) for i in range(300))
    with step_span(StepInfo("decode", 300, 0, 300, 0, 300, links=links)):
        pass
    otel_stepspan.flush(5.0)
    (span,) = [s for s in memory.get_finished_spans() if s.name.startswith("step[")]
    assert len(span.links) == 300 and span.attributes["forward.request_links"] == 300
    assert "forward.request_links_dropped" not in span.attributes
    provider.shutdown()


def test_ids_do_not_follow_the_engines_seed_of_pythons_random(memory_spans):
    """Engines seed ``random`` (vLLM with 0 by default); the SDK's own ids come from it, so two
    engines with one seed would repeat ids. Step spans and timeline roots must not."""
    import random

    def run() -> set[tuple[int, int]]:
        random.seed(0)
        for bs in (1, 2, 3):
            with step_span(StepInfo("decode", bs, 0, bs, 0, bs)):
                pass
        runtime._flush_at_exit()
        return {(s.context.trace_id, s.context.span_id) for s in memory_spans.all_spans()}

    first = run()
    both = run()
    assert len(first) == 4  # three steps and their timeline root
    assert len(both) == 8  # the second run repeated none of the first run's ids


def test_forked_children_draw_ids_of_their_own():
    import os

    from otel_stepspan import ids

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_fd, ids.random_bits(64).to_bytes(8, "big"))
        os._exit(0)
    os.waitpid(pid, 0)
    child = int.from_bytes(os.read(read_fd, 8), "big")
    os.close(read_fd)
    os.close(write_fd)
    assert child != ids.random_bits(64)
